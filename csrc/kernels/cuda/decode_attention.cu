// CUDA decode attention over a compact cache, split-K flash-decoding (see decode_attention.h,
// docs/decode_attention.md).
//
// Step 1, one block per (KV row, chunk of its GQA group's query rows, split of the slots):
//   threadIdx.x (bdx lanes, a power of two <= 32) covers the head dim, VEC elements each;
//   threadIdx.y is the query row of the group (query head i, step t): the bdy rows of a block
//     read the same K / V rows, which the first of them brings into L1 for the others;
//   threadIdx.z takes every bdz-th run of kUnroll slots, so that short groups still keep
//     enough loads in flight; the bdz partial states are merged in shared memory at the end.
//   Each thread keeps an online-softmax state (running max m, sum l, VEC outputs) in fp32.
//   With one split the block writes the normalised output, otherwise (m, l, unnormalised out).
// Step 2 (several splits): one block per (KV row, query row) merges the splits.
// No slot at or past a row's length is read; lengths are clamped to [0, C].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../decode_attention.h"
#include "check_launch.cuh"

namespace sparse_attn {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kUnroll = 4;         // slots per thread per step: loads issued before they are used
constexpr int kCombineThreads = 128;
constexpr int64_t kMinSplit = 256;  // slots per split at least: a split's fixed cost is amortised
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(x);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// Two 16-bit elements packed in a 32-bit word -> fp32.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same<T, __half>::value) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  } else {  // bf16: the top half of an fp32
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
}

// VEC elements of `row` from d0 to fp32; elements at or past D read as 0. kAligned: D % VEC ==
// 0 and the row starts on a vector boundary, so whole 8- or 16-byte vectors are loaded (into
// registers, never through a local array).
template <typename T, int VEC, bool kAligned>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int d0, int D, float (&x)[VEC]) {
  if constexpr (kAligned) {
    if (d0 >= D) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = 0.0f;
    } else if constexpr (std::is_same<T, float>::value) {
#pragma unroll
      for (int i = 0; i < VEC / 4; ++i) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(row + d0) + i);
        x[4 * i] = f.x;
        x[4 * i + 1] = f.y;
        x[4 * i + 2] = f.z;
        x[4 * i + 3] = f.w;
      }
    } else if constexpr (VEC == 4) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(row + d0));
      unpack2<T>(w.x, x[0], x[1]);
      unpack2<T>(w.y, x[2], x[3]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC / 8; ++i) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(row + d0) + i);
        unpack2<T>(w.x, x[8 * i], x[8 * i + 1]);
        unpack2<T>(w.y, x[8 * i + 2], x[8 * i + 3]);
        unpack2<T>(w.z, x[8 * i + 4], x[8 * i + 5]);
        unpack2<T>(w.w, x[8 * i + 6], x[8 * i + 7]);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = d0 + e < D ? to_float(row[d0 + e]) : 0.0f;
  }
}

// Sum over the bdx lanes of one query row (a power-of-two group of lanes inside a warp).
__device__ __forceinline__ float group_sum(float v, int bdx, unsigned mask) {
  for (int offset = bdx / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, bdx);
  return v;
}

