"""ffi/common/fastdiv.h against C++'s `/` and `%`: every dividend below 2^16 for the divisors
1..300, and the edges (k d - 1, k d, k d + 1, 2^31 - 1) plus random dividends for divisors up to
2^31, compiled for the host with g++ (skipped without a C++ compiler)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = r"""
#include <cstdio>
#include <cstdint>
#include <random>
#include "common/fastdiv.h"

static int check(uint32_t d, uint32_t n, long long& bad) {
  const jax_ds::FastDiv f = jax_ds::FastDiv::make(d);
  const uint32_t q = f.div(n);
  if (q != n / d || f.mod(n, q) != n % d) {
    if (bad++ < 5) std::printf("d=%u n=%u: %u, expected %u\n", d, n, q, n / d);
  }
  return 0;
}

int main() {
  long long bad = 0, count = 0;
  for (uint32_t d = 1; d <= 300; ++d)
    for (uint32_t n = 0; n < (1u << 16); ++n, ++count) check(d, n, bad);
  std::mt19937_64 rng(1234);
  const uint32_t top = (1u << 31) - 1;
  for (int i = 0; i < 20000; ++i) {
    uint32_t d;
    switch (i % 4) {
      case 0: d = 1 + rng() % 4096; break;               // tile counts
      case 1: d = 1 + rng() % (1u << 20); break;
      case 2: d = 1u << (rng() % 32); break;             // powers of two, up to 2^31
      default: d = 1 + rng() % (1u << 31); break;
    }
    const uint64_t k = top / d;
    const uint64_t picks[] = {0, 1, d - 1ull, d, d + 1ull, k * d, k * d - 1, top,
                              rng() % (uint64_t(top) + 1), rng() % (uint64_t(top) + 1)};
    for (uint64_t n : picks) {
      if (n > top) continue;
      check(d, static_cast<uint32_t>(n), bad);
      ++count;
    }
  }
  std::printf("%lld cases, %lld wrong\n", count, bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="needs a C++ compiler")
def test_fastdiv_equals_division(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    src = tmp_path / "check.cc"
    src.write_text(CHECK)
    exe = tmp_path / "check"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{ROOT / 'ffi'}", str(src), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert " 0 wrong" in out.stdout
