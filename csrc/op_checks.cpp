// Argument checks shared by both devices (see op_checks.h).
#include "op_checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace sparse_attn {
namespace {

void check_same_device(const char* op, const Tensor& ref, const char* ref_name, const Tensor& t,
                       const char* name) {
  SA_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
           " is on ", ref.device(), "; expected one device");
}

void check_mask(const char* op, const Tensor& ref, const char* ref_name,
                const std::optional<Tensor>& mask, const char* name, at::IntArrayRef shape) {
  if (!mask) return;
  check_same_device(op, ref, ref_name, *mask, name);
  SA_CHECK(mask->scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ",
           mask->scalar_type());
  SA_CHECK(mask->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
           shape_str(*mask));
}

DType attention_dtype(const char* op, const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      SA_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

// Checks shared by gather and scatter; returns whether index rows are per head.
bool check_kv_args(const char* op, const Tensor& k, const Tensor& v, const char* kv_names,
                   const Tensor& indices, const std::optional<Tensor>& counts) {
  SA_CHECK(k.dim() == 4 && k.size(3) > 0, op, ": ", kv_names,
           " must be [B, H, L, D] with D > 0, got shape ", shape_str(k));
  SA_CHECK(v.sizes() == k.sizes(), op, ": ", kv_names, " must have the same shape, got ",
           shape_str(k), " and ", shape_str(v));
  SA_CHECK(v.scalar_type() == k.scalar_type(), op, ": ", kv_names,
           " must have the same dtype, got ", k.scalar_type(), " and ", v.scalar_type());
  check_same_device(op, k, "k", v, "v");
  check_same_device(op, k, "k", indices, "indices");
  SA_CHECK(indices.scalar_type() == at::kInt, op, ": indices must be int32, got ",
           indices.scalar_type());
  const int64_t B = k.size(0), H = k.size(1);
  SA_CHECK(indices.dim() == 2 && (indices.size(0) == B || indices.size(0) == B * H), op,
           ": indices must be [B, N] (shared by the heads) or [B * H, N] (per head) with B = ", B,
           ", H = ", H, "; got shape ", shape_str(indices));
  if (counts) {
    check_same_device(op, k, "k", *counts, "counts");
    SA_CHECK(counts->scalar_type() == at::kInt, op, ": counts must be int32, got ",
             counts->scalar_type());
    SA_CHECK(counts->dim() == 1 && counts->size(0) == indices.size(0), op,
             ": counts must have shape [", indices.size(0), "] (one per index row), got ",
             shape_str(*counts));
  }
  return indices.size(0) == B * H && H != 1;
}

}  // namespace

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

const uint8_t* mask_ptr(const std::optional<Tensor>& contiguous_mask) {
  return contiguous_mask ? reinterpret_cast<const uint8_t*>(contiguous_mask->data_ptr<bool>())
                         : nullptr;
}

