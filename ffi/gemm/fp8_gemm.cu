// XLA FFI handler for the dense FP8 GEMM: decode -> validate -> launch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "common/status.h"
#include "gemm/launch.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::gemm {
namespace {

// The split of the last wave (attributes split_units, splits; DenseScheduler::make) and the
// epilogue overlap of the one-accumulator-set tiles (attribute overlap).
struct SplitPlan {
  int split_units, splits;
  bool overlap;
};

// Validates the split plan against the tile's units, sets up its workspace, launches the
// instance of tile T (a TileTag) with or without the epilogue overlap.
template <typename T, bool kOverlap, typename OutT>
ffi::Error Launch(SplitPlan plan, cudaStream_t stream, const GemmArgs<OutT>& args,
                  float* workspace, int64_t workspace_floats) {
  using Sched = DenseScheduler<T::BM, T::BN, T::kClusterN, kOverlap>;
  const int k_blocks = args.K / kBlockK;
  Sched sched = Sched::make(args.a_rows, args.N, k_blocks, plan.split_units, plan.splits);
  JAX_DS_CHECK_ARG(plan.split_units >= 0 && plan.split_units <= sched.num_tile_units() &&
                       plan.splits >= 1 && plan.splits <= k_blocks,
                   "fp8_gemm: need 0 <= split_units <= tile units (" +
                       std::to_string(sched.num_tile_units()) + ") and 1 <= splits <= K/128");
  if (sched.split_units > 0) {  // make() keeps a split only when it cuts something
    const int64_t per_unit = int64_t{T::kClusterN} * T::BM * T::BN;  // floats per slice
    const int64_t partials = int64_t{sched.split_units} * sched.splits * per_unit;
    const int64_t counters = int64_t{sched.split_units} * T::kClusterN * (T::BM / 64);
    JAX_DS_CHECK_ARG(workspace_floats >= partials + counters,
                     "fp8_gemm: the split-K workspace needs " +
                         std::to_string(partials + counters) + " floats, got " +
                         std::to_string(workspace_floats));
    sched.ws = SplitWorkspace{workspace, reinterpret_cast<int*>(workspace + partials)};
    JAX_DS_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(sched.ws.counters, 0, counters * sizeof(int), stream));
  }
  return LaunchGemm<T::BM, T::BN, T::kClusterN>(stream, args, sched, sched.num_units(),
                                                Sched::extra_smem_bytes());
}

template <typename OutT>
ffi::Error Dispatch(int block_m, int block_n, int cluster_n, SplitPlan plan, cudaStream_t stream,
                    const GemmArgs<OutT>& args, float* workspace, int64_t workspace_floats) {
  auto run = [&](auto tile) {
    using T = decltype(tile);
    // The epilogue overlap is an instance of its own, compiled for the one-set tiles only (the
    // others ignore the attribute).
    if constexpr (kOneAccSetTile<T::BM, T::BN>) {
      if (plan.overlap) {
        return Launch<T, true>(plan, stream, args, workspace, workspace_floats);
      }
    }
    return Launch<T, false>(plan, stream, args, workspace, workspace_floats);
  };
  return DispatchTile</*kDense=*/true>("jax_ds_fp8_gemm", block_m, block_n, cluster_n, run);
}

ffi::Error Fp8GemmImpl(cudaStream_t stream, ffi::AnyBuffer a,
                       ffi::Buffer<ffi::F32> a_scale, ffi::AnyBuffer b,
                       ffi::Buffer<ffi::F32> b_scale, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> workspace, int32_t block_m,
                       int32_t block_n, int32_t cluster_n, int32_t num_sms, int32_t split_units,
                       int32_t splits, int32_t overlap) {
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
  JAX_DS_CHECK_ARG(overlap == 0 || overlap == 1, "fp8_gemm: overlap must be 0 or 1");

  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  return WithOutType("fp8_gemm", out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    const SplitPlan plan{split_units, splits, overlap == 1};
    return Dispatch(block_m, block_n, cluster_n, plan, stream,
                    GemmArgs<OutT>{a.untyped_data(), a_scale.typed_data(), b.untyped_data(),
                                   b_scale.typed_data(), out_ptr, m, n, n, k, num_sms},
                    workspace->typed_data(), static_cast<int64_t>(workspace->element_count()));
  });
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
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()       // split-K workspace
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("block_n")
                                  .Attr<int32_t>("cluster_n")
                                  .Attr<int32_t>("num_sms")
                                  .Attr<int32_t>("split_units")
                                  .Attr<int32_t>("splits")
                                  .Attr<int32_t>("overlap"),
                              // Only enqueues work on the stream: XLA may capture it into a CUDA
                              // graph (command buffer) with its neighbours, which removes the
                              // per-launch host cost from jitted programs.
                              {xla::ffi::Traits::kCmdBufferCompatible});
