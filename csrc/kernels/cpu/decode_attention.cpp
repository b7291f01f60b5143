// CPU decode attention over a compact cache (see decode_attention.h, docs/decode_attention.md).
//
// One work item = (KV row, split): the g * T queries of the row's GQA group walk the split's
// visible slots in tiles of kTile. Per tile: the logits of every query (one K row read serves
// all of them), an online-softmax rescale per query, then acc += p * V (one V row read serves
// all of them). fp16 / bf16 tiles are widened to fp32 once per tile. With AVX + FMA (checked at
// run time, so the build needs no -march flag) the dot products and the P.V update use 256-bit
// FMAs; otherwise plain loops the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SA_X86_AVX 1
#endif

#include "../decode_attention.h"

namespace sparse_attn {
namespace {

constexpr int64_t kTile = 64;  // slots per tile: K and V tiles (fp32, D = 128) fit in L1 + L2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  uint32_t bits;
  if (e == 0) {
    const float f = std::ldexp(static_cast<float>(m), -24);  // zero or subnormal
    return sign ? -f : f;
  }
  bits = e == 31 ? (sign | 0x7F800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal, m * 2^-24
    float af;
    std::memcpy(&af, &a, sizeof(af));
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)));
  }
  a += 0xFFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((a - 0x38000000u) >> 13));
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// n elements of `src` (dtype) starting at element `offset` -> fp32.
void widen(const void* src, DType dtype, int64_t offset, int64_t n, float* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
  if (dtype == DType::kFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

void narrow_to(const float* src, int64_t n, DType dtype, void* dst, int64_t offset) {
  if (dtype == DType::kFloat32) {
    std::memcpy(static_cast<float*>(dst) + offset, src, n * sizeof(float));
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + offset;
  if (dtype == DType::kFloat16) {
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

// ---- inner loops over D: portable versions -------------------------------------------------

// s[j] = q . rows[j] for j < n (rows ld floats apart).
void dots_plain(const float* q, const float* rows, int64_t ld, int64_t n, int64_t D, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    const float* r = rows + j * ld;
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * r[d];
    s[j] = acc;
  }
}

// acc += sum_j p[j] * rows[j] for j < n.
void pv_plain(float* acc, const float* p, const float* rows, int64_t ld, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* r = rows + j * ld;
    for (int64_t d = 0; d < D; ++d) acc[d] += pj * r[d];
  }
}

void widen_tile_plain(const void* src, DType dtype, int64_t row0, int64_t stride, int64_t n,
                      int64_t D, float* dst) {
  for (int64_t j = 0; j < n; ++j) widen(src, dtype, (row0 + j) * stride, D, dst + j * D);
}

#ifdef SA_X86_AVX
// ---- AVX + FMA versions (D % 8 == 0) -------------------------------------------------------
#define SA_AVX __attribute__((target("avx,fma,f16c")))

SA_AVX void dots_avx(const float* q, const float* rows, int64_t ld, int64_t n, int64_t D,
                     float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four rows per pass: one q load feeds four FMAs
    const float* r0 = rows + j * ld;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0 + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1 + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2 + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3 + d), a3);
    }
    // Horizontal sums of the four accumulators at once.
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(s + j, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  for (; j < n; ++j) {
    const float* r = rows + j * ld;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(r + d), a);
    const __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    s[j] = _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)));
  }
}

SA_AVX void pv_avx(float* acc, const float* p, const float* rows, int64_t ld, int64_t n,
                   int64_t D) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {  // 32 outputs stay in registers over the whole tile
    __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8),
           a2 = _mm256_loadu_ps(acc + d + 16), a3 = _mm256_loadu_ps(acc + d + 24);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_broadcast_ss(p + j);
      const float* r = rows + j * ld + d;
      a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r), a0);
      a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8), a1);
      a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 16), a2);
      a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 24), a3);
    }
    _mm256_storeu_ps(acc + d, a0);
    _mm256_storeu_ps(acc + d + 8, a1);
    _mm256_storeu_ps(acc + d + 16, a2);
    _mm256_storeu_ps(acc + d + 24, a3);
  }
  for (; d < D; d += 8) {
    __m256 a = _mm256_loadu_ps(acc + d);
    for (int64_t j = 0; j < n; ++j)
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(rows + j * ld + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
}

SA_AVX void widen_tile_avx(const void* src, DType dtype, int64_t row0, int64_t stride, int64_t n,
                           int64_t D, float* dst) {
  const uint16_t* base = static_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* s = base + (row0 + j) * stride;
    float* o = dst + j * D;
    for (int64_t d = 0; d < D; d += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + d));
      if (dtype == DType::kFloat16) {
        _mm256_storeu_ps(o + d, _mm256_cvtph_ps(x));
      } else {  // bf16: the 16 bits are the top half of an fp32
        const __m128i zero = _mm_setzero_si128();
        const __m128 lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, x));
        const __m128 hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, x));
        _mm256_storeu_ps(o + d, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
      }
    }
  }
}

bool cpu_has_avx_fma() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

struct Math {
  void (*dots)(const float*, const float*, int64_t, int64_t, int64_t, float*);
  void (*pv)(float*, const float*, const float*, int64_t, int64_t, int64_t);
  void (*widen_tile)(const void*, DType, int64_t, int64_t, int64_t, int64_t, float*);
};

