// Host-side TMA tensor-map encoding. The driver entry point is looked up once through the
// runtime, so the library does not link libcuda directly.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/status.h"

namespace jax_ds {

inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// Encodes a `rank`-D tensor map (dims, strides and box innermost first; strides in bytes, one
// fewer than dims) with the 128-byte swizzle; loads past the edges read zeros.
inline ffi::Error EncodeSwizzled128(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank,
                                    const void* base, const cuuint64_t* dims,
                                    const cuuint64_t* strides, const cuuint32_t* box) {
  auto encode = TensorMapEncoder();
  if (encode == nullptr) {
    return ffi::Error::Internal("jax_ds: cuTensorMapEncodeTiled is not available from the driver");
  }
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult res = encode(map, dtype, rank, const_cast<void*>(base), dims, strides, box,
                        elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    return ffi::Error::Internal("jax_ds: cuTensorMapEncodeTiled (" + std::to_string(rank) +
                                "-D) failed with CUresult " +
                                std::to_string(static_cast<int>(res)));
  }
  return ffi::Error::Success();
}

// A row-major [rows, cols] matrix moved in boxes of [box_rows, box_cols] with the 128-byte
// swizzle (box_cols * elem_bytes must be 128): the layout WGMMA descriptors expect for loads, and
// a bank-conflict-free staging layout for stores. Loads past the edges read zeros and stores
// past them are dropped, which is how M/N tails cost nothing in the kernels.
inline ffi::Error EncodeTileMap(CUtensorMap* map, CUtensorMapDataType dtype, size_t elem_bytes,
                                const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows,
                                uint32_t box_cols) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * elem_bytes};  // bytes between rows
  const cuuint32_t box[2] = {box_cols, box_rows};
  return EncodeSwizzled128(map, dtype, 2, base, dims, strides, box);
}

// A row-major [planes, rows, cols] tensor moved in boxes of [1, box_rows, box_cols] with the
// 128-byte swizzle: boxes never cross a plane (rows past a plane's end read zeros, not the next
// plane's first rows).
inline ffi::Error EncodeTileMap3d(CUtensorMap* map, CUtensorMapDataType dtype, size_t elem_bytes,
                                  const void* base, uint64_t planes, uint64_t rows,
                                  uint64_t cols, uint32_t box_rows, uint32_t box_cols) {
  const cuuint64_t dims[3] = {cols, rows, planes};
  const cuuint64_t strides[2] = {cols * elem_bytes, rows * cols * elem_bytes};
  const cuuint32_t box[3] = {box_cols, box_rows, 1};
  return EncodeSwizzled128(map, dtype, 3, base, dims, strides, box);
}

}  // namespace jax_ds
