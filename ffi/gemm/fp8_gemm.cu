// XLA FFI handler for the dense FP8 GEMM: decode -> validate -> launch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common/status.h"
#include "common/tma.h"
#include "gemm/sm90_fp8_gemm.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::gemm {
namespace {

constexpr int kMaxSmemBytes = 227 * 1024;  // Hopper's per-block opt-in limit
constexpr int kMaxStages = 32;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename OutT>
constexpr CUtensorMapDataType kOutMapType =
    sizeof(OutT) == 2 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;

// A 1-D launch of `grid` CTAs in clusters of `cluster_n` along x; `attr` must outlive the config.
cudaLaunchConfig_t ClusterLaunch(int grid, int cluster_n, int threads, int smem_bytes,
                                 cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster_n;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// What a kernel asks of each device once: the shared-memory opt-in (setting the attribute costs
// host time that small GEMMs feel) and how many of its clusters can be resident at once.
struct KernelDeviceState {
  std::atomic<bool> ready{false};
  std::atomic<int> max_clusters{0};
};

// `per_device` is the kernel's own table (one static per kernel instantiation).
template <typename Kernel>
ffi::Error PrepareKernel(Kernel kernel, KernelDeviceState (&per_device)[64], int smem_bytes,
                         int threads, int cluster_n, int num_sms, int* max_clusters) {
  int device = 0;
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  KernelDeviceState& slot = per_device[device % 64];
  if (!slot.ready.load(std::memory_order_acquire)) {
    JAX_DS_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    int clusters = 0;
    if (cluster_n == 1) {
      JAX_DS_CUDA_RETURN_IF_ERROR(
          cudaDeviceGetAttribute(&clusters, cudaDevAttrMultiProcessorCount, device));
    } else {
      // Clusters live inside one GPC: how many fit at once can be fewer than SMs / cluster_n.
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg =
          ClusterLaunch(cluster_n, cluster_n, threads, smem_bytes, nullptr, &attr);
      JAX_DS_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    }
    if (clusters < 1) {
      return ffi::Error::Internal("jax_ds: kernel cannot be resident (clusters of " +
                                  std::to_string(cluster_n) + " CTAs, " +
                                  std::to_string(smem_bytes) + " B shared memory)");
    }
    slot.max_clusters.store(clusters, std::memory_order_relaxed);
    slot.ready.store(true, std::memory_order_release);
  }
  // num_sms (from Python) can only lower the grid: a persistent grid larger than what is
  // resident would run its last clusters in a second wave.
  *max_clusters = std::min(slot.max_clusters.load(std::memory_order_relaxed),
                           std::max(1, num_sms / cluster_n));
  return ffi::Error::Success();
}

template <typename Kernel, typename... Args>
ffi::Error LaunchPersistent(Kernel kernel, cudaStream_t stream, int64_t units, int cluster_n,
                            int max_clusters, int threads, int smem_bytes, Args... args) {
  cudaLaunchAttribute attr;
  const int grid = static_cast<int>(std::min<int64_t>(units, max_clusters) * cluster_n);
  const cudaLaunchConfig_t cfg =
      ClusterLaunch(grid, cluster_n, threads, smem_bytes, stream, &attr);
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, args...));
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return ffi::Error::Success();
}

template <int BM, int BN, int kClusterN, typename OutT>
ffi::Error Launch(cudaStream_t stream, const void* a, const float* a_scale, const void* b,
                  const float* b_scale, OutT* out, int M, int N, int K, int num_sms) {
  using Smem = GemmSmem<BM, BN, OutT>;
  using Sched = DenseScheduler<BM, BN, kClusterN>;
  const int stages =
      std::min(kMaxStages, (kMaxSmemBytes - Smem::bytes(0)) / (Smem::kStageBytes + 16));
  const int smem_bytes = Smem::bytes(stages);
  auto kernel = sm90_fp8_gemm_kernel<BM, BN, kClusterN, OutT, Sched>;
  static KernelDeviceState per_device[64];
  int max_clusters = 0;
  if (auto err = PrepareKernel(kernel, per_device, smem_bytes, Smem::kThreads, kClusterN, num_sms,
                               &max_clusters);
      err.failure())
    return err;

  CUtensorMap map_a, map_b, map_out = {};
  // With clusters, each CTA loads (and multicasts) a 1/kClusterN slice of the A tile.
  if (auto err = EncodeFp8TileMap(&map_a, a, M, K, BM / kClusterN, kBlockK); err.failure())
    return err;
  if (auto err = EncodeFp8TileMap(&map_b, b, N, K, BN, kBlockK); err.failure()) return err;
  const bool out_aligned = (static_cast<int64_t>(N) * sizeof(OutT)) % 16 == 0;
  if (Smem::kTmaStore && out_aligned) {
    if (auto err = EncodeTileMap(&map_out, kOutMapType<OutT>, sizeof(OutT), out, M, N, 64,
                                 Smem::kBoxCols);
        err.failure())
      return err;
  }
  const Sched sched = Sched::make(M, N);
  return LaunchPersistent(kernel, stream, sched.num_units(), kClusterN, max_clusters,
                          Smem::kThreads, smem_bytes, map_a, map_b, map_out, a_scale, b_scale,
                          out, sched, M, N, K, stages, out_aligned);
}

