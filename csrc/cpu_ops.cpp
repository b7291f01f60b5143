// The CPU implementation of every op, registered for the CPU dispatch key. Each op checks its
// arguments (op_checks.h, shared with CUDA), converts tensors to the kernel's raw parameters
// and runs the kernels of csrc/kernels/cpu in parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"

namespace sparse_attn {
namespace {

Tensor cumulative_scores_cpu_op(const Tensor& q, const Tensor& k, std::optional<double> scale,
                                bool causal, const std::optional<Tensor>& key_mask) {
  const auto args = check_cumulative_scores(q, k, scale, key_mask);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  Tensor out = at::zeros({B, Hkv, Lk}, q.options().dtype(at::kFloat));  // accumulated into
  if (out.numel() == 0 || Lq == 0 || D == 0) return out;
  const auto mask = contiguous_opt(key_mask);
  const Tensor qf = (q.to(at::kFloat) * args.scale).contiguous();
  const Tensor kf = k.to(at::kFloat).contiguous();
  CumulativeScoresParams prm{qf.data_ptr(), kf.data_ptr(), mask_ptr(mask), nullptr,
                             out.data_ptr<float>(), DType::kFloat32, B, Hq, Hkv, Lq, Lk, D,
                             1.0f, causal};
  at::parallel_for(0, B * Hkv, 1,
                   [&](int64_t b, int64_t e) { cumulative_scores_cpu(prm, b, e); });
  return out;
}

std::tuple<Tensor, Tensor> topp_select_cpu_op(const Tensor& scores, double p,
                                              const std::optional<Tensor>& p_rows,
                                              const std::optional<Tensor>& valid_mask,
                                              int64_t keep_first, int64_t keep_last,
                                              const std::optional<Tensor>& candidate_mask) {
  check_topp_select(scores, p, p_rows, valid_mask, keep_first, keep_last, candidate_mask);
  const int64_t R = scores.size(0), L = scores.size(1);
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
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { topp_select_cpu(prm, b, e); });
  raise_on_bad_topp_row(status, prm, pr);
  return {indices, counts};
}

void check_kv_indices(const char* op, const KVCopyParams& prm, KVCopyKind kind,
                      const Tensor& status, const std::optional<Tensor>& counts) {
  at::parallel_for(0, status.numel(), 1,
                   [&](int64_t b, int64_t e) { check_kv_indices_cpu(prm, kind, b, e); });
  raise_on_bad_kv_row(op, status, prm, kind, counts);
}

std::tuple<Tensor, Tensor> gather_kv_cpu_op(const Tensor& k, const Tensor& v,
                                            const Tensor& indices, const Tensor& counts,
                                            std::optional<int64_t> capacity) {
  const bool per_head = check_gather_kv(k, v, indices, counts, capacity);
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), N = indices.size(1);
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
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { gather_kv_cpu(prm, b, e); });
  return {k_out, v_out};
}

void scatter_kv_cpu_op(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v,
                       const Tensor& indices, const std::optional<Tensor>& counts) {
  const bool per_head = check_scatter_kv(k_cache, v_cache, k, v, indices, counts);
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  const int64_t T = k.size(2), N = indices.size(1), R = indices.size(0);
  if (R == 0) return;
  Tensor status = at::empty({R}, indices.options());
  const Tensor kc = k.contiguous(), vc = v.contiguous(), ic = indices.contiguous();
  const auto cc = contiguous_opt(counts);
  KVCopyParams prm{kc.data_ptr(), vc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   ic.data_ptr<int32_t>(), cc ? cc->data_ptr<int32_t>() : nullptr,
                   status.data_ptr<int32_t>(), B, H, T, C, N,
                   D * static_cast<int64_t>(k.element_size()), per_head};
  check_kv_indices("scatter_kv", prm, KVCopyKind::kScatter, status, cc);
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) { scatter_kv_cpu(prm, b, e); });
}

Tensor decode_attention_cpu_op(const Tensor& query, const Tensor& key, const Tensor& value,
                               const Tensor& lengths, std::optional<double> scale,
                               bool check_lengths) {
  DecodeAttentionParams prm =
      check_decode_attention(query, key, value, lengths, scale, check_lengths);
  const Tensor q = with_contiguous_rows(query), k = with_contiguous_rows(key),
               v = with_contiguous_rows(value), len = lengths.contiguous();
  Tensor out = at::empty(query.sizes(), query.options());  // every element is written
  if (out.numel() == 0) return out;
  bind_decode_tensors(prm, q, k, v, len, out);
  const int64_t rows = prm.B * prm.Hkv, nq = decode_group_rows(prm);
  // Enough (row, split) items to keep every thread busy, splits of at least 512 slots.
  decode_attention_plan(prm, rows, 4 * at::get_num_threads(), 512, 64);
  Tensor partial_out, partial_ml;
  if (prm.splits > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    partial_out = at::empty({rows, prm.splits, nq, prm.D}, f32);
    partial_ml = at::empty({rows, prm.splits, nq, 2}, f32);
    prm.partial_out = partial_out.data_ptr<float>();
    prm.partial_ml = partial_ml.data_ptr<float>();
  }
  at::parallel_for(0, rows * prm.splits, 1,
                   [&](int64_t b, int64_t e) { decode_attention_cpu(prm, b, e); });
  if (prm.splits > 1) {
    // The combine reads splits * nq * D floats per row: a small one runs on this thread (a
    // parallel region costs a wake-up of the other threads, far more than the merge itself).
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (prm.splits * nq * prm.D));
    at::parallel_for(0, rows, grain,
                     [&](int64_t b, int64_t e) { decode_attention_combine_cpu(prm, b, e); });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) {
  m.impl("cumulative_scores", &cumulative_scores_cpu_op);
  m.impl("topp_select", &topp_select_cpu_op);
  m.impl("gather_kv", &gather_kv_cpu_op);
  m.impl("scatter_kv", &scatter_kv_cpu_op);
  m.impl("decode_attention", &decode_attention_cpu_op);
}

}  // namespace sparse_attn
