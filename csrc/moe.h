// Mixtral MoE routing: fused softmax + top-k + renormalise, the expert-sorted layout that the
// Triton grouped GEMMs read, and the fp32 combine of each token's K expert outputs.
//
// Legend: T tokens, E experts, K experts per token, TK = T * K routing slots (slot t * K + j is
// token t's j-th choice), BM the GEMM tile height, D hidden size.
//
// route:   logits (T, E) -> weights (T, K) in the logits' dtype, experts (T, K) int32.
//          p = softmax(float(logits)) over E; the K largest p in decreasing order (equal p: the
//          lower expert index first); weights = p_top / sum(p_top) rounded to the logits' dtype.
// sort:    experts (TK,) int32 -> offsets (E + 1,): offsets[e] is the first sorted row of expert
//          e, every expert's block padded to a multiple of BM; sorted_ids (n_tiles * BM,): the
//          slot at each sorted row (slots of one expert in increasing order; TK on padding
//          rows); tile_expert (n_tiles,): the expert of each BM-row tile, -1 past the last.
//          n_tiles >= ceil(TK / BM) + E bounds the tiles for any routing, so nothing has to
//          be read back by the host. Ids outside [0, E) are left out of the layout.
// combine: y (TK, D) fp32 -> out (T, D): out[t] = sum_j w[t K + j] y[t K + j] summed in fp32 in
//          the order j = 0..K-1, w = 1 when weights is null, slots with an id outside [0, E)
//          skipped when experts is given.
#pragma once

#include "common.h"

namespace grit {

constexpr int kMoeMaxExperts = 64;       // route: one row of probabilities in registers
constexpr int kMoeMaxTopK = 8;
constexpr int kMoeSortMaxExperts = 256;  // sort: per-warp counters in shared memory

void moe_route_cuda(const void* logits, void* weights, int* experts, int64_t T, int E, int K, DType dtype,
                    cudaStream_t stream);
void moe_sort_cuda(const int* experts, int64_t TK, int E, int block_m, int64_t n_tiles, int* sorted_ids,
                   int* tile_expert, int* offsets, cudaStream_t stream);
void moe_combine_cuda(const float* y, const float* weights, const int* experts, int64_t T, int K, int64_t D, int E,
                      void* out, DType dtype, cudaStream_t stream);

// The same arithmetic on the host (pointers into host memory), for CPU tests.
void moe_route_host(const void* logits, void* weights, int* experts, int64_t T, int E, int K, DType dtype);
void moe_sort_host(const int* experts, int64_t TK, int E, int block_m, int64_t n_tiles, int* sorted_ids,
                   int* tile_expert, int* offsets);
void moe_combine_host(const float* y, const float* weights, const int* experts, int64_t T, int K, int64_t D, int E,
                      void* out, DType dtype);

}  // namespace grit
