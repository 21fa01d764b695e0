// MoE routing kernels (DeepEP's dispatch layout, permute with the FP8 cast fused, unpermute with
// the weighted top-k combine), as XLA FFI handlers. The row order is exactly the reference's
// (jax_ds/ops/moe.py): rows grouped by expert in increasing order, within an expert by flat slot
// index n*K + k (a stable sort); slots whose expert id is outside [0, E) are dropped (-1).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/fp8_quant.cuh"
#include "common/status.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::moe {
namespace {

constexpr int kMaxExperts = 4096;  // shared-memory histogram
constexpr int kLayoutThreads = 512;

// counts[e] = slots routed to expert e (counts zeroed before the launch).
__global__ void count_kernel(const int* __restrict__ idx, int64_t slots, int E,
                             int* __restrict__ counts) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < slots;
       s += int64_t(gridDim.x) * blockDim.x) {
    const int e = idx[s];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

// Block e < E places expert e's slots in flat order after the rows of experts < e; block E marks
// dropped slots and the rows past the last expert (src_row -1: a zero row).
__global__ void __launch_bounds__(kLayoutThreads)
    place_kernel(const int* __restrict__ idx, int64_t slots, int K, int E,
                 const int* __restrict__ counts, int* __restrict__ perm,
                 int* __restrict__ src_row) {
  __shared__ int64_t warp_sums[kLayoutThreads / 32];
  __shared__ int warp_flags[kLayoutThreads / 32];
  const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // offset = sum(counts[:e]) (or the total, for block E)
  int64_t part = 0;
  for (int i = threadIdx.x; i < e; i += blockDim.x) part += counts[i];
  for (int off = 16; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
  if (lane == 0) warp_sums[warp] = part;
  __syncthreads();
  int64_t offset = 0;
  for (int w = 0; w < kLayoutThreads / 32; ++w) offset += warp_sums[w];
  if (e == E) {
    for (int64_t r = offset + threadIdx.x; r < slots; r += blockDim.x) src_row[r] = -1;
    for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
      const int x = idx[s];
      if (x < 0 || x >= E) perm[s] = -1;
    }
    return;
  }
  constexpr int kPerThread = 4;  // consecutive slots per thread: a 2048-slot chunk per step
  for (int64_t base = 0; base < slots; base += int64_t(blockDim.x) * kPerThread) {
    const int64_t s0 = base + int64_t(threadIdx.x) * kPerThread;
    int mine = 0;  // bit i: slot s0 + i belongs to expert e
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (s0 + i < slots && idx[s0 + i] == e) mine |= 1 << i;
    int count = __popc(mine), incl = count;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int o = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += o;
    }
    __syncthreads();  // warp_flags of the previous chunk are read
    if (lane == 31) warp_flags[warp] = incl;
    __syncthreads();
    int before = incl - count, total = 0;
    for (int w = 0; w < kLayoutThreads / 32; ++w) {
      before += w < warp ? warp_flags[w] : 0;
      total += warp_flags[w];
    }
    for (int i = 0; i < kPerThread; ++i) {
      if (mine >> i & 1) {
        const int64_t row = offset + before++;
        perm[s0 + i] = static_cast<int>(row);
        src_row[row] = static_cast<int>((s0 + i) / K);
      }
    }
    offset += total;
  }
}

// Token-major: each token row is read once and written to its K rows perm[n, :] (DeepEP's
// dispatch); 16 bytes per thread when rows allow it. Rows no slot lands on are zero_rows_kernel's.
template <typename T>
__global__ void permute_kernel(const T* __restrict__ x, const int* __restrict__ perm,
                               T* __restrict__ out, int64_t tokens, int K, int D, int64_t rows) {
  const bool vec = (D * sizeof(T)) % 16 == 0;
  const int per_row = vec ? D * sizeof(T) / 16 : D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < tokens * per_row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / per_row;
    const int c = static_cast<int>(i % per_row);
    if (vec) {
      const uint4 v = reinterpret_cast<const uint4*>(x + n * D)[c];
      for (int k = 0; k < K; ++k) {
        const int r = perm[n * K + k];
        if (r >= 0 && r < rows) reinterpret_cast<uint4*>(out + int64_t(r) * D)[c] = v;
      }
    } else {
      const T v = x[n * D + c];
      for (int k = 0; k < K; ++k) {
        const int r = perm[n * K + k];
        if (r >= 0 && r < rows) out[int64_t(r) * D + c] = v;
      }
    }
  }
}

