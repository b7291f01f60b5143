// CUDA top-p selection (see topp_select.h). Same algorithm and decisions as
// csrc/kernels/cpu/topp_select.cpp; only the summation order of the double mass sums differs,
// and that order is fixed, so identical calls give identical selections.
//
// One block of kThreads threads per row. Passes over the row (each a strided loop over L):
//   A  validate (NaN / inf anywhere in the valid positions -> kNonFiniteScore, else a negative
//      score -> kNegativeScore, as the CPU), n_valid, total mass;
//   R  (only with valid_mask and keep_first / keep_last) one block scan to turn the rank bounds
//      "rank < keep_first" and "rank >= n_valid - keep_last" into position bounds p_lo / p_hi,
//      so later passes decide "forced" without scanning;
//   B  forced and candidate mass;
//   4 radix passes (digits at shifts 24, 16, 8, 0): histogram of candidate mass and count over
//      the candidates matching the prefix so far, then warp 0 finds the threshold digit. The
//      mass histogram is deterministic (docs/gpu.md#topp-select-histograms): each warp sums the
//      lanes that share a digit in a fixed order and adds that into its own histogram (no
//      atomics), and the warps' histograms are reduced in warp order; only the integer counts
//      use shared-memory atomics, whose order does not matter;
//   T  (only if some but not all ties at the threshold key are kept) one block scan to find
//      the position p_tie of the first tie that is not kept;
//   E  emit: block scan over keep flags, chunk by chunk, writes kept positions in ascending
//      order, then -1 up to L.
// A position j is kept iff valid and (forced or key > T or (candidate, key == T and j < p_tie)).
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../topp_select.h"
#include "check_launch.cuh"

namespace sparse_attn {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
using BlockScan = cub::BlockScan<int, kThreads>;

static_assert(kRadixBins == 256 && kRadixBits == 8, "the digit walk assumes 8-bit digits");
static_assert(kThreads >= kRadixBins, "histogram reset uses one thread per bin");

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct OrOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a | b;
  }
};

// Reduction over the block; every thread gets the same value (same order everywhere).
// Must be called by all threads. `buf` holds kWarps elements.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* buf) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // previous users of buf are done
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = buf[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, buf[w]);
  return r;
}

struct SharedState {
  typename BlockScan::TempStorage scan;
  double red_d[kWarps];
  long long red_i[kWarps];
  double h_warp[kWarps][kRadixBins];  // each warp's own mass histogram of the current pass
  double h_mass[kRadixBins];          // their sum, in warp order
  int h_cnt[kRadixBins];
  long long pos[2];
  double mass_above;
  int digit;
  int take_all;
  int n_ties;
};

// Lane of the n-th (0-based) set bit of mask, 32 if mask has n or fewer set bits.
__device__ __forceinline__ int nth_set_bit(unsigned mask, int n) {
  if (n >= __popc(mask)) return 32;
  // The largest pos with fewer than n + 1 set bits below it is the n-th set bit.
  int pos = 0;
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) {
    if (__popc(mask & ((1u << (pos + w)) - 1u)) <= n) pos += w;
  }
  return pos;
}

// Sum of v over the lanes of `peers` (the calling lane's group; groups partition the warp),
// valid in the group's lowest lane. A tree over the lanes' ranks within the group: the order of
// the additions depends only on the group, never on scheduling. Must be called by all 32 lanes.
__device__ __forceinline__ double group_sum(double v, unsigned peers) {
  const int lane = threadIdx.x & 31;
  if (__all_sync(kFullMask, peers == kFullMask)) {  // one group: a plain butterfly
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
  }
  const int rank = __popc(peers & ((1u << lane) - 1u));
  const unsigned largest = __reduce_max_sync(kFullMask, static_cast<unsigned>(__popc(peers)));
  // After the step with offset o, rank r holds the sum of ranks [r, r + 2 o) of its group.
  for (unsigned o = 1; o < largest; o <<= 1) {
    const int src = nth_set_bit(peers, rank + static_cast<int>(o));
    const double y = __shfl_sync(kFullMask, v, src & 31);
    if (src < 32) v += y;
  }
  return v;
}

