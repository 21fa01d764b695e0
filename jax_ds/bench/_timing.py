"""Per-call timing for JAX and torch callables, and the device peaks the roofline uses.

Two numbers per measurement, both the median over `repeats` of T(n calls) / n, with the inputs
rotating among several sets so that a weight which fits in L2 (50 MB on H100) is not served from
cache on every call:
  per call      what a Python caller pays: one jitted call (or one torch call) after another. JAX
                dispatch is asynchronous, so host work overlaps device work, but a kernel shorter
                than the dispatch itself is host-bound (`dispatch_floor_s` says where that is).
  device-bound  one call per input set inside one jitted executable (JAX; the calls repeated
                inside it until the host's dispatch no longer shows) or one CUDA graph (torch): a
                single dispatch for all of them, so the time per call is the device's.
                This is the number comparable with kernel-level figures such as DeepGEMM's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
import warnings

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call: median and best of `repeats` repeats of `calls` back-to-back calls."""

    median_s: float
    min_s: float
    calls: int
    repeats: int
    in_place: bool | None = None  # time_jax_launch: outputs written into donated buffers


def _calls_per_repeat(est_s, num_sets, budget_s, repeats, iters):
    """Calls per repeat: `iters` if given, else what fills budget_s; a multiple of num_sets."""
    if iters:
        n = iters
    else:
        n = int(budget_s / repeats / max(est_s, 1e-7))
    n = min(max(n, 2 * num_sets), 2000)
    return num_sets * math.ceil(n / num_sets)


def time_jax(fn, arg_sets, *, budget_s=0.3, repeats=5, iters=None):
    """Times `fn(*args)` (a jitted function) for args rotating over `arg_sets`.

    The first call per set compiles and warms up; it is not timed.
    """
    s = len(arg_sets)
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for i in range(2 * s):
        jax.block_until_ready(fn(*arg_sets[i % s]))
    est = (time.perf_counter() - t0) / (2 * s)
    n = _calls_per_repeat(est, s, budget_s, repeats, iters)
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*arg_sets[i % s])
        # One stream executes the calls in order: the last one done means all are done.
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / n)
    return Timing(statistics.median(per_call), min(per_call), n, repeats)


def time_torch(fn, arg_sets, *, budget_s=0.3, repeats=5, iters=None):
    """Times `fn(*args)` on torch's current CUDA stream with CUDA events; args rotate as above."""
    import torch

    s = len(arg_sets)
    for args in arg_sets:
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(2 * s):
        fn(*arg_sets[i % s])
    end.record()
    end.synchronize()
    est = start.elapsed_time(end) / 1e3 / (2 * s)
    n = _calls_per_repeat(est, s, budget_s, repeats, iters)
    per_call = []
    for _ in range(repeats):
        start.record()
        for i in range(n):
            fn(*arg_sets[i % s])
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / n)
    return Timing(statistics.median(per_call), min(per_call), n, repeats)


def repeated_calls(fn, reps):
    """sets -> [[fn(*args) for args in sets]] * reps, as one traceable function in which no two
    calls can be merged: each repeat after the first gets its inputs through an
    `optimization_barrier` (a no-op at run time that XLA cannot see through)."""
    def many(sets):
        outs = []
        for r in range(reps):
            if r:
                sets = jax.lax.optimization_barrier(sets)
            outs.append([fn(*args) for args in sets])
        return outs

    return many


def kernel_ops(compiled) -> int:
    """Dots and custom calls in a compiled executable: ops no fusion merges, so an executable of
    n GEMM calls holds n of them, unless XLA's CSE merged identical calls."""
    return sum(line.count(" dot(") + line.count(" custom-call(")
               for line in compiled.as_text().splitlines())


def aliased_outputs(compiled, text: str | None = None) -> int:
    """Outputs of a compiled executable that XLA writes into donated input buffers (the
    `input_output_alias` entries of its HLO module; `text`: its as_text(), if already read)."""
    header = (text or compiled.as_text()).split("\n", 1)[0]
    start = header.find("input_output_alias={")
    if start < 0:
        return 0
    depth, end = 0, start
    for end in range(start + len("input_output_alias="), len(header)):
        depth += {"{": 1, "}": -1}.get(header[end], 0)
        if depth == 0:
            break
    return header[start:end].count("alias)")


def root_copies(compiled, text: str | None = None) -> int:
    """Copies among the entry computation's outputs (`copy` ops under its ROOT tuple): what XLA
    adds where an output cannot be computed into its donated buffer directly."""
    lines = (text or compiled.as_text()).splitlines()
    entry = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
    if entry is None:
        return 0
    root = next((line for line in lines[entry:] if line.lstrip().startswith("ROOT")), "")
    operands = root.split(" tuple(", 1)[1] if " tuple(" in root else root.split("=", 1)[-1]
    return len(re.findall(r"(?:^|[(,\s])%?copy(?:\.\d+)?(?=[,)\s]|$)", operands))


