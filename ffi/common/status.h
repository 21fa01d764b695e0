// Error plumbing shared by all FFI handlers: every CUDA call is checked and turned into an
// ffi::Error naming the call, so XLA reports it instead of the process dying.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_ds {

namespace ffi = xla::ffi;

inline ffi::Error CudaError(cudaError_t err, const char* what) {
  return ffi::Error::Internal(std::string("jax_ds: ") + what + ": " + cudaGetErrorName(err) +
                              " (" + cudaGetErrorString(err) + ")");
}

}  // namespace jax_ds

// Returns an ffi::Error from the enclosing handler when a CUDA call fails.
#define JAX_DS_CUDA_RETURN_IF_ERROR(expr)                          \
  do {                                                             \
    cudaError_t jax_ds_err_ = (expr);                              \
    if (jax_ds_err_ != cudaSuccess) return ::jax_ds::CudaError(jax_ds_err_, #expr); \
  } while (0)

// Validation inside a handler: a bad shape becomes InvalidArgument, never a launch.
#define JAX_DS_CHECK_ARG(cond, msg)                                          \
  do {                                                                       \
    if (!(cond)) return ::xla::ffi::Error::InvalidArgument(std::string("jax_ds: ") + (msg)); \
  } while (0)