// Positions of the flagged elements with exclusive ranks k1 and k2 among the flagged ones
// (ascending position order); L when there is no such element or the k is negative. Must be
// called by all threads.
template <typename Flag>
__device__ void find_ranked(SharedState& sh, Flag flag, int64_t L, int64_t k1, int64_t k2,
                            int64_t& pos1, int64_t& pos2) {
  if (threadIdx.x == 0) {
    sh.pos[0] = L;
    sh.pos[1] = L;
  }
  __syncthreads();
  const int64_t kmax = k1 > k2 ? k1 : k2;
  int64_t carry = 0;  // same value in every thread
  for (int64_t base = 0; base < L && carry <= kmax; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int f = (j < L && flag(j)) ? 1 : 0;
    int excl = 0, agg = 0;
    BlockScan(sh.scan).ExclusiveSum(f, excl, agg);
    if (f) {
      const int64_t rank = carry + excl;
      if (rank == k1) sh.pos[0] = j;
      if (rank == k2) sh.pos[1] = j;
    }
    carry += agg;
    __syncthreads();  // sh.scan is reused by the next chunk
  }
  __syncthreads();
  pos1 = sh.pos[0];
  pos2 = sh.pos[1];
  __syncthreads();  // sh.pos may be rewritten by the next call
}

