// Masked mean pooling: CUDA kernels and their host twins. See mean_pool.h for the contract.
//
// Napkin math (H100, 3.35 TB/s): B=64, S=512, D=4096 bf16 is 268 MB of hidden, so the
// forward's floor is ~80 us. Everything else (weights, partial sums, output) is < 2 MB.
// The kernel therefore only has to keep enough 16-byte loads in flight: a block covers
// 32 * VEC columns with 8 warps walking the tokens (4 tokens unrolled per warp), and long
// rows of a small batch are split along S into `splits` blocks whose fp32 partials are
// summed, in a fixed order, by whichever block of the row finishes last. No float atomics,
// so results are bitwise reproducible.
#include "mean_pool.h"

#include <cmath>
#include <vector>

namespace grit {
namespace {

constexpr float kNormEps = 1e-12f;  // torch.nn.functional.normalize's eps
constexpr int kWarps = 8;           // warps per block
constexpr int kUnroll = 4;          // tokens in flight per warp (forward)
constexpr int kTokensPerWarp = 4;   // consecutive tokens per warp (backward)

// ---------------------------------------------------------------------------------------
// Per-row logic, compiled for host and device.
// ---------------------------------------------------------------------------------------

// A row's tokens are hidden[start, start + len); positions < first are never pooled.
struct Row {
  int64_t start, len, first;
};

GRIT_HD Row row_span(const MeanPoolArgs& a, int64_t b) {
  if (a.cu_seqlens != nullptr) {
    const int64_t start = a.cu_seqlens[b], len = a.cu_seqlens[b + 1] - start;
    const int64_t skip = a.skip[b];
    return {start, len, skip < len ? skip : len};
  }
  return {b * a.S, a.S, 0};
}

// Weight of position s of row b (1, or its rank among the pooled tokens when weighted).
GRIT_HD float token_weight(const MeanPoolArgs& a, int64_t b, int64_t s, const Row& r) {
  if (a.cu_seqlens == nullptr) return a.weights[b * a.S + s];
  if (s < r.first) return 0.f;
  return a.weighted ? static_cast<float>(s - r.first + 1) : 1.f;
}

// Sum of a packed row's weights in closed form: n, or n (n + 1) / 2.
GRIT_HD float packed_denominator(const Row& r, bool weighted) {
  const double n = static_cast<double>(r.len - r.first);
  return static_cast<float>(weighted ? 0.5 * n * (n + 1.0) : n);
}

// An empty row pools to zeros instead of 0 / 0.
GRIT_HD float mean_of(float sum, float den) { return den > 0.f ? sum / den : 0.f; }

GRIT_HD float norm_divisor(float norm) { return norm > kNormEps ? norm : kNormEps; }

// d mean / d h for a token of weight w in a row of weight sum den.
GRIT_HD float grad_scale(float w, float den) { return w / (den > 1.f ? den : 1.f); }

// Row b and position s of packed/padded token t; false for tokens past the last row.
GRIT_HD bool locate_token(const MeanPoolArgs& a, int64_t t, int64_t* b, int64_t* s) {
  if (a.cu_seqlens == nullptr) {
    *b = t / a.S;
    *s = t % a.S;
    return true;
  }
  if (t >= a.cu_seqlens[a.B]) return false;
  // Largest b with cu_seqlens[b] <= t: skips empty rows (equal offsets) onto the row holding t.
  int64_t lo = 0, hi = a.B;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (a.cu_seqlens[mid] <= t) lo = mid; else hi = mid - 1;
  }
  *b = lo;
  *s = t - a.cu_seqlens[lo];
  return true;
}

// Weight of token t for the backward, given its row's weight sum (den, from the forward).
GRIT_HD float token_grad_scale(const MeanPoolArgs& a, int64_t t, const float* den, int64_t* b) {
  int64_t s;
  if (!locate_token(a, t, b, &s)) return 0.f;
  const Row r = row_span(a, *b);
  return grad_scale(token_weight(a, *b, s, r), den[*b]);
}

// ---------------------------------------------------------------------------------------
// Device code.
// ---------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&x)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    // hidden is read exactly once: stream it past L1.
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = to_float(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&x)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(x[i]);
    __stcs(reinterpret_cast<uint4*>(p), raw);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(x[i]);
  }
}

