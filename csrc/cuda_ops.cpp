// The CUDA implementation of every op, registered for the CUDA dispatch key (compiled only in a
// CUDA build). Same shape as cpu_ops.cpp: shared checks (op_checks.h), raw parameters, then the
// launchers of csrc/kernels/cuda on the tensor's current stream.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "op_checks.h"

namespace sparse_attn {
namespace {

void* current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

Tensor cumulative_scores_cuda_op(const Tensor& q, const Tensor& k, std::optional<double> scale,
                                 bool causal, const std::optional<Tensor>& key_mask) {
  const auto args = check_cumulative_scores(q, k, scale, key_mask);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  c10::DeviceGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  if (B * Hkv * Lk == 0 || Lq == 0 || D == 0) return at::zeros({B, Hkv, Lk}, f32);
  Tensor out = at::empty({B, Hkv, Lk}, f32);  // pass 2 writes every element
  const auto mask = contiguous_opt(key_mask);
  const Tensor qc = q.contiguous(), kc = k.contiguous();
  Tensor lse = at::empty({B, Hq, Lq}, f32);
  CumulativeScoresParams prm{qc.data_ptr(), kc.data_ptr(), mask_ptr(mask), lse.data_ptr<float>(),
                             out.data_ptr<float>(), args.dtype, B, Hq, Hkv, Lq, Lk, D,
                             args.scale, causal};
  cumulative_scores_cuda(prm, current_stream(q));
  return out;
}

std::tuple<Tensor, Tensor> topp_select_cuda_op(const Tensor& scores, double p,
                                               const std::optional<Tensor>& p_rows,
                                               const std::optional<Tensor>& valid_mask,
                                               int64_t keep_first, int64_t keep_last,
                                               const std::optional<Tensor>& candidate_mask) {
  check_topp_select(scores, p, p_rows, valid_mask, keep_first, keep_last, candidate_mask);
  const int64_t R = scores.size(0), L = scores.size(1);
  c10::DeviceGuard guard(scores.device());
  const auto int_opts = scores.options().dtype(at::kInt);
  Tensor indices = at::empty({R, L}, int_opts);
  Tensor counts = at::empty({R}, int_opts);
  Tensor status = at::empty({R}, int_opts);  // every row's status is written
  if (R == 0) return {indices, counts};
  const Tensor sc = scores.contiguous();
  const auto pr = contiguous_opt(p_rows);
  const auto vm = contiguous_opt(valid_mask);
  const auto cm = contiguous_opt(candidate_mask);
  ToppSelectParams prm{sc.data_ptr<float>(), pr ? pr->data_ptr<float>() : nullptr,
                       static_cast<float>(p), mask_ptr(vm), mask_ptr(cm),
                       indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                       status.data_ptr<int32_t>(), R, L, keep_first, keep_last};
  topp_select_cuda(prm, current_stream(scores));
  raise_on_bad_topp_row(status, prm, pr);
  return {indices, counts};
}

void check_kv_indices(const char* op, const KVCopyParams& prm, KVCopyKind kind,
                      const Tensor& status, const std::optional<Tensor>& counts) {
  check_kv_indices_cuda(prm, kind, current_stream(status));
  raise_on_bad_kv_row(op, status, prm, kind, counts);
}

std::tuple<Tensor, Tensor> gather_kv_cuda_op(const Tensor& k, const Tensor& v,
                                             const Tensor& indices, const Tensor& counts,
                                             std::optional<int64_t> capacity) {
  const bool per_head = check_gather_kv(k, v, indices, counts, capacity);
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), N = indices.size(1);
  c10::DeviceGuard guard(k.device());
  const int64_t C = gather_kv_capacity(counts, N, capacity);
  Tensor k_out = at::empty({B, H, C, D}, k.options());
  Tensor v_out = at::empty({B, H, C, D}, v.options());
  const int64_t R = indices.size(0);
  if (k_out.numel() == 0 && R == 0) return {k_out, v_out};
  Tensor status = at::empty({R}, indices.options());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), ic = indices.contiguous(),
               cc = counts.contiguous();
  KVCopyParams prm{kc.data_ptr(), vc.data_ptr(), k_out.data_ptr(), v_out.data_ptr(),
                   ic.data_ptr<int32_t>(), cc.data_ptr<int32_t>(), status.data_ptr<int32_t>(),
                   B, H, L, C, N, D * static_cast<int64_t>(k.element_size()), per_head};
  check_kv_indices("gather_kv", prm, KVCopyKind::kGather, status, counts);
  gather_kv_cuda(prm, current_stream(k));
  return {k_out, v_out};
}

void scatter_kv_cuda_op(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v,
                        const Tensor& indices, const std::optional<Tensor>& counts) {
  const bool per_head = check_scatter_kv(k_cache, v_cache, k, v, indices, counts);
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  const int64_t T = k.size(2), N = indices.size(1), R = indices.size(0);
  if (R == 0) return;
  c10::DeviceGuard guard(k_cache.device());
  Tensor status = at::empty({R}, indices.options());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), ic = indices.contiguous();
  const auto cc = contiguous_opt(counts);
  KVCopyParams prm{kc.data_ptr(), vc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   ic.data_ptr<int32_t>(), cc ? cc->data_ptr<int32_t>() : nullptr,
                   status.data_ptr<int32_t>(), B, H, T, C, N,
                   D * static_cast<int64_t>(k.element_size()), per_head};
  check_kv_indices("scatter_kv", prm, KVCopyKind::kScatter, status, cc);
  scatter_kv_cuda(prm, current_stream(k_cache));
}

Tensor decode_attention_cuda_op(const Tensor& query, const Tensor& key, const Tensor& value,
                                const Tensor& lengths, std::optional<double> scale,
                                bool check_lengths) {
  c10::DeviceGuard guard(query.device());
  DecodeAttentionParams prm =
      check_decode_attention(query, key, value, lengths, scale, check_lengths);
  const Tensor q = with_contiguous_rows(query), k = with_contiguous_rows(key),
               v = with_contiguous_rows(value), len = lengths.contiguous();
  Tensor out = at::empty(query.sizes(), query.options());  // every element is written
  if (out.numel() == 0) return out;
  bind_decode_tensors(prm, q, k, v, len, out);
  decode_attention_cuda_plan(prm);
  Tensor partial_out, partial_ml;
  if (prm.splits > 1) {
    const int64_t rows = prm.B * prm.Hkv, nq = decode_group_rows(prm);
    const auto f32 = query.options().dtype(at::kFloat);
    partial_out = at::empty({rows, prm.splits, nq, prm.D}, f32);
    partial_ml = at::empty({rows, prm.splits, nq, 2}, f32);
    prm.partial_out = partial_out.data_ptr<float>();
    prm.partial_ml = partial_ml.data_ptr<float>();
  }
  decode_attention_cuda(prm, current_stream(query));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("cumulative_scores", &cumulative_scores_cuda_op);
  m.impl("topp_select", &topp_select_cuda_op);
  m.impl("gather_kv", &gather_kv_cuda_op);
  m.impl("scatter_kv", &scatter_kv_cuda_op);
  m.impl("decode_attention", &decode_attention_cuda_op);
}

}  // namespace sparse_attn
