// Copies of whole key/value rows between a full-length cache and a compact one.
//
// Tensors are [B, H, len, D] (contiguous; a "row" is D elements = row_bytes bytes). Index rows are
// [R, N] int32 with R == B (one selection shared by the H heads, the per-layer budget) or
// R == B * H (one per head, row r = b * H + h). Only the first counts[r] entries of an index row
// are used (all N when counts is nullptr); they must be strictly ascending, as topp_select emits
// them, so no two writes of a row ever hit the same slot.
//
//   gather:  dst[b, h, c] = src[b, h, idx[r, c]]   for c < count;  dst[b, h, c] = 0 for
//            count <= c < dst_len                   (src_len = L, dst_len = capacity)
//   scatter: dst[b, h, idx[r, t]] = src[b, h, t]   for t < count    (in place; other slots kept)
//
// Both copy a key and a value tensor in one pass. Bad counts or indices set status[r] and the
// row is not copied.
#pragma once

#include "common.h"

namespace sparse_attn {

struct KVCopyParams {
  const void* src_k;
  const void* src_v;
  void* dst_k;
  void* dst_v;
  const int32_t* indices;  // [R, N]
  const int32_t* counts;   // [R] or nullptr
  int32_t* status;         // [R] out, RowStatus
  int64_t B, H;
  int64_t src_len, dst_len, n_indices;
  int64_t row_bytes;
  bool per_head;           // R == B * H
};

// Index rows [row_begin, row_end).
void gather_kv_cpu(const KVCopyParams& params, int64_t row_begin, int64_t row_end);
void scatter_kv_cpu(const KVCopyParams& params, int64_t row_begin, int64_t row_end);

void gather_kv_cuda(const KVCopyParams& params, void* stream);
void scatter_kv_cuda(const KVCopyParams& params, void* stream);

}  // namespace sparse_attn
