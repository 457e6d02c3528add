// The pybind11 module grit_kernels._C. Pointers cross as integers (tensor.data_ptr()) and
// streams as their handle (torch.cuda.current_stream().cuda_stream), so no torch header
// is needed and one binary serves every torch version.
#include <pybind11/pybind11.h>

#include "mean_pool.h"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

grit::MeanPoolArgs mean_pool_args(uintptr_t hidden, uintptr_t weights, uintptr_t cu_seqlens, uintptr_t skip,
                                  int64_t B, int64_t S, int64_t D, int64_t T, bool weighted, int dtype) {
  grit::MeanPoolArgs a;
  a.hidden = ptr<const void>(hidden);
  a.weights = ptr<const float>(weights);
  a.cu_seqlens = ptr<const int>(cu_seqlens);
  a.skip = ptr<const int>(skip);
  a.B = B;
  a.S = S;
  a.D = D;
  a.T = T;
  a.weighted = weighted;
  a.dtype = static_cast<grit::DType>(dtype);
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "grit-kernels CUDA C++ kernels (device launches and host builds of the same code)";

  // ---- mean pooling (csrc/mean_pool.h) ----
  const char* layout_doc =
      "hidden: (B, S, D) with weights (B, S) fp32, or (T, D) with cu_seqlens (B + 1) and skip (B) int32;"
      " pass 0 for the pointers a layout does not use. dtype: 0 fp32, 1 fp16, 2 bf16.";
  m.def(
      "mean_pool_forward",
      [](uintptr_t hidden, uintptr_t weights, uintptr_t cu_seqlens, uintptr_t skip, uintptr_t out, uintptr_t norm,
         uintptr_t den, uintptr_t workspace, uintptr_t counters, int64_t B, int64_t S, int64_t D, int64_t T,
         bool weighted, bool normalize, int dtype, int splits, int vec, uintptr_t stream) {
        grit::mean_pool_forward_cuda(mean_pool_args(hidden, weights, cu_seqlens, skip, B, S, D, T, weighted, dtype),
                                     ptr<float>(out), ptr<float>(norm), ptr<float>(den), normalize,
                                     ptr<float>(workspace), ptr<int>(counters), splits, vec,
                                     reinterpret_cast<cudaStream_t>(stream));
      },
      layout_doc, py::arg("hidden"), py::arg("weights"), py::arg("cu_seqlens"), py::arg("skip"), py::arg("out"),
      py::arg("norm"), py::arg("den"), py::arg("workspace"), py::arg("counters"), py::arg("B"), py::arg("S"),
      py::arg("D"), py::arg("T"), py::arg("weighted"), py::arg("normalize"), py::arg("dtype"), py::arg("splits"),
      py::arg("vec"), py::arg("stream"));
  m.def(
      "mean_pool_backward",
      [](uintptr_t hidden, uintptr_t weights, uintptr_t cu_seqlens, uintptr_t skip, uintptr_t dy, uintptr_t den,
         uintptr_t dhidden, int64_t B, int64_t S, int64_t D, int64_t T, bool weighted, int dtype, int vec,
         uintptr_t stream) {
        grit::mean_pool_backward_cuda(mean_pool_args(hidden, weights, cu_seqlens, skip, B, S, D, T, weighted, dtype),
                                      ptr<const float>(dy), ptr<const float>(den), ptr<void>(dhidden), vec,
                                      reinterpret_cast<cudaStream_t>(stream));
      },
      layout_doc, py::arg("hidden"), py::arg("weights"), py::arg("cu_seqlens"), py::arg("skip"), py::arg("dy"),
      py::arg("den"), py::arg("dhidden"), py::arg("B"), py::arg("S"), py::arg("D"), py::arg("T"),
      py::arg("weighted"), py::arg("dtype"), py::arg("vec"), py::arg("stream"));
  m.def(
      "mean_pool_forward_host",
      [](uintptr_t hidden, uintptr_t weights, uintptr_t cu_seqlens, uintptr_t skip, uintptr_t out, uintptr_t norm,
         uintptr_t den, int64_t B, int64_t S, int64_t D, int64_t T, bool weighted, bool normalize, int dtype) {
        grit::mean_pool_forward_host(mean_pool_args(hidden, weights, cu_seqlens, skip, B, S, D, T, weighted, dtype),
                                     ptr<float>(out), ptr<float>(norm), ptr<float>(den), normalize);
      },
      "Host build of mean_pool_forward (host pointers).", py::arg("hidden"), py::arg("weights"),
      py::arg("cu_seqlens"), py::arg("skip"), py::arg("out"), py::arg("norm"), py::arg("den"), py::arg("B"),
      py::arg("S"), py::arg("D"), py::arg("T"), py::arg("weighted"), py::arg("normalize"), py::arg("dtype"));
  m.def(
      "mean_pool_backward_host",
      [](uintptr_t hidden, uintptr_t weights, uintptr_t cu_seqlens, uintptr_t skip, uintptr_t dy, uintptr_t den,
         uintptr_t dhidden, int64_t B, int64_t S, int64_t D, int64_t T, bool weighted, int dtype) {
        grit::mean_pool_backward_host(mean_pool_args(hidden, weights, cu_seqlens, skip, B, S, D, T, weighted, dtype),
                                      ptr<const float>(dy), ptr<const float>(den), ptr<void>(dhidden));
      },
      "Host build of mean_pool_backward (host pointers).", py::arg("hidden"), py::arg("weights"),
      py::arg("cu_seqlens"), py::arg("skip"), py::arg("dy"), py::arg("den"), py::arg("dhidden"), py::arg("B"),
      py::arg("S"), py::arg("D"), py::arg("T"), py::arg("weighted"), py::arg("dtype"));
}