template <typename T, int VEC, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads, 1)
    decode_split_kernel(const DecodeAttentionParams p, int64_t row_chunks) {
  const int bdx = blockDim.x, bdy = blockDim.y, bdz = blockDim.z;
  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int64_t bh = blockIdx.x / row_chunks, chunk = blockIdx.x % row_chunks;
  const int64_t split = blockIdx.y;
  const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
  const int64_t g = p.Hq / p.Hkv, nq = decode_group_rows(p);
  const int64_t r = chunk * bdy + ty;  // query row of the group: head h * g + r / T, step r % T
  const bool row_ok = r < nq;
  const int D = static_cast<int>(p.D), d0 = tx * VEC;

  // The lanes of this row: bdx consecutive lanes of one warp (bdx divides 32).
  const int lane = static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32);
  const unsigned mask = bdx == 32 ? 0xffffffffu : (((1u << bdx) - 1u) << (lane / bdx * bdx));

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  float qv[VEC];
  int64_t end = 0;  // this row sees slots < end
  if (row_ok) {
    const int64_t i = r / p.T, t = r % p.T;
    load_vec<T, VEC, kAligned>(q + b * p.q_stride_b + (h * g + i) * p.q_stride_h + t * p.q_stride_t,
                               d0, D, qv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) qv[e] *= p.scale;
    end = decode_visible_end(p, bh, t);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) qv[e] = 0.0f;
  }
  const int64_t len = decode_visible_end(p, bh, p.T - 1);
  const int64_t s0 = split * p.split_len;
  const int64_t s1 = s0 + p.split_len < len ? s0 + p.split_len : len;
  const int64_t lim = end < s1 ? end : s1;  // this row's slots in this split: [s0, lim)

  float m = -INFINITY, l = 0.0f, o[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) o[e] = 0.0f;

  // Every thread of a row runs the same iterations (the bounds depend on the block only), so
  // the lanes of a row stay together for the shuffles; slots a row may not see are masked.
  for (int64_t j0 = s0 + static_cast<int64_t>(tz) * kUnroll; j0 < s1; j0 += static_cast<int64_t>(bdz) * kUnroll) {
    float kx[kUnroll][VEC], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u < s1) {
        load_vec<T, VEC, kAligned>(k + (j0 + u) * p.k_stride_c, d0, D, kx[u]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kx[u][e] = 0.0f;
      }
    }
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float acc = 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc = fmaf(qv[e], kx[u][e], acc);
      acc = group_sum(acc, bdx, mask);
      s[u] = j0 + u < lim ? acc : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
    const float m_new = fmaxf(m, tile_max);
    if (m_new == -INFINITY) continue;  // nothing visible yet (uniform over the row's lanes)
    const float alpha = __expf(m - m_new);  // 0 while m is -inf
    l *= alpha;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] *= alpha;
    m = m_new;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!(j0 + u < lim)) continue;
      const float pu = __expf(s[u] - m);
      l += pu;
      float vx[VEC];
      load_vec<T, VEC, kAligned>(v + (j0 + u) * p.v_stride_c, d0, D, vx);
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = fmaf(pu, vx[e], o[e]);
    }
  }

  // Merge the bdz states of each row (shared memory), then write.
  __shared__ float sh_o[kMaxThreads * VEC];  // [bdz * bdy][bdx * VEC]
  __shared__ float sh_ml[2 * kMaxThreads / 8];  // [bdz * bdy][2], bdx >= 8
  const int row_slot = tz * bdy + ty;
  if (bdz > 1) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) sh_o[(row_slot * bdx + tx) * VEC + e] = o[e];
    if (tx == 0) {
      sh_ml[row_slot * 2] = m;
      sh_ml[row_slot * 2 + 1] = l;
    }
  }
  __syncthreads();
  if (tz != 0 || !row_ok) return;
  if (bdz > 1) {
    float M = -INFINITY;
    for (int z = 0; z < bdz; ++z) {
      const int rs = z * bdy + ty;
      if (sh_ml[rs * 2 + 1] != 0.0f) M = fmaxf(M, sh_ml[rs * 2]);
    }
    m = M;
    l = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = 0.0f;
    for (int z = 0; z < bdz; ++z) {
      const int rs = z * bdy + ty;
      const float lz = sh_ml[rs * 2 + 1];
      if (lz == 0.0f) continue;  // saw nothing
      const float w = __expf(sh_ml[rs * 2] - M);
      l += w * lz;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = fmaf(w, sh_o[(rs * bdx + tx) * VEC + e], o[e]);
    }
  }
  if (p.splits == 1) {
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // a row that saw no slot: zeros
    T* out = static_cast<T*>(p.out) + (bh * nq + r) * p.D;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (d0 + e < D) out[d0 + e] = from_float<T>(o[e] * inv);
  } else {
    const int64_t row = (bh * p.splits + split) * nq + r;
    float* po = p.partial_out + row * p.D;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (d0 + e < D) po[d0 + e] = o[e];
    if (tx == 0) {
      p.partial_ml[row * 2] = m;
      p.partial_ml[row * 2 + 1] = l;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeAttentionParams p) {
  const int64_t nq = decode_group_rows(p);
  const int64_t bh = blockIdx.x / nq, r = blockIdx.x % nq;
  float M = -INFINITY;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float* ml = p.partial_ml + ((bh * p.splits + s) * nq + r) * 2;
    if (ml[1] != 0.0f) M = fmaxf(M, ml[0]);
  }
  float L = 0.0f;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float* ml = p.partial_ml + ((bh * p.splits + s) * nq + r) * 2;
    if (ml[1] != 0.0f) L += __expf(ml[0] - M) * ml[1];
  }
  const float inv = L == 0.0f ? 0.0f : 1.0f / L;
  T* out = static_cast<T*>(p.out) + (bh * nq + r) * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const int64_t row = (bh * p.splits + s) * nq + r;
      const float lz = p.partial_ml[row * 2 + 1];
      if (lz == 0.0f) continue;
      acc = fmaf(__expf(p.partial_ml[row * 2] - M), p.partial_out[row * p.D + d], acc);
    }
    out[d] = from_float<T>(acc * inv);
  }
}

