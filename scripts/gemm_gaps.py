"""Where the time between back-to-back FP8 GEMMs goes, in the benchmark's device-bound executable.

    python scripts/gemm_gaps.py                      # the short shapes where ours < kernel
    python scripts/gemm_gaps.py 64 7168 2048         # one shape: m n k
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/gemm_gaps.py  # no CUDA graphs

One executable calls fp8_gemm `reps` times on each of 16 input sets (`_timing.repeated_calls`, as
`bench gemm`'s device-bound column). Per call it prints: the wall time of the whole executable,
the host time until the call returned (enqueue), the kernels' own time, their span on the GPU
(first start to last end) and the mean idle gap between two kernels, from a `jax.profiler` trace.
Host-bound when enqueue ~ wall; launch-gap-bound when span - kernels ~ gaps x calls.
"""
import os
import sys
import time

import jax
import numpy as np

from jax_ds.bench import _profile, _timing
from jax_ds.bench.gemm import block_sets
from jax_ds.ops import fp8_gemm

SHAPES = ((64, 7168, 2048), (64, 32768, 512), (64, 24576, 1536), (128, 24576, 1536),
          (128, 32768, 512), (128, 7168, 2048))
SETS, REPS = 16, 16


def gpu_kernels(run):
    """[(start_ns, end_ns)] of the GPU stream events while `run()` runs, sorted."""
    with _profile._trace(run) as path:
        return sorted((ev.start_ns, ev.start_ns + ev.duration_ns)
                      for ev in _profile._stream_events(path))


def measure(m, n, k):
    args = (tuple(block_sets(m, n, k, SETS)),)
    impl = "ffi" if jax.default_backend() == "gpu" else "xla"  # xla: a CPU smoke run
    many = jax.jit(_timing.repeated_calls(lambda *o: fp8_gemm(*o, impl=impl), REPS))
    compiled = many.lower(*args).compile()
    calls = SETS * REPS
    jax.block_until_ready(compiled(*args))
    walls, enqueues = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        out = compiled(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        enqueues.append(t1 - t0)
        walls.append(t2 - t0)
        del out
    ev = gpu_kernels(lambda: jax.block_until_ready(compiled(*args))) or [(0, 0)]  # none: CPU
    kernel = sum(e - s for s, e in ev)
    span = ev[-1][1] - ev[0][0]
    gaps = [max(0, s - pe) for (_, pe), (s, _) in zip(ev, ev[1:])]
    us = 1e6 / calls
    flops = 2 * m * n * k
    print(f"{m}x{n}x{k} ({calls} calls, {len(ev)} GPU events): per call wall "
          f"{np.median(walls) * us:.1f} us, enqueue {np.median(enqueues) * us:.1f} us, kernels "
          f"{kernel / 1e3 / calls:.1f} us ({flops / max(kernel / calls, 1e-9) / 1e3:.0f} TFLOP/s), span "
          f"{span / 1e3 / calls:.1f} us, gap mean {np.mean(gaps) / 1e3:.2f} us "
          f"median {np.median(gaps) / 1e3:.2f} us; device-bound {flops / np.median(walls) * calls / 1e12:.0f} "
          f"TFLOP/s", flush=True)


def main(argv):
    shapes = [tuple(int(x) for x in argv[:3])] if argv else SHAPES
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    for shape in shapes:
        measure(*shape)


if __name__ == "__main__":
    main(sys.argv[1:])
