// Division by a divisor fixed for a whole launch, as a multiply-high, an add and a shift: the
// magic number is computed once on the host (`make`), so a kernel's per-tile index arithmetic
// does not pay a ~20-instruction integer division (I2F, MUFU.RCP, fix-ups) per quotient.
// Valid for dividends in [0, 2^31) and divisors in [1, 2^31]: with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1 (< 2^32), n / d = (umulhi(n, m) + n) >> s, and the sum
// does not overflow 32 bits since umulhi(n, m) <= n < 2^31 (the round-up method of Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994).
// Plain C++ on the host (tests/test_fastdiv.py checks it against `/` and `%`), also CUDA code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define JAX_DS_HD __host__ __device__ __forceinline__
#else
#define JAX_DS_HD inline
#endif

namespace jax_ds {

struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;

  JAX_DS_HD static FastDiv make(uint32_t d) {  // 1 <= d <= 2^31 (once per launch: the host)
    FastDiv f;
    f.d = d > 0 ? d : 1;  // (callers pass d >= 1; 0 would be a division by zero here)
    d = f.d;
    while ((uint64_t(1) << f.s) < d) ++f.s;
    f.m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << f.s) - d)) / d + 1);
    return f;
  }
  JAX_DS_HD uint32_t div(uint32_t n) const {  // 0 <= n < 2^31
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * m) >> 32);
#endif
    return (hi + n) >> s;
  }
  JAX_DS_HD uint32_t mod(uint32_t n, uint32_t q) const { return n - q * d; }  // q = div(n)
};

}  // namespace jax_ds
