// Fused FP8 quantisation: amax -> scale -> e4m3 cast in one pass over x (two for 128x128).
//
// Per block of x (1x128 token group or 128x128 weight block):
//   amax  = max |x| over the block's finite elements, clamped to >= 1e-4
//   f32:    scale = amax * (1/448),             q = x * (1 / scale)
//   ue8m0:  scale = 2^ceil(log2(amax * (1/448))), q = x * (1 / scale)     (exact power of two)
//   x_fp8 = e4m3(q) rounded to nearest even; NaN / +-Inf inputs become NaN (e4m3fn has no Inf),
//   so non-finite values poison the GEMM visibly instead of being scaled away.
// The Python reference (jax_ds/ops/quant.py) computes the same expressions in the same order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/fp8_quant.cuh"
#include "common/status.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::gemm {
namespace {

using fp8::block_scale;
using fp8::finite_abs;
using fp8::kGroup;
using fp8::to_e4m3;
using fp8::to_float;

// (1, 128) blocks: one warp per token group, 4 elements per lane.
template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                     float* __restrict__ scales, int64_t M, int K, bool ue8m0) {
  const int k_groups = (K + kGroup - 1) / kGroup;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (group >= M * k_groups) return;
  const int64_t row = group / k_groups;
  fp8::quantize_group_1x128(x + row * K, q + row * K, scales + group, K,
                            static_cast<int>(group % k_groups), threadIdx.x % 32, ue8m0);
}

// (128, 128) blocks: one 256-thread CTA per block; amax pass, then cast pass (L1/L2 hits).
template <typename T>
__global__ void quantize_blocks_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                       float* __restrict__ scales, int64_t M, int K, bool ue8m0) {
  __shared__ float warp_max[8];
  const int k_groups = (K + kGroup - 1) / kGroup;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kGroup;
  const int c = blockIdx.x * kGroup + threadIdx.x % kGroup;
  const int r_step = blockDim.x / kGroup;  // 2 rows per pass
  float amax = 0.f;
  for (int64_t r = r0 + threadIdx.x / kGroup; r < min(r0 + kGroup, M); r += r_step)
    if (c < K) amax = fmaxf(amax, finite_abs(to_float(x[r * K + c])));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.f;
#pragma unroll
  for (int w = 0; w < 8; ++w) amax = fmaxf(amax, warp_max[w]);
  const float2 s = block_scale(amax, ue8m0);
  for (int64_t r = r0 + threadIdx.x / kGroup; r < min(r0 + kGroup, M); r += r_step)
    if (c < K) q[r * K + c] = to_e4m3(to_float(x[r * K + c]), s.y);
  if (threadIdx.x == 0) scales[blockIdx.y * k_groups + blockIdx.x] = s.x;
}

template <typename T>
ffi::Error Launch(cudaStream_t stream, const void* x, void* q, float* scales, int64_t M, int K,
                  int block_m, bool ue8m0) {
  const int k_groups = (K + kGroup - 1) / kGroup;
  const T* xt = static_cast<const T*>(x);
  uint8_t* qb = static_cast<uint8_t*>(q);
  if (block_m == 1) {
    const int64_t groups = M * k_groups;
    const int warps_per_block = 8;
    const int64_t grid = (groups + warps_per_block - 1) / warps_per_block;
    quantize_rows_kernel<T><<<static_cast<unsigned>(grid), 32 * warps_per_block, 0, stream>>>(
        xt, qb, scales, M, K, ue8m0);
  } else {
    const dim3 grid(k_groups, static_cast<unsigned>((M + kGroup - 1) / kGroup));
    quantize_blocks_kernel<T><<<grid, 256, 0, stream>>>(xt, qb, scales, M, K, ue8m0);
  }
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return ffi::Error::Success();
}

ffi::Error QuantizeFp8Impl(cudaStream_t stream, ffi::AnyBuffer x,
                           ffi::Result<ffi::AnyBuffer> q,
                           ffi::Result<ffi::Buffer<ffi::F32>> scales, int32_t block_m,
                           bool ue8m0) {
  auto xd = x.dimensions();
  JAX_DS_CHECK_ARG(xd.size() == 2, "quantize_fp8: x must be 2-D [M, K]");
  const int64_t M = xd[0], K = xd[1];
  JAX_DS_CHECK_ARG(block_m == 1 || block_m == 128, "quantize_fp8: block_m must be 1 or 128");
  JAX_DS_CHECK_ARG(M >= 1 && K >= 1 && K < (int64_t(1) << 31), "quantize_fp8: bad x shape");
  JAX_DS_CHECK_ARG(M * ((K + kGroup - 1) / kGroup) < (int64_t(1) << 31) * 8,
                   "quantize_fp8: x too large for one launch");
  JAX_DS_CHECK_ARG(q->element_type() == ffi::F8E4M3FN, "quantize_fp8: x_fp8 must be e4m3fn");
  auto qd = q->dimensions(), sd = scales->dimensions();
  JAX_DS_CHECK_ARG(qd.size() == 2 && qd[0] == M && qd[1] == K, "quantize_fp8: x_fp8 must be [M,K]");
  JAX_DS_CHECK_ARG(sd.size() == 2 && sd[0] == (M + block_m - 1) / block_m &&
                       sd[1] == (K + kGroup - 1) / kGroup,
                   "quantize_fp8: scales must be [ceil(M/block_m), ceil(K/128)]");
  const int k = static_cast<int>(K);
  switch (x.element_type()) {
    case ffi::BF16:
      return Launch<__nv_bfloat16>(stream, x.untyped_data(), q->untyped_data(),
                                   scales->typed_data(), M, k, block_m, ue8m0);
    case ffi::F32:
      return Launch<float>(stream, x.untyped_data(), q->untyped_data(), scales->typed_data(), M, k,
                           block_m, ue8m0);
    default:
      return ffi::Error::InvalidArgument("quantize_fp8: x must be bfloat16 or float32");
  }
}

}  // namespace
}  // namespace jax_ds::gemm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsQuantizeFp8, jax_ds::gemm::QuantizeFp8Impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()                   // x
                                  .Ret<xla::ffi::AnyBuffer>()                   // x_fp8 (e4m3fn)
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()       // scales
                                  .Attr<int32_t>("block_m")
                                  .Attr<bool>("ue8m0"),
                              // Only enqueues work on the stream: XLA may capture it into a CUDA
                              // graph (command buffer) with its neighbours, which removes the
                              // per-launch host cost from jitted programs.
                              {xla::ffi::Traits::kCmdBufferCompatible});
