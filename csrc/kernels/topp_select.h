// Minimal top-p token set per row (docs/design.md#top-p-selection), without a full sort.
//
// Over the valid positions of a row (valid_mask, default all):
//   forced F = first keep_first valid positions, last keep_last valid positions, and every valid
//              position whose candidate_mask is 0. F's mass counts toward the target.
//   target   = p * total (total = mass of all valid positions)
//   then candidates (valid, not forced) in order of decreasing score, ties lower position first,
//   until mass(S) >= target. p == 1 keeps every valid position.
// Output: the kept positions of each row in ascending order, then -1; counts[r] = |S|.
//
// Algorithm (CPU and CUDA alike): non-negative floats order like their bits, so a radix search
// over the 32 key bits (histograms of *mass* per digit; CUDA: 4 digits of 8 bits, CPU: the same
// for short rows, 12 + 10 + 10 bits for long ones) finds the exact threshold score T at which the greedy prefix crosses the target: every candidate with score > T
// is kept, and among the candidates equal to T the lowest positions are kept until the target is
// met. A final ascending scan over positions emits the indices.
#pragma once

#include "common.h"

namespace sparse_attn {

struct ToppSelectParams {
  const float* scores;            // [R, L]
  const float* p_rows;            // [R] per-row thresholds, or nullptr to use p_scalar
  float p_scalar;
  const uint8_t* valid_mask;      // [R, L] (1 = real token) or nullptr
  const uint8_t* candidate_mask;  // [R, L] (0 = always keep) or nullptr
  int32_t* indices;               // [R, L] out
  int32_t* counts;                // [R] out
  int32_t* status;                // [R] out, RowStatus
  int64_t R, L;
  int64_t keep_first, keep_last;
};

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Rows [row_begin, row_end); the caller parallelises over row ranges.
void topp_select_cpu(const ToppSelectParams& params, int64_t row_begin, int64_t row_end);

void topp_select_cuda(const ToppSelectParams& params, void* stream);

}  // namespace sparse_attn
