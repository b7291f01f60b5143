// CPU gather / scatter of whole K and V rows (see kv_copy.h).
#include "../kv_copy.h"

namespace sparse_attn {
namespace {

// Validates index row r against the indexed length; returns kOk or the first problem.
RowStatus check_index_row(const KVCopyParams& prm, int64_t r, int64_t indexed_len,
                          int64_t max_count, int64_t* count_out) {
  const int64_t count = prm.counts ? prm.counts[r] : prm.n_indices;
  *count_out = count;
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

// The (b, h) slices an index row applies to: one head for per-head rows, all H otherwise.
void heads_of_row(const KVCopyParams& prm, int64_t r, int64_t* bh_begin, int64_t* bh_end) {
  if (prm.per_head) {
    *bh_begin = r;
    *bh_end = r + 1;
  } else {
    *bh_begin = r * prm.H;
    *bh_end = (r + 1) * prm.H;
  }
}

}  // namespace

void gather_kv_cpu(const KVCopyParams& prm, int64_t row_begin, int64_t row_end) {
  const int64_t rb = prm.row_bytes;
  const int64_t max_count = prm.n_indices < prm.dst_len ? prm.n_indices : prm.dst_len;
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t count = 0;
    const RowStatus st = check_index_row(prm, r, prm.src_len, max_count, &count);
    prm.status[r] = st;
    if (st != kOk) count = 0;  // leave no garbage: the whole compact row is zero-filled
    const int32_t* idx = prm.indices + r * prm.n_indices;
    int64_t bh0, bh1;
    heads_of_row(prm, r, &bh0, &bh1);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      for (int64_t c = 0; c < count; ++c) {
        std::memcpy(row_ptr(prm.dst_k, bh, prm.dst_len, c, rb),
                    row_ptr(prm.src_k, bh, prm.src_len, idx[c], rb), rb);
        std::memcpy(row_ptr(prm.dst_v, bh, prm.dst_len, c, rb),
                    row_ptr(prm.src_v, bh, prm.src_len, idx[c], rb), rb);
      }
      const int64_t tail = (prm.dst_len - count) * rb;
      std::memset(row_ptr(prm.dst_k, bh, prm.dst_len, count, rb), 0, tail);
      std::memset(row_ptr(prm.dst_v, bh, prm.dst_len, count, rb), 0, tail);
    }
  }
}

void scatter_kv_cpu(const KVCopyParams& prm, int64_t row_begin, int64_t row_end) {
  const int64_t rb = prm.row_bytes;
  const int64_t max_count = prm.n_indices < prm.src_len ? prm.n_indices : prm.src_len;
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t count = 0;
    const RowStatus st = check_index_row(prm, r, prm.dst_len, max_count, &count);
    prm.status[r] = st;
    if (st != kOk) continue;
    const int32_t* idx = prm.indices + r * prm.n_indices;
    int64_t bh0, bh1;
    heads_of_row(prm, r, &bh0, &bh1);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      for (int64_t t = 0; t < count; ++t) {
        std::memcpy(row_ptr(prm.dst_k, bh, prm.dst_len, idx[t], rb),
                    row_ptr(prm.src_k, bh, prm.src_len, t, rb), rb);
        std::memcpy(row_ptr(prm.dst_v, bh, prm.dst_len, idx[t], rb),
                    row_ptr(prm.src_v, bh, prm.src_len, t, rb), rb);
      }
    }
  }
}

}  // namespace sparse_attn
