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