// Sum over the block in a fixed order (deterministic). `scratch` holds kWarps floats.
__device__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // scratch may still be in use by a previous call
  if (threadIdx.x == 0) scratch[threadIdx.y] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// grid (B, ceil(D / (32 VEC)), splits), block (32, kWarps). Rows in grid.x: no limit on B.
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kWarps)
    mean_pool_fwd_kernel(MeanPoolArgs a, float* out, float* norm, float* den_out, bool normalize, float* ws,
                         int* counters) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t b = blockIdx.x;
  const int split = blockIdx.z, splits = gridDim.z;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * VEC;
  const Row r = row_span(a, b);
  const T* hidden = static_cast<const T*>(a.hidden);

  // This split's share of the pooled positions [first, len).
  const int64_t n = r.len - r.first, per = (n + splits - 1) / splits;
  const int64_t s_begin = r.first + split * per;
  const int64_t s_end = s_begin + per < r.len ? s_begin + per : r.len;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  if (col < a.D) {
    int64_t s = s_begin + warp;
    for (; s + (kUnroll - 1) * kWarps < s_end; s += kUnroll * kWarps) {
      float w[kUnroll], x[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) w[u] = token_weight(a, b, s + u * kWarps, r);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (w[u] != 0.f) {  // masked tokens (the instruction, padding) are never loaded
          load_floats<T, VEC>(hidden + (r.start + s + u * kWarps) * a.D + col, x[u]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[u][i] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w[u], x[u][i], acc[i]);
    }
    for (; s < s_end; s += kWarps) {
      const float w = token_weight(a, b, s, r);
      if (w == 0.f) continue;
      float x[VEC];
      load_floats<T, VEC>(hidden + (r.start + s) * a.D + col, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w, x[i], acc[i]);
    }
  }

  // Reduce the warps' partial sums, then publish this block's partial for the row.
  __shared__ float part[kWarps][32 * VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  if (warp == 0 && col < a.D) {
    float* dst = ws + (static_cast<int64_t>(split) * a.B + b) * a.D + col;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += part[w][lane * VEC + i];
      if (col + i < a.D) dst[i] = sum;
    }
  }

  // The last block of row b to arrive finishes it (CUDA samples' threadFenceReduction).
  __threadfence();
  __shared__ bool is_last;
  __syncthreads();
  if (lane == 0 && warp == 0) {
    const int ticket = atomicAdd(&counters[b], 1);
    is_last = ticket == static_cast<int>(gridDim.y * gridDim.z) - 1;
  }
  __syncthreads();
  if (!is_last) return;

  __shared__ float scratch[kWarps];
  const int tid = warp * 32 + lane, nthreads = 32 * kWarps;
  float den;
  if (a.cu_seqlens != nullptr) {
    den = packed_denominator(r, a.weighted);
  } else {
    float local = 0.f;
    for (int64_t s = tid; s < a.S; s += nthreads) local += a.weights[b * a.S + s];
    den = block_sum(local, scratch);
  }
  float sumsq = 0.f;
  float* out_row = out + b * a.D;
  for (int64_t c = tid; c < a.D; c += nthreads) {
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) sum += __ldcg(ws + (static_cast<int64_t>(sp) * a.B + b) * a.D + c);
    const float y = mean_of(sum, den);
    out_row[c] = y;
    sumsq = fmaf(y, y, sumsq);
  }
  const float nrm = sqrtf(block_sum(sumsq, scratch));
  if (tid == 0) {
    norm[b] = nrm;
    den_out[b] = den;
    counters[b] = 0;  // leave the counters reusable
  }
  if (normalize) {
    const float d = norm_divisor(nrm);
    for (int64_t c = tid; c < a.D; c += nthreads) out_row[c] = out_row[c] / d;  // own writes: visible
  }
}

// grid (ceil(tokens / (kWarps kTokensPerWarp)), ceil(D / (32 VEC))), block (32, kWarps).
// Tokens go in grid.x (up to 2^31 - 1 blocks); grid.y would cap them at 2M.
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kWarps)
    mean_pool_bwd_kernel(MeanPoolArgs a, const float* dy, const float* den, T* dhidden, int64_t tokens) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * VEC;
  if (col >= a.D) return;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kTokensPerWarp;
  for (int k = 0; k < kTokensPerWarp; ++k) {
    const int64_t t = t0 + k;
    if (t >= tokens) return;
    int64_t b = 0;
    const float scale = token_grad_scale(a, t, den, &b);
    float g[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = scale == 0.f ? 0.f : scale * dy[b * a.D + col + i];
    store_floats<T, VEC>(dhidden + t * a.D + col, g);
  }
}

template <typename T, int VEC>
void launch_forward(const MeanPoolArgs& a, float* out, float* norm, float* den, bool normalize, float* ws,
                    int* counters, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>((a.D + 32 * VEC - 1) / (32 * VEC)),
                  static_cast<unsigned>(splits));
  mean_pool_fwd_kernel<T, VEC><<<grid, dim3(32, kWarps), 0, stream>>>(a, out, norm, den, normalize, ws, counters);
  check_cuda(cudaGetLastError(), "mean_pool forward launch");
}

