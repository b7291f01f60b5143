// The torch layer: op schemas (TORCH_LIBRARY), input checks, and the CPU / CUDA registrations.
// The kernels themselves (csrc/kernels) know nothing of torch.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <optional>
#include <sstream>

#include "kernels/cumulative_scores.h"
#include "kernels/kv_copy.h"
#include "kernels/topp_select.h"

#ifdef SPARSE_ATTN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#endif

// Importing sparse_attn._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace sparse_attn {
namespace {

using at::Tensor;

#define SA_CHECK(cond, ...) TORCH_CHECK(cond, "sparse_attn.", __VA_ARGS__)

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

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

const uint8_t* mask_ptr(const std::optional<Tensor>& contiguous_mask) {
  return contiguous_mask ? reinterpret_cast<const uint8_t*>(contiguous_mask->data_ptr<bool>())
                         : nullptr;
}

std::optional<Tensor> contiguous_opt(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

// Kernels write one RowStatus per row; the first bad row becomes an error naming the argument.
// (On CUDA this is one small device-to-host copy: validation is never skipped.)
void raise_on_bad_row(const char* op, const Tensor& status, const std::function<std::string(int64_t, int32_t)>& describe) {
  if (status.numel() == 0) return;
  const Tensor host = status.to(at::kCPU);
  const int32_t* s = host.data_ptr<int32_t>();
  for (int64_t r = 0; r < host.numel(); ++r) {
    if (s[r] != kOk) SA_CHECK(false, op, ": ", describe(r, s[r]));
  }
}

void* current_stream(const Tensor& t) {
#ifdef SPARSE_ATTN_WITH_CUDA
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  (void)t;
  SA_CHECK(false, "this build of sparse_attn has no CUDA kernels; rebuild with nvcc and a CUDA "
                  "build of torch (pip install --no-build-isolation .)");
  return nullptr;
#endif
}

// ---------------------------------------------------------------------------------------------
// cumulative_scores

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

// CPU: BLAS GEMM tiles of logits per KV group, reduced by the fused softmax/column-sum kernel.
void cumulative_scores_cpu(const Tensor& q, const Tensor& k, float scale, bool causal,
                           const std::optional<Tensor>& key_mask, Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), g = Hq / Hkv;
  const Tensor qf = (q.to(at::kFloat) * scale).contiguous();
  const Tensor kf = k.to(at::kFloat).contiguous();
  const uint8_t* mask = mask_ptr(key_mask);
  float* out_ptr = out.data_ptr<float>();
  const int64_t group_rows = g * Lq;
  // Rows per GEMM tile: about 1 MiB of logits, at least 16 rows for an efficient GEMM.
  const int64_t tile_rows = std::min(group_rows, std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(Lk, 1)));
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    Tensor logits = at::empty({tile_rows, Lk}, qf.options());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const Tensor q_group = qf[b].narrow(0, h * g, g).reshape({group_rows, D});
      const Tensor k_t = kf[b][h].t();
      for (int64_t row0 = 0; row0 < group_rows; row0 += tile_rows) {
        const int64_t n = std::min(tile_rows, group_rows - row0);
        Tensor tile = logits.narrow(0, 0, n);
        at::mm_out(tile, q_group.narrow(0, row0, n), k_t);
        softmax_column_sum_cpu(tile.data_ptr<float>(), n, row0 % Lq, Lq, Lk, causal,
                               mask ? mask + b * Lk : nullptr, out_ptr + bh * Lk);
      }
    }
  });
}

