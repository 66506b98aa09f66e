// The named native ABI shared by bindings_cpu.cpp and bindings_cuda.cpp: every parameter struct
// of csrc/include/ftk/*.h bound as a Python class whose fields are its C++ members, built by
// keyword only, plus the constants Python mirrors (ftkernels._formats).
//
// The rules, enforced here once for every struct:
//   * every field is required and named exactly as the C++ member; a missing field, an unknown
//     keyword or a positional argument is a TypeError naming the struct and the field;
//   * pointers cross as Python ints (0 = null), enums as their int codes, validated here (an
//     unknown code is a ValueError naming the field); nested structs take the bound instance of
//     that struct; ints, floats and bools convert as pybind11 converts them (a float where an
//     int is expected is a TypeError naming the field);
//   * the launchers still run check(p) (null pointers, blocksizes, ranks: ValueError).
// The classes are py::module_local: the CPU and the CUDA module each register their own, so
// both import side by side; pybind11 still converts one module's instance for the other (the
// same C++ struct, compiled by the same compiler ABI), so mixing them is harmless.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ftk/lora.h"
#include "ftk/optim.h"
#include "ftk/quant.h"
#include "ftk/reft.h"

namespace ftk {
namespace bind {

namespace py = pybind11;

// ---- how one field crosses -----------------------------------------------------------------

// Enums: their codes and what an unknown one is called in the message.
template <typename E> struct EnumInfo;
template <> struct EnumInfo<DType> {
  static constexpr const char* what = "dtype code";
  static bool valid(int v) { return valid_dtype(v); }
};
template <> struct EnumInfo<QuantType> {
  static constexpr const char* what = "quant type code";
  static bool valid(int v) { return valid_quant_type(v); }
};
template <> struct EnumInfo<LoraMatmulMode> {
  static constexpr const char* what = "LoRA mode code";
  static bool valid(int v) { return v == 0 || v == 1; }
};
template <> struct EnumInfo<OptimKind> {
  static constexpr const char* what = "optimizer code";
  static bool valid(int v) { return v == 0 || v == 1; }
};

// Structs held inside others (LoraMatmulParams::W, ::dropout, Optim*Params::hyper, ...).
template <typename T> struct IsNested : std::false_type {};
template <> struct IsNested<Weight4bit> : std::true_type {};
template <> struct IsNested<Dropout> : std::true_type {};
template <> struct IsNested<OptimHyper> : std::true_type {};

inline std::string type_name(py::handle type) { return py::str(type.attr("__name__")); }

[[noreturn]] inline void type_error(const std::string& where, const std::string& expected, py::handle v) {
  throw py::type_error(where + ": expected " + expected + ", got " + type_name(py::type::handle_of(v)));
}

inline bool is_int(py::handle v) { return PyLong_Check(v.ptr()) && !PyBool_Check(v.ptr()); }

template <typename T>
T from_python(py::handle v, const std::string& where, const char* field) {
  if constexpr (std::is_pointer_v<T>) {
    if (!is_int(v)) type_error(where, "an int (a pointer, 0 for null)", v);
    const unsigned long long p = PyLong_AsUnsignedLongLong(v.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error(where + ": a pointer must be an int in [0, 2**64)");
    }
    return reinterpret_cast<T>(static_cast<uintptr_t>(p));
  } else if constexpr (std::is_enum_v<T>) {
    if (!is_int(v)) type_error(where, std::string("an int (") + EnumInfo<T>::what + ")", v);
    const long long code = PyLong_AsLongLong(v.ptr());
    if (PyErr_Occurred()) PyErr_Clear();
    else if (code >= INT32_MIN && code <= INT32_MAX && EnumInfo<T>::valid(static_cast<int>(code)))
      return static_cast<T>(static_cast<int>(code));
    throw py::value_error(std::string(field) + ": unknown " + EnumInfo<T>::what + " " +
                          std::string(py::str(v)));
  } else if constexpr (IsNested<T>::value) {
    // A cast, not isinstance: pybind11 also loads the other module's class of the same C++
    // struct (module_local types of one C++ type and ABI convert), as the launchers' arguments do.
    if (!v.is_none()) {
      try {
        return v.template cast<T>();
      } catch (const py::cast_error&) {
      }
    }
    type_error(where, "a " + type_name(py::type::of<T>()), v);
  } else if constexpr (std::is_same_v<T, uint64_t>) {
    // The dropout seed: an int64 (torch's seeds can be negative), used as its 64-bit pattern.
    if (!is_int(v)) type_error(where, "an int", v);
    try {
      return static_cast<uint64_t>(v.template cast<int64_t>());
    } catch (const py::cast_error&) {
      throw py::value_error(where + ": must fit in int64");
    }
  } else {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (PyFloat_Check(v.ptr())) type_error(where, "an int", v);
    }
    try {
      return v.template cast<T>();
    } catch (const py::cast_error&) {
      type_error(where, std::is_same_v<T, bool> ? "a bool" : std::is_integral_v<T> ? "an int in range" : "a float", v);
    }
  }
}

template <typename T>
py::object to_python(const T& v) {
  if constexpr (std::is_pointer_v<T>) return py::int_(reinterpret_cast<uintptr_t>(v));
  else if constexpr (std::is_enum_v<T>) return py::int_(static_cast<int>(v));
  else if constexpr (std::is_same_v<T, uint64_t>) return py::int_(static_cast<int64_t>(v));
  else return py::cast(v);
}

// ---- a struct as a keyword-only class --------------------------------------------------------

template <typename S>
class Params {
 public:
  Params(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc, py::module_local()), name_(name), fields_(std::make_shared<Fields>()) {}