template <typename T, int VEC>
void launch_backward(const MeanPoolArgs& a, const float* dy, const float* den, void* dhidden, cudaStream_t stream) {
  const int64_t tokens = a.packed() ? a.T : a.B * a.S;
  const int64_t per_block = kWarps * kTokensPerWarp;
  const dim3 grid(static_cast<unsigned>((tokens + per_block - 1) / per_block),
                  static_cast<unsigned>((a.D + 32 * VEC - 1) / (32 * VEC)));
  mean_pool_bwd_kernel<T, VEC><<<grid, dim3(32, kWarps), 0, stream>>>(a, dy, den, static_cast<T*>(dhidden), tokens);
  check_cuda(cudaGetLastError(), "mean_pool backward launch");
}

void check_args(const MeanPoolArgs& a) {
  if (a.B < 0 || a.D < 1) throw std::invalid_argument("mean_pool: expected B >= 0 and D >= 1");
  if (a.packed() ? a.skip == nullptr : a.weights == nullptr)
    throw std::invalid_argument("mean_pool: packed rows need skip; padded rows need weights");
  if ((a.D + 31) / 32 > 65535) throw std::invalid_argument("mean_pool: D must be <= 2097120 (grid.y)");
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------

void mean_pool_forward_cuda(const MeanPoolArgs& a, float* out, float* norm, float* den, bool normalize,
                            float* workspace, int* counters, int splits, int vec, cudaStream_t stream) {
  check_args(a);
  if (a.B == 0) return;
  if (splits < 1 || splits > 65535) throw std::invalid_argument("mean_pool: splits must be in [1, 65535]");
  dispatch_dtype(a.dtype, [&]<typename T>() {
    if (vec * static_cast<int>(sizeof(T)) == 16) {
      launch_forward<T, 16 / sizeof(T)>(a, out, norm, den, normalize, workspace, counters, splits, stream);
    } else if (vec == 1) {
      launch_forward<T, 1>(a, out, norm, den, normalize, workspace, counters, splits, stream);
    } else {
      throw std::invalid_argument("mean_pool: vec must be 1 or 16 / sizeof(dtype)");
    }
  });
}

void mean_pool_backward_cuda(const MeanPoolArgs& a, const float* dy, const float* den, void* dhidden, int vec,
                             cudaStream_t stream) {
  check_args(a);
  if ((a.packed() ? a.T : a.B * a.S) == 0) return;
  dispatch_dtype(a.dtype, [&]<typename T>() {
    if (vec * static_cast<int>(sizeof(T)) == 16) {
      launch_backward<T, 16 / sizeof(T)>(a, dy, den, dhidden, stream);
    } else if (vec == 1) {
      launch_backward<T, 1>(a, dy, den, dhidden, stream);
    } else {
      throw std::invalid_argument("mean_pool: vec must be 1 or 16 / sizeof(dtype)");
    }
  });
}

void mean_pool_forward_host(const MeanPoolArgs& a, float* out, float* norm, float* den_out, bool normalize) {
  check_args(a);
  dispatch_dtype(a.dtype, [&]<typename T>() {
    const T* hidden = static_cast<const T*>(a.hidden);
    std::vector<float> acc(static_cast<size_t>(a.D));
    for (int64_t b = 0; b < a.B; ++b) {
      const Row r = row_span(a, b);
      std::fill(acc.begin(), acc.end(), 0.f);
      float den = 0.f;
      for (int64_t s = r.first; s < r.len; ++s) {
        const float w = token_weight(a, b, s, r);
        den += w;
        if (w == 0.f) continue;
        const T* h = hidden + (r.start + s) * a.D;
        for (int64_t c = 0; c < a.D; ++c) acc[c] = std::fma(w, to_float(h[c]), acc[c]);
      }
      if (a.packed()) den = packed_denominator(r, a.weighted);
      float sumsq = 0.f;
      for (int64_t c = 0; c < a.D; ++c) {
        acc[c] = mean_of(acc[c], den);
        sumsq = std::fma(acc[c], acc[c], sumsq);
      }
      norm[b] = std::sqrt(sumsq);
      den_out[b] = den;
      const float d = normalize ? norm_divisor(norm[b]) : 1.f;
      for (int64_t c = 0; c < a.D; ++c) out[b * a.D + c] = normalize ? acc[c] / d : acc[c];
    }
  });
}

void mean_pool_backward_host(const MeanPoolArgs& a, const float* dy, const float* den, void* dhidden) {
  check_args(a);
  dispatch_dtype(a.dtype, [&]<typename T>() {
    T* dh = static_cast<T*>(dhidden);
    const int64_t tokens = a.packed() ? a.T : a.B * a.S;
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t b = 0;
      const float scale = token_grad_scale(a, t, den, &b);
      for (int64_t c = 0; c < a.D; ++c) dh[t * a.D + c] = from_float<T>(scale == 0.f ? 0.f : scale * dy[b * a.D + c]);
    }
  });
}

}  // namespace grit
