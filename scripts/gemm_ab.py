"""Sustained A/B of two GEMM configs: gemm_config's pick against 128x128 pairs without split
(the rule before 128x192), each timed as the benchmark's device-bound "ours" (one executable of
many calls, ~0.25 s a repeat, so clocks settle at the power limit), alternating, two rounds.
Prints a line per timing and writes $OUT/gemm-ab-<device>-<date>.json (OUT defaults to .).

  python scripts/gemm_ab.py [m n k ...]
"""
import os
import sys

import jax

from jax_ds.bench import environment, write_json
from jax_ds.bench._timing import time_jax_launch
from jax_ds.bench.gemm import block_sets
from jax_ds.ops import gemm

nums = [int(x) for x in sys.argv[1:]]
shapes = list(zip(nums[::3], nums[1::3], nums[2::3])) or [
    (4096, 2112, 7168), (4096, 24576, 1536), (4096, 7168, 16384), (4096, 4096, 7168),
    (8192, 8192, 8192)]
sms = jax.devices()[0].core_count
rows = []
for m, n, k in shapes:
    sets = block_sets(m, n, k, 4)
    configs = {"128x128c2": gemm.GemmConfig(128, 128, sms, 2),
               "pick": gemm.gemm_config(m, n, k, sms)}
    tflops = {name: [] for name in configs}
    for rnd in range(2):
        for name, cfg in configs.items():
            t = time_jax_launch(lambda *o, cfg=cfg: gemm.ffi_fp8_gemm(*o, cfg), sets, max_reps=4,
                                budget_s=0.25, repeats=3)
            tflops[name].append(2 * m * n * k / t.median_s / 1e12)
            print(f"{m} {n} {k} round {rnd} {name:10s} {tflops[name][-1]:7.0f} TFLOP/s  {cfg}",
                  flush=True)
    rows.append(dict(m=m, n=n, k=k, configs={name: repr(c) for name, c in configs.items()},
                     tflops=tflops))
path = write_json(os.environ.get("OUT", "."), "gemm-ab", environment(), {
    "note": "device-bound TFLOP/s (the benchmark's 'ours' timing: one executable of many calls, "
            "~0.25 s a repeat, median of 3), two rounds alternating",
    "rows": rows})
print(f"wrote {path}")