class _InPlace:
    """A compiled `(sets, outs) -> outs'` whose outs are donated: each call passes the previous
    call's outputs back in, so XLA writes every output into the same buffers, call after call."""

    def __init__(self, compiled, outs):
        self.compiled, self.outs = compiled, outs

    def __call__(self, sets):
        self.outs = self.compiled(sets, self.outs)
        return self.outs


_FELL_BACK: list[str] = []  # executables timed with fresh outputs although in place was asked


def fell_back() -> list[str]:
    """Names of the functions timed with fresh outputs, in place having failed, since the last
    `reset_fell_back()` (each suite's `environment()`): their result files list them."""
    return list(_FELL_BACK)


def reset_fell_back() -> None:
    _FELL_BACK.clear()


def _compile_launch(fn, sets, reps, in_place):
    """The device-bound executable of `reps` repeats over `sets`: (callable, compiled, in_place).
    In place: the outputs alias donated buffers (a warning and fresh outputs when XLA would not
    alias every one of them)."""
    many = repeated_calls(fn, reps)
    compile_fresh = lambda: jax.jit(many).lower(sets).compile()  # noqa: E731
    fresh = None
    if in_place:
        shapes = jax.eval_shape(many, sets)
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        if any(len(a.sharding.device_set) > 1 for a in jax.tree.leaves(sets)):
            # the donated buffers must be laid out as the outputs are (a mesh's shardings)
            fresh = compile_fresh()
            outs = jax.jit(zeros, out_shardings=fresh.output_shardings)()
        else:
            outs = zeros()
        compiled = jax.jit(lambda s, o: many(s), donate_argnums=1,
                           keep_unused=True).lower(sets, outs).compile()
        text = compiled.as_text()
        aliased, copies = aliased_outputs(compiled, text), root_copies(compiled, text)
        if copies:  # an input returned as it is: copied with fresh outputs too
            fresh = fresh or compile_fresh()
            copies -= root_copies(fresh)
        if aliased == len(jax.tree.leaves(shapes)) and copies <= 0:
            return _InPlace(compiled, outs), compiled, True
        warnings.warn(f"time_jax_launch: XLA aliased {aliased} of {len(jax.tree.leaves(shapes))} "
                      f"outputs to donated buffers, copying {max(copies, 0)} more into them "
                      "than into fresh ones; timing with fresh outputs", RuntimeWarning,
                      stacklevel=3)
        _FELL_BACK.append(getattr(fn, "__name__", type(fn).__name__))
    fresh = fresh or compile_fresh()
    return fresh, fresh, False


OUTPUTS_ENV = "JAX_DS_BENCH_OUTPUTS"  # "in-place" (the default) or "fresh": time_jax_launch's
# What a result file says of its device-bound column (the suites' JSON "timing").
DEVICE_BOUND = ("one call per input set in one jitted executable (JAX; the sets repeated inside "
                "it, doubling, while that still lowers the time per call; outputs donated back "
                "in, written in place, unless JAX_DS_BENCH_OUTPUTS=fresh) or one CUDA graph "
                "(torch), time / calls")


def outputs_in_place() -> bool:
    """time_jax_launch's default: outputs in place unless $JAX_DS_BENCH_OUTPUTS is "fresh"."""
    value = os.environ.get(OUTPUTS_ENV, "in-place")
    if value not in ("in-place", "fresh"):
        raise ValueError(f"${OUTPUTS_ENV} must be 'in-place' or 'fresh', got {value!r}")
    return value == "in-place"


