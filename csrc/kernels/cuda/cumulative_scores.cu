// CUDA cumulative attention scores (see cumulative_scores.h and docs/design.md#top-p-selection).
//
// For one (b, h) the probe rows of the g query heads of KV head h form one "group" of
// gL = g * Lq rows; group row t is probe i = t % Lq of query head h * g + t / Lq, so the q rows
// and lse entries of a group are contiguous, starting at row (b * Hq + h * g) * Lq.
//
// All passes work on 64 x 64 logit tiles S = Q_tile . K_tile^T that live in shared memory only:
//   fp16/bf16 (sm_80+): WMMA 16x16x16 tensor-core tiles with fp32 accumulation,
//   fp32:               a shared-memory tiled FMA GEMM (4x4 outputs per thread).
// Both paths compute plain fp32 dot products; the logit is __fmul_rn(dot, scale), bit-identical
// in pass 1 and pass 2, so exp(logit - lse) <= 1 always holds.
//
//   pass 1  (lse_kernel):     block = (b, h, 64-row tile, key split). Each thread keeps an online
//                             (max, sum) of its row over its columns; 4 threads share a row and
//                             merge at the end. With one split it writes lse directly; with
//                             several it writes (max, sum) partials into `out`, which pass 2
//                             overwrites completely anyway (needs 2 * gL * splits <= Lk floats
//                             per (b, h), the host picks splits accordingly), and
//          (lse_combine_kernel) merges the partials into lse.
//   pass 2  (colsum_kernel):  block = (b, h, 64-key tile). Loops over all row tiles of the group,
//                             recomputes the logit tile and sums exp(logit - lse) per key over
//                             the visible (row, key) pairs. Each output element is owned by one
//                             block; every element in [0, Lk) is written (zeros included).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cumulative_scores.h"
#include "check_launch.cuh"

namespace sparse_attn {
namespace {

constexpr int kThreads = 256;       // 8 warps
constexpr int kBM = 64;             // probe rows per tile
constexpr int kBN = 64;             // keys per tile
constexpr int kSLd = kBN + 4;       // logit tile row stride (floats); multiple of 4 for WMMA
constexpr int kFmaDK = 32;          // head-dim chunk of the FMA path
constexpr int kMmaDK = 64;          // head-dim chunk of the WMMA path
constexpr int kMmaLd = kMmaDK + 8;  // staging row stride (16-bit elements); multiple of 8
// No buffer is sized by D (both GEMM paths loop over it in chunks), so any head dim works, as on
// the CPU; the bound only keeps `int` dim arithmetic (d0 + chunk) far from overflow.
constexpr int64_t kMaxD = int64_t{1} << 30;

static_assert(kThreads == 4 * kBM, "pass 1 maps 4 threads to each row");
static_assert(kThreads % kBN == 0, "pass 2 maps kThreads / kBN threads to each key");
static_assert(kThreads == 256 && kBM == 64 && kBN == 64, "tile mappings assume 256 threads, 64x64");

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(x);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(x);
  } else {
    static_assert(std::is_same<T, float>::value, "unsupported element type");
    return x;
  }
}

// Shared memory of one logit tile. The staging buffers of the two GEMM paths share storage; the
// 16-bit staging is kept as raw uint16_t (no constructors in __shared__) and reinterpreted as
// __half / __nv_bfloat16 for WMMA. WMMA pointers must be 32-byte aligned: row strides are
// 144 bytes (kMmaLd halves) and 272 bytes (kSLd floats) and every fragment starts at a multiple
// of 16 rows / 16 columns, so all fragment pointers are multiples of 32 bytes.
struct alignas(32) TileSmem {
  union alignas(32) Staging {
    struct {
      float q[kFmaDK][kBM + 1];  // transposed: [d][row]
      float k[kFmaDK][kBN + 1];  // transposed: [d][key]
    } fma;
    struct {
      alignas(32) uint16_t q[kBM][kMmaLd];  // [row][d]
      alignas(32) uint16_t k[kBN][kMmaLd];  // [key][d]
    } mma;
  } u;
  alignas(32) float s[kBM][kSLd];  // raw dot products q_row . k_key
};

