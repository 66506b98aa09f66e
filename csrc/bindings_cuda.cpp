// The CUDA module: integers in (pointers, sizes, enum codes, a cudaStream_t), launchers out,
// GIL released. Python (ftkernels/backends/cuda.py) checked every argument first, made the
// tensors' device current and passes torch's current stream; the launchers check again.
// cudart is linked statically, so importing this module needs no GPU and no CUDA toolkit: a
// call without a usable device raises RuntimeError naming the CUDA call that failed.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include "ftk/quant_args.h"
#include "ftk/quant_cuda.h"

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
