"""Device time of JAX calls, read from the profiler: the sum of the GPU kernels' own durations.

Wall-clock timing of small GEMMs measures the host: a jitted call costs tens of microseconds of
dispatch, more than a 64-row FP8 GEMM runs on an H100. DeepGEMM's and FlashMLA's published figures
are kernel times (CUPTI), so we compare like with like: run the calls under `jax.profiler`, collect
every kernel/memcpy event on the GPU's stream lines, and divide their total duration by the number
of calls. Multi-kernel paths (XLA's dequantize + dot) are charged all their kernels, not the gaps
between them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

import jax


def _stream_events(xspace_path: str):
    from jax.profiler import ProfileData  # jax >= 0.4.3x

    data = ProfileData.from_file(xspace_path)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Stream lines hold kernels and copies; "XLA Ops"/"XLA Modules" lines are annotations
            # spanning them, and counting those too would double the time.
            if line.name.startswith("Stream"):
                yield from line.events


@contextlib.contextmanager
def _trace(run):
    """The .xplane.pb path of a jax.profiler trace of `run()`, in a temporary folder that lives
    while the context does."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError("jax.profiler wrote no trace")
        yield paths[0]


def gpu_span_ns(fn, args) -> int:
    """Nanoseconds from the first GPU kernel/copy's start to the last one's end while `fn(*args)`
    runs once (after one untraced warm-up call): the device's busy span, gaps between kernels
    included, host work before the first launch or after the last kernel not."""
    jax.block_until_ready(fn(*args))
    with _trace(lambda: jax.block_until_ready(fn(*args))) as path:
        events = list(_stream_events(path))
        if not events:
            raise RuntimeError("the trace holds no GPU kernel events (profiler unavailable?)")
        return (max(ev.start_ns + ev.duration_ns for ev in events)
                - min(ev.start_ns for ev in events))


def kernel_events(fn, arg_sets, calls: int):
    """(name, duration_ns) of every GPU kernel/copy while `fn(*args)` runs `calls` times, args
    rotating over `arg_sets`. Each set is called once first (compile, warm-up) outside the trace."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))

    def run():
        out = None
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)

    with _trace(run) as path:
        return [(ev.name, ev.duration_ns) for ev in _stream_events(path)]


def device_time_jax(fn, arg_sets, calls: int) -> float:
    """Seconds of GPU kernel time per call of `fn(*args)`, args rotating over `arg_sets`."""
    total_ns = sum(ns for _, ns in kernel_events(fn, arg_sets, calls))
    if total_ns <= 0:
        raise RuntimeError("the trace holds no GPU kernel events (profiler unavailable?)")
    return total_ns * 1e-9 / calls
