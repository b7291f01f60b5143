// CPU gather / scatter of whole K and V rows (see kv_copy.h).
#include "../kv_copy.h"

namespace sparse_attn {
namespace {

RowStatus check_index_row(const KVCopyParams& prm, int64_t r, int64_t indexed_len,
                          int64_t max_count) {
  const int64_t count = prm.counts ? prm.counts[r] : prm.n_indices;
  if (count < 0 || count > max_count) return kBadCount;
  const int32_t* idx = prm.indices + r * prm.n_indices;
  for (int64_t c = 0; c < count; ++c) {
    if (idx[c] < 0 || idx[c] >= indexed_len) return kIndexOutOfRange;
    if (c > 0 && idx[c] <= idx[c - 1]) return kIndexNotAscending;
  }
  return kOk;
}

char* row_ptr(void* base, int64_t bh, int64_t len, int64_t pos, int64_t row_bytes) {
  return static_cast<char*>(base) + ((bh * len) + pos) * row_bytes;
}

const char* row_ptr(const void* base, int64_t bh, int64_t len, int64_t pos, int64_t row_bytes) {
  return static_cast<const char*>(base) + ((bh * len) + pos) * row_bytes;
}

// Calls fn(bh, idx, count) for each (batch * head) slice index row r applies to: one head for
// per-head rows, all H otherwise.
template <typename Fn>
void for_each_slice(const KVCopyParams& prm, int64_t row_begin, int64_t row_end, Fn fn) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t count = prm.counts ? prm.counts[r] : prm.n_indices;
    const int32_t* idx = prm.indices + r * prm.n_indices;
    const int64_t bh0 = prm.per_head ? r : r * prm.H;
    const int64_t bh1 = prm.per_head ? r + 1 : (r + 1) * prm.H;
    for (int64_t bh = bh0; bh < bh1; ++bh) fn(bh, idx, count);
  }
}

}  // namespace

void check_kv_indices_cpu(const KVCopyParams& prm, KVCopyKind kind, int64_t row_begin,
                          int64_t row_end) {
  const int64_t indexed_len = kv_indexed_len(prm, kind), max_count = kv_max_count(prm, kind);
  for (int64_t r = row_begin; r < row_end; ++r) {
    prm.status[r] = check_index_row(prm, r, indexed_len, max_count);
  }
}

void gather_kv_cpu(const KVCopyParams& prm, int64_t row_begin, int64_t row_end) {
  const int64_t rb = prm.row_bytes;
  for_each_slice(prm, row_begin, row_end, [&](int64_t bh, const int32_t* idx, int64_t count) {
    for (int64_t c = 0; c < count; ++c) {
      std::memcpy(row_ptr(prm.dst_k, bh, prm.dst_len, c, rb),
                  row_ptr(prm.src_k, bh, prm.src_len, idx[c], rb), rb);
      std::memcpy(row_ptr(prm.dst_v, bh, prm.dst_len, c, rb),
                  row_ptr(prm.src_v, bh, prm.src_len, idx[c], rb), rb);
    }
    const int64_t tail = (prm.dst_len - count) * rb;
    std::memset(row_ptr(prm.dst_k, bh, prm.dst_len, count, rb), 0, tail);
    std::memset(row_ptr(prm.dst_v, bh, prm.dst_len, count, rb), 0, tail);
  });
}

void scatter_kv_cpu(const KVCopyParams& prm, int64_t row_begin, int64_t row_end) {
  const int64_t rb = prm.row_bytes;
  for_each_slice(prm, row_begin, row_end, [&](int64_t bh, const int32_t* idx, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      std::memcpy(row_ptr(prm.dst_k, bh, prm.dst_len, idx[t], rb),
                  row_ptr(prm.src_k, bh, prm.src_len, t, rb), rb);
      std::memcpy(row_ptr(prm.dst_v, bh, prm.dst_len, idx[t], rb),
                  row_ptr(prm.src_v, bh, prm.src_len, t, rb), rb);
    }
  });
}

}  // namespace sparse_attn