Tensor cumulative_scores(const Tensor& q, const Tensor& k, std::optional<double> scale,
                         bool causal, const std::optional<Tensor>& key_mask) {
  const char* op = "cumulative_scores";
  SA_CHECK(q.dim() == 4, op, ": q must be [B, Hq, Lq, D], got shape ", shape_str(q));
  SA_CHECK(k.dim() == 4, op, ": k must be [B, Hkv, Lk, D], got shape ", shape_str(k));
  check_same_device(op, q, "q", k, "k");
  const DType dtype = attention_dtype(op, q, "q");
  SA_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(),
           ", got ", k.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  SA_CHECK(k.size(0) == B, op, ": k batch ", k.size(0), " != q batch ", B);
  SA_CHECK(k.size(3) == D, op, ": k head dim ", k.size(3), " != q head dim ", D);
  SA_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads (", Hq,
           ") must be a multiple of key heads (", Hkv, ")");
  check_mask(op, k, "k", key_mask, "key_mask", {B, Lk});
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  SA_CHECK(std::isfinite(s) && s > 0.0, op, ": scale must be a positive finite number, got ", s);

  c10::DeviceGuard guard(q.device());
  Tensor out = at::zeros({B, Hkv, Lk}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || Lq == 0 || D == 0) return out;
  const auto mask = contiguous_opt(key_mask);
  if (q.is_cuda()) {
    const Tensor qc = q.contiguous(), kc = k.contiguous();
    Tensor lse = at::empty({B, Hq, Lq}, out.options());
    CumulativeScoresParams prm{qc.data_ptr(), kc.data_ptr(), mask_ptr(mask), lse.data_ptr<float>(),
                               out.data_ptr<float>(), dtype, B, Hq, Hkv, Lq, Lk, D,
                               static_cast<float>(s), causal};
    cumulative_scores_cuda(prm, current_stream(q));
  } else {
    cumulative_scores_cpu(q, k, static_cast<float>(s), causal, mask, out);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// topp_select

std::tuple<Tensor, Tensor> topp_select(const Tensor& scores, double p,
                                       const std::optional<Tensor>& p_rows,
                                       const std::optional<Tensor>& valid_mask, int64_t keep_first,
                                       int64_t keep_last,
                                       const std::optional<Tensor>& candidate_mask) {
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

  c10::DeviceGuard guard(scores.device());
  const auto int_opts = scores.options().dtype(at::kInt);
  Tensor indices = at::empty({R, L}, int_opts);
  Tensor counts = at::empty({R}, int_opts);
  Tensor status = at::zeros({R}, int_opts);
  if (R == 0) return {indices, counts};
  const Tensor sc = scores.contiguous();
  const auto pr = contiguous_opt(p_rows);
  const auto vm = contiguous_opt(valid_mask);
  const auto cm = contiguous_opt(candidate_mask);
  ToppSelectParams prm{sc.data_ptr<float>(), pr ? pr->data_ptr<float>() : nullptr,
                       static_cast<float>(p), mask_ptr(vm), mask_ptr(cm),
                       indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                       status.data_ptr<int32_t>(), R, L, keep_first, keep_last};
  if (scores.is_cuda()) {
    topp_select_cuda(prm, current_stream(scores));
  } else {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { topp_select_cpu(prm, b, e); });
  }
  raise_on_bad_row(op, status, [&](int64_t r, int32_t code) {
    std::ostringstream os;
    if (code == kBadP) {
      os << "p[" << r << "] = " << (pr ? pr->select(0, r).item<float>() : p) << " is outside (0, 1]";
    } else if (code == kNonFiniteScore) {
      os << "scores[" << r << "] contains NaN or inf at a valid position; expected finite scores";
    } else {
      os << "scores[" << r << "] contains a negative value; expected non-negative attention mass";
    }
    return os.str();
  });
  return {indices, counts};
}

// ---------------------------------------------------------------------------------------------
// gather_kv / scatter_kv

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

// Validates every index row before anything is copied: a bad row never half-writes a cache.
void check_kv_indices(const char* op, const KVCopyParams& prm, KVCopyKind kind,
                      const Tensor& status, const std::optional<Tensor>& counts) {
  if (status.is_cuda()) {
    check_kv_indices_cuda(prm, kind, current_stream(status));
  } else {
    at::parallel_for(0, status.numel(), 1,
                     [&](int64_t b, int64_t e) { check_kv_indices_cpu(prm, kind, b, e); });
  }
  raise_on_bad_row(op, status, [&](int64_t r, int32_t code) {
    std::ostringstream os;
    if (code == kBadCount) {
      os << "counts[" << r << "] = " << counts->select(0, r).item<int32_t>()
         << " is out of range; expected 0 <= count <= " << kv_max_count(prm, kind);
    } else if (code == kIndexOutOfRange) {
      os << "indices[" << r << "] holds a position outside [0, " << kv_indexed_len(prm, kind) << ")";
    } else {
      os << "indices[" << r << "] is not strictly ascending in its first counts[" << r
         << "] entries (as topp_select emits them)";
    }
    return os.str();
  });
}

std::tuple<Tensor, Tensor> gather_kv(const Tensor& k, const Tensor& v, const Tensor& indices,
                                     const Tensor& counts, std::optional<int64_t> capacity) {
  const char* op = "gather_kv";
  const bool per_head = check_kv_args(op, k, v, "k and v", indices, counts);
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), N = indices.size(1);
  c10::DeviceGuard guard(k.device());
  int64_t C;
  if (capacity) {
    C = *capacity;
    SA_CHECK(C >= 0, op, ": capacity must be >= 0, got ", C);
  } else {
    C = counts.numel() ? std::max<int64_t>(counts.max().item<int32_t>(), 0) : 0;
  }
  Tensor k_out = at::empty({B, H, C, D}, k.options());
  Tensor v_out = at::empty({B, H, C, D}, v.options());
  const int64_t R = indices.size(0);
  if (k_out.numel() == 0 && R == 0) return {k_out, v_out};
  Tensor status = at::zeros({R}, indices.options());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), ic = indices.contiguous(),
               cc = counts.contiguous();
  KVCopyParams prm{kc.data_ptr(), vc.data_ptr(), k_out.data_ptr(), v_out.data_ptr(),
                   ic.data_ptr<int32_t>(), cc.data_ptr<int32_t>(), status.data_ptr<int32_t>(),
                   B, H, L, C, N, D * static_cast<int64_t>(k.element_size()), per_head};
  check_kv_indices(op, prm, KVCopyKind::kGather, status, counts);
  if (k.is_cuda()) {
    gather_kv_cuda(prm, current_stream(k));
  } else {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { gather_kv_cpu(prm, b, e); });
  }
  return {k_out, v_out};
}

