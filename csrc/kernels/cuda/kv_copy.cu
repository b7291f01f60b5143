// CUDA gather / scatter of whole K and V rows and the index-row check (see kv_copy.h). Same
// validation and results as csrc/kernels/cpu/kv_copy.cpp.
//
//   check_kv_indices_cuda -> validate_kernel: one warp per index row r; writes status[r] (kOk or
//       the first problem, in the CPU's order: the count, then per entry c ascending: out of
//       range, then not ascending).
//   gather_kv_cuda / scatter_kv_cuda -> gather_kernel / scatter_kernel<V>: the copies trust their
//       index rows (the caller checked them first). blockIdx.x = a chunk of up to `slots`
//       consecutive slots (dst slots for gather, src rows for scatter), blockIdx.y (+ a loop of
//       stride gridDim.y, for B * H > 65535) = (b, h). The chunk's source / destination row
//       numbers are staged in shared memory, then the block's threads copy the chunk's rows as a
//       flat array of V words (V = 16-, 8-, 4-, 2- or 1-byte words: the widest that divides
//       row_bytes and all four base pointers), key and value in the same loop. Gather zero-fills
//       the dst slots count <= c < dst_len.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../kv_copy.h"
#include "check_launch.cuh"

namespace sparse_attn {
namespace {

constexpr int kValidateThreads = 256;  // 8 index rows per block
constexpr int kCopyThreads = 256;
constexpr int kMaxSlots = 256;          // slots per copy block (shared staging size)
constexpr int64_t kChunkBytes = 16384;  // bytes per tensor a copy block moves (roughly)
constexpr int64_t kMaxGridY = 65535;

// status[r] for every index row r < R. Entries are checked against [0, indexed_len); the count
// must be in [0, max_count].
__global__ void __launch_bounds__(kValidateThreads)
    validate_kernel(const int32_t* __restrict__ indices, const int32_t* __restrict__ counts,
                    int32_t* __restrict__ status, int64_t R, int64_t n_indices, int64_t max_count,
                    int64_t indexed_len) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kValidateThreads / 32) + threadIdx.x / 32;
  if (r >= R) return;  // whole warp
  const int lane = threadIdx.x % 32;
  const int64_t count = counts ? static_cast<int64_t>(counts[r]) : n_indices;
  int code = kOk;
  if (count < 0 || count > max_count) {
    code = kBadCount;
  } else {
    const int32_t* idx = indices + r * n_indices;
    for (int64_t c0 = 0; c0 < count; c0 += 32) {
      const int64_t c = c0 + lane;
      int mine = kOk;
      if (c < count) {
        const int32_t v = idx[c];
        if (v < 0 || v >= indexed_len) {
          mine = kIndexOutOfRange;
        } else if (c > 0 && v <= idx[c - 1]) {
          mine = kIndexNotAscending;
        }
      }
      const unsigned bad = __ballot_sync(0xffffffffu, mine != kOk);
      if (bad != 0u) {  // the lowest failing entry of the first failing chunk is the first one
        code = __shfl_sync(0xffffffffu, mine, __ffs(bad) - 1);
        break;
      }
    }
  }
  if (lane == 0) status[r] = code;
}

struct CopyArgs {
  const char* src_k;
  const char* src_v;
  char* dst_k;
  char* dst_v;
  const int32_t* indices;
  const int32_t* counts;
  int64_t BH, H;
  int64_t src_len, dst_len, n_indices;
  int64_t row_bytes;
  bool per_head;
  int slots;  // slots per block, <= kMaxSlots
};

__device__ __forceinline__ int64_t index_row_of(const CopyArgs& a, int64_t bh) {
  return a.per_head ? bh : bh / a.H;
}

