// Turns a failed kernel launch into an exception naming the op (the glue reports it as an error).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace sparse_attn {

inline void check_launch(const std::string& what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_attn::") + what + ": " + cudaGetErrorString(err));
}

}  // namespace sparse_attn
