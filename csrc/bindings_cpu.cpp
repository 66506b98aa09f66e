// The CPU module: the parameter structs (bindings_params.h) in, launchers out, GIL released.
// Python (ftkernels/backends/cpu.py) checked every tensor first and builds each struct by name
// (ftkernels/_native.py); the launchers check the struct again (check(p): ValueError).
#include <pybind11/pybind11.h>

#include "bindings_params.h"
#include "ftk/lora.h"
#include "ftk/optim.h"
#include "ftk/quant.h"
#include "ftk/reft.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_ftk_cpu, m) {
  m.doc() = "ftkernels CPU kernels (parameter structs of raw pointers; use ftkernels.* instead)";
  ftk::bind::define_params(m);
  ftk::bind::define_constants(m);
  auto release = py::call_guard<py::gil_scoped_release>();

  // Tests only: caps the instruction set (0 baseline x86-64, 1 AVX2, 2 AVX-512) so that
  // every kernel variant runs on one machine; returns the previous cap.
  m.def("set_isa_limit", [](int level) {
    FTK_CHECK_ARG(level >= 0 && level <= 2, "level must be 0, 1 or 2");
    return static_cast<int>(ftk::set_cpu_isa_limit(static_cast<ftk::CpuIsa>(level)));
  }, "level"_a);

  // Every launcher takes (params, num_threads): num_threads is torch.get_num_threads().
  m.def("quantize_4bit", &ftk::quantize_4bit_cpu, "params"_a, "num_threads"_a, release);
  m.def("dequantize_4bit", &ftk::dequantize_4bit_cpu, "params"_a, "num_threads"_a, release);
  // Elements [begin, end) of params.w into params.out (element begin first).
  m.def("dequantize_4bit_range", &ftk::dequantize_4bit_range_cpu, "params"_a, "begin"_a, "end"_a, "num_threads"_a,
        release);
  m.def("quantize_blockwise", &ftk::quantize_blockwise_cpu, "params"_a, "num_threads"_a, release);
  m.def("dequantize_blockwise", &ftk::dequantize_blockwise_cpu, "params"_a, "num_threads"_a, release);

  m.def("lora_dropout", &ftk::lora_dropout_cpu, "params"_a, "num_threads"_a, release);

  m.def("reft_forward", &ftk::reft_forward_cpu, "params"_a, "num_threads"_a, release);
  m.def("reft_backward", &ftk::reft_backward_cpu, "params"_a, "num_threads"_a, release);

  m.def("optim_32bit_step", &ftk::optim_32bit_step_cpu, "params"_a, "num_threads"_a, release);
  m.def("optim_8bit_step", &ftk::optim_8bit_step_cpu, "params"_a, "num_threads"_a, release);
}