// The FP8 variant: one warp per token and 128 columns quantizes once and writes K copies (the
// scale travels with each). Bit-identical to quantize_fp8 of the permuted rows.
template <typename T>
__global__ void permute_fp8_kernel(const T* __restrict__ x, const int* __restrict__ perm,
                                   uint8_t* __restrict__ q, float* __restrict__ scales,
                                   int64_t tokens, int K, int D, int64_t rows) {
  const int groups = (D + fp8::kGroup - 1) / fp8::kGroup;
  const int64_t item = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (item >= tokens * groups) return;
  const int64_t n = item / groups;
  const int g = static_cast<int>(item % groups), lane = threadIdx.x % 32;
  uint8_t packed[4];
  float scale;
  fp8::quantize_group_1x128_regs(x + n * D, D, g, lane, false, packed, &scale);
  for (int k = 0; k < K; ++k) {
    const int r = perm[n * K + k];
    if (r < 0 || r >= rows) continue;
    fp8::store_group_1x128(q + int64_t(r) * D, D, g, lane, packed);
    if (lane == 0) scales[int64_t(r) * groups + g] = scale;
  }
}

// Rows past the last expert (src_row -1): zeros, and for FP8 the scale of a zero block.
template <typename T>
__global__ void zero_rows_kernel(const int* __restrict__ src_row, T* __restrict__ out,
                                 uint8_t* __restrict__ q, float* __restrict__ scales,
                                 int64_t rows, int D) {
  const int groups = (D + fp8::kGroup - 1) / fp8::kGroup;
  const int64_t item = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (item >= rows * groups) return;
  const int64_t r = item / groups;
  if (src_row[r] >= 0) return;
  const int g = static_cast<int>(item % groups), lane = threadIdx.x % 32;
  if (q != nullptr) {
    fp8::quantize_group_1x128(static_cast<const T*>(nullptr), q + r * D, scales + item, D, g,
                              lane, false);
  } else {
    for (int c = g * fp8::kGroup + lane; c < min(D, (g + 1) * fp8::kGroup); c += 32)
      out[r * D + c] = T(0.f);
  }
}

// out[n] = sum_k w[n,k] y[perm[n,k]] in float32 (k in order); slots with perm outside [0, M)
// add nothing. Each thread owns 8 consecutive columns (one 16-byte load per bf16 row) and issues
// the loads of kBatch slots before it adds any of them, so several rows are in flight per thread
// (the sum's order, and so its bits, are those of the one-slot-at-a-time loop).
template <typename T>
__global__ void unpermute_kernel(const T* __restrict__ y, const int* __restrict__ perm,
                                 const float* __restrict__ w, T* __restrict__ out, int64_t N,
                                 int K, int D, int64_t M) {
  constexpr int kCols = 8, kBatch = 4;
  const int chunks = (D + kCols - 1) / kCols;
  const bool vec = sizeof(T) == 2 && D % kCols == 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / chunks;
    const int c0 = static_cast<int>(i % chunks) * kCols;
    float acc[kCols] = {};
    for (int k0 = 0; k0 < K; k0 += kBatch) {
      int64_t rows[kBatch];
      float wk[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int k = k0 + b;
        const int row = k < K ? perm[n * K + k] : -1;
        rows[b] = row >= 0 && row < M ? row : -1;
        wk[b] = rows[b] >= 0 ? w[n * K + k] : 0.f;
      }
      if (vec) {
        uint4 v[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          v[b] = rows[b] >= 0 ? *reinterpret_cast<const uint4*>(y + rows[b] * D + c0)
                              : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (rows[b] < 0) continue;
          const T* e = reinterpret_cast<const T*>(&v[b]);
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[j] = fmaf(wk[b], fp8::to_float(e[j]), acc[j]);
        }
      } else {
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (rows[b] < 0) continue;
          const T* yr = y + rows[b] * D + c0;
#pragma unroll
          for (int j = 0; j < kCols; ++j)
            if (c0 + j < D) acc[j] = fmaf(wk[b], fp8::to_float(yr[j]), acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCols; ++j)
      if (c0 + j < D) out[n * D + c0 + j] = T(acc[j]);
  }
}

int Blocks(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 1 << 20));
}

