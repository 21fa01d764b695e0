// XLA FFI handlers for the grouped FP8 GEMMs (MoE experts): the dense kernel body with the
// grouped tile scheduler. Contiguous: a [M, K] rows sorted by group, group_sizes [G] (any sizes,
// no alignment), rows past the groups zeroed. Masked: a [G, Mmax, K], masked_m [G] valid rows
// per group, the rest zeroed.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "common/status.h"
#include "gemm/launch.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::gemm {
namespace {

constexpr int kMaxGroups = GroupedScheduler<64, 16, 1>::kMaxGroups;  // shared-memory tables

// mmax = 0: contiguous layout; mmax > 0: masked layout with mmax rows per group.
template <typename OutT>
ffi::Error Dispatch(int block_m, int block_n, int cluster_n, cudaStream_t stream,
                    const GemmArgs<OutT>& args, const int* sizes, int G, int mmax,
                    bool shared_space) {
  const char* op = mmax > 0 ? "jax_ds_masked_grouped_fp8_gemm" : "jax_ds_grouped_fp8_gemm";
  return DispatchTile(op, block_m, block_n, cluster_n, [&](auto tile) {
    using T = decltype(tile);
    const auto launch = [&](auto shared) {
      using Sched = GroupedScheduler<T::BM, T::BN, T::kClusterN, decltype(shared)::value>;
      const Sched sched = Sched::make(sizes, G, args.a_rows, args.N, mmax);
      // Every segment adds at most one partial tile to the row tiles of the whole of A.
      const int64_t max_units =
          (CeilDiv(args.a_rows, T::BM) + sched.num_segments()) * sched.num_n_units;
      return LaunchGemm<T::BM, T::BN, T::kClusterN>(stream, args, sched, max_units,
                                                    Sched::extra_smem_bytes(G, mmax > 0));
    };
    if constexpr (T::BM == 128 && (T::BN == 128 || T::BN == 192)) {
      if (mmax > 0 && shared_space) return launch(std::true_type{});
    }
    return launch(std::false_type{});
  });
}

// Shared validation of b, b_scale and the per-group sizes; rows/mmax describe a.
ffi::Error CheckGroupedOperands(const char* op, ffi::AnyBuffer b, ffi::Buffer<ffi::F32> b_scale,
                                ffi::Buffer<ffi::S32> sizes, int64_t K) {
  auto bd = b.dimensions(), sbd = b_scale.dimensions(), gd = sizes.dimensions();
  JAX_DS_CHECK_ARG(bd.size() == 3 && sbd.size() == 3 && gd.size() == 1,
                   std::string(op) + ": b must be [G, N, K], b_scale [G, ceil(N/128), K/128], "
                   "sizes [G]");
  JAX_DS_CHECK_ARG(b.element_type() == ffi::F8E4M3FN, std::string(op) + ": b must be e4m3fn");
  const int64_t G = bd[0], N = bd[1];
  JAX_DS_CHECK_ARG(G >= 1 && G <= kMaxGroups && N >= 1 &&
                       bd[2] == K,
                   std::string(op) + ": need b [G, N, K] with 1 <= G <= 1024, N >= 1 and a's K");
  JAX_DS_CHECK_ARG(G * N < (int64_t(1) << 31), std::string(op) + ": G * N must fit in int32");
  JAX_DS_CHECK_ARG(sbd[0] == G && sbd[1] == CeilDiv(N, 128) && sbd[2] == K / kBlockK,
                   std::string(op) + ": b_scale must be [G, ceil(N/128), K/128]");
  JAX_DS_CHECK_ARG(gd[0] == G, std::string(op) + ": sizes must be [G]");
  return ffi::Error::Success();
}

ffi::Error Run(const char* op, cudaStream_t stream, ffi::AnyBuffer a,
               ffi::Buffer<ffi::F32> a_scale, ffi::AnyBuffer b, ffi::Buffer<ffi::F32> b_scale,
               ffi::Buffer<ffi::S32> sizes, ffi::Result<ffi::AnyBuffer> out, int64_t rows,
               int64_t mmax, int32_t block_m, int32_t block_n, int32_t cluster_n,
               int32_t num_sms, bool shared_space = false) {
  const int64_t K = a.dimensions().back();
  JAX_DS_CHECK_ARG(a.element_type() == ffi::F8E4M3FN, std::string(op) + ": a must be e4m3fn");
  JAX_DS_CHECK_ARG(rows >= 1 && rows < (int64_t(1) << 31) && K >= kBlockK && K % kBlockK == 0 &&
                       K < (int64_t(1) << 31),
                   std::string(op) + ": need rows >= 1 and K a positive multiple of 128");
  JAX_DS_CHECK_ARG(a_scale.element_count() == rows * (K / kBlockK),
                   std::string(op) + ": a_scale must hold one scale per row and 128 columns");
  if (auto err = CheckGroupedOperands(op, b, b_scale, sizes, K); err.failure()) return err;
  const int64_t G = b.dimensions()[0], N = b.dimensions()[1];
  JAX_DS_CHECK_ARG(out->element_count() == rows * N && out->dimensions().back() == N,
                   std::string(op) + ": out must hold [rows, N]");
  JAX_DS_CHECK_ARG(num_sms >= 1, std::string(op) + ": num_sms must be >= 1");
  const int m = static_cast<int>(rows), n = static_cast<int>(N), k = static_cast<int>(K);
  const int b_rows = static_cast<int>(G * N), g = static_cast<int>(G);
  return WithOutType(op, out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    return Dispatch(block_m, block_n, cluster_n, stream,
                    GemmArgs<OutT>{a.untyped_data(), a_scale.typed_data(), b.untyped_data(),
                                   b_scale.typed_data(), out_ptr, m, b_rows, n, k, num_sms},
                    sizes.typed_data(), g, static_cast<int>(mmax), shared_space);
  });
}

