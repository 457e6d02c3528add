// Mixtral MoE routing, sort/align and combine: CUDA kernels and their host twins. Contract in moe.h.
//
// Napkin math (H100, Mixtral 8x7B, T = 16384, K = 2): the router logits are 16384 x 8 floats
// (0.5 MB) and the expert GEMMs ~11.5 TFLOP (~15 ms), so routing and sorting only have to stay
// off the critical path and, above all, never make the host wait. One thread per token row for
// the routing (E <= 64 probabilities in registers); one block for the sort (TK = 32768 slots,
// 32 passes of 1024 slots, a few us); a row-parallel combine reading TK * D fp32
// (0.5 GB, ~0.2 ms at 3.35 TB/s).
#include "moe.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace grit {
namespace {

constexpr int kRouteThreads = 128;
constexpr int kSortThreads = 1024;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kCombineThreads = 256;

// ---------------------------------------------------------------------------------------
// Per-row / per-element logic, compiled for host and device.
// ---------------------------------------------------------------------------------------

// Softmax over the E logits of one row in fp32, then the K largest probabilities in
// decreasing order. Strict `>` scanning upwards keeps the lowest index among equal values.
// The top-k is chosen on the probabilities, not the logits, as transformers does: two
// different logits may round to the same probability and then tie.
template <typename T>
GRIT_HD void route_row(const T* logits, int E, int K, T* weights, int* experts) {
  float p[kMoeMaxExperts];
  float m = -INFINITY;
  for (int i = 0; i < E; ++i) {
    p[i] = to_float(logits[i]);
    m = p[i] > m ? p[i] : m;
  }
  float z = 0.f;
  for (int i = 0; i < E; ++i) {
    p[i] = expf(p[i] - m);
    z += p[i];
  }
  for (int i = 0; i < E; ++i) p[i] = p[i] / z;

  uint64_t taken = 0;
  float top[kMoeMaxTopK];
  float sum = 0.f;
  for (int j = 0; j < K; ++j) {
    int best = -1;
    for (int i = 0; i < E; ++i) {
      if ((taken >> i) & 1u) continue;
      if (best < 0 || p[i] > p[best]) best = i;
    }
    taken |= uint64_t{1} << best;
    top[j] = p[best];
    experts[j] = best;
    sum += top[j];
  }
  for (int j = 0; j < K; ++j) weights[j] = from_float<T>(top[j] / sum);
}

GRIT_HD bool valid_expert(int e, int E) { return e >= 0 && e < E; }

GRIT_HD int64_t padded_count(int64_t count, int block_m) { return (count + block_m - 1) / block_m * block_m; }

// Expert owning tile `tile` given the padded offsets (E + 1,), or -1 past the last expert.
// Empty experts have offsets[e] == offsets[e + 1] and own no tile.
GRIT_HD int expert_of_tile(const int* offsets, int E, int64_t tile, int block_m) {
  const int64_t row = tile * block_m;
  if (row >= offsets[E]) return -1;
  int lo = 0, hi = E - 1;  // the last e with offsets[e] <= row
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One output element of the combine: sum over the token's K slots in a fixed order.
GRIT_HD float combine_elem(const float* y, const float* weights, const int* experts, int64_t t, int K, int64_t D,
                           int E, int64_t d) {
  float acc = 0.f;
  for (int j = 0; j < K; ++j) {
    const int64_t s = t * K + j;
    if (experts != nullptr && !valid_expert(experts[s], E)) continue;
    const float v = y[s * D + d];
    acc = weights != nullptr ? fmaf(weights[s], v, acc) : acc + v;
  }
  return acc;
}

// ---------------------------------------------------------------------------------------
// Device code.
// ---------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(const T* logits, T* weights, int* experts, int64_t rows, int E, int K) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteThreads + threadIdx.x;
  if (t >= rows) return;
  route_row<T>(logits + t * E, E, K, weights + t * K, experts + t * K);
}

// One block. Counting uses shared-memory atomics (integer adds commute: deterministic); the
// scatter is stable (slot order within an expert) by ranking each 1024-slot chunk with
// __match_any_sync inside a warp and per-warp counts across warps.
__global__ void __launch_bounds__(kSortThreads)
    moe_sort_kernel(const int* experts, int64_t TK, int E, int block_m, int64_t n_tiles, int* sorted_ids,
                    int* tile_expert, int* offsets_out) {
  extern __shared__ int smem[];
  int* counts = smem;                 // E
  int* offsets = counts + E;          // E + 1
  int* running = offsets + E + 1;     // E: next free row of each expert
  int* warp_counts = running + E;     // kSortWarps * E
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int e = tid; e < E; e += kSortThreads) counts[e] = 0;
  __syncthreads();
  for (int64_t i = tid; i < TK; i += kSortThreads) {
    const int e = experts[i];
    if (valid_expert(e, E)) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (tid == 0) {
    offsets[0] = 0;
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + static_cast<int>(padded_count(counts[e], block_m));
  }
  __syncthreads();
  for (int e = tid; e <= E; e += kSortThreads) offsets_out[e] = offsets[e];
  for (int e = tid; e < E; e += kSortThreads) running[e] = offsets[e];
  const int64_t rows = n_tiles * block_m;
  for (int64_t r = tid; r < rows; r += kSortThreads) sorted_ids[r] = static_cast<int>(TK);  // padding
  for (int64_t tile = tid; tile < n_tiles; tile += kSortThreads)
    tile_expert[tile] = expert_of_tile(offsets, E, tile, block_m);
  __syncthreads();  // the padding fill is visible to the block before the scatter overwrites it

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = 0; base < TK; base += kSortThreads) {
    for (int e = lane; e < E; e += 32) warp_counts[warp * E + e] = 0;
    __syncwarp();
    const int64_t i = base + tid;
    const int e = i < TK ? experts[i] : -1;
    const bool ok = valid_expert(e, E);
    const unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (ok && rank_in_warp == 0) warp_counts[warp * E + e] = __popc(peers);
    __syncthreads();
    if (ok) {
      int rank = running[e] + rank_in_warp;
      for (int w = 0; w < warp; ++w) rank += warp_counts[w * E + e];
      sorted_ids[rank] = static_cast<int>(i);
    }
    __syncthreads();
    for (int ee = tid; ee < E; ee += kSortThreads) {
      int add = 0;
      for (int w = 0; w < kSortWarps; ++w) add += warp_counts[w * E + ee];
      running[ee] += add;
    }
    __syncthreads();
  }
}