std::optional<Tensor> contiguous_opt(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

Tensor with_contiguous_rows(const Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// ---------------------------------------------------------------------------------------------
// Status rows -> errors

namespace {

template <typename Describe>
void raise_on_bad_row(const char* op, const Tensor& status, Describe describe) {
  if (status.numel() == 0) return;
  const Tensor host = status.to(at::kCPU);
  const int32_t* s = host.data_ptr<int32_t>();
  for (int64_t r = 0; r < host.numel(); ++r) {
    if (s[r] != kOk) SA_CHECK(false, op, ": ", describe(r, s[r]));
  }
}

}  // namespace

void raise_on_bad_topp_row(const Tensor& status, const ToppSelectParams& prm,
                           const std::optional<Tensor>& p_rows) {
  raise_on_bad_row("topp_select", status, [&](int64_t r, int32_t code) {
    std::ostringstream os;
    if (code == kBadP) {
      os << "p[" << r << "] = " << (p_rows ? p_rows->select(0, r).item<float>() : prm.p_scalar)
         << " is outside (0, 1]";
    } else if (code == kNonFiniteScore) {
      os << "scores[" << r << "] contains NaN or inf at a valid position; expected finite scores";
    } else {
      os << "scores[" << r << "] contains a negative value; expected non-negative attention mass";
    }
    return os.str();
  });
}

void raise_on_bad_kv_row(const char* op, const Tensor& status, const KVCopyParams& prm,
                         KVCopyKind kind, const std::optional<Tensor>& counts) {
  raise_on_bad_row(op, status, [&](int64_t r, int32_t code) {
    std::ostringstream os;
    if (code == kBadCount) {
      // Without counts every row uses all of its N entries (scatter_kv: more than the T new
      // tokens is the error).
      const int64_t count = counts ? counts->select(0, r).item<int32_t>() : prm.n_indices;
      os << (counts ? "counts[" : "the index row length N of indices[") << r << "] = " << count
         << " is out of range; expected 0 <= count <= " << kv_max_count(prm, kind);
      if (!counts && kind == KVCopyKind::kScatter) os << " (the T new tokens of k)";
    } else if (code == kIndexOutOfRange) {
      os << "indices[" << r << "] holds a position outside [0, " << kv_indexed_len(prm, kind) << ")";
    } else {
      os << "indices[" << r << "] is not strictly ascending in its first counts[" << r
         << "] entries (as topp_select emits them)";
    }
    return os.str();
  });
}

// ---------------------------------------------------------------------------------------------
// Per-op checks

CumulativeScoresArgs check_cumulative_scores(const Tensor& q, const Tensor& k,
                                             std::optional<double> scale,
                                             const std::optional<Tensor>& key_mask) {
  const char* op = "cumulative_scores";
  SA_CHECK(q.dim() == 4, op, ": q must be [B, Hq, Lq, D], got shape ", shape_str(q));
  SA_CHECK(k.dim() == 4, op, ": k must be [B, Hkv, Lk, D], got shape ", shape_str(k));
  check_same_device(op, q, "q", k, "k");
  const DType dtype = attention_dtype(op, q, "q");
  SA_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(),
           ", got ", k.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  SA_CHECK(k.size(0) == B, op, ": k batch ", k.size(0), " != q batch ", B);
  SA_CHECK(k.size(3) == D, op, ": k head dim ", k.size(3), " != q head dim ", D);
  SA_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads (", Hq,
           ") must be a multiple of key heads (", Hkv, ")");
  check_mask(op, k, "k", key_mask, "key_mask", {B, Lk});
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  SA_CHECK(std::isfinite(s) && s > 0.0, op, ": scale must be a positive finite number, got ", s);
  return {static_cast<float>(s), dtype};
}

void check_topp_select(const Tensor& scores, double p, const std::optional<Tensor>& p_rows,
                       const std::optional<Tensor>& valid_mask, int64_t keep_first,
                       int64_t keep_last, const std::optional<Tensor>& candidate_mask) {
  const char* op = "topp_select";
  SA_CHECK(scores.dim() == 2, op, ": scores must be [R, L], got shape ", shape_str(scores));
  SA_CHECK(scores.scalar_type() == at::kFloat, op, ": scores must be float32, got ",
           scores.scalar_type());
  const int64_t R = scores.size(0), L = scores.size(1);
  SA_CHECK(L <= std::numeric_limits<int32_t>::max(), op, ": rows longer than 2^31 - 1 (L = ", L,
           ") are not supported (int32 indices)");
  SA_CHECK(keep_first >= 0 && keep_last >= 0, op, ": keep_first and keep_last must be >= 0, got ",
           keep_first, " and ", keep_last);
  if (p_rows) {
    check_same_device(op, scores, "scores", *p_rows, "p");
    SA_CHECK(p_rows->scalar_type() == at::kFloat, op, ": p as a tensor must be float32, got ",
             p_rows->scalar_type());
    SA_CHECK(p_rows->dim() == 1 && p_rows->size(0) == R, op, ": p as a tensor must have shape [",
             R, "] (one per row of scores), got ", shape_str(*p_rows));
  } else {
    SA_CHECK(p > 0.0 && p <= 1.0, op, ": p must be in (0, 1], got ", p);
  }
  check_mask(op, scores, "scores", valid_mask, "valid_mask", {R, L});
  check_mask(op, scores, "scores", candidate_mask, "candidate_mask", {R, L});
}

bool check_gather_kv(const Tensor& k, const Tensor& v, const Tensor& indices,
                     const Tensor& counts, std::optional<int64_t> capacity) {
  const char* op = "gather_kv";
  const bool per_head = check_kv_args(op, k, v, "k and v", indices, counts);
  if (capacity) SA_CHECK(*capacity >= 0, op, ": capacity must be >= 0, got ", *capacity);
  return per_head;
}

int64_t gather_kv_capacity(const Tensor& counts, int64_t n_indices,
                           std::optional<int64_t> capacity) {
  if (capacity) return *capacity;
  if (counts.numel() == 0) return 0;
  const int64_t max_count = counts.max().item<int32_t>();
  return std::min(std::max<int64_t>(max_count, 0), n_indices);
}

bool check_scatter_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k,
                      const Tensor& v, const Tensor& indices, const std::optional<Tensor>& counts) {
  const char* op = "scatter_kv";
  const bool per_head = check_kv_args(op, k_cache, v_cache, "k_cache and v_cache", indices, counts);
  const int64_t B = k_cache.size(0), H = k_cache.size(1), D = k_cache.size(3);
  SA_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
           ": k_cache and v_cache are written in place and must be contiguous");
  SA_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D, op,
           ": k must be [", B, ", ", H, ", T, ", D, "] to match k_cache, got ", shape_str(k));
  SA_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", shape_str(k), ", got ",
           shape_str(v));
  SA_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
           op, ": k and v must have the cache dtype ", k_cache.scalar_type(), ", got ",
           k.scalar_type(), " and ", v.scalar_type());
  check_same_device(op, k_cache, "k_cache", k, "k");
  check_same_device(op, k_cache, "k_cache", v, "v");
  return per_head;
}