// FMA path: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and keys tx + 16 j.
template <typename T>
__device__ __forceinline__ void compute_tile_fma(TileSmem& sm, const T* __restrict__ q_tile,
                                                 int n_rows, const T* __restrict__ k_tile,
                                                 int n_keys, int D) {
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  for (int d0 = 0; d0 < D; d0 += kFmaDK) {
    // Everyone is done with the previous chunk's staging and (on the first chunk) with the
    // caller's reads of the previous tile's S.
    __syncthreads();
    for (int idx = tid; idx < kBM * kFmaDK; idx += kThreads) {
      const int row = idx / kFmaDK, dd = idx % kFmaDK, d = d0 + dd;
      sm.u.fma.q[dd][row] =
          (row < n_rows && d < D) ? to_float(q_tile[static_cast<int64_t>(row) * D + d]) : 0.f;
    }
    for (int idx = tid; idx < kBN * kFmaDK; idx += kThreads) {
      const int key = idx / kFmaDK, dd = idx % kFmaDK, d = d0 + dd;
      sm.u.fma.k[dd][key] =
          (key < n_keys && d < D) ? to_float(k_tile[static_cast<int64_t>(key) * D + d]) : 0.f;
    }
    __syncthreads();
    const int dn = min(kFmaDK, D - d0);
#pragma unroll 4
    for (int dd = 0; dd < dn; ++dd) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sm.u.fma.q[dd][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.u.fma.k[dd][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }
  // S is not part of the staging union and all readers of the previous S passed the first
  // barrier of the loop above (D >= 1), so S can be written now.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.s[ty + 16 * i][tx + 16 * j] = acc[i][j];
  }
  __syncthreads();
}

// WMMA path (16-bit inputs): warp w computes rows 16 * (w % 4) .. +16, keys 32 * (w / 4) .. +32.
// `vec`: D % 8 == 0 and q, k 16-byte aligned, so rows can be staged with 16-byte loads.
template <typename T>
__device__ __forceinline__ void compute_tile_mma(TileSmem& sm, const T* __restrict__ q_tile,
                                                 int n_rows, const T* __restrict__ k_tile,
                                                 int n_keys, int D, bool vec) {
  using namespace nvcuda;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 4, wn = warp / 4;
  const uint16_t* qraw = reinterpret_cast<const uint16_t*>(q_tile);
  const uint16_t* kraw = reinterpret_cast<const uint16_t*>(k_tile);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c0, c1;
  wmma::fill_fragment(c0, 0.f);
  wmma::fill_fragment(c1, 0.f);
  for (int d0 = 0; d0 < D; d0 += kMmaDK) {
    __syncthreads();  // see compute_tile_fma
    if (vec) {
      constexpr int kVecPerRow = kMmaDK / 8;
      for (int idx = tid; idx < kBM * kVecPerRow; idx += kThreads) {
        const int row = idx / kVecPerRow, v = idx % kVecPerRow, d = d0 + 8 * v;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (row < n_rows && d < D)  // D % 8 == 0: d < D implies d + 8 <= D
          val = *reinterpret_cast<const uint4*>(qraw + static_cast<int64_t>(row) * D + d);
        *reinterpret_cast<uint4*>(&sm.u.mma.q[row][8 * v]) = val;
      }
      for (int idx = tid; idx < kBN * kVecPerRow; idx += kThreads) {
        const int key = idx / kVecPerRow, v = idx % kVecPerRow, d = d0 + 8 * v;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (key < n_keys && d < D)
          val = *reinterpret_cast<const uint4*>(kraw + static_cast<int64_t>(key) * D + d);
        *reinterpret_cast<uint4*>(&sm.u.mma.k[key][8 * v]) = val;
      }
    } else {
      for (int idx = tid; idx < kBM * kMmaDK; idx += kThreads) {
        const int row = idx / kMmaDK, dd = idx % kMmaDK, d = d0 + dd;
        sm.u.mma.q[row][dd] =
            (row < n_rows && d < D) ? qraw[static_cast<int64_t>(row) * D + d] : uint16_t{0};
      }
      for (int idx = tid; idx < kBN * kMmaDK; idx += kThreads) {
        const int key = idx / kMmaDK, dd = idx % kMmaDK, d = d0 + dd;
        sm.u.mma.k[key][dd] =
            (key < n_keys && d < D) ? kraw[static_cast<int64_t>(key) * D + d] : uint16_t{0};
      }
    }
    __syncthreads();
    // Dims in [D, round_up(D, 16)) of the last chunk are zero in the staging buffers.
    const int kn = min(kMmaDK, D - d0);
    for (int kk = 0; kk < kn; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b0, b1;
      wmma::load_matrix_sync(a, reinterpret_cast<const T*>(&sm.u.mma.q[16 * wm][kk]), kMmaLd);
      wmma::load_matrix_sync(b0, reinterpret_cast<const T*>(&sm.u.mma.k[32 * wn][kk]), kMmaLd);
      wmma::load_matrix_sync(b1, reinterpret_cast<const T*>(&sm.u.mma.k[32 * wn + 16][kk]),
                             kMmaLd);
      wmma::mma_sync(c0, a, b0, c0);
      wmma::mma_sync(c1, a, b1, c1);
    }
  }
  wmma::store_matrix_sync(&sm.s[16 * wm][32 * wn], c0, kSLd, wmma::mem_row_major);
  wmma::store_matrix_sync(&sm.s[16 * wm][32 * wn + 16], c1, kSLd, wmma::mem_row_major);
  __syncthreads();
}

// sm.s[r][c] = q_tile[r] . k_tile[c] for r < kBM, c < kBN; rows >= n_rows, keys >= n_keys and
// dims >= D count as zero. Must be called by all threads of the block, after every thread has
// finished reading the previous sm.s; returns after a barrier, with sm.s ready.
template <typename T>
__device__ __forceinline__ void compute_tile(TileSmem& sm, const T* q_tile, int n_rows,
                                             const T* k_tile, int n_keys, int D, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool kMma = !std::is_same<T, float>::value;
#else
  constexpr bool kMma = false;
#endif
  if constexpr (kMma) {
    compute_tile_mma<T>(sm, q_tile, n_rows, k_tile, n_keys, D, vec);
  } else {
    (void)vec;
    compute_tile_fma<T>(sm, q_tile, n_rows, k_tile, n_keys, D);
  }
}

// Non-finite logits poison their probe row as in the reference softmax (and the CPU twin): a
// NaN logit, a +inf maximum, or a row whose visible logits are all -inf gives lse = NaN, so
// pass 2 writes NaN at every key the row sees. Hence a max that keeps NaN (fmaxf drops it), and
// the state m = -inf, s > 0 for "saw only -inf logits" (s = 0: saw nothing).
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a || b != b) ? NAN : fmaxf(a, b);
}