// dst[bh, c] = src[bh, idx[r, c]] for c < count, 0 for count <= c < dst_len.
template <typename V>
__global__ void __launch_bounds__(kCopyThreads) gather_kernel(const CopyArgs a) {
  __shared__ int32_t s_src[kMaxSlots];  // source row of each slot of the chunk, -1: zero-fill
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * a.slots;
  const int64_t left = a.dst_len - c0;
  const int n_slots = static_cast<int>(left < a.slots ? left : a.slots);
  // Words per row and per chunk fit in int: row_bytes <= 2^30 and a chunk is one row or at
  // most kChunkBytes bytes (host side).
  const int vpr = static_cast<int>(a.row_bytes / static_cast<int64_t>(sizeof(V)));
  const int n_words = n_slots * vpr;
  for (int64_t bh = blockIdx.y; bh < a.BH; bh += gridDim.y) {
    const int64_t r = index_row_of(a, bh);
    const int64_t count = a.counts ? static_cast<int64_t>(a.counts[r]) : a.n_indices;
    __syncthreads();  // readers of the previous s_src are done
    for (int i = threadIdx.x; i < n_slots; i += kCopyThreads) {
      const int64_t c = c0 + i;
      s_src[i] = c < count ? a.indices[r * a.n_indices + c] : -1;
    }
    __syncthreads();
    const V* sk = reinterpret_cast<const V*>(a.src_k + bh * a.src_len * a.row_bytes);
    const V* sv = reinterpret_cast<const V*>(a.src_v + bh * a.src_len * a.row_bytes);
    V* dk = reinterpret_cast<V*>(a.dst_k + (bh * a.dst_len + c0) * a.row_bytes);
    V* dv = reinterpret_cast<V*>(a.dst_v + (bh * a.dst_len + c0) * a.row_bytes);
#pragma unroll 4
    for (int e = threadIdx.x; e < n_words; e += kCopyThreads) {
      const int i = e / vpr;
      const int w = e - i * vpr;
      const int32_t src_row = s_src[i];
      V kw{}, vw{};
      if (src_row >= 0) {
        const int64_t off = static_cast<int64_t>(src_row) * vpr + w;
        kw = sk[off];
        vw = sv[off];
      }
      dk[e] = kw;
      dv[e] = vw;
    }
  }
}

// dst[bh, idx[r, t]] = src[bh, t] for t < count; other dst slots are left alone.
template <typename V>
__global__ void __launch_bounds__(kCopyThreads) scatter_kernel(const CopyArgs a) {
  __shared__ int32_t s_dst[kMaxSlots];  // destination row of each source row of the chunk
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.slots;
  const int vpr = static_cast<int>(a.row_bytes / static_cast<int64_t>(sizeof(V)));  // see gather
  for (int64_t bh = blockIdx.y; bh < a.BH; bh += gridDim.y) {
    const int64_t r = index_row_of(a, bh);
    const int64_t count = a.counts ? static_cast<int64_t>(a.counts[r]) : a.n_indices;
    const int64_t left = count - t0;
    if (left <= 0) continue;  // uniform over the block
    const int n_slots = static_cast<int>(left < a.slots ? left : a.slots);
    __syncthreads();  // readers of the previous s_dst are done
    for (int i = threadIdx.x; i < n_slots; i += kCopyThreads)
      s_dst[i] = a.indices[r * a.n_indices + t0 + i];
    __syncthreads();
    const V* sk = reinterpret_cast<const V*>(a.src_k + (bh * a.src_len + t0) * a.row_bytes);
    const V* sv = reinterpret_cast<const V*>(a.src_v + (bh * a.src_len + t0) * a.row_bytes);
    V* dk = reinterpret_cast<V*>(a.dst_k + bh * a.dst_len * a.row_bytes);
    V* dv = reinterpret_cast<V*>(a.dst_v + bh * a.dst_len * a.row_bytes);
    const int n_words = n_slots * vpr;
#pragma unroll 4
    for (int e = threadIdx.x; e < n_words; e += kCopyThreads) {
      const int i = e / vpr;
      const int w = e - i * vpr;
      const int64_t off = static_cast<int64_t>(s_dst[i]) * vpr + w;
      const V kw = sk[e];
      const V vw = sv[e];
      dk[off] = kw;
      dv[off] = vw;
    }
  }
}

// Widest word that divides row_bytes and all four base pointers.
int word_bytes(const KVCopyParams& p) {
  const uintptr_t any =
      reinterpret_cast<uintptr_t>(p.src_k) | reinterpret_cast<uintptr_t>(p.src_v) |
      reinterpret_cast<uintptr_t>(p.dst_k) | reinterpret_cast<uintptr_t>(p.dst_v) |
      static_cast<uintptr_t>(p.row_bytes);
  for (int w = 16; w > 1; w /= 2) {
    if (any % static_cast<uintptr_t>(w) == 0) return w;
  }
  return 1;
}

void check_params(const KVCopyParams& p, const char* what) {
  if (p.B < 0 || p.H < 0 || p.src_len < 0 || p.dst_len < 0 || p.n_indices < 0 || p.row_bytes <= 0)
    throw std::runtime_error(std::string("sparse_attn::") + what + ": bad sizes");
  if (p.row_bytes > (int64_t{1} << 30))
    throw std::runtime_error(std::string("sparse_attn::") + what + ": rows too large");
}

