// XLA FFI handler for the bf16 grouped GEMM (the bf16 MoE experts' GEMMs): the FP8 GEMM kernel in
// its bf16 mode (sm90_fp8_gemm.cuh, kBf16) with the grouped tile scheduler. a [M, K] bf16 rows
// sorted by group, b [G, N, K] bf16, group_sizes [G] (any sizes, no alignment), out [M, N] bf16
// or f32 with the rows past the groups zeroed. K any multiple of 8 (TMA needs 16-byte rows; the
// last k block's columns past K read as zeros). transpose_b = 1: b is [G, K, N] (out = a @ b[g],
// the dgrad of the forward's out = a @ b[g]^T reads b itself), N a multiple of 8 too.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "common/status.h"
#include "gemm/launch.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::gemm {
namespace {

constexpr int kMaxGroups = GroupedScheduler<64, 16, 1>::kMaxGroups;  // shared-memory tables

// The tiles compiled for bf16 (a subset of the FP8 ones; Python's grouped_config picks one).
template <typename Fn>
ffi::Error DispatchBf16Tile(const char* op, int block_m, int block_n, int cluster_n, Fn&& fn) {
  if (block_m == 64 && block_n == 64 && cluster_n == 1) return fn(TileTag<64, 64, 1>{});
  if (block_m == 64 && block_n == 128 && cluster_n == 1) return fn(TileTag<64, 128, 1>{});
  if (block_m == 128 && block_n == 128 && cluster_n == 1) return fn(TileTag<128, 128, 1>{});
  if (block_m == 128 && block_n == 128 && cluster_n == 2) return fn(TileTag<128, 128, 2>{});
  if (block_m == 128 && block_n == 192 && cluster_n == 1) return fn(TileTag<128, 192, 1>{});
  if (block_m == 128 && block_n == 192 && cluster_n == 2) return fn(TileTag<128, 192, 2>{});
  return ffi::Error::InvalidArgument(
      std::string(op) + ": no compiled bf16 tile " + std::to_string(block_m) + "x" +
      std::to_string(block_n) + " cluster " + std::to_string(cluster_n) +
      " (64x64, 64x128 single; 128x128, 128x192 single or pairs)");
}

ffi::Error GroupedBf16Impl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Buffer<ffi::S32> group_sizes, ffi::Result<ffi::AnyBuffer> out,
                           int32_t block_m, int32_t block_n, int32_t cluster_n, int32_t num_sms,
                           int32_t transpose_b) {
  const std::string op = "grouped_bf16_gemm";
  auto ad = a.dimensions(), bd = b.dimensions(), gd = group_sizes.dimensions();
  JAX_DS_CHECK_ARG(ad.size() == 2 && bd.size() == 3 && gd.size() == 1 &&
                       out->dimensions().size() == 2,
                   op + ": need a [M, K], b [G, N, K] (transpose_b: [G, K, N]), group_sizes [G] "
                        "and out [M, N]");
  JAX_DS_CHECK_ARG(a.element_type() == ffi::BF16 && b.element_type() == ffi::BF16,
                   op + ": a and b must be bf16");
  JAX_DS_CHECK_ARG(transpose_b == 0 || transpose_b == 1, op + ": transpose_b must be 0 or 1");
  const bool trans = transpose_b == 1;
  const int64_t M = ad[0], K = ad[1], G = bd[0], N = trans ? bd[2] : bd[1];
  // (K < 2^31 - 64: the kernel rounds K up to whole 64-wide blocks in int)
  JAX_DS_CHECK_ARG(M >= 1 && M < (int64_t(1) << 31) && K >= 8 && K % 8 == 0 &&
                       K < (int64_t(1) << 31) - 64 && (trans ? bd[1] : bd[2]) == K,
                   op + ": need M >= 1 rows and K a positive multiple of 8 shared by a and b");
  JAX_DS_CHECK_ARG(!trans || (N % 8 == 0 && G * K < (int64_t(1) << 31)),
                   op + ": transpose_b needs N a multiple of 8 and G * K < 2^31");
  // (B rows: group * N + a tile's columns stay below 2^31)
  JAX_DS_CHECK_ARG(G >= 1 && G <= kMaxGroups && N >= 1 && G * N < (int64_t(1) << 31) - 512,
                   op + ": need 1 <= G <= 1024, N >= 1 and G * N < 2^31 - 512");
  JAX_DS_CHECK_ARG(gd[0] == G, op + ": group_sizes must be [G]");
  JAX_DS_CHECK_ARG(out->element_count() == M * N && out->dimensions().back() == N,
                   op + ": out must hold [M, N]");
  JAX_DS_CHECK_ARG(num_sms >= 1, op + ": num_sms must be >= 1");
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int g = static_cast<int>(G);
  return WithOutType(op.c_str(), out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    const GemmArgs<OutT> args{a.untyped_data(), nullptr, b.untyped_data(), nullptr, out_ptr,
                              m, trans ? g * k : g * n, n, k, num_sms};
    return DispatchBf16Tile(op.c_str(), block_m, block_n, cluster_n, [&](auto tile) {
      using T = decltype(tile);
      using Sched = GroupedScheduler<T::BM, T::BN, T::kClusterN>;
      const Sched sched = Sched::make(group_sizes.typed_data(), g, m, n, 0);
      // Every segment adds at most one partial tile to the row tiles of the whole of A.
      const int64_t max_units = (CeilDiv(m, T::BM) + sched.num_segments()) * sched.num_n_units;
      const int extra = Sched::extra_smem_bytes(g, false);
      if (trans) {
        return LaunchGemm<T::BM, T::BN, T::kClusterN, OutT, Sched, true, true>(
            stream, args, sched, max_units, extra);
      }
      return LaunchGemm<T::BM, T::BN, T::kClusterN, OutT, Sched, true>(stream, args, sched,
                                                                        max_units, extra);
    });
  });
}

}  // namespace
}  // namespace jax_ds::gemm

// Command-buffer compatible: it only enqueues work on the stream (see fp8_gemm.cu).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsGroupedBf16Gemm, jax_ds::gemm::GroupedBf16Impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()              /* a bf16 [M, K] */
                                  .Arg<xla::ffi::AnyBuffer>()              /* b bf16 [G, N, K] */
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  /* group_sizes */
                                  .Ret<xla::ffi::AnyBuffer>()              /* out [M, N] */
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("block_n")
                                  .Attr<int32_t>("cluster_n")
                                  .Attr<int32_t>("num_sms")
                                  .Attr<int32_t>("transpose_b"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