// Merges the log-sum-exp state (m2, s2) into (m, s): s is the sum of exp(x - m).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float nm = nan_max(m, m2);
  if (nm == -INFINITY) {
    s = s + s2;  // both sides saw nothing or only -inf logits
  } else {
    s = s * expf(m - nm) + s2 * expf(m2 - nm);  // expf(-inf) == 0 for an empty side
  }
  m = nm;
}

__device__ __forceinline__ float lse_finish(float m, float s) {
  if (m == -INFINITY) return s > 0.f ? NAN : -INFINITY;  // only -inf logits: NaN, as softmax
  return m + logf(s);
}

// Pass 1. blockIdx.x = (bh * splits + split) * row_tiles + row_tile.
// partials == nullptr: write lse. Otherwise write (max, sum) of each (group row t, split) to
// partials[bh * Lk + (split * gL + t) * 2 + {0, 1}].
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    lse_kernel(const T* __restrict__ q, const T* __restrict__ k,
               const uint8_t* __restrict__ key_mask, float* __restrict__ lse, float* partials,
               int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int D, float scale, bool causal,
               int64_t row_tiles, int64_t splits, int64_t tiles_per_split, bool vec) {
  __shared__ TileSmem sm;
  __shared__ int64_t row_end[kBM];
  __shared__ bool col_ok[kBN];

  int64_t blk = blockIdx.x;
  const int64_t rt = blk % row_tiles;
  blk /= row_tiles;
  const int64_t split = blk % splits;
  const int64_t bh = blk / splits;
  const int64_t b = bh / Hkv, h = bh % Hkv;
  const int64_t g = Hq / Hkv, gL = g * Lq;
  const int64_t row0 = rt * kBM;
  const int n_rows = static_cast<int>(min(static_cast<int64_t>(kBM), gL - row0));
  const int64_t group_base = (b * Hq + h * g) * Lq;
  const T* q_tile = q + (group_base + row0) * D;
  const T* k_head = k + bh * Lk * D;
  const uint8_t* mask_b = key_mask ? key_mask + b * Lk : nullptr;

  const int tid = threadIdx.x;
  if (tid < kBM)
    row_end[tid] = tid < n_rows ? probe_visible_end((row0 + tid) % Lq, Lq, Lk, causal) : 0;

  const int64_t ntiles = (Lk + kBN - 1) / kBN;
  const int64_t kt0 = split * tiles_per_split;
  const int64_t kt1 = min(ntiles, kt0 + tiles_per_split);
  const int row = tid / 4, sub = tid % 4;
  float m = -INFINITY, s = 0.f;
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const int64_t j0 = kt * kBN;
    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kBN), Lk - j0));
    bool ok = false;
    if (tid < kBN) {
      ok = tid < n_keys && (mask_b == nullptr || mask_b[j0 + tid] != 0);
      col_ok[tid] = ok;
    }
    // Skip tiles nobody sees (all keys masked, or causal and after every row's end). These
    // barriers also publish row_end / col_ok. After them a skipping thread reads no shared
    // memory, so the next iteration may overwrite col_ok.
    const bool any_col = __syncthreads_or(ok);
    const bool any_row = __syncthreads_or(tid < kBM && row_end[tid] > j0);
    if (!any_col || !any_row) continue;

    compute_tile<T>(sm, q_tile, n_rows, k_head + j0 * D, n_keys, D, vec);

    const int64_t end = row_end[row];
    float tmax = -INFINITY;
    bool seen = false;
