// Argument checks shared by the CPU glue (cpu_ops.cpp) and the CUDA glue (cuda_ops.cpp): both
// devices accept and refuse exactly the same inputs, with the same messages. The fake kernels in
// sparse_attn/ops.py torch._check the same shape / dtype contract.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "kernels/cumulative_scores.h"
#include "kernels/decode_attention.h"
#include "kernels/kv_copy.h"
#include "kernels/topp_select.h"

#define SA_CHECK(cond, ...) TORCH_CHECK(cond, "sparse_attn.", __VA_ARGS__)

namespace sparse_attn {

using at::Tensor;

std::string shape_str(const Tensor& t);

const uint8_t* mask_ptr(const std::optional<Tensor>& contiguous_mask);
std::optional<Tensor> contiguous_opt(const std::optional<Tensor>& t);

// Kernels write one RowStatus per row; the first bad row becomes an error naming the argument.
// (On CUDA this is one small device-to-host copy.)
void raise_on_bad_topp_row(const Tensor& status, const ToppSelectParams& prm,
                           const std::optional<Tensor>& p_rows);
void raise_on_bad_kv_row(const char* op, const Tensor& status, const KVCopyParams& prm,
                         KVCopyKind kind, const std::optional<Tensor>& counts);

// cumulative_scores: returns the checked scale (default D ** -0.5) and the dtype.
struct CumulativeScoresArgs {
  float scale;
  DType dtype;
};
CumulativeScoresArgs check_cumulative_scores(const Tensor& q, const Tensor& k,
                                             std::optional<double> scale,
                                             const std::optional<Tensor>& key_mask);

void check_topp_select(const Tensor& scores, double p, const std::optional<Tensor>& p_rows,
                       const std::optional<Tensor>& valid_mask, int64_t keep_first,
                       int64_t keep_last, const std::optional<Tensor>& candidate_mask);

// gather_kv / scatter_kv: return whether index rows are per head ([B * H, N]).
bool check_gather_kv(const Tensor& k, const Tensor& v, const Tensor& indices,
                     const Tensor& counts, std::optional<int64_t> capacity);
bool check_scatter_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k,
                      const Tensor& v, const Tensor& indices, const std::optional<Tensor>& counts);
// gather_kv with capacity=None: max(counts) bounded by the index row length N, so that a garbage
// count is reported by the index validation instead of failing an allocation.
int64_t gather_kv_capacity(const Tensor& counts, int64_t n_indices,
                           std::optional<int64_t> capacity);

// decode_attention: everything but the data pointers and the split plan. With check_lengths,
// lengths outside [T, C] are an error (a device-to-host copy of one flag on CUDA).
DecodeAttentionParams check_decode_attention(const Tensor& query, const Tensor& key,
                                             const Tensor& value, const Tensor& lengths,
                                             std::optional<double> scale, bool check_lengths);

// Fills the data pointers and strides of params (query / key / value with contiguous rows,
// lengths and out contiguous; out [B, Hq, T, D] in query's dtype).
void bind_decode_tensors(DecodeAttentionParams& params, const Tensor& query, const Tensor& key,
                         const Tensor& value, const Tensor& lengths, Tensor& out);

// The last dim contiguous (the kernels' only layout requirement): t itself or a copy.
Tensor with_contiguous_rows(const Tensor& t);

}  // namespace sparse_attn
