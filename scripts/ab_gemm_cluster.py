"""A/B of the dense GEMM's cluster sizes (gemm.CLUSTERS: no cluster, N-pairs sharing A by TMA
multicast) with 128x128 tiles on the large benchmark shapes: kernel time from the profiler, 12
calls over 3 input sets per measurement, interleaved rounds, medians; each variant's output is
checked against the reference (calc_diff). A candidate cluster shape compiled into the library
is added to gemm.CLUSTERS and compared here in one device run (NOTES-gemm.md, 2 x 2 clusters).

    python scripts/ab_gemm_cluster.py [rounds]
"""
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds.bench import gemm as bench_gemm
from jax_ds.bench._profile import device_time_jax
from jax_ds.ops import gemm

SHAPES = ((4096, 7168, 16384), (4096, 4096, 7168), (8192, 8192, 8192), (4096, 2112, 7168),
          (4096, 24576, 1536))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
sms = jax.devices()[0].core_count
key = jax.random.key(7)
print(f"{jax.devices()[0].device_kind}, {sms} SMs, jax {jax.__version__}")
for m, n, k in SHAPES:
    sets = [bench_gemm._make_set(jax.random.fold_in(key, i), m, n, k)["block"] for i in range(3)]
    ref = np.asarray(gemm.fp8_gemm(*sets[0], out_dtype=jnp.float32, impl="xla"), np.float64)
    times = {c: [] for c in gemm.CLUSTERS}
    fns = {c: jax.jit(lambda *o, c=c: gemm.ffi_fp8_gemm(*o, gemm.GemmConfig(128, 128, sms, c)))
           for c in gemm.CLUSTERS}
    diffs = {}
    for c, f in fns.items():
        y = np.asarray(f(*sets[0]).astype(jnp.float32), np.float64)
        diffs[c] = 1 - 2 * np.sum(y * ref) / np.sum(y * y + ref * ref)
    for _ in range(rounds):
        for c, f in fns.items():
            times[c].append(device_time_jax(f, sets, 12))
    flop = 2 * m * n * k
    print(f"{m:5d} {n:6d} {k:6d} pick c{gemm.gemm_config(m, n, k, sms).cluster_n}  " + "  ".join(
        f"c{c}: {flop / statistics.median(t) / 1e12:6.0f} TFLOP/s "
        f"(spread {flop / max(t) / 1e12:.0f}-{flop / min(t) / 1e12:.0f}, diff {diffs[c]:.1e})"
        for c, t in times.items()), flush=True)