// Tile shapes compiled ahead of time; Python's gemm_config() picks one per problem shape.
template <typename OutT>
ffi::Error Dispatch(int block_m, int block_n, int cluster_n, cudaStream_t stream, const void* a,
                    const float* a_scale, const void* b, const float* b_scale, OutT* out, int M,
                    int N, int K, int num_sms) {
#define JAX_DS_GEMM_TILE(BM_, BN_)                                                          \
  if (block_m == BM_ && block_n == BN_ && cluster_n == 1)                                   \
    return Launch<BM_, BN_, 1, OutT>(stream, a, a_scale, b, b_scale, out, M, N, K, num_sms); \
  if (block_m == BM_ && block_n == BN_ && cluster_n == 2)                                   \
    return Launch<BM_, BN_, 2, OutT>(stream, a, a_scale, b, b_scale, out, M, N, K, num_sms);
  JAX_DS_GEMM_TILE(64, 16)
  JAX_DS_GEMM_TILE(64, 32)
  JAX_DS_GEMM_TILE(64, 64)
  JAX_DS_GEMM_TILE(64, 128)
  JAX_DS_GEMM_TILE(128, 16)
  JAX_DS_GEMM_TILE(128, 32)
  JAX_DS_GEMM_TILE(128, 64)
  JAX_DS_GEMM_TILE(128, 128)
#undef JAX_DS_GEMM_TILE
  return ffi::Error::InvalidArgument(
      "jax_ds_fp8_gemm: no compiled tile " + std::to_string(block_m) + "x" +
      std::to_string(block_n) + " cluster " + std::to_string(cluster_n) +
      " (block_m in {64,128}, block_n in {16,32,64,128}, cluster_n in {1,2})");
}

ffi::Error Fp8GemmImpl(cudaStream_t stream, ffi::AnyBuffer a,
                       ffi::Buffer<ffi::F32> a_scale, ffi::AnyBuffer b,
                       ffi::Buffer<ffi::F32> b_scale, ffi::Result<ffi::AnyBuffer> out,
                       int32_t block_m, int32_t block_n, int32_t cluster_n, int32_t num_sms) {
  auto ad = a.dimensions(), bd = b.dimensions(), sad = a_scale.dimensions(),
       sbd = b_scale.dimensions(), od = out->dimensions();
  JAX_DS_CHECK_ARG(ad.size() == 2 && bd.size() == 2 && sad.size() == 2 && sbd.size() == 2 &&
                       od.size() == 2,
                   "fp8_gemm: a, b, a_scale, b_scale and out must be 2-D");
  JAX_DS_CHECK_ARG(a.element_type() == ffi::F8E4M3FN && b.element_type() == ffi::F8E4M3FN,
                   "fp8_gemm: a and b must be float8_e4m3fn");
  const int64_t M = ad[0], K = ad[1], N = bd[0];
  JAX_DS_CHECK_ARG(M >= 1 && N >= 1 && K >= kBlockK && K % kBlockK == 0 && bd[1] == K,
                   "fp8_gemm: need a [M,K], b [N,K] with K a positive multiple of 128");
  JAX_DS_CHECK_ARG(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K < (int64_t(1) << 31),
                   "fp8_gemm: dimensions must fit in int32");
  JAX_DS_CHECK_ARG(sad[0] == M && sad[1] == K / kBlockK, "fp8_gemm: a_scale must be [M, K/128]");
  JAX_DS_CHECK_ARG(sbd[0] == CeilDiv(N, 128) && sbd[1] == K / kBlockK,
                   "fp8_gemm: b_scale must be [ceil(N/128), K/128]");
  JAX_DS_CHECK_ARG(od[0] == M && od[1] == N, "fp8_gemm: out must be [M, N]");
  JAX_DS_CHECK_ARG(num_sms >= 1, "fp8_gemm: num_sms must be >= 1");

  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  switch (out->element_type()) {
    case ffi::BF16:
      return Dispatch(block_m, block_n, cluster_n, stream, a.untyped_data(), a_scale.typed_data(),
                      b.untyped_data(), b_scale.typed_data(),
                      reinterpret_cast<__nv_bfloat16*>(out->untyped_data()), m, n, k, num_sms);
    case ffi::F32:
      return Dispatch(block_m, block_n, cluster_n, stream, a.untyped_data(), a_scale.typed_data(),
                      b.untyped_data(), b_scale.typed_data(),
                      reinterpret_cast<float*>(out->untyped_data()), m, n, k, num_sms);
    default:
      return ffi::Error::InvalidArgument("fp8_gemm: out dtype must be bfloat16 or float32");
  }
}

}  // namespace
}  // namespace jax_ds::gemm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsFp8Gemm, jax_ds::gemm::Fp8GemmImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()                   // a (e4m3fn)
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       // a_scale
                                  .Arg<xla::ffi::AnyBuffer>()                   // b (e4m3fn)
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       // b_scale
                                  .Ret<xla::ffi::AnyBuffer>()                   // out
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("block_n")
                                  .Attr<int32_t>("cluster_n")
                                  .Attr<int32_t>("num_sms"),
                              // Only enqueues work on the stream: XLA may capture it into a CUDA
                              // graph (command buffer) with its neighbours, which removes the
                              // per-launch host cost from jitted programs.
                              {xla::ffi::Traits::kCmdBufferCompatible});
