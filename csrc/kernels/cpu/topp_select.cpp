// CPU top-p selection: radix threshold search on the score mass (see topp_select.h).
//
// Per row: one pass validates, sums, splits forced tokens from candidates and builds the first
// mass histogram (a second, counting pass first only when a valid_mask makes the number of valid
// positions unknown); the narrowing passes touch only the candidates of the threshold bucket; one
// last pass emits the kept positions in ascending order. Long rows use a wide first digit (12
// bits: exponent + 4 mantissa bits), which usually leaves a bucket of a few dozen candidates.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "../topp_select.h"

namespace sparse_attn {
namespace {

struct Digit {
  int shift, bits;
};
constexpr Digit kLongRowDigits[] = {{20, 12}, {10, 10}, {0, 10}};
constexpr Digit kShortRowDigits[] = {{24, 8}, {16, 8}, {8, 8}, {0, 8}};
constexpr int64_t kLongRow = 2048;  // below this, clearing 4096 bins per row would dominate
constexpr int kMaxBins = 1 << 12;

// Where the greedy prefix crosses `need`: keep every candidate with key > key and the first
// n_ties candidates with key == key (in position order).
struct Threshold {
  uint32_t key;
  int64_t n_ties;
};

struct RowScratch {
  std::vector<uint32_t> keys;  // candidate keys (scores as bits), position order
  std::vector<uint32_t> bucket;
  double mass[kMaxBins];
};

uint32_t digit_of(uint32_t key, Digit d) { return (key >> d.shift) & ((1u << d.bits) - 1); }

// Walks the histogram from the top digit down: the first digit whose mass takes the running sum
// to `need`. Returns -1 when float rounding leaves `need` out of reach.
int walk_down(const double* mass, int bins, double need, double* mass_above) {
  for (int d = bins - 1; d >= 0; --d) {
    if (*mass_above + mass[d] >= need) return d;
    *mass_above += mass[d];
  }
  return -1;
}

int lowest_with_mass(const double* mass, int bins) {
  for (int d = 0; d < bins; ++d) {
    if (mass[d] > 0.0) return d;
  }
  return -1;
}

// Radix search given the first histogram (over all candidates, digit `digits[0]`).
template <size_t N>
Threshold find_threshold(const Digit (&digits)[N], RowScratch& scratch, double need) {
  double mass_above = 0.0;  // mass of the candidates above the prefix found so far
  bool take_all = false;    // rounding: keep every positive candidate (follow the lowest mass)
  uint32_t prefix = 0, prefix_mask = 0;
  const std::vector<uint32_t>* source = &scratch.keys;
  for (size_t level = 0; level < N; ++level) {
    const Digit dg = digits[level];
    const int bins = 1 << dg.bits;
    if (level > 0) {  // histogram of the candidates in the current bucket
      std::fill(scratch.mass, scratch.mass + bins, 0.0);
      for (uint32_t key : *source) scratch.mass[digit_of(key, dg)] += key_float(key);
    }
    int d = take_all ? -1 : walk_down(scratch.mass, bins, need, &mass_above);
    if (d < 0) {
      take_all = true;
      d = lowest_with_mass(scratch.mass, bins);
    }
    prefix |= static_cast<uint32_t>(d) << dg.shift;
    prefix_mask |= ((1u << dg.bits) - 1) << dg.shift;
    if (level + 1 < N) {  // narrow to the chosen bucket
      std::vector<uint32_t>& next = scratch.bucket;
      size_t n = 0;
      if (source != &next) next.resize(source->size());
      for (uint32_t key : *source) {
        if ((key & prefix_mask) == prefix) next[n++] = key;
      }
      next.resize(n);
      source = &next;
    }
  }
  int64_t n_ties = 0;
  for (uint32_t key : *source) n_ties += key == prefix;
  const double v = key_float(prefix);
  int64_t k = n_ties;
  if (!take_all && v > 0.0) {
    const double k_real = std::ceil((need - mass_above) / v);
    k = k_real < 1.0 ? 1 : (k_real > static_cast<double>(n_ties) ? n_ties : static_cast<int64_t>(k_real));
  }
  return {prefix, k};
}

bool p_is_valid(float p) { return p > 0.0f && p <= 1.0f; }  // false for NaN

void select_row(const ToppSelectParams& prm, int64_t r, RowScratch& scratch) {
  const int64_t L = prm.L;
  const float* s = prm.scores + r * L;
  const uint8_t* valid = prm.valid_mask ? prm.valid_mask + r * L : nullptr;
  const uint8_t* cand_mask = prm.candidate_mask ? prm.candidate_mask + r * L : nullptr;
  int32_t* out = prm.indices + r * L;

  auto fail = [&](RowStatus code) {
    prm.status[r] = code;
    prm.counts[r] = 0;
    std::fill(out, out + L, -1);
  };
  const float p = prm.p_rows ? prm.p_rows[r] : prm.p_scalar;
  if (!p_is_valid(p)) return fail(kBadP);

  int64_t n_valid = L;
  if (valid) {
    n_valid = 0;
    for (int64_t j = 0; j < L; ++j) n_valid += valid[j] != 0;
  }
  const int64_t forced_tail = n_valid - prm.keep_last;
  auto is_forced = [&](int64_t j, int64_t rank) {
    return rank < prm.keep_first || rank >= forced_tail || (cand_mask && !cand_mask[j]);
  };
  const bool long_row = L >= kLongRow;
  const Digit first = long_row ? kLongRowDigits[0] : kShortRowDigits[0];

  // Validate, sum, split forced / candidates, first histogram. Kept branch-light: this loop and
  // the emitting one are nearly all of the time.
  double total = 0.0, cand_mass = 0.0;
  bool all_ok = true;
  std::fill(scratch.mass, scratch.mass + (1 << first.bits), 0.0);
  scratch.keys.resize(static_cast<size_t>(L));
  uint32_t* keys = scratch.keys.data();
  int64_t n_cand = 0;
  for (int64_t j = 0, rank = 0; j < L; ++j) {
    if (valid && !valid[j]) continue;
    const float x = s[j];
    all_ok &= x >= 0.0f && x <= std::numeric_limits<float>::max();  // false for NaN, inf, < 0
    total += x;
    if (!is_forced(j, rank++)) {
      const uint32_t key = float_key(x);
      keys[n_cand++] = key;
      scratch.mass[digit_of(key, first)] += x;
      cand_mass += x;
    }
  }
  if (!all_ok) {  // say which problem: NaN / inf first, as they also poison the sums
    for (int64_t j = 0; j < L; ++j) {
      if ((!valid || valid[j]) && !std::isfinite(s[j])) return fail(kNonFiniteScore);
    }
    return fail(kNegativeScore);
  }
  scratch.keys.resize(static_cast<size_t>(n_cand));
  const double forced_mass = total - cand_mass;

  Threshold t{0xffffffffu, 0};  // above every key: forced tokens only
  const double need = static_cast<double>(p) * total - forced_mass;
  if (p == 1.0f) {
    t = {0, L};  // every candidate, zeros included
  } else if (need > 0.0 && need >= cand_mass) {
    t = {0, 0};  // target out of reach by rounding: every positive-score candidate
  } else if (need > 0.0) {
    t = long_row ? find_threshold(kLongRowDigits, scratch, need)
                 : find_threshold(kShortRowDigits, scratch, need);
  }

  // Emit the kept positions in ascending order (out[n_kept] is always safe: n_kept <= j).
  int64_t n_kept = 0, ties_seen = 0;
  for (int64_t j = 0, rank = 0; j < L; ++j) {
    if (valid && !valid[j]) continue;
    const uint32_t key = float_key(s[j]);
    const bool forced = is_forced(j, rank++);
    const bool tie = !forced && key == t.key;
    const bool keep = forced || key > t.key || (tie && ties_seen < t.n_ties);
    ties_seen += tie;
    out[n_kept] = static_cast<int32_t>(j);
    n_kept += keep;
  }
  std::fill(out + n_kept, out + L, -1);
  prm.counts[r] = static_cast<int32_t>(n_kept);
  prm.status[r] = kOk;
}

}  // namespace

void topp_select_cpu(const ToppSelectParams& params, int64_t row_begin, int64_t row_end) {
  auto scratch = std::make_unique<RowScratch>();
  scratch->keys.reserve(static_cast<size_t>(params.L));
  for (int64_t r = row_begin; r < row_end; ++r) select_row(params, r, *scratch);
}

}  // namespace sparse_attn