#pragma unroll
    for (int cc = 0; cc < kBN / 4; ++cc) {
      const int c = sub + 4 * cc;
      if (col_ok[c] && j0 + c < end) {
        const float x = __fmul_rn(sm.s[row][c], scale);
        tmax = (x > tmax || x != x) ? x : tmax;  // keeps a NaN (see nan_max)
        seen = true;
      }
    }
    const float nm = nan_max(m, tmax);
    if (seen && nm == -INFINITY) {
      s += 1.f;  // only -inf logits so far: lse_finish makes the row NaN unless a finite one comes
    } else if (seen) {
      float acc = s * expf(m - nm);  // m == -inf: s is finite and expf(-inf) == 0
#pragma unroll 4
      for (int cc = 0; cc < kBN / 4; ++cc) {
        const int c = sub + 4 * cc;
        if (col_ok[c] && j0 + c < end) acc += expf(__fmul_rn(sm.s[row][c], scale) - nm);
      }
      m = nm;
      s = acc;
    }
    __syncthreads();  // done reading sm.s / col_ok of this tile
  }

  // The 4 threads of a row are lanes 4k .. 4k + 3 of one warp.
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  if (sub == 0 && row < n_rows) {
    const int64_t t = row0 + row;
    if (partials != nullptr) {
      float* p = partials + bh * Lk + (split * gL + t) * 2;
      p[0] = m;
      p[1] = s;
    } else {
      lse[group_base + t] = lse_finish(m, s);
    }
  }
}

