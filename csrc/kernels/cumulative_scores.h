// Cumulative attention scores of probe queries (docs/design.md#top-p-selection):
//   a[b, h, j] = sum_{r in group(h)} sum_i softmax_j(scale * q[b, r, i] . k[b, h, j] + mask)
// Probe i sits at absolute position Lk - Lq + i (bottom-right aligned, as FlashAttention);
// with causal it sees keys j <= that position. Keys with key_mask == 0 get no mass. A probe
// that sees no key at all contributes nothing (no NaN).
#pragma once

#include "common.h"

namespace sparse_attn {

struct CumulativeScoresParams {
  const void* q;            // [B, Hq, Lq, D], contiguous, dtype
  const void* k;            // [B, Hkv, Lk, D], contiguous, dtype
  const uint8_t* key_mask;  // [B, Lk] (1 = real token) or nullptr
  float* lse;               // [B, Hq, Lq] workspace: log-sum-exp of each probe row (pass 1)
  float* out;               // [B, Hkv, Lk] fp32
  DType dtype;
  int64_t B, Hq, Hkv, Lq, Lk, D;
  float scale;
  bool causal;
};

// Exclusive end of the keys probe i can see.
SA_HOST_DEVICE int64_t probe_visible_end(int64_t i, int64_t Lq, int64_t Lk, bool causal) {
  if (!causal) return Lk;
  const int64_t end = Lk - Lq + i + 1;
  return end < 0 ? 0 : (end > Lk ? Lk : end);
}

// CPU: KV rows [bh_begin, bh_end) (bh = b * Hkv + h) of out, which the caller zeroed. q and k
// must be fp32 (dtype kFloat32) with q already multiplied by scale; params.scale is not applied
// again. fp32 logit tiles of one KV group come from a BLAS GEMM and go through
// softmax_column_sum_cpu.
void cumulative_scores_cpu(const CumulativeScoresParams& params, int64_t bh_begin, int64_t bh_end);

// CPU: the fused pass over one GEMM tile of fp32 logits (scale * q . k) for `rows` probe rows of
// one KV group: turns each row into probabilities in place and adds them into acc[0..Lk). Row t
// is probe (first_probe + t) % Lq. Only one tile of rows is ever in memory, never the
// [Hq * Lq, Lk] probability matrix.
void softmax_column_sum_cpu(float* logits, int64_t rows, int64_t first_probe, int64_t Lq,
                            int64_t Lk, bool causal, const uint8_t* key_mask, float* acc);

// CUDA: pass 1 writes lse for every probe row, pass 2 recomputes the logits of a key tile for
// all rows of a group and accumulates exp(logit - lse) over rows; probabilities never leave
// registers/shared memory.
void cumulative_scores_cuda(const CumulativeScoresParams& params, void* stream);

}  // namespace sparse_attn