// grid (T, ceil(D / (kCombineThreads * 4))): one token row per blockIdx.x, 4 columns per thread.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    moe_combine_kernel(const float* y, const float* weights, const int* experts, int K, int64_t D, int E, T* out) {
  const int64_t t = blockIdx.x;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x) * 4;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int64_t d = d0 + c;
    if (d < D) out[t * D + d] = from_float<T>(combine_elem(y, weights, experts, t, K, D, E, d));
  }
}

void check_route(int64_t T, int E, int K) {
  if (T < 0) throw std::invalid_argument("moe_route: T must be >= 0");
  if (E < 1 || E > kMoeMaxExperts) throw std::invalid_argument("moe_route: E must be in [1, 64]");
  if (K < 1 || K > kMoeMaxTopK || K > E) throw std::invalid_argument("moe_route: top_k must be in [1, min(8, E)]");
}

void check_sort(int64_t TK, int E, int block_m, int64_t n_tiles) {
  if (TK < 0 || TK >= INT32_MAX) throw std::invalid_argument("moe_sort: TK must be in [0, 2^31 - 1)");
  if (E < 1 || E > kMoeSortMaxExperts) throw std::invalid_argument("moe_sort: E must be in [1, 256]");
  if (block_m < 1) throw std::invalid_argument("moe_sort: block_m must be >= 1");
  if (n_tiles < (TK + block_m - 1) / block_m + E)
    throw std::invalid_argument("moe_sort: n_tiles must be >= ceil(TK / block_m) + E");
  if (n_tiles * block_m >= INT32_MAX) throw std::invalid_argument("moe_sort: n_tiles * block_m must fit in int32");
}

