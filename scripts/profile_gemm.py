"""Three calls of the FP8 GEMM kernel at one shape and config, for a profiler to pick one.

    python scripts/profile_gemm.py 4096 32768 512              # gemm_config's pick
    python scripts/profile_gemm.py 4096 32768 512 128x192c1o   # a GemmConfig.key()
    python scripts/profile_gemm.py 8 576 7168 64x16c1s36x3     # s<units>x<slices>: a split
    ncu --target-processes all --kernel-name regex:sm90_fp8_gemm --launch-skip 1 \
        --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats \
        python scripts/profile_gemm.py 4096 32768 512

Random operands quantized as DeepSeek-V3 does (1x128 activations, 128x128 weights), the GEMM
scripts' `bench.gemm.block_sets`.
"""
import re
import sys

import jax

from jax_ds import _ffi
from jax_ds.bench.gemm import block_sets
from jax_ds.ops import gemm

m, n, k = map(int, sys.argv[1:4])
sms = _ffi.num_sms()
if len(sys.argv) > 4:
    bm, bn, cn, units, splits, o = re.fullmatch(r"(\d+)x(\d+)c(\d)(?:s(\d+)x(\d+))?(o?)",
                                                sys.argv[4]).groups()
    cfg = gemm.GemmConfig(int(bm), int(bn), sms, int(cn), int(units or 0), int(splits or 1),
                          overlap=bool(o))
else:
    cfg = gemm.gemm_config(m, n, k, sms)
print(f"{m}x{n}x{k}: {cfg.key()} (split {cfg.split_units} x {cfg.splits})", flush=True)
(operands,) = block_sets(m, n, k, 1)
f = jax.jit(lambda *o: gemm.ffi_fp8_gemm(*o, cfg))
for _ in range(3):
    jax.block_until_ready(f(*operands))
