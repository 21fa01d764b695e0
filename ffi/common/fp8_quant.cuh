// DeepSeek-V3 FP8 quantisation math shared by every kernel that casts to e4m3 (quantize_fp8, the
// MoE permute with its fused cast): the same expressions, in the same order, as the Python
// reference (jax_ds/ops/quant.py), so results agree bit for bit.
//   amax  = max |x| over the block's finite elements, clamped to >= 1e-4
//   f32:    scale = amax * (1/448),             q = x * (1 / scale)
//   ue8m0:  scale = 2^ceil(log2(amax * (1/448))), q = x * (1 / scale)     (exact power of two)
//   x_fp8 = e4m3(q) rounded to nearest even; NaN / +-Inf inputs become NaN (e4m3fn has no Inf).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace jax_ds::fp8 {

constexpr int kGroup = 128;
constexpr float kFp8Max = 448.f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float finite_abs(float v) { return isfinite(v) ? fabsf(v) : 0.f; }

// Returns (scale, multiplier applied to x) for a block's amax.
__device__ __forceinline__ float2 block_scale(float amax, bool ue8m0) {
  amax = fmaxf(amax, 1e-4f);
  // amax * (1/448), not amax / 448: PyTorch (DeepGEMM's reference) and XLA both turn a division
  // by a constant into this multiplication, and the scale must match them bit for bit. The
  // multiplier is 1 / scale, as DeepGEMM's `x * (1.0 / sf)` (a correctly rounded reciprocal).
  const float scaled = amax * (1.f / kFp8Max);
  if (!ue8m0) return make_float2(scaled, 1.f / scaled);  // IEEE division (no fast math)
  int e;
  const float mant = frexpf(scaled, &e);  // amax/448 = mant * 2^e, mant in [0.5, 1)
  const int exp2 = mant == 0.5f ? e - 1 : e;       // ceil(log2(.)), exact
  return make_float2(ldexpf(1.f, exp2), ldexpf(1.f, -exp2));
}

__device__ __forceinline__ uint8_t to_e4m3(float v, float mul) {
  if (!isfinite(v)) return 0x7F;  // NaN
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v * mul, __NV_SATFINITE, __NV_E4M3));
}

// One warp, 128 columns (group `g`) of a row of K, 4 elements per lane: the lane's e4m3 bytes and
// the group's scale. `xr` null means a row of zeros.
template <typename T>
__device__ __forceinline__ void quantize_group_1x128_regs(const T* xr, int K, int g, int lane,
                                                          bool ue8m0, uint8_t (&q)[4],
                                                          float* scale) {
  const int col0 = g * kGroup + lane * 4;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = xr != nullptr && col0 + i < K ? to_float(xr[col0 + i]) : 0.f;
    amax = fmaxf(amax, finite_abs(v[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float2 s = block_scale(amax, ue8m0);
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = to_e4m3(v[i], s.y);
  *scale = s.x;
}

// Writes a lane's 4 bytes of group `g` into row `qr` (one 4-byte store when aligned).
__device__ __forceinline__ void store_group_1x128(uint8_t* qr, int K, int g, int lane,
                                                  const uint8_t (&q)[4]) {
  const int col0 = g * kGroup + lane * 4;
  if (col0 + 3 < K && K % 4 == 0) {
    *reinterpret_cast<uint32_t*>(qr + col0) =
        q[0] | (q[1] << 8) | (q[2] << 16) | (uint32_t(q[3]) << 24);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (col0 + i < K) qr[col0 + i] = q[i];
  }
}

// quantize_group_1x128_regs + store_group_1x128 into row `qr`, the scale into *scale.
template <typename T>
__device__ __forceinline__ void quantize_group_1x128(const T* xr, uint8_t* qr, float* scale,
                                                     int K, int g, int lane, bool ue8m0) {
  uint8_t q[4];
  float s;
  quantize_group_1x128_regs(xr, K, g, lane, ue8m0, q, &s);
  store_group_1x128(qr, K, g, lane, q);
  if (lane == 0) *scale = s;
}

}  // namespace jax_ds::fp8