void check_combine(int64_t T, int K, int64_t D) {
  if (T < 0 || K < 1 || D < 1) throw std::invalid_argument("moe_combine: expected T >= 0, K >= 1, D >= 1");
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------

void moe_route_cuda(const void* logits, void* weights, int* experts, int64_t T, int E, int K, DType dtype,
                    cudaStream_t stream) {
  check_route(T, E, K);
  if (T == 0) return;
  dispatch_dtype(dtype, [&]<typename V>() {
    const unsigned blocks = static_cast<unsigned>((T + kRouteThreads - 1) / kRouteThreads);
    moe_route_kernel<V><<<blocks, kRouteThreads, 0, stream>>>(static_cast<const V*>(logits), static_cast<V*>(weights),
                                                              experts, T, E, K);
    check_cuda(cudaGetLastError(), "moe_route launch");
  });
}

void moe_sort_cuda(const int* experts, int64_t TK, int E, int block_m, int64_t n_tiles, int* sorted_ids,
                   int* tile_expert, int* offsets, cudaStream_t stream) {
  check_sort(TK, E, block_m, n_tiles);
  const size_t smem = sizeof(int) * (static_cast<size_t>(E) * (3 + kSortWarps) + 1);  // <= 35 KB for E = 256
  moe_sort_kernel<<<1, kSortThreads, smem, stream>>>(experts, TK, E, block_m, n_tiles, sorted_ids, tile_expert,
                                                     offsets);
  check_cuda(cudaGetLastError(), "moe_sort launch");
}

void moe_combine_cuda(const float* y, const float* weights, const int* experts, int64_t T, int K, int64_t D, int E,
                      void* out, DType dtype, cudaStream_t stream) {
  check_combine(T, K, D);
  if (T == 0) return;
  if (T > INT32_MAX) throw std::invalid_argument("moe_combine: T must be < 2^31");
  const int64_t per_block = kCombineThreads * 4;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((D + per_block - 1) / per_block));
  if (grid.y > 65535) throw std::invalid_argument("moe_combine: D too large");
  dispatch_dtype(dtype, [&]<typename V>() {
    moe_combine_kernel<V><<<grid, kCombineThreads, 0, stream>>>(y, weights, experts, K, D, E, static_cast<V*>(out));
    check_cuda(cudaGetLastError(), "moe_combine launch");
  });
}

void moe_route_host(const void* logits, void* weights, int* experts, int64_t T, int E, int K, DType dtype) {
  check_route(T, E, K);
  dispatch_dtype(dtype, [&]<typename V>() {
    const V* l = static_cast<const V*>(logits);
    V* w = static_cast<V*>(weights);
    for (int64_t t = 0; t < T; ++t) route_row<V>(l + t * E, E, K, w + t * K, experts + t * K);
  });
}

void moe_sort_host(const int* experts, int64_t TK, int E, int block_m, int64_t n_tiles, int* sorted_ids,
                   int* tile_expert, int* offsets) {
  check_sort(TK, E, block_m, n_tiles);
  std::vector<int64_t> counts(E, 0);
  for (int64_t i = 0; i < TK; ++i)
    if (valid_expert(experts[i], E)) ++counts[experts[i]];
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + static_cast<int>(padded_count(counts[e], block_m));
  for (int64_t r = 0; r < n_tiles * block_m; ++r) sorted_ids[r] = static_cast<int>(TK);
  for (int64_t tile = 0; tile < n_tiles; ++tile) tile_expert[tile] = expert_of_tile(offsets, E, tile, block_m);
  std::vector<int64_t> next(offsets, offsets + E);
  for (int64_t i = 0; i < TK; ++i)  // slot order: the same stable layout as the device
    if (valid_expert(experts[i], E)) sorted_ids[next[experts[i]]++] = static_cast<int>(i);
}

void moe_combine_host(const float* y, const float* weights, const int* experts, int64_t T, int K, int64_t D, int E,
                      void* out, DType dtype) {
  check_combine(T, K, D);
  dispatch_dtype(dtype, [&]<typename V>() {
    V* o = static_cast<V*>(out);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) o[t * D + d] = from_float<V>(combine_elem(y, weights, experts, t, K, D, E, d));
  });
}

}  // namespace grit
