// The pybind11 module grit_kernels._C. Pointers cross as integers (tensor.data_ptr()) and
// streams as their handle (torch.cuda.current_stream().cuda_stream), so no torch header
// is needed and one binary serves every torch version.
#include <pybind11/pybind11.h>

#include "mean_pool.h"
#include "moe.h"

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
#ifdef GRIT_CUDA_ARCHS_STRING
  m.attr("cuda_archs") = GRIT_CUDA_ARCHS_STRING;  // e.g. "80,90": the SM targets compiled in
#endif
#ifdef GRIT_NVCC_VERSION
  m.attr("nvcc_version") = GRIT_NVCC_VERSION;
#endif

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

  // ---- Mixtral MoE routing, sort/align, combine (csrc/moe.h) ----
  // Device entry points take the stream handle; *_host twins run the same arithmetic on host
  // pointers. dtype: 0 fp32, 1 fp16, 2 bf16. Pass 0 for optional pointers.
  m.def(
      "moe_route",
      [](uintptr_t logits, uintptr_t weights, uintptr_t experts, int64_t T, int E, int top_k, int dtype,
         uintptr_t stream) {
        grit::moe_route_cuda(ptr<const void>(logits), ptr<void>(weights), ptr<int>(experts), T, E, top_k,
                             static_cast<grit::DType>(dtype), reinterpret_cast<cudaStream_t>(stream));
      },
      "logits (T, E) -> weights (T, top_k) in dtype, experts (T, top_k) int32.", py::arg("logits"),
      py::arg("weights"), py::arg("experts"), py::arg("T"), py::arg("E"), py::arg("top_k"), py::arg("dtype"),
      py::arg("stream"));
  m.def(
      "moe_route_host",
      [](uintptr_t logits, uintptr_t weights, uintptr_t experts, int64_t T, int E, int top_k, int dtype) {
        grit::moe_route_host(ptr<const void>(logits), ptr<void>(weights), ptr<int>(experts), T, E, top_k,
                             static_cast<grit::DType>(dtype));
      },
      "Host build of moe_route.", py::arg("logits"), py::arg("weights"), py::arg("experts"), py::arg("T"),
      py::arg("E"), py::arg("top_k"), py::arg("dtype"));
  m.def(
      "moe_sort",
      [](uintptr_t experts, uintptr_t sorted_ids, uintptr_t tile_expert, uintptr_t offsets, int64_t TK, int E,
         int block_m, int64_t n_tiles, uintptr_t stream) {
        grit::moe_sort_cuda(ptr<const int>(experts), TK, E, block_m, n_tiles, ptr<int>(sorted_ids),
                            ptr<int>(tile_expert), ptr<int>(offsets), reinterpret_cast<cudaStream_t>(stream));
      },
      "experts (TK,) int32 -> sorted_ids (n_tiles * block_m,), tile_expert (n_tiles,), offsets (E + 1,) int32.",
      py::arg("experts"), py::arg("sorted_ids"), py::arg("tile_expert"), py::arg("offsets"), py::arg("TK"),
      py::arg("E"), py::arg("block_m"), py::arg("n_tiles"), py::arg("stream"));
  m.def(
      "moe_sort_host",
      [](uintptr_t experts, uintptr_t sorted_ids, uintptr_t tile_expert, uintptr_t offsets, int64_t TK, int E,
         int block_m, int64_t n_tiles) {
        grit::moe_sort_host(ptr<const int>(experts), TK, E, block_m, n_tiles, ptr<int>(sorted_ids),
                            ptr<int>(tile_expert), ptr<int>(offsets));
      },
      "Host build of moe_sort.", py::arg("experts"), py::arg("sorted_ids"), py::arg("tile_expert"),
      py::arg("offsets"), py::arg("TK"), py::arg("E"), py::arg("block_m"), py::arg("n_tiles"));
  m.def(
      "moe_combine",
      [](uintptr_t y, uintptr_t weights, uintptr_t experts, uintptr_t out, int64_t T, int K, int64_t D, int E,
         int dtype, uintptr_t stream) {
        grit::moe_combine_cuda(ptr<const float>(y), ptr<const float>(weights), ptr<const int>(experts), T, K, D, E,
                               ptr<void>(out), static_cast<grit::DType>(dtype),
                               reinterpret_cast<cudaStream_t>(stream));
      },
      "y (T * K, D) fp32, weights (T * K,) fp32 or 0, experts (T * K,) int32 or 0 -> out (T, D) in dtype.",
      py::arg("y"), py::arg("weights"), py::arg("experts"), py::arg("out"), py::arg("T"), py::arg("K"), py::arg("D"),
      py::arg("E"), py::arg("dtype"), py::arg("stream"));
  m.def(
      "moe_combine_host",
      [](uintptr_t y, uintptr_t weights, uintptr_t experts, uintptr_t out, int64_t T, int K, int64_t D, int E,
         int dtype) {
        grit::moe_combine_host(ptr<const float>(y), ptr<const float>(weights), ptr<const int>(experts), T, K, D, E,
                               ptr<void>(out), static_cast<grit::DType>(dtype));
      },
      "Host build of moe_combine.", py::arg("y"), py::arg("weights"), py::arg("experts"), py::arg("out"),
      py::arg("T"), py::arg("K"), py::arg("D"), py::arg("E"), py::arg("dtype"));
  // ---- end MoE ----
}