Math pick_math(int64_t D) {
#ifdef SA_X86_AVX
  if (D % 8 == 0 && cpu_has_avx_fma()) return {dots_avx, pv_avx, widen_tile_avx};
#endif
  (void)D;
  return {dots_plain, pv_plain, widen_tile_plain};
}

}  // namespace

void decode_attention_cpu(const DecodeAttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int64_t g = p.Hq / p.Hkv, nq = decode_group_rows(p), D = p.D;
  const Math math = pick_math(D);
  const bool wide = p.dtype == DType::kFloat32;
  std::vector<float> q(nq * D), acc(nq * D), s(kTile), m(nq), l(nq);
  std::vector<float> k_tile(wide ? 0 : kTile * D), v_tile(wide ? 0 : kTile * D);
  std::vector<int64_t> end(nq);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t bh = item / p.splits, split = item % p.splits;
    const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
    const int64_t len = decode_visible_end(p, bh, p.T - 1);  // the last query sees the most
    const int64_t s0 = split * p.split_len, s1 = std::min(s0 + p.split_len, len);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = r / p.T, t = r % p.T;
      end[r] = decode_visible_end(p, bh, t);
      widen(p.q, p.dtype, b * p.q_stride_b + (h * g + i) * p.q_stride_h + t * p.q_stride_t, D,
            q.data() + r * D);
      for (int64_t d = 0; d < D; ++d) q[r * D + d] *= p.scale;
      m[r] = kNegInf;
      l[r] = 0.0f;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t k_base = b * p.k_stride_b + h * p.k_stride_h;
    const int64_t v_base = b * p.v_stride_b + h * p.v_stride_h;
    for (int64_t j0 = s0; j0 < s1; j0 += kTile) {
      const int64_t n = std::min(kTile, s1 - j0);
      const float *kt, *vt;
      int64_t ldk, ldv;
      if (wide) {
        kt = static_cast<const float*>(p.k) + k_base + j0 * p.k_stride_c;
        vt = static_cast<const float*>(p.v) + v_base + j0 * p.v_stride_c;
        ldk = p.k_stride_c;
        ldv = p.v_stride_c;
      } else {
        math.widen_tile(static_cast<const uint16_t*>(p.k) + k_base, p.dtype, j0, p.k_stride_c, n,
                        D, k_tile.data());
        math.widen_tile(static_cast<const uint16_t*>(p.v) + v_base, p.dtype, j0, p.v_stride_c, n,
                        D, v_tile.data());
        kt = k_tile.data();
        vt = v_tile.data();
        ldk = ldv = D;
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t e = std::min(n, end[r] - j0);  // slots of this tile query r sees
        if (e <= 0) continue;
        float* a = acc.data() + r * D;
        math.dots(q.data() + r * D, kt, ldk, e, D, s.data());
        float tile_max = kNegInf;
        for (int64_t j = 0; j < e; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
        const float m_new = std::max(m[r], tile_max);
        if (m_new == kNegInf) continue;  // all -inf logits so far: nothing to add
        if (m[r] != m_new) {
          const float alpha = std::exp(m[r] - m_new);  // 0 on the first tile
          l[r] *= alpha;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          m[r] = m_new;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < e; ++j) {
          s[j] = std::exp(s[j] - m_new);
          sum += s[j];
        }
        l[r] += sum;
        math.pv(a, s.data(), vt, ldv, e, D);
      }
    }
    if (p.splits == 1) {  // final: normalise and write in the output dtype
      for (int64_t r = 0; r < nq; ++r) {
        float* a = acc.data() + r * D;
        // A query that saw no slot gets zeros; a NaN sum stays NaN.
        const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
        for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        narrow_to(a, D, p.dtype, p.out, (bh * nq + r) * D);
      }
    } else {
      const int64_t base = (bh * p.splits + split) * nq;
      std::memcpy(p.partial_out + base * D, acc.data(), nq * D * sizeof(float));
      for (int64_t r = 0; r < nq; ++r) {
        p.partial_ml[(base + r) * 2] = m[r];
        p.partial_ml[(base + r) * 2 + 1] = l[r];
      }
    }
  }
}

void decode_attention_combine_cpu(const DecodeAttentionParams& p, int64_t bh_begin,
                                  int64_t bh_end) {
  const int64_t nq = decode_group_rows(p), D = p.D;
  std::vector<float> acc(D);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    for (int64_t r = 0; r < nq; ++r) {
      float M = kNegInf;
      for (int64_t sp = 0; sp < p.splits; ++sp) {
        const float* ml = p.partial_ml + ((bh * p.splits + sp) * nq + r) * 2;
        if (ml[1] != 0.0f) M = std::max(M, ml[0]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float L = 0.0f;
      for (int64_t sp = 0; sp < p.splits; ++sp) {
        const int64_t row = (bh * p.splits + sp) * nq + r;
        const float* ml = p.partial_ml + row * 2;
        if (ml[1] == 0.0f) continue;  // a split that saw nothing adds nothing
        const float w = std::exp(ml[0] - M);
        L += w * ml[1];
        const float* po = p.partial_out + row * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * po[d];
      }
      const float inv = L == 0.0f ? 0.0f : 1.0f / L;
      for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
      narrow_to(acc.data(), D, p.dtype, p.out, (bh * nq + r) * D);
    }
  }
}

}  // namespace sparse_attn
