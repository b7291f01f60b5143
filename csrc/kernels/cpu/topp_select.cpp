// CPU top-p selection: radix threshold search on the score mass (see topp_select.h).
#include <cmath>
#include <vector>

#include "../topp_select.h"

namespace sparse_attn {
namespace {

struct Candidate {
  uint32_t key;
  float score;
};

// Where the greedy prefix crosses `need`: keep every candidate with key > threshold and the
// first n_ties candidates with key == threshold (in position order).
struct Threshold {
  uint32_t key;
  int64_t n_ties;
};

// Radix search over the candidate keys. `cands` is consumed (narrowed in place pass by pass).
Threshold find_threshold(std::vector<Candidate>& cands, double need) {
  double mass_above = 0.0;  // mass of candidates whose key is above the current prefix
  uint32_t prefix = 0;
  bool take_all_ties = false;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    double mass[kRadixBins] = {0.0};
    for (const Candidate& c : cands) {
      const uint32_t d = (c.key >> shift) & (kRadixBins - 1);
      mass[d] += c.score;
    }
    int digit = -1;
    for (int d = kRadixBins - 1; d >= 0 && !take_all_ties; --d) {
      if (mass_above + mass[d] >= need) {
        digit = d;
        break;
      }
      mass_above += mass[d];
    }
    if (digit < 0) {
      // Float rounding: the candidates sum to less than `need` in this order, so every one with
      // a positive score is kept: follow the lowest digit holding mass down to the smallest
      // positive key and take every tie there.
      take_all_ties = true;
      for (int d = 0; d < kRadixBins && digit < 0; ++d) {
        if (mass[d] > 0.0) digit = d;
      }
    }
    prefix |= static_cast<uint32_t>(digit) << shift;
    // Narrow to the candidates in the chosen digit.
    size_t n = 0;
    for (const Candidate& c : cands) {
      if (((c.key >> shift) & (kRadixBins - 1)) == static_cast<uint32_t>(digit)) cands[n++] = c;
    }
    cands.resize(n);
  }
  const int64_t n_ties = static_cast<int64_t>(cands.size());
  const double v = key_float(prefix);
  int64_t k = n_ties;
  if (!take_all_ties && v > 0.0) {
    const double k_real = std::ceil((need - mass_above) / v);
    k = k_real < 1.0 ? 1 : (k_real > static_cast<double>(n_ties) ? n_ties : static_cast<int64_t>(k_real));
  }
  return {prefix, k};
}

bool p_is_valid(float p) { return p > 0.0f && p <= 1.0f; }  // false for NaN

void select_row(const ToppSelectParams& prm, int64_t r, std::vector<Candidate>& cands) {
  const int64_t L = prm.L;
  const float* s = prm.scores + r * L;
  const uint8_t* valid = prm.valid_mask ? prm.valid_mask + r * L : nullptr;
  const uint8_t* cand_mask = prm.candidate_mask ? prm.candidate_mask + r * L : nullptr;
  int32_t* out = prm.indices + r * L;

  auto fail = [&](RowStatus code) {
    prm.status[r] = code;
    prm.counts[r] = 0;
    for (int64_t j = 0; j < L; ++j) out[j] = -1;
  };

  const float p = prm.p_rows ? prm.p_rows[r] : prm.p_scalar;
  if (!p_is_valid(p)) return fail(kBadP);

  // Pass 1: validate, count valid positions, total mass.
  int64_t n_valid = 0;
  double total = 0.0;
  for (int64_t j = 0; j < L; ++j) {
    if (valid && !valid[j]) continue;
    const float x = s[j];
    if (!std::isfinite(x)) return fail(kNonFiniteScore);
    if (x < 0.0f) return fail(kNegativeScore);
    ++n_valid;
    total += x;
  }

  // Pass 2: forced mass and the candidate list.
  const int64_t forced_tail = n_valid - prm.keep_last;
  auto is_forced = [&](int64_t j, int64_t rank) {
    return rank < prm.keep_first || rank >= forced_tail || (cand_mask && !cand_mask[j]);
  };
  uint32_t threshold = 0xffffffffu;  // no candidate has a key above this: keep forced only
  int64_t n_ties = 0;
  if (p == 1.0f) {
    threshold = 0;  // every candidate has key >= 0
    n_ties = L;
  } else {
    double forced_mass = 0.0, cand_mass = 0.0;
    cands.clear();
    int64_t rank = 0;
    for (int64_t j = 0; j < L; ++j) {
      if (valid && !valid[j]) continue;
      if (is_forced(j, rank)) {
        forced_mass += s[j];
      } else {
        cand_mass += s[j];
        cands.push_back({float_key(s[j]), s[j]});
      }
      ++rank;
    }
    const double need = static_cast<double>(p) * total - forced_mass;
    if (need > 0.0 && need >= cand_mass) {
      threshold = 0;  // target out of reach by rounding: keep every positive-score candidate
      n_ties = 0;
    } else if (need > 0.0) {
      const Threshold t = find_threshold(cands, need);
      threshold = t.key;
      n_ties = t.n_ties;
    }
  }

  // Pass 3: emit kept positions in ascending order.
  int64_t n_kept = 0, rank = 0, ties_taken = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (valid && !valid[j]) continue;
    bool keep = is_forced(j, rank);
    if (!keep) {
      const uint32_t key = float_key(s[j]);
      keep = key > threshold || (key == threshold && ties_taken++ < n_ties);
    }
    if (keep) out[n_kept++] = static_cast<int32_t>(j);
    ++rank;
  }
  for (int64_t j = n_kept; j < L; ++j) out[j] = -1;
  prm.counts[r] = static_cast<int32_t>(n_kept);
  prm.status[r] = kOk;
}

}  // namespace

void topp_select_cpu(const ToppSelectParams& params, int64_t row_begin, int64_t row_end) {
  std::vector<Candidate> cands;
  cands.reserve(static_cast<size_t>(params.L));
  for (int64_t r = row_begin; r < row_end; ++r) select_row(params, r, cands);
}

}  // namespace sparse_attn