  template <typename T>
  Params& field(const char* name, T S::*member) {
    const std::string where = name_ + "." + name;
    fields_->push_back(Field{name,
                             [member, where, name](S& s, py::handle v) { s.*member = from_python<T>(v, where, name); },
                             [member](const S& s) { return to_python<T>(s.*member); }});
    cls_.def_property_readonly(name, [member](const S& s) { return to_python<T>(s.*member); });
    return *this;
  }

  // Defines __init__ (keywords only, all required) and __repr__; call after the last field.
  void done() {
    auto fields = fields_;
    const std::string name = name_;
    cls_.def(py::init([fields, name](const py::args& args, const py::kwargs& kwargs) {
      if (!args.empty())
        throw py::type_error(name + " takes keyword arguments only (got " + std::to_string(args.size()) +
                             " positional)");
      for (auto item : kwargs) {
        const std::string key = py::str(item.first);
        bool known = false;
        for (const Field& f : *fields) known = known || key == f.name;
        if (!known) throw py::type_error(name + ": unknown field '" + key + "'");
      }
      S s{};
      for (const Field& f : *fields) {
        if (!kwargs.contains(f.name)) throw py::type_error(name + ": missing field '" + f.name + "'");
        const py::object v = kwargs[py::str(f.name)];
        f.set(s, v);
      }
      return s;
    }));
    cls_.def("__repr__", [fields, name](const S& s) {
      std::string r = name + "(";
      for (size_t i = 0; i < fields->size(); ++i) {
        if (i) r += ", ";
        r += (*fields)[i].name + "=" + std::string(py::repr((*fields)[i].get(s)));
      }
      return r + ")";
    });
    py::list names;
    for (const Field& f : *fields_) names.append(f.name);
    cls_.attr("_fields") = py::tuple(names);
  }