void scatter_kv(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v,
                const Tensor& indices, const std::optional<Tensor>& counts) {
  const char* op = "scatter_kv";
  const bool per_head = check_kv_args(op, k_cache, v_cache, "k_cache and v_cache", indices, counts);
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
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
  const int64_t T = k.size(2), N = indices.size(1), R = indices.size(0);
  if (R == 0) return;
  c10::DeviceGuard guard(k_cache.device());
  Tensor status = at::zeros({R}, indices.options());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), ic = indices.contiguous();
  const auto cc = contiguous_opt(counts);
  KVCopyParams prm{kc.data_ptr(), vc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   ic.data_ptr<int32_t>(), cc ? cc->data_ptr<int32_t>() : nullptr,
                   status.data_ptr<int32_t>(), B, H, T, C, N,
                   D * static_cast<int64_t>(k.element_size()), per_head};
  check_kv_indices(op, prm, KVCopyKind::kScatter, status, counts);
  if (k_cache.is_cuda()) {
    scatter_kv_cuda(prm, current_stream(k_cache));
  } else {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { scatter_kv_cpu(prm, b, e); });
  }
}

}  // namespace

TORCH_LIBRARY(sparse_attn, m) {
  m.def("cumulative_scores(Tensor q, Tensor k, float? scale=None, bool causal=True, "
        "Tensor? key_mask=None) -> Tensor");
  m.def("topp_select(Tensor scores, float p, Tensor? p_rows=None, Tensor? valid_mask=None, "
        "int keep_first=0, int keep_last=0, Tensor? candidate_mask=None) -> (Tensor, Tensor)");
  m.def("gather_kv(Tensor k, Tensor v, Tensor indices, Tensor counts, SymInt? capacity=None) "
        "-> (Tensor, Tensor)");
  m.def("scatter_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor indices, "
        "Tensor? counts=None) -> ()");
}

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("cumulative_scores", &cumulative_scores);
  m.impl("topp_select", &topp_select);
  m.impl("gather_kv", &gather_kv);
  m.impl("scatter_kv", &scatter_kv);
}

#ifdef SPARSE_ATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("cumulative_scores", &cumulative_scores);
  m.impl("topp_select", &topp_select);
  m.impl("gather_kv", &gather_kv);
  m.impl("scatter_kv", &scatter_kv);
}
#endif

}  // namespace sparse_attn
