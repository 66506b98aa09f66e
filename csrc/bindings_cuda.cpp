// The CUDA module: the parameter structs (bindings_params.h) and a cudaStream_t (an int) in,
// launchers out, GIL released. Python (ftkernels/backends/cuda.py) checked every tensor first,
// builds each struct by name (ftkernels/_native.py), made the tensors' device current and
// passes torch's current stream; the launchers check the struct again (check(p): ValueError).
// cudart is linked statically, so importing this module needs no GPU and no CUDA toolkit: a
// call without a usable device raises RuntimeError naming the CUDA call that failed.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "bindings_params.h"
#include "ftk/lora_cuda.h"
#include "ftk/optim_cuda.h"
#include "ftk/paged_cuda.h"
#include "ftk/quant_cuda.h"
#include "ftk/reft_cuda.h"

namespace py = pybind11;
using namespace pybind11::literals;

// How this module was built: CMakeLists.txt passes these to this file only (the architectures
// with ',' for ';', which CMake would split); a build without CMake says "unknown".
#ifndef FTK_BUILD_COMPILER
#define FTK_BUILD_COMPILER "unknown"
#endif
#ifndef FTK_BUILD_TYPE
#define FTK_BUILD_TYPE "unknown"
#endif
#ifndef FTK_CUDA_ARCHITECTURES
#define FTK_CUDA_ARCHITECTURES "unknown"
#endif

namespace {

cudaStream_t stream_arg(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// A launcher of P as a Python function of (params, stream).
template <typename P>
auto on_stream(void (*launcher)(const P&, cudaStream_t)) {
  return [launcher](const P& p, uintptr_t stream) { launcher(p, stream_arg(stream)); };
}

}  // namespace

PYBIND11_MODULE(_ftk_cuda, m) {
  m.doc() = "ftkernels CUDA kernels (parameter structs of raw pointers, streams; use ftkernels.* instead)";
  ftk::bind::define_params(m);
  ftk::bind::define_constants(m);
  auto release = py::call_guard<py::gil_scoped_release>();

  // Build facts for bug reports (`ftk doctor`): the CMake architecture list the kernels were
  // compiled for ("80-real;...;90-virtual": SASS for each -real, PTX for each -virtual, both
  // for a bare number) and the CUDA runtime linked in; a driver older than that runtime
  // cannot run the module.
  py::dict info;
  std::string archs = FTK_CUDA_ARCHITECTURES;
  std::replace(archs.begin(), archs.end(), ',', ';');
  info["cuda_architectures"] = archs;
  info["cudart_version"] = CUDART_VERSION;  // 1000 * major + 10 * minor, e.g. 12040
  info["compiler"] = FTK_BUILD_COMPILER;
  info["build_type"] = FTK_BUILD_TYPE;
  m.attr("build_info") = info;

  // The CUDA version the installed driver supports (same encoding), 0 without a driver;
  // never raises.
  m.def("driver_version", []() {
    int version = 0;
    if (cudaDriverGetVersion(&version) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return version;
  });

  // Every launcher takes (params, stream): stream is torch.cuda.current_stream().cuda_stream.
  m.def("quantize_4bit", on_stream(&ftk::quantize_4bit_cuda), "params"_a, "stream"_a, release);
  m.def("dequantize_4bit", on_stream(&ftk::dequantize_4bit_cuda), "params"_a, "stream"_a, release);
  m.def("quantize_blockwise", on_stream(&ftk::quantize_blockwise_cuda), "params"_a, "stream"_a, release);
  m.def("dequantize_blockwise", on_stream(&ftk::dequantize_blockwise_cuda), "params"_a, "stream"_a, release);

  m.def("lora_dropout", on_stream(&ftk::lora_dropout_cuda), "params"_a, "stream"_a, release);
  m.def("lora_matmul", on_stream(&ftk::lora_matmul_cuda), "params"_a, "stream"_a, release);

  m.def("reft_forward", on_stream(&ftk::reft_forward_cuda), "params"_a, "stream"_a, release);
  // Floats of workspace reft_backward needs (on the current device) when dP, dQ, db are wanted.
  m.def("reft_backward_workspace", [](int64_t n_slots, int64_t d, int64_t r) {
    return ftk::reft_backward_workspace_cuda(n_slots, d, r);
  }, "n_slots"_a, "d"_a, "r"_a, release);
  m.def("reft_backward", on_stream(&ftk::reft_backward_cuda), "params"_a, "stream"_a, release);

  m.def("optim_32bit_step", on_stream(&ftk::optim_32bit_step_cuda), "params"_a, "stream"_a, release);
  m.def("optim_8bit_step", on_stream(&ftk::optim_8bit_step_cuda), "params"_a, "stream"_a, release);

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