__global__ void __launch_bounds__(kThreads, 1) topp_select_kernel(const ToppSelectParams prm) {
  __shared__ SharedState sh;

  const int64_t r = blockIdx.x;
  const int64_t L = prm.L;
  const int tid = threadIdx.x;
  const float* __restrict__ s = prm.scores + r * L;
  const uint8_t* __restrict__ vm = prm.valid_mask ? prm.valid_mask + r * L : nullptr;
  const uint8_t* __restrict__ cm = prm.candidate_mask ? prm.candidate_mask + r * L : nullptr;
  int32_t* __restrict__ out = prm.indices + r * L;

  auto fail = [&](int code) {
    for (int64_t j = tid; j < L; j += kThreads) out[j] = -1;
    if (tid == 0) {
      prm.status[r] = code;
      prm.counts[r] = 0;
    }
  };
  auto valid = [&](int64_t j) { return vm == nullptr || vm[j] != 0; };

  const float p = prm.p_rows ? prm.p_rows[r] : prm.p_scalar;
  if (!(p > 0.0f && p <= 1.0f)) {  // NaN fails too
    fail(kBadP);
    return;
  }

  // Pass A: validation, n_valid, total. bad: bit 0 = some NaN / inf, bit 1 = some negative
  // score among the valid positions; NaN / inf is reported first (as the CPU does).
  long long n_valid = 0;
  double total = 0.0;
  long long bad = 0;
  for (int64_t j = tid; j < L; j += kThreads) {
    if (!valid(j)) continue;
    const float x = s[j];
    if (!isfinite(x)) {
      bad |= 1;
    } else if (x < 0.0f) {
      bad |= 2;
    }
    ++n_valid;
    total += static_cast<double>(x);
  }
  bad = block_allreduce(bad, OrOp{}, sh.red_i);
  if (bad != 0) {
    fail((bad & 1) ? kNonFiniteScore : kNegativeScore);
    return;
  }
  n_valid = block_allreduce(n_valid, SumOp{}, sh.red_i);
  total = block_allreduce(total, SumOp{}, sh.red_d);

  // Selection result: keep valid j iff forced(j) || key > thr || (key == thr && j < p_tie).
  uint32_t thr = 0u;
  int64_t p_tie = L;
  int64_t p_lo = 0, p_hi = L;  // forced by rank iff j < p_lo || j >= p_hi (valid j)
  auto forced = [&](int64_t j) { return j < p_lo || j >= p_hi || (cm != nullptr && cm[j] == 0); };

  if (p != 1.0f) {  // p == 1 keeps every valid position: thr = 0, p_tie = L
    // Rank bounds -> position bounds.
    const int64_t lo = prm.keep_first;
    const int64_t hi = n_valid - prm.keep_last;
    if (vm == nullptr) {  // rank == position
      p_lo = lo < 0 ? 0 : (lo > L ? L : lo);
      p_hi = hi < 0 ? 0 : (hi > L ? L : hi);
    } else {
      const int64_t k1 = (lo > 0 && lo < n_valid) ? lo : -1;
      const int64_t k2 = (hi > 0 && hi < n_valid) ? hi : -1;
      int64_t pos1 = L, pos2 = L;
      find_ranked(sh, valid, L, k1, k2, pos1, pos2);
      p_lo = lo <= 0 ? 0 : (lo >= n_valid ? L : pos1);
      p_hi = hi <= 0 ? 0 : (hi >= n_valid ? L : pos2);
    }

    // Pass B: forced and candidate mass.
    double forced_mass = 0.0, cand_mass = 0.0;
    for (int64_t j = tid; j < L; j += kThreads) {
      if (!valid(j)) continue;
      const double x = static_cast<double>(s[j]);
      if (forced(j)) {
        forced_mass += x;
      } else {
        cand_mass += x;
      }
    }
    forced_mass = block_allreduce(forced_mass, SumOp{}, sh.red_d);
    cand_mass = block_allreduce(cand_mass, SumOp{}, sh.red_d);
    const double need = static_cast<double>(p) * total - forced_mass;

    if (need <= 0.0) {
      thr = 0xffffffffu;  // no finite non-negative score has this key: forced only
      p_tie = 0;
    } else if (need >= cand_mass) {
      // Target out of reach by rounding: every positive-score candidate (key > 0; no ties at 0).
      thr = 0u;
      p_tie = 0;
    } else {
      // Radix search for the threshold key.
      uint32_t prefix = 0u;
      double mass_above = 0.0;  // mass of the candidates above the current prefix
      bool take_all = false;
      int64_t n_ties = 0;
      const int lane = tid & 31;
      double* const h_own = sh.h_warp[tid >> 5];
      for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
        for (int i = tid; i < kWarps * kRadixBins; i += kThreads) (&sh.h_warp[0][0])[i] = 0.0;
        if (tid < kRadixBins) sh.h_cnt[tid] = 0;
        __syncthreads();
        // Bits above this digit, fixed by the earlier passes (none in the first pass).
        const uint32_t hi_mask =
            shift == 32 - kRadixBits ? 0u : (0xffffffffu << (shift + kRadixBits));
        // Warp-uniform loop (j0 is the warp's first position), so that every lane takes part in
        // the warp collectives; lanes past L or not matching hold digit kRadixBins (none).
        for (int64_t j0 = tid - lane; j0 < L; j0 += kThreads) {
          const int64_t j = j0 + lane;
          int d = kRadixBins;
          double x = 0.0;
          if (j < L && valid(j) && !forced(j)) {
            const float xf = s[j];
            const uint32_t key = float_key(xf);
            if ((key & hi_mask) == prefix) {
              d = static_cast<int>((key >> shift) & (kRadixBins - 1));
              x = static_cast<double>(xf);
            }
          }
          if (__ballot_sync(kFullMask, d < kRadixBins) == 0u) continue;  // warp-uniform
          const unsigned peers = __match_any_sync(kFullMask, d);
          const double group_mass = group_sum(x, peers);
          // The group's lowest lane adds it: one writer per digit and warp, no atomics.
          if (d < kRadixBins && (peers & ((1u << lane) - 1u)) == 0u) {
            h_own[d] += group_mass;
            atomicAdd(&sh.h_cnt[d], __popc(peers));
          }
          __syncwarp();  // the next iteration's leader of a digit sees this one's write
        }
        __syncthreads();
        if (tid < kRadixBins) {  // the warps' histograms, summed in warp order
          double m = 0.0;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) m += sh.h_warp[w][tid];
          sh.h_mass[tid] = m;
        }
        __syncthreads();
        if (tid < 32) {
          // Lane l covers digits 255 - 8 l down to 248 - 8 l. Inclusive scan of the lane sums in
          // descending digit order finds the first lane whose digits reach `need`; lane 0 then
          // walks that lane's digits one by one (and on, if rounding makes it miss).
          const int lane = tid;
          double lsum = 0.0;
#pragma unroll
          for (int q = 0; q < 8; ++q) lsum += sh.h_mass[255 - 8 * lane - q];
          double incl = lsum;
#pragma unroll
          for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
          }
          const double excl_raw = __shfl_up_sync(0xffffffffu, incl, 1);
          const bool cross = !take_all && (mass_above + incl >= need);
          const unsigned ballot = __ballot_sync(0xffffffffu, cross);
          const int first = ballot ? __ffs(ballot) - 1 : 0;
          const double excl_first = __shfl_sync(0xffffffffu, excl_raw, first);
          if (lane == 0) {
            int digit = -1;
            double acc = mass_above;
            if (ballot) {
              // Lanes before `first` did not reach need: mass_above + excl < need.
              if (first > 0) acc = mass_above + excl_first;
              for (int d = 255 - 8 * first; d >= 0; --d) {
                if (acc + sh.h_mass[d] >= need) {
                  digit = d;
                  break;
                }
                acc += sh.h_mass[d];
              }
            }
            if (digit >= 0) {
              sh.mass_above = acc;
              sh.take_all = 0;
            } else {
              // Float rounding (or take_all from an earlier pass): the candidates sum to less
              // than `need`, so every positive-score one is kept. Follow the lowest digit holding
              // mass down to the smallest positive key and take every tie there.
              for (int d = 0; d < kRadixBins; ++d) {
                if (sh.h_mass[d] > 0.0) {
                  digit = d;
                  break;
                }
              }
              // Unreachable: the chosen bucket always holds mass (need > 0 was crossed inside it
              // or it was chosen for its mass), and so does the first histogram (cand_mass > 0).
              if (digit < 0) digit = 0;
              sh.mass_above = mass_above;
              sh.take_all = 1;
            }
            sh.digit = digit;
            sh.n_ties = sh.h_cnt[digit];
          }
        }
        __syncthreads();
        // The next writes of sh.digit etc. and of the histogram come after two more barriers.
        prefix |= static_cast<uint32_t>(sh.digit) << shift;
        mass_above = sh.mass_above;
        take_all = sh.take_all != 0;
        n_ties = sh.n_ties;
      }
      thr = prefix;
      // How many ties (candidates with key == thr, in position order) are kept.
      const double v = static_cast<double>(key_float(thr));
      int64_t k = n_ties;
      if (!take_all && v > 0.0) {
        const double k_real = ceil((need - mass_above) / v);
        k = k_real < 1.0 ? 1
                         : (k_real > static_cast<double>(n_ties) ? n_ties
                                                                  : static_cast<int64_t>(k_real));
      }
      if (k >= n_ties) {
        p_tie = L;
      } else {
        auto tie = [&](int64_t j) {
          return valid(j) && !forced(j) && float_key(s[j]) == thr;
        };
        int64_t unused = L;
        find_ranked(sh, tie, L, k, -1, p_tie, unused);
      }
    }
  }

  // Pass E: emit kept positions in ascending order.
  int64_t n_kept = 0;  // same value in every thread
  for (int64_t base = 0; base < L; base += kThreads) {
    const int64_t j = base + tid;
    int keep = 0;
    if (j < L && valid(j)) {
      if (forced(j)) {
        keep = 1;
      } else {
        const uint32_t key = float_key(s[j]);
        keep = (key > thr || (key == thr && j < p_tie)) ? 1 : 0;
      }
    }
    int slot = 0, agg = 0;
    BlockScan(sh.scan).ExclusiveSum(keep, slot, agg);
    if (keep) out[n_kept + slot] = static_cast<int32_t>(j);
    n_kept += agg;
    __syncthreads();  // sh.scan is reused by the next chunk
  }
  for (int64_t j = n_kept + tid; j < L; j += kThreads) out[j] = -1;
  if (tid == 0) {
    prm.counts[r] = static_cast<int32_t>(n_kept);
    prm.status[r] = kOk;
  }
}

}  // namespace

void topp_select_cuda(const ToppSelectParams& params, void* stream) {
  if (params.R < 0 || params.L < 0)
    throw std::runtime_error("topp_select_cuda: negative sizes");
  if (params.L > INT32_MAX)
    throw std::runtime_error("topp_select_cuda: rows longer than 2^31 - 1 are not supported");
  if (params.R > INT32_MAX)
    throw std::runtime_error("topp_select_cuda: more than 2^31 - 1 rows are not supported");
  if (params.R == 0) return;
  topp_select_kernel<<<static_cast<unsigned>(params.R), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(params);
  check_launch("topp_select_cuda: kernel launch failed");
}

}  // namespace sparse_attn