DecodeAttentionParams check_decode_attention(const Tensor& query, const Tensor& key,
                                             const Tensor& value, const Tensor& lengths,
                                             std::optional<double> scale, bool check_lengths) {
  const char* op = "decode_attention";
  SA_CHECK(query.dim() == 4, op, ": query must be [B, Hq, T, D], got shape ", shape_str(query));
  SA_CHECK(key.dim() == 4, op, ": key must be [B, Hkv, C, D], got shape ", shape_str(key));
  SA_CHECK(value.sizes() == key.sizes(), op, ": value must have key's shape ", shape_str(key),
           ", got ", shape_str(value));
  check_same_device(op, query, "query", key, "key");
  check_same_device(op, query, "query", value, "value");
  check_same_device(op, query, "query", lengths, "lengths");
  const DType dtype = attention_dtype(op, query, "query");
  SA_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
           op, ": key and value must have query's dtype ", query.scalar_type(), ", got ",
           key.scalar_type(), " and ", value.scalar_type());
  const int64_t B = query.size(0), Hq = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), C = key.size(2);
  SA_CHECK(key.size(0) == B, op, ": key batch ", key.size(0), " != query batch ", B);
  SA_CHECK(key.size(3) == D, op, ": key head dim ", key.size(3), " != query head dim ", D);
  SA_CHECK(T >= 1, op, ": query must hold T >= 1 new tokens, got shape ", shape_str(query));
  SA_CHECK(D >= 1, op, ": the head dim must be >= 1, got shape ", shape_str(query));
  SA_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads (", Hq,
           ") must be a multiple of key heads (", Hkv, ")");
  SA_CHECK(lengths.scalar_type() == at::kInt, op, ": lengths must be int32, got ",
           lengths.scalar_type());
  SA_CHECK(lengths.dim() == 2 && lengths.size(0) == B && lengths.size(1) == Hkv, op,
           ": lengths must have shape [", B, ", ", Hkv, "] (tokens per KV row), got ",
           shape_str(lengths));
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  SA_CHECK(std::isfinite(s) && s > 0.0, op, ": scale must be a positive finite number, got ", s);
  if (check_lengths && lengths.numel() > 0) {
    const Tensor bad = at::logical_or(lengths < T, lengths > C);
    if (bad.any().item<bool>()) {
      const int64_t r = bad.flatten().nonzero().select(0, 0).item<int64_t>();
      const int32_t value_r = lengths.flatten().select(0, r).item<int32_t>();
      SA_CHECK(false, op, ": lengths[", r / Hkv, ", ", r % Hkv, "] = ", value_r,
               " is out of range; expected T <= length <= C with T = ", T,
               " new tokens and C = ", C, " cache slots");
    }
  }
  DecodeAttentionParams p{};
  p.dtype = dtype;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.T = T;
  p.C = C;
  p.D = D;
  p.scale = static_cast<float>(s);
  return p;
}

void bind_decode_tensors(DecodeAttentionParams& p, const Tensor& query, const Tensor& key,
                         const Tensor& value, const Tensor& lengths, Tensor& out) {
  p.q = query.data_ptr();
  p.k = key.data_ptr();
  p.v = value.data_ptr();
  p.lengths = lengths.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.q_stride_b = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.q_stride_t = query.stride(2);
  p.k_stride_b = key.stride(0);
  p.k_stride_h = key.stride(1);
  p.k_stride_c = key.stride(2);
  p.v_stride_b = value.stride(0);
  p.v_stride_h = value.stride(1);
  p.v_stride_c = value.stride(2);
}

}  // namespace sparse_attn
