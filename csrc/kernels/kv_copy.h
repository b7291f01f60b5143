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
// Both copy a key and a value tensor in one pass. The copies trust their index rows: the caller
// first runs check_kv_indices (status per row) and copies only when every row is valid, so a bad
// row never leaves a cache half-written.
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
  int32_t* status;         // [R] out, RowStatus (check_kv_indices)
  int64_t B, H;
  int64_t src_len, dst_len, n_indices;
  int64_t row_bytes;
  bool per_head;           // R == B * H
};

enum class KVCopyKind : int32_t { kGather = 0, kScatter = 1 };

// The bounds an index row must respect: indices into src (gather) or dst (scatter), and at most
// min(N, dst_len) (gather) or min(N, src_len) (scatter) entries used.
SA_HOST_DEVICE int64_t kv_indexed_len(const KVCopyParams& p, KVCopyKind kind) {
  return kind == KVCopyKind::kGather ? p.src_len : p.dst_len;
}
SA_HOST_DEVICE int64_t kv_max_count(const KVCopyParams& p, KVCopyKind kind) {
  const int64_t other = kind == KVCopyKind::kGather ? p.dst_len : p.src_len;
  return p.n_indices < other ? p.n_indices : other;
}

// Index rows [row_begin, row_end): counts in range, indices in range and strictly ascending.
void check_kv_indices_cpu(const KVCopyParams& params, KVCopyKind kind, int64_t row_begin,
                          int64_t row_end);
void gather_kv_cpu(const KVCopyParams& params, int64_t row_begin, int64_t row_end);
void scatter_kv_cpu(const KVCopyParams& params, int64_t row_begin, int64_t row_end);

void check_kv_indices_cuda(const KVCopyParams& params, KVCopyKind kind, void* stream);
void gather_kv_cuda(const KVCopyParams& params, void* stream);
void scatter_kv_cuda(const KVCopyParams& params, void* stream);

}  // namespace sparse_attn
