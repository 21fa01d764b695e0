"""Three calls of torch's blockwise FP8 GEMM (cuBLAS, `_scaled_mm` with DeepSeek-V3's 1x128 /
128x128 scales) at one shape, for a profiler to pick one: the anchor of `bench gemm`, alone in its
process (no JAX kernels to filter out). scripts/profile_gemm.py is ours at the same shape.

    ncu --target-processes all --kernel-name regex:'gemm|xmma|cutlass' --launch-skip 1 \
        --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python scripts/profile_torch_gemm.py 4096 4096 7168

Operand values are random normal cast to e4m3 and the scales random in [0.5, 1): the timing does
not depend on them.
"""
import sys

import torch

m, n, k = map(int, sys.argv[1:4])
if k % 128 or n % 128:
    sys.exit("k and n must be multiples of 128 (128x128 weight blocks)")
gen = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(m, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
b = torch.randn(n, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
# The layouts `bench gemm` passes: scale_a [m, k/128] outer-major, scale_b [k/128, n/128] (a
# transposed view of the [n/128, k/128] block scales).
sa = (torch.rand(m, k // 128, device="cuda", generator=gen) / 2 + 0.5).t().contiguous().t()
sb = (torch.rand(n // 128, k // 128, device="cuda", generator=gen) / 2 + 0.5).t()
for _ in range(3):
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
torch.cuda.synchronize()
print(f"{m}x{n}x{k}: {tuple(out.shape)} {out.dtype}, |out| mean {out.float().abs().mean():.3g}")