ffi::Error GroupedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> a_scale,
                       ffi::AnyBuffer b, ffi::Buffer<ffi::F32> b_scale,
                       ffi::Buffer<ffi::S32> group_sizes, ffi::Result<ffi::AnyBuffer> out,
                       int32_t block_m, int32_t block_n, int32_t cluster_n, int32_t num_sms) {
  const char* op = "grouped_fp8_gemm";
  JAX_DS_CHECK_ARG(a.dimensions().size() == 2 && a_scale.dimensions().size() == 2 &&
                       out->dimensions().size() == 2,
                   "grouped_fp8_gemm: a, a_scale and out must be 2-D");
  return Run(op, stream, a, a_scale, b, b_scale, group_sizes, out, a.dimensions()[0], 0, block_m,
             block_n, cluster_n, num_sms);
}

ffi::Error MaskedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> a_scale,
                      ffi::AnyBuffer b, ffi::Buffer<ffi::F32> b_scale,
                      ffi::Buffer<ffi::S32> masked_m, ffi::Result<ffi::AnyBuffer> out,
                      int32_t block_m, int32_t block_n, int32_t cluster_n, int32_t num_sms,
                      int32_t shared_space) {
  const char* op = "masked_grouped_fp8_gemm";
  auto ad = a.dimensions();
  JAX_DS_CHECK_ARG(ad.size() == 3 && a_scale.dimensions().size() == 3 &&
                       out->dimensions().size() == 3,
                   "masked_grouped_fp8_gemm: a, a_scale and out must be 3-D");
  JAX_DS_CHECK_ARG(ad[0] == b.dimensions()[0] && ad[1] >= 1,
                   "masked_grouped_fp8_gemm: a must be [G, Mmax, K] with b's G and Mmax >= 1");
  return Run(op, stream, a, a_scale, b, b_scale, masked_m, out, ad[0] * ad[1], ad[1], block_m,
             block_n, cluster_n, num_sms, shared_space != 0);
}

}  // namespace
}  // namespace jax_ds::gemm

#define JAX_DS_GROUPED_BINDING                                                   \
  xla::ffi::Ffi::Bind()                                                          \
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                             \
      .Arg<xla::ffi::AnyBuffer>()                   /* a (e4m3fn) */             \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       /* a_scale */                \
      .Arg<xla::ffi::AnyBuffer>()                   /* b (e4m3fn) [G, N, K] */   \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       /* b_scale */                \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()       /* group_sizes / masked_m */ \
      .Ret<xla::ffi::AnyBuffer>()                   /* out */                    \
      .Attr<int32_t>("block_m")                                                  \
      .Attr<int32_t>("block_n")                                                  \
      .Attr<int32_t>("cluster_n")                                                \
      .Attr<int32_t>("num_sms")

// Command-buffer compatible: they only enqueue work on the stream (see fp8_gemm.cu).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsGroupedFp8Gemm, jax_ds::gemm::GroupedImpl,
                              JAX_DS_GROUPED_BINDING, {xla::ffi::Traits::kCmdBufferCompatible});
// Masked: also `shared_space` (1: the 128x128 / 128x192 tiles' shared-typed instances).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMaskedGroupedFp8Gemm, jax_ds::gemm::MaskedImpl,
                              JAX_DS_GROUPED_BINDING.Attr<int32_t>("shared_space"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
