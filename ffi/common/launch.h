// Host-side launch pieces shared by the FFI handlers: the once-per-device kernel setup and the
// launch configurations that carry attributes (clusters, programmatic dependent launch).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common/status.h"

namespace jax_ds {

constexpr int kMaxSmemBytes = 227 * 1024;  // Hopper's per-block opt-in limit

// A launch configuration carrying one attribute (`attr`, filled by the caller; it must outlive
// the config).
inline cudaLaunchConfig_t LaunchWithAttr(dim3 grid, dim3 block, int smem_bytes,
                                         cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// A 1-D launch of `grid` CTAs in clusters of `cluster_n` along x; `attr` must outlive the config.
inline cudaLaunchConfig_t ClusterLaunch(int grid, int cluster_n, int threads, int smem_bytes,
                                        cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster_n;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  return LaunchWithAttr(dim3(grid), dim3(threads), smem_bytes, stream, attr);
}

// What a kernel asks of each device once: the shared-memory opt-in (always the whole 227 KB, so
// that calls needing different table sizes share it; setting it costs host time that small GEMMs
// feel) and how many of its clusters can be resident at once.
struct KernelDeviceState {
  std::atomic<bool> ready{false};
  std::atomic<int> max_clusters{0};
};

// `per_device` is the kernel's own table (one static per kernel instantiation).
template <typename Kernel>
ffi::Error PrepareKernel(Kernel kernel, KernelDeviceState (&per_device)[64], int threads,
                         int cluster_n, int num_sms, int* max_clusters) {
  int device = 0;
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  KernelDeviceState& slot = per_device[device % 64];
  if (!slot.ready.load(std::memory_order_acquire)) {
    JAX_DS_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmemBytes));
    int clusters = 0;
    if (cluster_n == 1) {
      JAX_DS_CUDA_RETURN_IF_ERROR(
          cudaDeviceGetAttribute(&clusters, cudaDevAttrMultiProcessorCount, device));
    } else {
      // Clusters live inside one GPC: how many fit at once can be fewer than SMs / cluster_n.
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg =
          ClusterLaunch(cluster_n, cluster_n, threads, kMaxSmemBytes, nullptr, &attr);
      JAX_DS_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    }
    if (clusters < 1) {
      return ffi::Error::Internal("jax_ds: kernel cannot be resident (clusters of " +
                                  std::to_string(cluster_n) + " CTAs)");
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

// A launch of `grid` x `block` as a programmatic dependent of the previous kernel on `stream`:
// it may start before that kernel ends, so the kernel must call griddepcontrol.wait
// (sm90::grid_dependency_wait) before reading anything the previous kernel writes. `attr` must
// outlive the config.
inline cudaLaunchConfig_t DependentLaunch(dim3 grid, dim3 block, int smem_bytes,
                                          cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr->val.programmaticStreamSerializationAllowed = 1;
  return LaunchWithAttr(grid, block, smem_bytes, stream, attr);
}

}  // namespace jax_ds
