// Shared by every csrc op: dtype codes, host/device conversions, error checks.
// No torch headers: ops take raw device pointers, sizes and a cudaStream_t.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define GRIT_HD __host__ __device__ __forceinline__

namespace grit {

// Codes shared with Python (grit_kernels/ops/_cuda.py: DTYPE_CODES).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType d) { return d == DType::f32 ? 4 : 2; }

GRIT_HD float to_float(float x) { return x; }
GRIT_HD float to_float(__half x) { return __half2float(x); }
GRIT_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> GRIT_HD T from_float(float x);
template <> GRIT_HD float from_float<float>(float x) { return x; }
template <> GRIT_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> GRIT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Calls f.template operator()<T>() with T the C++ type of `dtype`.
template <typename F> void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f.template operator()<float>(); break;
    case DType::f16: f.template operator()<__half>(); break;
    case DType::bf16: f.template operator()<__nv_bfloat16>(); break;
    default: throw std::invalid_argument("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

}  // namespace grit
