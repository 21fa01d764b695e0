// Host side shared by the FP8 GEMM handlers (dense, grouped, masked): one launcher for every
// (tile, cluster, output type, scheduler) instance of sm90_fp8_gemm_kernel, and the dispatch
// from runtime tile attributes to the instances compiled ahead of time.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common/launch.h"
#include "common/status.h"
#include "common/tma.h"
#include "gemm/sm90_fp8_gemm.cuh"

namespace jax_ds::gemm {

constexpr int kMaxStages = 32;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename OutT>
constexpr CUtensorMapDataType kOutMapType =
    sizeof(OutT) == 2 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;

// The operands of one launch. A is [a_rows, K], B [b_rows, K] (groups stacked), out [a_rows, N].
template <typename OutT>
struct GemmArgs {
  const void* a;
  const float* a_scale;
  const void* b;
  const float* b_scale;
  OutT* out;
  int a_rows, b_rows, N, K, num_sms;
};

// Launches one kernel instance. `max_units` bounds the scheduler's work units from above (the
// grouped schedulers only know theirs on the device): it sizes the persistent grid. kBf16: bf16
// operands (K in elements, rows 16-byte aligned), no scales. kBTrans: b is [G, K, N] bf16
// (b_rows = G * K), read MN-major.
template <int BM, int BN, int kClusterN, typename OutT, typename Sched, bool kBf16 = false,
          bool kBTrans = false>
ffi::Error LaunchGemm(cudaStream_t stream, const GemmArgs<OutT>& g, const Sched& sched,
                      int64_t max_units, int extra_smem_bytes) {
  using Smem = GemmSmem<BM, BN, OutT, kBf16>;
  // The output staging buffer only where TMA stores can be used (16-byte aligned rows); without
  // it the stages get its room. (Dropping it everywhere for 7 stages and register stores was
  // 3-45% slower at m = 4096 on the H200, NOTES-gemm.md.)
  const bool out_aligned = (static_cast<int64_t>(g.N) * sizeof(OutT)) % 16 == 0;
  const int out_bytes = Smem::kTmaStore && out_aligned ? Smem::kOutBytes : 0;
  const int fixed_bytes = Smem::bytes(0, extra_smem_bytes) - Smem::kOutBytes + out_bytes;
  const int stages =
      std::min(kMaxStages, (kMaxSmemBytes - fixed_bytes) / (Smem::kStageBytes + 16));
  if (stages < 2) {
    return ffi::Error::InvalidArgument("jax_ds: GEMM scheduler tables leave no room for stages");
  }
  const int smem_bytes = fixed_bytes + stages * (Smem::kStageBytes + 16);
  auto kernel = sm90_fp8_gemm_kernel<BM, BN, kClusterN, OutT, Sched, kBf16, kBTrans>;
  static KernelDeviceState per_device[64];
  int max_clusters = 0;
  if (auto err = PrepareKernel(kernel, per_device, Smem::kThreads, kClusterN, g.num_sms,
                               &max_clusters);
      err.failure())
    return err;

  CUtensorMap map_a, map_b, map_out = {};
  // With clusters, each CTA loads (and multicasts) a 1/kClusterN slice of the A tile. A stage
  // holds 128 bytes of K per row: 128 FP8 (as bytes) or 64 bf16.
  constexpr auto kInType = kBf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_UINT8;
  constexpr size_t kInBytes = kBf16 ? 2 : 1;
  constexpr int kStageK = kBf16 ? kBlockKBf16 : kBlockK;
  if (auto err = EncodeTileMap(&map_a, kInType, kInBytes, g.a, g.a_rows, g.K, BM / kClusterN,
                               kStageK);
      err.failure())
    return err;
  if constexpr (kBTrans) {  // [G, K, N] in boxes of [1, 64 k rows, 64 n columns]
    if (auto err = EncodeTileMap3d(&map_b, kInType, kInBytes, g.b, g.b_rows / g.K, g.K, g.N,
                                   kStageK, 64);
        err.failure())
      return err;
  } else {
    if (auto err = EncodeTileMap(&map_b, kInType, kInBytes, g.b, g.b_rows, g.K, BN, kStageK);
        err.failure())
      return err;
  }
  if (out_bytes > 0) {
    if (auto err = EncodeTileMap(&map_out, kOutMapType<OutT>, sizeof(OutT), g.out, g.a_rows, g.N,
                                 64, Smem::kBoxCols);
        err.failure())
      return err;
  }
  cudaLaunchAttribute attr;
  const int grid = static_cast<int>(std::min<int64_t>(max_units, max_clusters) * kClusterN);
  const cudaLaunchConfig_t cfg =
      ClusterLaunch(grid, kClusterN, Smem::kThreads, smem_bytes, stream, &attr);
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, map_a, map_b, map_out, g.a_scale,
                                                 g.b_scale, g.out, sched, g.a_rows, g.N, g.K,
                                                 stages, out_bytes));
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return ffi::Error::Success();
}

// Calls fn(typed output pointer) for a bf16 or f32 output buffer.
template <typename Fn>
ffi::Error WithOutType(const char* op, ffi::Result<ffi::AnyBuffer>& out, Fn&& fn) {
  switch (out->element_type()) {
    case ffi::BF16:
      return fn(reinterpret_cast<__nv_bfloat16*>(out->untyped_data()));
    case ffi::F32:
      return fn(reinterpret_cast<float*>(out->untyped_data()));
    default:
      return ffi::Error::InvalidArgument(std::string(op) + ": out dtype must be bf16 or f32");
  }
}

template <int BM_, int BN_, int kClusterN_>
struct TileTag {
  static constexpr int BM = BM_, BN = BN_, kClusterN = kClusterN_;
};

// Calls fn(TileTag<BM, BN, C>{}) for the compiled instance named by the attributes; Python's
// gemm_config() picks one per problem shape. kDense: also 192x128 (three consumer warpgroups),
// which only the dense GEMM compiles (gemm.DENSE_EXTRA_TILES).
template <bool kDense = false, typename Fn>
ffi::Error DispatchTile(const char* op, int block_m, int block_n, int cluster_n, Fn&& fn) {
#define JAX_DS_GEMM_TILE(BM_, BN_)                                                \
  if (block_m == BM_ && block_n == BN_ && cluster_n == 1) return fn(TileTag<BM_, BN_, 1>{}); \
  if (block_m == BM_ && block_n == BN_ && cluster_n == 2) return fn(TileTag<BM_, BN_, 2>{});
  JAX_DS_GEMM_TILE(64, 16)
  JAX_DS_GEMM_TILE(64, 32)
  JAX_DS_GEMM_TILE(64, 64)
  JAX_DS_GEMM_TILE(64, 128)
  JAX_DS_GEMM_TILE(128, 16)
  JAX_DS_GEMM_TILE(128, 32)
  JAX_DS_GEMM_TILE(128, 64)
  JAX_DS_GEMM_TILE(128, 128)
  JAX_DS_GEMM_TILE(128, 192)
  if constexpr (kDense) {
    JAX_DS_GEMM_TILE(192, 128)
  }
#undef JAX_DS_GEMM_TILE
  return ffi::Error::InvalidArgument(
      std::string(op) + ": no compiled tile " + std::to_string(block_m) + "x" +
      std::to_string(block_n) + " cluster " + std::to_string(cluster_n) +
      " (block_m in {64,128}, block_n in {16,32,64,128} or 128x192" +
      (kDense ? std::string(" or 192x128") : std::string()) + ", cluster_n in {1,2})");
}

}  // namespace jax_ds::gemm
