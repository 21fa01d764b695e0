"""Three calls of torch's blockwise FP8 GEMM (cuBLAS through `TorchGemm`, the `bench gemm` anchor:
the same recipe search and check against our reference) at one shape, for a profiler to pick one.
scripts/profile_gemm.py is ours at the same shape, on the same operands (`block_sets`).

    ncu --target-processes all --kernel-name regex:nvjet --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis python scripts/profile_torch_gemm.py 4096 4096 7168

(`nvjet_sm90_...` is cuBLAS's blockwise FP8 kernel in torch 2.11 + CUDA 13; the recipe search
runs the same kernel first, so skip one launch.)
"""
import sys

import jax.numpy as jnp
import numpy as np

from jax_ds.bench._torch_gemm import TorchGemm
from jax_ds.bench.gemm import block_sets
from jax_ds.ops import fp8_gemm_reference

m, n, k = map(int, sys.argv[1:4])
(operands,) = block_sets(m, n, k, 1)
ref = np.asarray(fp8_gemm_reference(*operands, out_dtype=jnp.float32))
torch_gemm = TorchGemm()


def three_calls(call, sets):
    for _ in range(3):
        out = call(*sets[0])
    torch_gemm.torch.cuda.synchronize()
    return {"shape": list(out.shape)}


cell = torch_gemm.measure("torch_blockwise", [{"block": operands}], ref, three_calls)
print(f"{m}x{n}x{k}: {cell}")
sys.exit(0 if "recipe" in cell else 1)