CopyArgs make_args(const KVCopyParams& p) {
  CopyArgs a;
  a.src_k = static_cast<const char*>(p.src_k);
  a.src_v = static_cast<const char*>(p.src_v);
  a.dst_k = static_cast<char*>(p.dst_k);
  a.dst_v = static_cast<char*>(p.dst_v);
  a.indices = p.indices;
  a.counts = p.counts;
  a.BH = p.B * p.H;
  a.H = p.H;
  a.src_len = p.src_len;
  a.dst_len = p.dst_len;
  a.n_indices = p.n_indices;
  a.row_bytes = p.row_bytes;
  a.per_head = p.per_head;
  int64_t slots = kChunkBytes / p.row_bytes;
  slots = slots < 1 ? 1 : (slots > kMaxSlots ? kMaxSlots : slots);
  a.slots = static_cast<int>(slots);
  return a;
}

// Launches kernel<V> for the word size of p over `n_slots` slots.
template <bool kGather>
void launch_copy(const KVCopyParams& p, int64_t n_slots, cudaStream_t stream, const char* what) {
  const CopyArgs a = make_args(p);
  if (a.BH <= 0 || n_slots <= 0) return;
  const int64_t gx = (n_slots + a.slots - 1) / a.slots;
  if (gx > INT32_MAX)
    throw std::runtime_error(std::string("sparse_attn::") + what + ": too many rows");
  const dim3 grid(static_cast<unsigned>(gx),
                  static_cast<unsigned>(a.BH < kMaxGridY ? a.BH : kMaxGridY));
  switch (word_bytes(p)) {
    case 16:
      if constexpr (kGather) gather_kernel<uint4><<<grid, kCopyThreads, 0, stream>>>(a);
      else scatter_kernel<uint4><<<grid, kCopyThreads, 0, stream>>>(a);
      break;
    case 8:
      if constexpr (kGather) gather_kernel<uint2><<<grid, kCopyThreads, 0, stream>>>(a);
      else scatter_kernel<uint2><<<grid, kCopyThreads, 0, stream>>>(a);
      break;
    case 4:
      if constexpr (kGather) gather_kernel<uint32_t><<<grid, kCopyThreads, 0, stream>>>(a);
      else scatter_kernel<uint32_t><<<grid, kCopyThreads, 0, stream>>>(a);
      break;
    case 2:
      if constexpr (kGather) gather_kernel<uint16_t><<<grid, kCopyThreads, 0, stream>>>(a);
      else scatter_kernel<uint16_t><<<grid, kCopyThreads, 0, stream>>>(a);
      break;
    default:
      if constexpr (kGather) gather_kernel<uint8_t><<<grid, kCopyThreads, 0, stream>>>(a);
      else scatter_kernel<uint8_t><<<grid, kCopyThreads, 0, stream>>>(a);
      break;
  }
  check_launch(std::string(what) + ": kernel launch failed");
}

}  // namespace

void check_kv_indices_cuda(const KVCopyParams& params, KVCopyKind kind, void* stream) {
  const char* what = "check_kv_indices_cuda";
  check_params(params, what);
  const int64_t R = params.per_head ? params.B * params.H : params.B;
  if (R <= 0) return;
  constexpr int kRowsPerBlock = kValidateThreads / 32;
  const int64_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT32_MAX)
    throw std::runtime_error(std::string("sparse_attn::") + what + ": too many index rows");
  validate_kernel<<<static_cast<unsigned>(blocks), kValidateThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(
      params.indices, params.counts, params.status, R, params.n_indices,
      kv_max_count(params, kind), kv_indexed_len(params, kind));
  check_launch(std::string(what) + ": kernel launch failed");
}

void gather_kv_cuda(const KVCopyParams& params, void* stream) {
  const char* what = "gather_kv_cuda";
  check_params(params, what);
  // Every dst slot c < dst_len is written: copied (c < count) or zeroed.
  launch_copy<true>(params, params.dst_len, static_cast<cudaStream_t>(stream), what);
}

void scatter_kv_cuda(const KVCopyParams& params, void* stream) {
  const char* what = "scatter_kv_cuda";
  check_params(params, what);
  // Source rows t < count <= kv_max_count (checked by the caller via check_kv_indices).
  launch_copy<false>(params, kv_max_count(params, KVCopyKind::kScatter),
                     static_cast<cudaStream_t>(stream), what);
}

}  // namespace sparse_attn
