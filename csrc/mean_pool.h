// Masked mean pooling (GritLM's `mean` and `weightedmean`), forward and backward.
//
// Two layouts share every kernel:
//   padded: hidden (B, S, D), per-token weights w (B, S) fp32 prepared by the caller
//           (1 for pooled tokens, 1..n for weighted, 0 otherwise);
//   packed: hidden (T, D), cu_seqlens (B + 1) int32, skip (B) int32; the weight of token s
//           of row b is computed here: 0 for s < skip[b], else 1 (or s - skip[b] + 1).
// Forward: den[b] = sum_s w[b,s], out[b] = sum_s w[b,s] h[b,s] / den[b] in fp32 (zeros when
//          den[b] is 0), norm[b] = |out[b]|, and out[b] /= max(norm[b], 1e-12) when normalize.
// Backward: dh[b,s] = w[b,s] / max(den[b], 1) * dy[b] in hidden's dtype, where dy is
//          the gradient w.r.t. the unnormalised mean (the caller applies the normalisation's
//          Jacobian, an O(B*D) step).
#pragma once

#include "common.h"

namespace grit {

struct MeanPoolArgs {
  const void* hidden = nullptr;     // (B, S, D) or (T, D), `dtype`
  const float* weights = nullptr;   // padded: (B, S); packed: nullptr
  const int* cu_seqlens = nullptr;  // packed: (B + 1); padded: nullptr
  const int* skip = nullptr;        // packed: (B); padded: nullptr
  int64_t B = 0, S = 0, D = 0;      // S: padded sequence length
  int64_t T = 0;                    // packed tokens (hidden's first dim)
  bool weighted = false;            // packed only: weights 1..n (padded weights come in `weights`)
  DType dtype = DType::f32;
  GRIT_HD bool packed() const { return cu_seqlens != nullptr; }
};

// Forward on the GPU (out, norm, den: (B, D), (B,), (B,) fp32). `workspace` holds
// splits * B * D floats, `counters` B zeroed ints (left zeroed again on return). `vec`:
// elements per 16-byte load (1 when D or the pointer does not allow it). Asynchronous.
void mean_pool_forward_cuda(const MeanPoolArgs& a, float* out, float* norm, float* den, bool normalize,
                            float* workspace, int* counters, int splits, int vec, cudaStream_t stream);

// Backward on the GPU: dy (B, D) fp32 -> dhidden (same shape/dtype as hidden). Tokens past
// cu_seqlens[B] get zeros.
void mean_pool_backward_cuda(const MeanPoolArgs& a, const float* dy, const float* den, void* dhidden, int vec,
                             cudaStream_t stream);

// The same arithmetic on the host (pointers into host memory), for CPU tests.
void mean_pool_forward_host(const MeanPoolArgs& a, float* out, float* norm, float* den, bool normalize);
void mean_pool_backward_host(const MeanPoolArgs& a, const float* dy, const float* den, void* dhidden);

}  // namespace grit