ffi::Error LayoutImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> topk_idx,
                      ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
                      ffi::Result<ffi::Buffer<ffi::S32>> perm,
                      ffi::Result<ffi::Buffer<ffi::S32>> src_row) {
  auto id = topk_idx.dimensions();
  JAX_DS_CHECK_ARG(id.size() == 2, "moe_layout: topk_idx must be [N, K]");
  const int64_t slots = topk_idx.element_count(), E = group_sizes->element_count();
  JAX_DS_CHECK_ARG(slots >= 1 && slots < (int64_t(1) << 31) && id[1] >= 1,
                   "moe_layout: need 1 <= N*K < 2^31");
  JAX_DS_CHECK_ARG(E >= 1 && E <= kMaxExperts, "moe_layout: need 1 <= num_experts <= 4096");
  JAX_DS_CHECK_ARG(perm->element_count() == slots && src_row->element_count() == slots,
                   "moe_layout: perm and src_row must have N*K elements");
  const int e = static_cast<int>(E), k = static_cast<int>(id[1]);
  JAX_DS_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(group_sizes->typed_data(), 0, E * sizeof(int), stream));
  count_kernel<<<std::min(Blocks(slots, 256), 264), 256, E * sizeof(int), stream>>>(
      topk_idx.typed_data(), slots, e, group_sizes->typed_data());
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  place_kernel<<<e + 1, kLayoutThreads, 0, stream>>>(topk_idx.typed_data(), slots, k, e,
                                                    group_sizes->typed_data(),
                                                    perm->typed_data(), src_row->typed_data());
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return ffi::Error::Success();
}

template <typename Fn>
ffi::Error WithFloatType(const char* op, ffi::DataType type, Fn&& fn) {
  switch (type) {
    case ffi::BF16:
      return fn(__nv_bfloat16{});
    case ffi::F32:
      return fn(float{});
    default:
      return ffi::Error::InvalidArgument(std::string(op) + ": dtype must be bf16 or f32");
  }
}

ffi::Error PermuteImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> perm,
                       ffi::Buffer<ffi::S32> src_row, ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions(), pd = perm.dimensions();
  const int64_t rows = src_row.element_count();
  JAX_DS_CHECK_ARG(xd.size() == 2 && pd.size() == 2 && pd[0] == xd[0] &&
                       out->dimensions().size() == 2 && out->dimensions()[0] == rows &&
                       out->dimensions()[1] == xd[1] && out->element_type() == x.element_type(),
                   "moe_permute: need x [N, D], perm [N, K], src_row [R], out [R, D] of x's dtype");
  const int D = static_cast<int>(xd[1]), K = static_cast<int>(pd[1]);
  const int64_t per_row = (D * ffi::ByteWidth(x.element_type())) % 16 == 0
                              ? D * ffi::ByteWidth(x.element_type()) / 16 : D;
  const int64_t zero_items = rows * ((D + fp8::kGroup - 1) / fp8::kGroup);
  return WithFloatType("moe_permute", x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out->untyped_data());
    permute_kernel<T><<<Blocks(xd[0] * per_row, 256), 256, 0, stream>>>(
        static_cast<const T*>(x.untyped_data()), perm.typed_data(), o, xd[0], K, D, rows);
    JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    zero_rows_kernel<T><<<Blocks(zero_items * 32, 256), 256, 0, stream>>>(
        src_row.typed_data(), o, nullptr, nullptr, rows, D);
    JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return ffi::Error::Success();
  });
}

