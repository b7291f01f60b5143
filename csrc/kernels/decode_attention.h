// Attention of the T newest queries of each sequence over a compact KV cache (one decode step),
// see docs/decode_attention.md:
//   out[b, h*g + i, t] = sum_{j < end} softmax_j(scale * q[b, h*g + i, t] . k[b, h, j]) v[b, h, j]
//   end = clamp(lengths[b, h], 0, C) - (T - 1 - t)      (g = Hq / Hkv; no slot seen: out = 0)
// Slots at or past a row's length are never read.
//
// Work is split flash-decoding style: the slots [0, C) of a KV row are cut into `splits` ranges
// of `split_len`; one work item (row, split) computes, for all g * T queries of the row's GQA
// group at once (so each K / V row is read once per group), an unnormalised fp32 partial
// output with its running max and sum (online softmax). A combine step merges the splits of a
// row. With splits == 1 the first step writes the output itself.
#pragma once

#include "common.h"

namespace sparse_attn {

struct DecodeAttentionParams {
  const void* q;              // [B, Hq, T, D]; strides below, last dim contiguous
  const void* k;              // [B, Hkv, C, D]; strides below, last dim contiguous
  const void* v;              // [B, Hkv, C, D]; strides below, last dim contiguous
  const int32_t* lengths;     // [B, Hkv] contiguous; tokens held per row (clamped to [0, C])
  void* out;                  // [B, Hq, T, D] contiguous, dtype
  float* partial_out;         // [B * Hkv, splits, g * T, D] fp32 workspace (splits > 1)
  float* partial_ml;          // [B * Hkv, splits, g * T, 2] fp32 workspace: (max, sum)
  DType dtype;
  int64_t B, Hq, Hkv, T, C, D;
  int64_t q_stride_b, q_stride_h, q_stride_t;
  int64_t k_stride_b, k_stride_h, k_stride_c;
  int64_t v_stride_b, v_stride_h, v_stride_c;
  int64_t splits, split_len;  // splits * split_len >= C
  float scale;
};

// Group rows of a KV row: g * T queries, row r = i * T + t is query head h * g + i, step t.
SA_HOST_DEVICE int64_t decode_group_rows(const DecodeAttentionParams& p) {
  return (p.Hq / p.Hkv) * p.T;
}

// Exclusive end of the slots query step t of KV row bh sees (<= 0: none).
SA_HOST_DEVICE int64_t decode_visible_end(const DecodeAttentionParams& p, int64_t bh, int64_t t) {
  int64_t len = p.lengths[bh];
  len = len < 0 ? 0 : (len > p.C ? p.C : len);
  return len - (p.T - 1 - t);
}

// Cuts [0, C) into `splits` ranges of `split_len` slots (a multiple of `tile`, at least
// `min_split_len` unless C is shorter) so that about `target_items` work items exist when each
// split gives `items_per_split` of them. Depends on C only, never on lengths: no device read.
inline void decode_attention_plan(DecodeAttentionParams& p, int64_t items_per_split,
                                  int64_t target_items, int64_t min_split_len, int64_t tile) {
  int64_t splits = (target_items + items_per_split - 1) / (items_per_split > 0 ? items_per_split : 1);
  const int64_t max_splits = (p.C + min_split_len - 1) / min_split_len;
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < 1 ? 1 : splits;
  int64_t split_len = (p.C + splits - 1) / splits;
  split_len = ((split_len + tile - 1) / tile) * tile;
  p.split_len = split_len < tile ? tile : split_len;
  p.splits = (p.C + p.split_len - 1) / p.split_len;
  p.splits = p.splits < 1 ? 1 : p.splits;
}

// CPU: work items [item_begin, item_end) of B * Hkv * splits (item = bh * splits + split);
// then, when splits > 1, the combine over KV rows [bh_begin, bh_end).
void decode_attention_cpu(const DecodeAttentionParams& params, int64_t item_begin,
                          int64_t item_end);
void decode_attention_combine_cpu(const DecodeAttentionParams& params, int64_t bh_begin,
                                  int64_t bh_end);

// CUDA: sets splits / split_len for the current device (no device read, no sync), then both
// steps on `stream`; partial_* must be sized for params.splits.
void decode_attention_cuda_plan(DecodeAttentionParams& params);
void decode_attention_cuda(const DecodeAttentionParams& params, void* stream);

}  // namespace sparse_attn