 private:
  struct Field {
    std::string name;
    std::function<void(S&, py::handle)> set;
    std::function<py::object(const S&)> get;
  };
  using Fields = std::vector<Field>;
  py::class_<S> cls_;
  std::string name_;
  std::shared_ptr<Fields> fields_;
};

// ---- the structs ---------------------------------------------------------------------------

// Nested structs first: py::isinstance<Weight4bit> needs the class registered.
inline void define_params(py::module_& m) {
  Params<Weight4bit>(m, "Weight4bit", "ftk::Weight4bit (quant.h): a 4-bit tensor viewed as rows x cols")
      .field("packed", &Weight4bit::packed).field("rows", &Weight4bit::rows).field("cols", &Weight4bit::cols)
      .field("blocksize", &Weight4bit::blocksize).field("quant_type", &Weight4bit::quant_type)
      .field("absmax", &Weight4bit::absmax).field("absmax_q", &Weight4bit::absmax_q)
      .field("nested_absmax", &Weight4bit::nested_absmax).field("nested_code", &Weight4bit::nested_code)
      .field("offset", &Weight4bit::offset).field("nested_blocksize", &Weight4bit::nested_blocksize)
      .done();
  Params<Dropout>(m, "Dropout", "ftk::Dropout (dropout.h): the hashed mask; seed is used as its 64 bits")
      .field("enabled", &Dropout::enabled).field("seed", &Dropout::seed)
      .field("threshold", &Dropout::threshold).field("scale", &Dropout::scale)
      .done();
  Params<OptimHyper>(m, "OptimHyper", "ftk::OptimHyper (optim.h): the step's fp32 scalars")
      .field("lr", &OptimHyper::lr).field("beta1", &OptimHyper::beta1).field("beta2", &OptimHyper::beta2)
      .field("eps", &OptimHyper::eps).field("decay", &OptimHyper::decay)
      .field("one_minus_beta1", &OptimHyper::one_minus_beta1).field("one_minus_beta2", &OptimHyper::one_minus_beta2)
      .field("step_size", &OptimHyper::step_size).field("bias_correction2_sqrt", &OptimHyper::bias_correction2_sqrt)
      .done();

  Params<Quantize4bitParams>(m, "Quantize4bitParams", "ftk::Quantize4bitParams (quant.h)")
      .field("A", &Quantize4bitParams::A).field("n", &Quantize4bitParams::n)
      .field("dtype", &Quantize4bitParams::dtype).field("blocksize", &Quantize4bitParams::blocksize)
      .field("quant_type", &Quantize4bitParams::quant_type).field("packed", &Quantize4bitParams::packed)
      .field("absmax", &Quantize4bitParams::absmax)
      .done();
  Params<Dequantize4bitParams>(m, "Dequantize4bitParams", "ftk::Dequantize4bitParams (quant.h)")
      .field("w", &Dequantize4bitParams::w).field("dtype", &Dequantize4bitParams::dtype)
      .field("out", &Dequantize4bitParams::out)
      .done();
  Params<QuantizeBlockwiseParams>(m, "QuantizeBlockwiseParams", "ftk::QuantizeBlockwiseParams (quant.h)")
      .field("A", &QuantizeBlockwiseParams::A).field("n", &QuantizeBlockwiseParams::n)
      .field("dtype", &QuantizeBlockwiseParams::dtype).field("code", &QuantizeBlockwiseParams::code)
      .field("blocksize", &QuantizeBlockwiseParams::blocksize).field("out", &QuantizeBlockwiseParams::out)
      .field("absmax", &QuantizeBlockwiseParams::absmax)
      .done();
  Params<DequantizeBlockwiseParams>(m, "DequantizeBlockwiseParams", "ftk::DequantizeBlockwiseParams (quant.h)")
      .field("A", &DequantizeBlockwiseParams::A).field("n", &DequantizeBlockwiseParams::n)
      .field("absmax", &DequantizeBlockwiseParams::absmax).field("code", &DequantizeBlockwiseParams::code)
      .field("blocksize", &DequantizeBlockwiseParams::blocksize).field("dtype", &DequantizeBlockwiseParams::dtype)
      .field("out", &DequantizeBlockwiseParams::out)
      .done();

  Params<LoraDropoutParams>(m, "LoraDropoutParams", "ftk::LoraDropoutParams (lora.h)")
      .field("in", &LoraDropoutParams::in).field("dtype", &LoraDropoutParams::dtype)
      .field("rows", &LoraDropoutParams::rows).field("cols", &LoraDropoutParams::cols)
      .field("dropout", &LoraDropoutParams::dropout).field("out", &LoraDropoutParams::out)
      .done();
  Params<LoraMatmulParams>(m, "LoraMatmulParams", "ftk::LoraMatmulParams (lora.h)")
      .field("mode", &LoraMatmulParams::mode).field("X", &LoraMatmulParams::X)
      .field("dtype", &LoraMatmulParams::dtype).field("M", &LoraMatmulParams::M).field("W", &LoraMatmulParams::W)
      .field("bias", &LoraMatmulParams::bias).field("bias_dtype", &LoraMatmulParams::bias_dtype)
      .field("L", &LoraMatmulParams::L).field("R", &LoraMatmulParams::R).field("R_dtype", &LoraMatmulParams::R_dtype)
      .field("r", &LoraMatmulParams::r).field("scaling", &LoraMatmulParams::scaling)
      .field("dropout", &LoraMatmulParams::dropout).field("out", &LoraMatmulParams::out)
      .done();

  Params<ReftForwardParams>(m, "ReftForwardParams", "ftk::ReftForwardParams (reft.h)")
      .field("h", &ReftForwardParams::h).field("dtype", &ReftForwardParams::dtype)
      .field("n_rows", &ReftForwardParams::n_rows).field("d", &ReftForwardParams::d).field("r", &ReftForwardParams::r)
      .field("rows", &ReftForwardParams::rows).field("n_slots", &ReftForwardParams::n_slots)
      .field("P", &ReftForwardParams::P).field("Q", &ReftForwardParams::Q).field("b", &ReftForwardParams::b)
      .field("dropout", &ReftForwardParams::dropout).field("out", &ReftForwardParams::out)
      .field("z", &ReftForwardParams::z)
      .done();
  Params<ReftBackwardParams>(m, "ReftBackwardParams", "ftk::ReftBackwardParams (reft.h)")
      .field("grad", &ReftBackwardParams::grad).field("h", &ReftBackwardParams::h)
      .field("dtype", &ReftBackwardParams::dtype).field("n_rows", &ReftBackwardParams::n_rows)
      .field("d", &ReftBackwardParams::d).field("r", &ReftBackwardParams::r)
      .field("rows", &ReftBackwardParams::rows).field("n_slots", &ReftBackwardParams::n_slots)
      .field("P", &ReftBackwardParams::P).field("Q", &ReftBackwardParams::Q).field("z", &ReftBackwardParams::z)
      .field("dropout", &ReftBackwardParams::dropout).field("dh", &ReftBackwardParams::dh)
      .field("dP", &ReftBackwardParams::dP).field("dQ", &ReftBackwardParams::dQ).field("db", &ReftBackwardParams::db)
      .field("workspace", &ReftBackwardParams::workspace)
      .field("workspace_floats", &ReftBackwardParams::workspace_floats)
      .done();

  Params<Optim32bitParams>(m, "Optim32bitParams", "ftk::Optim32bitParams (optim.h)")
      .field("kind", &Optim32bitParams::kind).field("param", &Optim32bitParams::param)
      .field("param_dtype", &Optim32bitParams::param_dtype).field("grad", &Optim32bitParams::grad)
      .field("grad_dtype", &Optim32bitParams::grad_dtype).field("n", &Optim32bitParams::n)
      .field("state1", &Optim32bitParams::state1).field("state2", &Optim32bitParams::state2)
      .field("hyper", &Optim32bitParams::hyper)
      .done();
  Params<Optim8bitParams>(m, "Optim8bitParams", "ftk::Optim8bitParams (optim.h)")
      .field("param", &Optim8bitParams::param).field("param_dtype", &Optim8bitParams::param_dtype)
      .field("grad", &Optim8bitParams::grad).field("grad_dtype", &Optim8bitParams::grad_dtype)
      .field("n", &Optim8bitParams::n).field("state1", &Optim8bitParams::state1)
      .field("state2", &Optim8bitParams::state2).field("absmax1", &Optim8bitParams::absmax1)
      .field("absmax2", &Optim8bitParams::absmax2).field("code1", &Optim8bitParams::code1)
      .field("code2", &Optim8bitParams::code2).field("hyper", &Optim8bitParams::hyper)
      .done();
}

// ---- the constants -------------------------------------------------------------------------

// module.constants: the values ftkernels._formats mirrors (tests/test_native_abi.py compares
// each pair). The blocksize lists are read off the checks themselves.
inline void define_constants(py::module_& m) {
  py::dict c;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::Float32);
  dtypes["float16"] = static_cast<int>(DType::Float16);
  dtypes["bfloat16"] = static_cast<int>(DType::BFloat16);
  c["DTYPE_CODE"] = dtypes;
  py::dict qtypes;
  qtypes["nf4"] = static_cast<int>(QuantType::NF4);
  qtypes["fp4"] = static_cast<int>(QuantType::FP4);
  c["QUANT_TYPE_CODE"] = qtypes;
  py::list bs4, bs8;
  for (int64_t bs = 1; bs <= (int64_t{1} << 20); bs *= 2) {
    if (valid_blocksize_4bit(bs)) bs4.append(bs);
    if (valid_blocksize_8bit(bs)) bs8.append(bs);
  }
  c["BLOCKSIZES_4BIT"] = py::tuple(bs4);
  c["BLOCKSIZES_8BIT"] = py::tuple(bs8);
  c["NESTED_BLOCKSIZE"] = kNestedBlocksize;
  c["LORA_FORWARD"] = static_cast<int>(LoraMatmulMode::Forward);
  c["LORA_GRAD_INPUT"] = static_cast<int>(LoraMatmulMode::GradInput);
  c["LORA_MAX_RANK"] = kLoraMaxRank;
  c["REFT_MAX_RANK"] = kReftMaxRank;
  c["OPTIM_ADAMW"] = static_cast<int>(OptimKind::AdamW);
  c["OPTIM_LION"] = static_cast<int>(OptimKind::Lion);
  c["OPTIM_BLOCK"] = kOptimBlock;
  c["OPTIM_HYPER_FIELDS"] = m.attr("OptimHyper").attr("_fields");  // ftk::OptimHyper's order
  m.attr("constants") = c;
}

}  // namespace bind
}  // namespace ftk
