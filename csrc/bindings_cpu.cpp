// The CPU module: the parameter structs (bindings_params.h) in, launchers out, GIL released.
// Python (ftkernels/backends/cpu.py) checked every tensor first and builds each struct by name
// (ftkernels/_native.py); the launchers check the struct again (check(p): ValueError).
#include <pybind11/pybind11.h>

#include "bindings_params.h"
#include "ftk/cpu_isa.h"
#include "ftk/lora.h"
#include "ftk/optim.h"
#include "ftk/quant.h"
#include "ftk/reft.h"

namespace py = pybind11;
using namespace pybind11::literals;

// How this module was built: CMakeLists.txt passes these to this file only; a build without
// CMake says "unknown".
#ifndef FTK_BUILD_COMPILER
#define FTK_BUILD_COMPILER "unknown"
#endif
#ifndef FTK_BUILD_TYPE
#define FTK_BUILD_TYPE "unknown"
#endif
#ifndef FTK_BUILD_FLAGS
#define FTK_BUILD_FLAGS "unknown"
#endif

namespace {

// The instruction set every function may assume: the compiler's target, which -march raises.
constexpr const char* kIsaBaseline =
#if defined(__AVX512F__)
    "avx512f";
#elif defined(__AVX2__)
    "avx2";
#elif defined(__x86_64__)
    "x86-64";
#elif defined(__aarch64__)
    "aarch64";
#else
    "generic";
#endif

const char* isa_name(ftk::CpuIsa isa) {
  switch (isa) {
    case ftk::CpuIsa::AVX512: return "avx512";
    case ftk::CpuIsa::AVX2: return "avx2";
    case ftk::CpuIsa::Base: break;
  }
  return "baseline";
}

}  // namespace

PYBIND11_MODULE(_ftk_cpu, m) {
  m.doc() = "ftkernels CPU kernels (parameter structs of raw pointers; use ftkernels.* instead)";
  ftk::bind::define_params(m);
  ftk::bind::define_constants(m);
  auto release = py::call_guard<py::gil_scoped_release>();

  // Caps the instruction-set level of every CPU kernel (0 baseline, 1 AVX2, 2 AVX-512;
  // cpu_isa.h): FTK_CPU_ISA (ftkernels/_native.py), and tests that run each level on one
  // machine. A cap above what the CPU has runs its widest level. Returns the previous cap.
  m.def("set_isa_limit", [](int level) {
    FTK_CHECK_ARG(level >= 0 && level <= 2, "level must be 0, 1 or 2");
    return static_cast<int>(ftk::set_cpu_isa_limit(static_cast<ftk::CpuIsa>(level)));
  }, "level"_a);
  m.def("isa_limit", []() { return static_cast<int>(ftk::cpu_isa_limit()); });
  // The level the kernels run at now ("avx512", "avx2" or "baseline"), and the widest this
  // CPU has.
  m.def("cpu_isa", []() { return isa_name(ftk::cpu_isa_level()); });
  m.def("cpu_isa_max", []() { return isa_name(ftk::cpu_isa_max()); });
  // A feature of this CPU by its /proc/cpuinfo name ("avx512_bf16", "amx_bf16"), whatever
  // the cap.
  m.def("cpu_has", [](const std::string& feature) { return ftk::cpu_has(feature.c_str()); }, "feature"_a);

  // Build facts for bug reports (`ftk doctor`): the kernels are compiled for the baseline and
  // once more for each wider level (cpu_isa.h), the level picked at run time.
  py::dict info;
  info["compiler"] = FTK_BUILD_COMPILER;
  info["build_type"] = FTK_BUILD_TYPE;
  info["flags"] = FTK_BUILD_FLAGS;
#if defined(FTK_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["isa_baseline"] = kIsaBaseline;
#if FTK_X86
  info["isa_levels"] = "baseline, avx2 (avx2+fma+f16c), avx512 (avx512f+avx512bw+avx512vl)";
#else
  info["isa_levels"] = "baseline";
#endif
  m.attr("build_info") = info;

  // Every launcher takes (params, num_threads): num_threads is torch.get_num_threads().
  m.def("quantize_4bit", &ftk::quantize_4bit_cpu, "params"_a, "num_threads"_a, release);
  m.def("dequantize_4bit", &ftk::dequantize_4bit_cpu, "params"_a, "num_threads"_a, release);
  // Elements [begin, end) of params.w into params.out (element begin first).
  m.def("dequantize_4bit_range", &ftk::dequantize_4bit_range_cpu, "params"_a, "begin"_a, "end"_a, "num_threads"_a,
        release);
  // Columns [col0, col1) of params.w into params.out, rows x (col1 - col0).
  m.def("dequantize_4bit_cols", &ftk::dequantize_4bit_cols_cpu, "params"_a, "col0"_a, "col1"_a, "num_threads"_a,
        release);
  m.def("quantize_blockwise", &ftk::quantize_blockwise_cpu, "params"_a, "num_threads"_a, release);
  m.def("dequantize_blockwise", &ftk::dequantize_blockwise_cpu, "params"_a, "num_threads"_a, release);

  m.def("lora_dropout", &ftk::lora_dropout_cpu, "params"_a, "num_threads"_a, release);

  m.def("reft_forward", &ftk::reft_forward_cpu, "params"_a, "num_threads"_a, release);
  m.def("reft_backward", &ftk::reft_backward_cpu, "params"_a, "num_threads"_a, release);

  m.def("optim_32bit_step", &ftk::optim_32bit_step_cpu, "params"_a, "num_threads"_a, release);
  m.def("optim_8bit_step", &ftk::optim_8bit_step_cpu, "params"_a, "num_threads"_a, release);
}
