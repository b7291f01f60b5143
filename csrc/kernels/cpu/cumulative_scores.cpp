// CPU part of the cumulative scores: fused softmax + column sum over a tile of logit rows.
#include <cmath>
#include <limits>

#include "../cumulative_scores.h"

namespace sparse_attn {

void softmax_column_sum_cpu(float* logits, int64_t rows, int64_t first_probe, int64_t Lq,
                            int64_t Lk, bool causal, const uint8_t* key_mask, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < rows; ++t) {
    float* row = logits + t * Lk;
    const int64_t end = probe_visible_end((first_probe + t) % Lq, Lq, Lk, causal);
    // The max keeps a NaN it meets, so that a NaN logit, a +inf maximum or a row of -inf logits
    // makes exp(x - row_max), hence the whole row, NaN as in the reference softmax: non-finite
    // inputs must reach topp_select's check rather than vanish as zero mass.
    float row_max = neg_inf;
    bool sees_a_key = false;
    for (int64_t j = 0; j < end; ++j) {
      if (key_mask && !key_mask[j]) continue;
      sees_a_key = true;
      row_max = (row[j] > row_max || row[j] != row[j]) ? row[j] : row_max;
    }
    if (!sees_a_key) continue;  // sees no key: contributes nothing
    float sum = 0.0f;
    for (int64_t j = 0; j < end; ++j) {
      const float e = (key_mask && !key_mask[j]) ? 0.0f : std::exp(row[j] - row_max);
      row[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < end; ++j) acc[j] += row[j] * inv;
  }
}

}  // namespace sparse_attn

// ---------------------------------------------------------------------------------------------
// CPU cumulative scores of KV rows [bh_begin, bh_end): fp32 logit tiles of one GQA group by a
// BLAS GEMM (ATen's matmul over the caller's buffers; nothing of torch is in the interface),
// each tile reduced by softmax_column_sum_cpu. Only one tile of rows is ever in memory.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace sparse_attn {

void cumulative_scores_cpu(const CumulativeScoresParams& p, int64_t bh_begin, int64_t bh_end) {
  const int64_t g = p.Hq / p.Hkv, group_rows = g * p.Lq, Lk = p.Lk, D = p.D;
  // Rows per GEMM tile: about 1 MiB of logits, at least 16 rows for an efficient GEMM.
  const int64_t tile_rows = std::min(group_rows, std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(Lk, 1)));
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  float* q = const_cast<float*>(static_cast<const float*>(p.q));
  float* k = const_cast<float*>(static_cast<const float*>(p.k));
  at::Tensor logits = at::empty({tile_rows, Lk}, opts);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
    const at::Tensor q_group = at::from_blob(q + (b * p.Hq + h * g) * p.Lq * D, {group_rows, D}, opts);
    const at::Tensor k_t = at::from_blob(k + bh * Lk * D, {Lk, D}, opts).t();
    for (int64_t row0 = 0; row0 < group_rows; row0 += tile_rows) {
      const int64_t n = std::min(tile_rows, group_rows - row0);
      at::Tensor tile = logits.narrow(0, 0, n);
      at::mm_out(tile, q_group.narrow(0, row0, n), k_t);
      softmax_column_sum_cpu(tile.data_ptr<float>(), n, row0 % p.Lq, p.Lq, Lk, p.causal,
                             p.key_mask ? p.key_mask + b * Lk : nullptr, p.out + bh * Lk);
    }
  }
}

}  // namespace sparse_attn
