// The CPU module: integers in (pointers, sizes, enum codes), launchers out, GIL released.
// Python (ftkernels/backends/cpu.py) checked every argument first; the launchers check again.
#include <pybind11/pybind11.h>

#include "ftk/lora_args.h"
#include "ftk/optim_args.h"
#include "ftk/quant_args.h"
#include "ftk/reft_args.h"

namespace py = pybind11;
using namespace pybind11::literals;


PYBIND11_MODULE(_ftk_cpu, m) {
  m.doc() = "ftkernels CPU kernels (raw pointers; use ftkernels.* instead)";
  auto release = py::call_guard<py::gil_scoped_release>();

  // Tests only: caps the instruction set (0 baseline x86-64, 1 AVX2, 2 AVX-512) so that
  // every kernel variant runs on one machine; returns the previous cap.
  m.def("set_isa_limit", [](int level) {
    FTK_CHECK_ARG(level >= 0 && level <= 2, "level must be 0, 1 or 2");
    return static_cast<int>(ftk::set_cpu_isa_limit(static_cast<ftk::CpuIsa>(level)));
  }, "level"_a);

  m.def("quantize_4bit", [](uintptr_t A, int64_t n, int dtype, int64_t blocksize, int quant_type,
                            uintptr_t packed, uintptr_t absmax, int num_threads) {
    ftk::quantize_4bit_cpu(ftk::args::quantize_4bit(A, n, dtype, blocksize, quant_type, packed, absmax), num_threads);
  }, "A"_a, "n"_a, "dtype"_a, "blocksize"_a, "quant_type"_a, "packed"_a, "absmax"_a, "num_threads"_a, release);

  m.def("dequantize_4bit", [](uintptr_t packed, int64_t n, int64_t blocksize, int quant_type,
                              uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax,
                              uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                              int dtype, uintptr_t out, int num_threads) {
    ftk::dequantize_4bit_cpu(ftk::args::dequantize_4bit(packed, n, blocksize, quant_type, absmax, absmax_q,
                                                         nested_absmax, nested_code, offset, nested_blocksize,
                                                         dtype, out),
                             num_threads);
  }, "packed"_a, "n"_a, "blocksize"_a, "quant_type"_a, "absmax"_a, "absmax_q"_a, "nested_absmax"_a,
     "nested_code"_a, "offset"_a, "nested_blocksize"_a, "dtype"_a, "out"_a, "num_threads"_a, release);

  m.def("quantize_blockwise", [](uintptr_t A, int64_t n, int dtype, uintptr_t code, int64_t blocksize,
                                 uintptr_t out, uintptr_t absmax, int num_threads) {
    ftk::quantize_blockwise_cpu(ftk::args::quantize_blockwise(A, n, dtype, code, blocksize, out, absmax), num_threads);
  }, "A"_a, "n"_a, "dtype"_a, "code"_a, "blocksize"_a, "out"_a, "absmax"_a, "num_threads"_a, release);

  m.def("dequantize_blockwise", [](uintptr_t A, int64_t n, uintptr_t absmax, uintptr_t code,
                                   int64_t blocksize, int dtype, uintptr_t out, int num_threads) {
    ftk::dequantize_blockwise_cpu(ftk::args::dequantize_blockwise(A, n, absmax, code, blocksize, dtype, out),
                                  num_threads);
  }, "A"_a, "n"_a, "absmax"_a, "code"_a, "blocksize"_a, "dtype"_a, "out"_a, "num_threads"_a, release);

  // Elements [begin, end) of a 4-bit tensor of n elements, into out (element begin first).
  m.def("dequantize_4bit_range", [](uintptr_t packed, int64_t n, int64_t blocksize, int quant_type,
                                    uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax,
                                    uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                                    int dtype, uintptr_t out, int64_t begin, int64_t end, int num_threads) {
    ftk::dequantize_4bit_range_cpu(ftk::args::dequantize_4bit(packed, n, blocksize, quant_type, absmax, absmax_q,
                                                               nested_absmax, nested_code, offset, nested_blocksize,
                                                               dtype, out),
                                   begin, end, num_threads);
  }, "packed"_a, "n"_a, "blocksize"_a, "quant_type"_a, "absmax"_a, "absmax_q"_a, "nested_absmax"_a,
     "nested_code"_a, "offset"_a, "nested_blocksize"_a, "dtype"_a, "out"_a, "begin"_a, "end"_a, "num_threads"_a,
     release);

  // seed: an int64 (torch's seed tensors can be negative), used as its 64-bit pattern.
  m.def("lora_dropout", [](uintptr_t in, int dtype, int64_t rows, int64_t cols, bool enabled, int64_t seed,
                           uint32_t threshold, float scale, uintptr_t out, int num_threads) {
    ftk::lora_dropout_cpu(ftk::args::lora_dropout(in, dtype, rows, cols, enabled, static_cast<uint64_t>(seed),
                                                  threshold, scale, out),
                          num_threads);
  }, "in"_a, "dtype"_a, "rows"_a, "cols"_a, "enabled"_a, "seed"_a, "threshold"_a, "scale"_a, "out"_a,
     "num_threads"_a, release);

  // Fused ReFT edits (reft.h): the arguments of _native.reft_forward_args / reft_backward_args.
  m.def("reft_forward", [](uintptr_t h, int dtype, int64_t n_rows, int64_t d, int64_t r, uintptr_t rows,
                           int64_t n_slots, uintptr_t P, uintptr_t Q, uintptr_t b, bool enabled, int64_t seed,
                           uint32_t threshold, float scale, uintptr_t out, uintptr_t z, int num_threads) {
    ftk::reft_forward_cpu(ftk::args::reft_forward(h, dtype, n_rows, d, r, rows, n_slots, P, Q, b, enabled,
                                                  static_cast<uint64_t>(seed), threshold, scale, out, z),
                          num_threads);
  }, "h"_a, "dtype"_a, "n_rows"_a, "d"_a, "r"_a, "rows"_a, "n_slots"_a, "P"_a, "Q"_a, "b"_a, "enabled"_a, "seed"_a,
     "threshold"_a, "scale"_a, "out"_a, "z"_a, "num_threads"_a, release);

  m.def("reft_backward", [](uintptr_t grad, uintptr_t h, int dtype, int64_t n_rows, int64_t d, int64_t r,
                            uintptr_t rows, int64_t n_slots, uintptr_t P, uintptr_t Q, uintptr_t z, bool enabled,
                            int64_t seed, uint32_t threshold, float scale, uintptr_t dh, uintptr_t dP, uintptr_t dQ,
                            uintptr_t db, uintptr_t workspace, int64_t workspace_floats, int num_threads) {
    ftk::reft_backward_cpu(ftk::args::reft_backward(grad, h, dtype, n_rows, d, r, rows, n_slots, P, Q, z, enabled,
                                                    static_cast<uint64_t>(seed), threshold, scale, dh, dP, dQ, db,
                                                    workspace, workspace_floats),
                           num_threads);
  }, "grad"_a, "h"_a, "dtype"_a, "n_rows"_a, "d"_a, "r"_a, "rows"_a, "n_slots"_a, "P"_a, "Q"_a, "z"_a,
     "enabled"_a, "seed"_a, "threshold"_a, "scale"_a, "dh"_a, "dP"_a, "dQ"_a, "db"_a, "workspace"_a,
     "workspace_floats"_a, "num_threads"_a, release);

  // Fused optimizer steps (optim.h): the arguments of _native.optim_32bit_args / optim_8bit_args.
  m.def("optim_32bit_step", [](int kind, uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, int64_t n,
                               uintptr_t state1, uintptr_t state2, float lr, float beta1, float beta2, float eps,
                               float decay, float omb1, float omb2, float step_size, float bc2_sqrt, int num_threads) {
    ftk::optim_32bit_step_cpu(
        ftk::args::optim_32bit(kind, param, param_dtype, grad, grad_dtype, n, state1, state2,
                               ftk::args::optim_hyper(lr, beta1, beta2, eps, decay, omb1, omb2, step_size, bc2_sqrt)),
        num_threads);
  }, "kind"_a, "param"_a, "param_dtype"_a, "grad"_a, "grad_dtype"_a, "n"_a, "state1"_a, "state2"_a, "lr"_a, "beta1"_a,
     "beta2"_a, "eps"_a, "decay"_a, "one_minus_beta1"_a, "one_minus_beta2"_a, "step_size"_a,
     "bias_correction2_sqrt"_a, "num_threads"_a, release);

  m.def("optim_8bit_step", [](uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, int64_t n,
                              uintptr_t state1, uintptr_t state2, uintptr_t absmax1, uintptr_t absmax2,
                              uintptr_t code1, uintptr_t code2, float lr, float beta1, float beta2, float eps,
                              float decay, float omb1, float omb2, float step_size, float bc2_sqrt, int num_threads) {
    ftk::optim_8bit_step_cpu(
        ftk::args::optim_8bit(param, param_dtype, grad, grad_dtype, n, state1, state2, absmax1, absmax2, code1, code2,
                              ftk::args::optim_hyper(lr, beta1, beta2, eps, decay, omb1, omb2, step_size, bc2_sqrt)),
        num_threads);
  }, "param"_a, "param_dtype"_a, "grad"_a, "grad_dtype"_a, "n"_a, "state1"_a, "state2"_a, "absmax1"_a, "absmax2"_a,
     "code1"_a, "code2"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "decay"_a, "one_minus_beta1"_a,
     "one_minus_beta2"_a, "step_size"_a, "bias_correction2_sqrt"_a, "num_threads"_a, release);
}