ffi::Error PermuteFp8Impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> perm,
                          ffi::Buffer<ffi::S32> src_row, ffi::Result<ffi::AnyBuffer> q,
                          ffi::Result<ffi::Buffer<ffi::F32>> scales) {
  auto xd = x.dimensions(), pd = perm.dimensions();
  const int64_t rows = src_row.element_count();
  JAX_DS_CHECK_ARG(xd.size() == 2 && pd.size() == 2 && pd[0] == xd[0] &&
                       q->element_type() == ffi::F8E4M3FN && q->element_count() == rows * xd[1],
                   "moe_permute_fp8: need x [N, D], perm [N, K], src_row [R], x_fp8 [R, D]");
  const int D = static_cast<int>(xd[1]), K = static_cast<int>(pd[1]);
  const int groups = (D + fp8::kGroup - 1) / fp8::kGroup;
  JAX_DS_CHECK_ARG(scales->element_count() == rows * groups,
                   "moe_permute_fp8: scales must be [R, ceil(D/128)]");
  return WithFloatType("moe_permute_fp8", x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    auto* qp = static_cast<uint8_t*>(q->untyped_data());
    permute_fp8_kernel<T><<<Blocks(xd[0] * groups * 32, 256), 256, 0, stream>>>(
        static_cast<const T*>(x.untyped_data()), perm.typed_data(), qp, scales->typed_data(),
        xd[0], K, D, rows);
    JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    zero_rows_kernel<T><<<Blocks(rows * groups * 32, 256), 256, 0, stream>>>(
        src_row.typed_data(), nullptr, qp, scales->typed_data(), rows, D);
    JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return ffi::Error::Success();
  });
}

ffi::Error UnpermuteImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> perm,
                         ffi::Buffer<ffi::F32> weights, ffi::Result<ffi::AnyBuffer> out) {
  auto yd = y.dimensions(), pd = perm.dimensions();
  JAX_DS_CHECK_ARG(yd.size() == 2 && pd.size() == 2 && weights.element_count() ==
                       perm.element_count() && out->element_count() == pd[0] * yd[1] &&
                       out->element_type() == y.element_type(),
                   "moe_unpermute: need y [M, D], perm [N, K], weights [N, K], out [N, D]");
  const int64_t N = pd[0];
  const int K = static_cast<int>(pd[1]), D = static_cast<int>(yd[1]);
  return WithFloatType("moe_unpermute", y.element_type(), [&](auto tag) {
    using T = decltype(tag);
    unpermute_kernel<T><<<Blocks(N * ((D + 7) / 8), 256), 256, 0, stream>>>(
        static_cast<const T*>(y.untyped_data()), perm.typed_data(), weights.typed_data(),
        static_cast<T*>(out->untyped_data()), N, K, D, yd[0]);
    JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jax_ds::moe

// All four only enqueue work on the stream: command-buffer compatible (see fp8_gemm.cu).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMoeLayout, jax_ds::moe::LayoutImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // topk_idx [N, K]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // group_sizes [E]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()  // perm [N, K]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>(), // src_row [N*K]
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMoePermute, jax_ds::moe::PermuteImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()              // x [N, D]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // perm [N, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // src_row [R]
                                  .Ret<xla::ffi::AnyBuffer>(),             // out [R, D]
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMoePermuteFp8, jax_ds::moe::PermuteFp8Impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()              // x [N, D]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // perm [N, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // src_row [R]
                                  .Ret<xla::ffi::AnyBuffer>()              // x_fp8 [R, D]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>(), // scales
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMoeUnpermute, jax_ds::moe::UnpermuteImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()              // y [M, D]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // perm [N, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // weights [N, K]
                                  .Ret<xla::ffi::AnyBuffer>(),             // out [N, D]
                              {xla::ffi::Traits::kCmdBufferCompatible});
