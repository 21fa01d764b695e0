"""Where the time between back-to-back FP8 GEMMs goes, in the benchmark's device-bound executable.

    python scripts/gemm_gaps.py                      # the short shapes where ours < kernel
    python scripts/gemm_gaps.py 64 7168 2048         # one shape: m n k
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/gemm_gaps.py  # no CUDA graphs
    JAX_DS_BENCH_OUTPUTS=fresh python scripts/gemm_gaps.py  # new output buffers per execution

One executable calls fp8_gemm `reps` times on each of 16 input sets (`_timing.repeated_calls`, as
`bench gemm`'s device-bound column). Per call it prints: the wall time of the whole executable,
the host time until the call returned (enqueue), the kernels' own time, their span on the GPU
(first start to last end) and the mean idle gap between two kernels, from a `jax.profiler` trace;
then "back to back": the wall time of 5 executions dispatched one after another (as the device-bound
timing runs them), and the slope from 5 to 10 such executions (what the 5 more cost: the steady
state, without the first execution's enqueue that nothing overlaps). Host-bound when enqueue ~
wall; launch-gap-bound when span - kernels ~ gaps x calls. The outputs are written in place
(donated back in, as `bench gemm` does) unless $JAX_DS_BENCH_OUTPUTS is "fresh": then every
execution gets new buffers, and XLA re-records its CUDA graph for them.
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
    call, _, in_place = _timing._compile_launch(lambda *o: fp8_gemm(*o, impl=impl), args[0],
                                                REPS, _timing.outputs_in_place())
    calls = SETS * REPS
    jax.block_until_ready(call(*args))
    walls, enqueues = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        out = call(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        enqueues.append(t1 - t0)
        walls.append(t2 - t0)
        del out
    def dispatched(executions):  # the wall time of `executions` dispatched back to back
        t0 = time.perf_counter()
        for _ in range(executions):
            out = call(*args)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    t5, t10 = dispatched(5), dispatched(10)
    back_to_back = t5 / 5
    # the slope leaves out what one batch of executions pays once (the first one's enqueue,
    # which no GPU work overlaps): the steady state of a long run
    slope = (t10 - t5) / 5
    ev = gpu_kernels(lambda: jax.block_until_ready(call(*args))) or [(0, 0)]  # none: CPU
    kernel = sum(e - s for s, e in ev)
    span = ev[-1][1] - ev[0][0]
    gaps = [max(0, s - pe) for (_, pe), (s, _) in zip(ev, ev[1:])]
    us = 1e6 / calls
    flops = 2 * m * n * k
    tflops = lambda seconds_per_call: flops / max(seconds_per_call, 1e-15) / 1e12
    wall = np.median(walls) / calls
    print(f"{m}x{n}x{k} ({calls} calls, {len(ev)} GPU events, outputs "
          f"{'in place' if in_place else 'fresh'}): per call wall {wall * 1e6:.1f} us, enqueue "
          f"{np.median(enqueues) * us:.1f} us, kernels {kernel / 1e3 / calls:.1f} us "
          f"({tflops(kernel * 1e-9 / calls):.0f} TFLOP/s), span {span / 1e3 / calls:.1f} us, "
          f"gap mean {np.mean(gaps) / 1e3:.2f} us median {np.median(gaps) / 1e3:.2f} us; "
          f"device-bound {tflops(wall):.0f} TFLOP/s; back to back {back_to_back * us:.1f} us "
          f"({tflops(back_to_back / calls):.0f} TFLOP/s), slope of 5 -> 10 executions "
          f"{slope * us:.1f} us ({tflops(slope / calls):.0f} TFLOP/s)", flush=True)


def main(argv):
    shapes = [tuple(int(x) for x in argv[:3])] if argv else SHAPES
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    for shape in shapes:
        measure(*shape)


if __name__ == "__main__":
    main(sys.argv[1:])
