// The CUDA module: integers in (pointers, sizes, enum codes, a cudaStream_t), launchers out,
// GIL released. Python (ftkernels/backends/cuda.py) checked every argument first, made the
// tensors' device current and passes torch's current stream; the launchers check again.
// cudart is linked statically, so importing this module needs no GPU and no CUDA toolkit: a
// call without a usable device raises RuntimeError naming the CUDA call that failed.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "ftk/lora_args.h"
#include "ftk/lora_cuda.h"
#include "ftk/optim_args.h"
#include "ftk/optim_cuda.h"
#include "ftk/paged_cuda.h"
#include "ftk/quant_args.h"
#include "ftk/quant_cuda.h"
#include "ftk/reft_args.h"
#include "ftk/reft_cuda.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

cudaStream_t stream_arg(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_ftk_cuda, m) {
  m.doc() = "ftkernels CUDA kernels (raw pointers and streams; use ftkernels.* instead)";
  auto release = py::call_guard<py::gil_scoped_release>();

  m.def("quantize_4bit", [](uintptr_t A, int64_t n, int dtype, int64_t blocksize, int quant_type,
                            uintptr_t packed, uintptr_t absmax, uintptr_t stream) {
    ftk::quantize_4bit_cuda(ftk::args::quantize_4bit(A, n, dtype, blocksize, quant_type, packed, absmax), stream_arg(stream));
  }, "A"_a, "n"_a, "dtype"_a, "blocksize"_a, "quant_type"_a, "packed"_a, "absmax"_a, "stream"_a, release);

  m.def("dequantize_4bit", [](uintptr_t packed, int64_t n, int64_t blocksize, int quant_type,
                              uintptr_t absmax, uintptr_t absmax_q, uintptr_t nested_absmax,
                              uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                              int dtype, uintptr_t out, uintptr_t stream) {
    ftk::dequantize_4bit_cuda(ftk::args::dequantize_4bit(packed, n, blocksize, quant_type, absmax, absmax_q,
                                                         nested_absmax, nested_code, offset, nested_blocksize,
                                                         dtype, out),
                             stream_arg(stream));
  }, "packed"_a, "n"_a, "blocksize"_a, "quant_type"_a, "absmax"_a, "absmax_q"_a, "nested_absmax"_a,
     "nested_code"_a, "offset"_a, "nested_blocksize"_a, "dtype"_a, "out"_a, "stream"_a, release);

  m.def("quantize_blockwise", [](uintptr_t A, int64_t n, int dtype, uintptr_t code, int64_t blocksize,
                                 uintptr_t out, uintptr_t absmax, uintptr_t stream) {
    ftk::quantize_blockwise_cuda(ftk::args::quantize_blockwise(A, n, dtype, code, blocksize, out, absmax), stream_arg(stream));
  }, "A"_a, "n"_a, "dtype"_a, "code"_a, "blocksize"_a, "out"_a, "absmax"_a, "stream"_a, release);

  m.def("dequantize_blockwise", [](uintptr_t A, int64_t n, uintptr_t absmax, uintptr_t code,
                                   int64_t blocksize, int dtype, uintptr_t out, uintptr_t stream) {
    ftk::dequantize_blockwise_cuda(ftk::args::dequantize_blockwise(A, n, absmax, code, blocksize, dtype, out),
                                  stream_arg(stream));
  }, "A"_a, "n"_a, "absmax"_a, "code"_a, "blocksize"_a, "dtype"_a, "out"_a, "stream"_a, release);

  // Fused LoRA (lora.h): the arguments of _native.lora_dropout_args / lora_matmul_args, then the
  // stream. The seed crosses as int64 (a torch int64 may be negative) and is used as its 64 bits.
  m.def("lora_dropout", [](uintptr_t in, int dtype, int64_t rows, int64_t cols, bool enabled, int64_t seed,
                           uint32_t threshold, float scale, uintptr_t out, uintptr_t stream) {
    ftk::lora_dropout_cuda(ftk::args::lora_dropout(in, dtype, rows, cols, enabled, static_cast<uint64_t>(seed),
                                                   threshold, scale, out),
                           stream_arg(stream));
  }, "in"_a, "dtype"_a, "rows"_a, "cols"_a, "enabled"_a, "seed"_a, "threshold"_a, "scale"_a, "out"_a, "stream"_a,
     release);

  m.def("lora_matmul", [](int mode, uintptr_t X, int dtype, int64_t M, uintptr_t packed, int64_t rows, int64_t cols,
                          int64_t blocksize, int quant_type, uintptr_t absmax, uintptr_t absmax_q,
                          uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                          uintptr_t bias, int bias_dtype, uintptr_t L, uintptr_t R, int R_dtype, int64_t r,
                          float scaling, bool enabled, int64_t seed, uint32_t threshold, float scale, uintptr_t out,
                          uintptr_t stream) {
    ftk::lora_matmul_cuda(ftk::args::lora_matmul(mode, X, dtype, M, packed, rows, cols, blocksize, quant_type, absmax,
                                                 absmax_q, nested_absmax, nested_code, offset, nested_blocksize, bias,
                                                 bias_dtype, L, R, R_dtype, r, scaling, enabled,
                                                 static_cast<uint64_t>(seed), threshold, scale, out),
                          stream_arg(stream));
  }, "mode"_a, "X"_a, "dtype"_a, "M"_a, "packed"_a, "rows"_a, "cols"_a, "blocksize"_a, "quant_type"_a, "absmax"_a,
     "absmax_q"_a, "nested_absmax"_a, "nested_code"_a, "offset"_a, "nested_blocksize"_a, "bias"_a, "bias_dtype"_a,
     "L"_a, "R"_a, "R_dtype"_a, "r"_a, "scaling"_a, "enabled"_a, "seed"_a, "threshold"_a, "scale"_a, "out"_a,
     "stream"_a, release);

  // Fused ReFT edits (reft.h): the arguments of _native.reft_forward_args / reft_backward_args, then
  // the stream; the seed crosses as int64 as for LoRA.
  m.def("reft_forward", [](uintptr_t h, int dtype, int64_t n_rows, int64_t d, int64_t r, uintptr_t rows,
                           int64_t n_slots, uintptr_t P, uintptr_t Q, uintptr_t b, bool enabled, int64_t seed,
                           uint32_t threshold, float scale, uintptr_t out, uintptr_t z, uintptr_t stream) {
    ftk::reft_forward_cuda(ftk::args::reft_forward(h, dtype, n_rows, d, r, rows, n_slots, P, Q, b, enabled,
                                                   static_cast<uint64_t>(seed), threshold, scale, out, z),
                           stream_arg(stream));
  }, "h"_a, "dtype"_a, "n_rows"_a, "d"_a, "r"_a, "rows"_a, "n_slots"_a, "P"_a, "Q"_a, "b"_a, "enabled"_a, "seed"_a,
     "threshold"_a, "scale"_a, "out"_a, "z"_a, "stream"_a, release);

  // Floats of workspace reft_backward needs (on the current device) when dP, dQ, db are wanted.
  m.def("reft_backward_workspace", [](int64_t n_slots, int64_t d, int64_t r) {
    return ftk::reft_backward_workspace_cuda(n_slots, d, r);
  }, "n_slots"_a, "d"_a, "r"_a, release);

  m.def("reft_backward", [](uintptr_t grad, uintptr_t h, int dtype, int64_t n_rows, int64_t d, int64_t r,
                            uintptr_t rows, int64_t n_slots, uintptr_t P, uintptr_t Q, uintptr_t z, bool enabled,
                            int64_t seed, uint32_t threshold, float scale, uintptr_t dh, uintptr_t dP, uintptr_t dQ,
                            uintptr_t db, uintptr_t workspace, int64_t workspace_floats, uintptr_t stream) {
    ftk::reft_backward_cuda(ftk::args::reft_backward(grad, h, dtype, n_rows, d, r, rows, n_slots, P, Q, z, enabled,
                                                     static_cast<uint64_t>(seed), threshold, scale, dh, dP, dQ, db,
                                                     workspace, workspace_floats),
                            stream_arg(stream));
  }, "grad"_a, "h"_a, "dtype"_a, "n_rows"_a, "d"_a, "r"_a, "rows"_a, "n_slots"_a, "P"_a, "Q"_a, "z"_a, "enabled"_a,
     "seed"_a, "threshold"_a, "scale"_a, "dh"_a, "dP"_a, "dQ"_a, "db"_a, "workspace"_a, "workspace_floats"_a,
     "stream"_a, release);

  // Managed memory for paged optimizer states (paged_cuda.h). Pointers cross as integers; a
  // zero-byte allocation is 0, and freeing or prefetching 0 does nothing. Python
  // (ftkernels/optim/paged.py) owns the lifetime and the budget.
  m.def("managed_alloc", [](int64_t bytes, int device) {
    if (bytes < 0)
      throw std::invalid_argument("ftkernels: managed_alloc: bytes must be >= 0, got " + std::to_string(bytes));
    return reinterpret_cast<uintptr_t>(ftk::managed_alloc_cuda(static_cast<size_t>(bytes), device));
  }, "bytes"_a, "device"_a, release);

  m.def("managed_free", [](uintptr_t ptr) {
    ftk::managed_free_cuda(reinterpret_cast<void*>(ptr));
  }, "ptr"_a, release);

  // device: a CUDA device ordinal, or -1 (cudaCpuDeviceId) for the host.
  m.def("managed_prefetch", [](uintptr_t ptr, int64_t bytes, int device, uintptr_t stream) {
    if (bytes < 0)
      throw std::invalid_argument("ftkernels: managed_prefetch: bytes must be >= 0, got " + std::to_string(bytes));
    ftk::managed_prefetch_cuda(reinterpret_cast<const void*>(ptr), static_cast<size_t>(bytes), device,
                               stream_arg(stream));
  }, "ptr"_a, "bytes"_a, "device"_a, "stream"_a, release);

  // (free, total) bytes of `device`, as cudaMemGetInfo reports them.
  m.def("mem_get_info", [](int device) {
    const auto info = ftk::mem_get_info_cuda(device);
    return std::make_pair(static_cast<uint64_t>(info.first), static_cast<uint64_t>(info.second));
  }, "device"_a, release);

  // Fused optimizer steps (optim.h): the arguments of _native.optim_32bit_args / optim_8bit_args and
  // _native.optim_hyper, then the stream (the CPU bindings' num_threads is the stream here).
  m.def("optim_32bit_step", [](int kind, uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, int64_t n,
                               uintptr_t state1, uintptr_t state2, float lr, float beta1, float beta2, float eps,
                               float decay, float omb1, float omb2, float step_size, float bc2_sqrt, uintptr_t stream) {
    ftk::optim_32bit_step_cuda(
        ftk::args::optim_32bit(kind, param, param_dtype, grad, grad_dtype, n, state1, state2,
                               ftk::args::optim_hyper(lr, beta1, beta2, eps, decay, omb1, omb2, step_size, bc2_sqrt)),
        stream_arg(stream));
  }, "kind"_a, "param"_a, "param_dtype"_a, "grad"_a, "grad_dtype"_a, "n"_a, "state1"_a, "state2"_a, "lr"_a, "beta1"_a,
     "beta2"_a, "eps"_a, "decay"_a, "one_minus_beta1"_a, "one_minus_beta2"_a, "step_size"_a,
     "bias_correction2_sqrt"_a, "stream"_a, release);

  m.def("optim_8bit_step", [](uintptr_t param, int param_dtype, uintptr_t grad, int grad_dtype, int64_t n,
                              uintptr_t state1, uintptr_t state2, uintptr_t absmax1, uintptr_t absmax2,
                              uintptr_t code1, uintptr_t code2, float lr, float beta1, float beta2, float eps,
                              float decay, float omb1, float omb2, float step_size, float bc2_sqrt, uintptr_t stream) {
    ftk::optim_8bit_step_cuda(
        ftk::args::optim_8bit(param, param_dtype, grad, grad_dtype, n, state1, state2, absmax1, absmax2, code1, code2,
                              ftk::args::optim_hyper(lr, beta1, beta2, eps, decay, omb1, omb2, step_size, bc2_sqrt)),
        stream_arg(stream));
  }, "param"_a, "param_dtype"_a, "grad"_a, "grad_dtype"_a, "n"_a, "state1"_a, "state2"_a, "absmax1"_a, "absmax2"_a,
     "code1"_a, "code2"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "decay"_a, "one_minus_beta1"_a,
     "one_minus_beta2"_a, "step_size"_a, "bias_correction2_sqrt"_a, "stream"_a, release);

  // 0 when there is no driver or no device (never raises): lets Python and tests ask cheaply.
  m.def("device_count", []() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();  // clear it, so the next checked launch does not report it
      return 0;
    }
    return count;
  }, release);
}