// Head-dim layout: VEC elements per lane, bdx lanes per row (a power of two <= 32).
struct Layout {
  int vec, bdx;
};

Layout head_layout(int64_t D) {
  if (D <= 32) return {4, 8};
  if (D <= 64) return {4, 16};
  if (D <= 128) return {4, 32};
  if (D <= 256) return {8, 32};
  if (D <= 512) return {16, 32};
  throw std::runtime_error("sparse_attn::decode_attention: head dims above 512 are not supported on CUDA, got " + std::to_string(D));
}

struct Blocks {
  int bdx, bdy, bdz;
  int64_t row_chunks;
};

Blocks block_shape(const DecodeAttentionParams& p) {
  const Layout lay = head_layout(p.D);
  const int64_t nq = decode_group_rows(p);
  const int max_rows = kMaxThreads / lay.bdx < 8 ? kMaxThreads / lay.bdx : 8;
  const int bdy = static_cast<int>(nq < max_rows ? nq : max_rows);
  int bdz = kMaxThreads / (lay.bdx * bdy);
  bdz = bdz > 8 ? 8 : (bdz < 1 ? 1 : bdz);
  return {lay.bdx, bdy, bdz, (nq + bdy - 1) / bdy};
}

int multiprocessors() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // clear, not fatal: plan for an H100-sized device
    sms = 132;
  }
  return sms;
}

template <typename T, int VEC>
void launch_split(const DecodeAttentionParams& p, const Blocks& bs, bool aligned, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.Hkv * bs.row_chunks), static_cast<unsigned>(p.splits));
  const dim3 block(bs.bdx, bs.bdy, bs.bdz);
  if (aligned) {
    decode_split_kernel<T, VEC, true><<<grid, block, 0, stream>>>(p, bs.row_chunks);
  } else {
    decode_split_kernel<T, VEC, false><<<grid, block, 0, stream>>>(p, bs.row_chunks);
  }
  check_launch("decode_attention split kernel launch failed");
}

template <typename T>
void launch(const DecodeAttentionParams& p, cudaStream_t stream) {
  const Blocks bs = block_shape(p);
  const int vec = head_layout(p.D).vec;
  // Whole-vector loads need every row of q / k / v to start on a vector boundary.
  const int64_t bytes = vec * static_cast<int64_t>(sizeof(T));
  const auto on_boundary = [&](const void* ptr, std::initializer_list<int64_t> strides) {
    if (reinterpret_cast<uintptr_t>(ptr) % (bytes >= 16 ? 16 : bytes) != 0) return false;
    for (int64_t s : strides)
      if (s % vec != 0) return false;
    return true;
  };
  const bool aligned = p.D % vec == 0 &&
                       on_boundary(p.q, {p.q_stride_b, p.q_stride_h, p.q_stride_t}) &&
                       on_boundary(p.k, {p.k_stride_b, p.k_stride_h, p.k_stride_c}) &&
                       on_boundary(p.v, {p.v_stride_b, p.v_stride_h, p.v_stride_c});
  switch (vec) {
    case 4: launch_split<T, 4>(p, bs, aligned, stream); break;
    case 8: launch_split<T, 8>(p, bs, aligned, stream); break;
    default: launch_split<T, 16>(p, bs, aligned, stream); break;
  }
  if (p.splits > 1) {
    const int64_t blocks = p.B * p.Hkv * decode_group_rows(p);
    decode_combine_kernel<T><<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(p);
    check_launch("decode_attention combine kernel launch failed");
  }
}

}  // namespace

void decode_attention_cuda_plan(DecodeAttentionParams& p) {
  const Blocks bs = block_shape(p);
  // About two blocks per multiprocessor; splits of at least kMinSplit slots, whole kUnroll runs.
  decode_attention_plan(p, p.B * p.Hkv * bs.row_chunks, 2 * int64_t{multiprocessors()}, kMinSplit,
                        int64_t{kUnroll} * bs.bdz);
}

void decode_attention_cuda(const DecodeAttentionParams& p, void* stream) {
  if (p.B * p.Hq * p.T * p.D == 0) return;
  const Blocks bs = block_shape(p);
  if (p.B * p.Hkv * bs.row_chunks > INT32_MAX)
    throw std::runtime_error("sparse_attn::decode_attention: too many KV rows for one launch");
  if (p.splits > kMaxGridY || p.splits < 1 || (p.splits > 1 && (!p.partial_out || !p.partial_ml)))
    throw std::runtime_error("sparse_attn::decode_attention: bad split plan (splits = " +
                             std::to_string(p.splits) + ")");
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, s); break;
    case DType::kFloat16: launch<__half>(p, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(p, s); break;
  }
}

}  // namespace sparse_attn