// Merges the split partials of every probe row into lse[(b * Hq + r) * Lq + i].
__global__ void lse_combine_kernel(const float* __restrict__ partials, float* __restrict__ lse,
                                   int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk,
                                   int64_t splits) {
  const int64_t n = B * Hq * Lq;
  const int64_t g = Hq / Hkv, gL = g * Lq;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % Lq;
    const int64_t br = idx / Lq;
    const int64_t r = br % Hq, b = br / Hq;
    const int64_t h = r / g;
    const int64_t t = (r - h * g) * Lq + i;
    const float* p = partials + (b * Hkv + h) * Lk + t * 2;
    float m = -INFINITY, s = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) lse_merge(m, s, p[sp * gL * 2], p[sp * gL * 2 + 1]);
    lse[idx] = lse_finish(m, s);
  }
}

// Pass 2. blockIdx.x = bh * key_tiles + key_tile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    colsum_kernel(const T* __restrict__ q, const T* __restrict__ k,
                  const uint8_t* __restrict__ key_mask, const float* __restrict__ lse,
                  float* __restrict__ out, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int D,
                  float scale, bool causal, bool vec) {
  constexpr int kRowGroups = kThreads / kBN;
  __shared__ TileSmem sm;
  __shared__ int64_t row_end[kBM];
  __shared__ float row_lse[kBM];
  __shared__ bool col_ok[kBN];
  __shared__ float red[kRowGroups][kBN];

  const int64_t key_tiles = (Lk + kBN - 1) / kBN;
  const int64_t kt = blockIdx.x % key_tiles;
  const int64_t bh = blockIdx.x / key_tiles;
  const int64_t b = bh / Hkv, h = bh % Hkv;
  const int64_t g = Hq / Hkv, gL = g * Lq;
  const int64_t group_base = (b * Hq + h * g) * Lq;
  const int64_t j0 = kt * kBN;
  const int n_keys = static_cast<int>(min(static_cast<int64_t>(kBN), Lk - j0));
  const T* k_tile = k + (bh * Lk + j0) * D;

  const int tid = threadIdx.x;
  if (tid < kBN)
    col_ok[tid] = tid < n_keys && (key_mask == nullptr || key_mask[b * Lk + j0 + tid] != 0);
  const int col = tid % kBN, sub = tid / kBN;

  float acc = 0.f;
  for (int64_t row0 = 0; row0 < gL; row0 += kBM) {
    const int n_rows = static_cast<int>(min(static_cast<int64_t>(kBM), gL - row0));
    bool live = false;
    if (tid < kBM) {
      float l = -INFINITY;
      int64_t e = 0;
      if (tid < n_rows) {
        l = lse[group_base + row0 + tid];
        e = probe_visible_end((row0 + tid) % Lq, Lq, Lk, causal);
      }
      row_lse[tid] = l;
      row_end[tid] = e;
      live = l != -INFINITY && e > j0;
    }
    // Skip row tiles that see nothing of this key tile; the barrier publishes row_*/col_ok.
    if (!__syncthreads_or(live)) continue;

    compute_tile<T>(sm, q + (group_base + row0) * D, n_rows, k_tile, n_keys, D, vec);

    if (col_ok[col]) {
      const int64_t j = j0 + col;
#pragma unroll 4
      for (int ri = 0; ri < kBM / kRowGroups; ++ri) {
        const int rr = sub + kRowGroups * ri;
        const float l = row_lse[rr];
        if (j < row_end[rr] && l != -INFINITY) acc += expf(__fmul_rn(sm.s[rr][col], scale) - l);
      }
    }
    __syncthreads();  // done reading sm.s / row_* of this row tile
  }
  red[sub][col] = acc;
  __syncthreads();
  if (tid < n_keys) {
    float v = 0.f;
#pragma unroll
    for (int sg = 0; sg < kRowGroups; ++sg) v += red[sg][tid];
    out[bh * Lk + j0 + tid] = v;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();  // clear, not fatal: fall back to an H100-sized guess
    return 132;
  }
  return n;
}

