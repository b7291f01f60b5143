// Shared definitions for the sparse_attn kernels.
//
// Kernels take raw pointers, sizes and (for CUDA) a stream. They never include torch headers, so
// the .cu files compile quickly and can be checked by nvcc alone (CMakeLists.txt). The torch
// registration layer (csrc/torch_bindings.cpp) validates shapes/dtypes/devices and maps tensors
// onto the parameter structs declared in the op headers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE inline
#endif

namespace sparse_attn {

// Element types of attention inputs.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Per-row status written by kernels that validate values they read anyway (no extra pass).
// The registration layer turns the first non-zero status into an error naming the row.
enum RowStatus : int32_t {
  kOk = 0,
  kNonFiniteScore = 1,     // topp_select: NaN or +-inf in scores
  kNegativeScore = 2,      // topp_select: score < 0
  kBadP = 3,               // topp_select: p outside (0, 1] or NaN
  kBadCount = 4,           // gather/scatter: count < 0 or larger than the index row / capacity
  kIndexOutOfRange = 5,    // gather/scatter: index < 0 or >= the indexed length
  kIndexNotAscending = 6,  // gather/scatter: kept indices of a row must be strictly ascending
};

// Non-negative finite floats order like their bit patterns read as unsigned integers, which is
// what lets topp_select find its threshold by a radix search on the bits instead of sorting.
SA_HOST_DEVICE uint32_t float_key(float x) {
  x += 0.0f;  // -0.0 becomes +0.0: equal scores must get equal keys
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

SA_HOST_DEVICE float key_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

}  // namespace sparse_attn