def time_jax_launch(fn, arg_sets, *, max_reps=32, in_place=None, **kwargs):
    """Per-call time of one executable that calls `fn` once on each of arg_sets, `reps` times
    over: one dispatch for them all, so what remains is the device's time per call. The sets
    must be distinct arrays, or XLA would merge the identical calls; each repeat's inputs pass
    through an `optimization_barrier`, so XLA cannot merge the repeats either.

    `in_place` (None: `outputs_in_place()`, True unless $JAX_DS_BENCH_OUTPUTS=fresh): the
    executable's outputs are donated back to it, so every execution writes into the same
    buffers, as the replay of a captured CUDA graph does (torch's anchor, `time_torch_graph`).
    With fresh outputs each execution gets new buffers, and XLA re-records its command buffer
    (CUDA graph) for the moved buffers before it launches it: host work per call that did not
    overlap the GPU's (3-4 us a call at 10-40 us kernels, NOTES-gemm.md, "Where the short
    shapes' time goes"). `in_place=False` measures that way.

    An executable of a few short calls is still bound by the host's dispatch of it (tens of
    array arguments: 0.26-0.43 ms of idle GPU between executables were seen in a one-off trace
    against 9-10 us kernels, NOTES-gemm.md), so `reps` doubles, from 1 up to `max_reps`, while
    the time per call keeps falling by more than 10%: once it no longer does, the device bounds
    the executable.

    Some XLA versions drop the barrier before CSE (jax 0.10.2 on CPU merged the repeats): the
    compiled executable of `reps` repeats must hold `reps` times the dots and custom calls of
    one, or the doubling stops there (a warning says so) and the last honest timing comes back.
    The Timing's `in_place` says how the outputs were written.
    """
    n = len(arg_sets)
    args = (tuple(arg_sets),)
    in_place = outputs_in_place() if in_place is None else in_place

    def launch(reps):
        call, compiled, placed = _compile_launch(fn, args[0], reps, in_place)
        t = time_jax(call, [args], **kwargs)
        return (Timing(t.median_s / (n * reps), t.min_s / (n * reps), t.calls * n * reps,
                       t.repeats, placed), kernel_ops(compiled))

    reps, (best, ops_one) = 1, launch(1)
    while reps < max_reps:
        more, ops = launch(2 * reps)
        if ops < 2 * reps * ops_one:
            warnings.warn(f"time_jax_launch: XLA merged repeated calls ({ops} dots/custom calls "
                          f"for {2 * reps} repeats of {ops_one}); timing {reps} repeat(s)",
                          RuntimeWarning, stacklevel=2)
            return best
        if more.median_s > 0.9 * best.median_s:
            return more if more.median_s < best.median_s else best
        reps, best = 2 * reps, more
    return best


def span_jax_launch(fn, arg_sets, *, reps=4, repeats=3):
    """GPU time per call of the executable `time_jax_launch` builds (`reps` repeats of one call
    per set): the median over `repeats` runs of the span from its first kernel's start to its
    last kernel's end (jax.profiler), / calls. Unlike the executable's wall time it leaves out
    the host's work per execution that does not overlap the GPU's (with short kernels, a few
    microseconds per call were seen: output buffers and XLA's command-buffer update, serialized
    before the launch, NOTES-gemm.md); torch's CUDA-graph replay has no such work per call. Needs
    a GPU (the profiler's device events)."""
    from jax_ds.bench import _profile

    args = (tuple(arg_sets),)
    compiled = jax.jit(repeated_calls(fn, reps)).lower(*args).compile()
    spans = [_profile.gpu_span_ns(compiled, args) for _ in range(repeats)]
    return statistics.median(spans) * 1e-9 / (len(arg_sets) * reps)


def torch_graph(fn, arg_sets):
    """(graph, outputs): one CUDA graph that calls `fn` once on each of arg_sets, captured after a
    warm-up on a side stream (handles, workspaces); keep the outputs as long as the graph."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(*args) for args in arg_sets]
    return graph, outs


def time_torch_graph(fn, arg_sets, **kwargs):
    """Per-call time of one CUDA graph that calls `fn` once on each of arg_sets (`torch_graph`):
    torch's device time per call."""
    graph, outs = torch_graph(fn, arg_sets)
    t = time_torch(graph.replay, [()], **kwargs)
    del outs, graph
    n = len(arg_sets)
    return Timing(t.median_s / n, t.min_s / n, t.calls * n, t.repeats)


def dispatch_floor_s(budget_s=0.2):
    """Per-call time of a jitted near-empty function of four arrays: the host-bound floor."""
    fn = jax.jit(lambda a, b, c, d: a + 1)
    args = [tuple(jnp.full((8,), float(i + j)) for j in range(4)) for i in range(2)]
    return time_jax(fn, args, budget_s=budget_s, repeats=3).median_s


# Datasheet peaks: dense FP8 tensor-core TFLOP/s (no sparsity) and HBM TB/s. Matched in order
# against the device name, so "H200" is tried before "H20" and the H100 variants before "H100".
PEAKS = (
    ("H100 PCIe", 1513.0, 2.0),
    ("H100 NVL", 1671.0, 3.9),
    ("H100", 1979.0, 3.35),  # SXM5 80 GB
    ("H200", 1979.0, 4.8),
    ("H800", 1979.0, 3.35),
    ("H20", 296.0, 4.0),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Peak:
    """The peak a roofline is drawn against; `source` names the table row (or that none fits)."""

    fp8_flops: float | None  # FLOP/s
    hbm_bytes: float | None  # bytes/s
    source: str


def device_peak(device_name):
    for key, tflops, tbs in PEAKS:
        if key.lower() in device_name.lower():
            source = f"{key}: {tflops:g} TFLOP/s dense FP8, {tbs:g} TB/s"
            return Peak(tflops * 1e12, tbs * 1e12, source)
    return Peak(None, None, f"no peak known for {device_name!r}")


def roofline_fraction(peak, flops, nbytes, seconds):
    """Fraction of the roofline reached: max(flops / peak, bytes / bandwidth) / measured time."""
    if peak.fp8_flops is None or not seconds:
        return None
    return max(flops / peak.fp8_flops, nbytes / peak.hbm_bytes) / seconds