template <typename T>
void launch(const CumulativeScoresParams& p, cudaStream_t stream) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int D = static_cast<int>(p.D);
  const int64_t g = p.Hq / p.Hkv, gL = g * p.Lq, BH = p.B * p.Hkv;
  const bool vec = p.D % 8 == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.k) % 16 == 0;
  const int64_t key_tiles = ceil_div(p.Lk, kBN);

  // Pass 1: lse of every probe row (-inf for rows that see no key, including Lk == 0).
  if (BH > 0 && gL > 0) {
    const int64_t row_tiles = ceil_div(gL, kBM);
    const int64_t base_blocks = BH * row_tiles;
    int64_t splits = 1;
    if (key_tiles > 1) {
      const int64_t target_blocks = 4 * static_cast<int64_t>(sm_count());
      int64_t want = ceil_div(target_blocks, base_blocks);
      const int64_t max_by_work = ceil_div(key_tiles, 4);  // >= 4 key tiles per split
      const int64_t max_by_scratch = p.Lk / (2 * gL);      // partials must fit in out[b, h, :]
      want = want < max_by_work ? want : max_by_work;
      want = want < max_by_scratch ? want : max_by_scratch;
      want = want < 1024 ? want : 1024;
      splits = want > 1 ? want : 1;
    }
    int64_t tiles_per_split = key_tiles;
    if (splits > 1) {
      tiles_per_split = ceil_div(key_tiles, splits);
      splits = ceil_div(key_tiles, tiles_per_split);  // <= the previous value: still fits
    }
    const int64_t blocks = base_blocks * splits;
    if (blocks > INT_MAX) throw std::runtime_error("cumulative_scores_cuda: problem too large");
    lse_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        q, k, p.key_mask, p.lse, splits > 1 ? p.out : nullptr, p.Hq, p.Hkv, p.Lq, p.Lk, D,
        p.scale, p.causal, row_tiles, splits, tiles_per_split, vec);
    check_launch("cumulative_scores_cuda: lse_kernel launch failed");
    if (splits > 1) {
      const int64_t n = p.B * p.Hq * p.Lq;
      const int64_t cblocks = ceil_div(n, 256) < 65535 ? ceil_div(n, 256) : 65535;
      lse_combine_kernel<<<static_cast<unsigned>(cblocks), 256, 0, stream>>>(
          p.out, p.lse, p.B, p.Hq, p.Hkv, p.Lq, p.Lk, splits);
      check_launch("cumulative_scores_cuda: lse_combine_kernel launch failed");
    }
  }

  // Pass 2: every out[b, h, j] (zeros for keys nobody sees, and for everything when gL == 0).
  if (BH > 0 && key_tiles > 0) {
    const int64_t blocks = BH * key_tiles;
    if (blocks > INT_MAX) throw std::runtime_error("cumulative_scores_cuda: problem too large");
    colsum_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        q, k, p.key_mask, p.lse, p.out, p.Hq, p.Hkv, p.Lq, p.Lk, D, p.scale, p.causal, vec);
    check_launch("cumulative_scores_cuda: colsum_kernel launch failed");
  }
}

}  // namespace

void cumulative_scores_cuda(const CumulativeScoresParams& params, void* stream) {
  const CumulativeScoresParams& p = params;
  if (p.D < 1 || p.D > kMaxD)
    throw std::runtime_error("cumulative_scores_cuda: head dim must be in [1, 2^30], got " +
                             std::to_string(p.D));
  if (p.B < 0 || p.Hq < 0 || p.Lq < 0 || p.Lk < 0 || p.Hkv <= 0 || p.Hq % p.Hkv != 0)
    throw std::runtime_error("cumulative_scores_cuda: bad sizes (need Hkv > 0, Hq % Hkv == 0)");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32:
      launch<float>(p, s);
      break;
    case DType::kFloat16:
      launch<__half>(p, s);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(p, s);
      break;
    default:
      throw std::runtime_error("cumulative_scores_cuda: unsupported dtype");
  }
}

}  // namespace sparse_attn
