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
import functools
import glob
import os
import re
import tempfile

import jax


def _gpu_stream_lines(xspace_path: str):
    """(GPU plane name, line) of every stream line of a trace file."""
    from jax.profiler import ProfileData  # jax >= 0.4.3x

    data = ProfileData.from_file(xspace_path)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Stream lines hold kernels and copies; "XLA Ops"/"XLA Modules" lines are annotations
            # spanning them, and counting those too would double the time.
            if line.name.startswith("Stream"):
                yield plane.name, line


def _stream_events(xspace_path: str):
    for _, line in _gpu_stream_lines(xspace_path):
        yield from line.events


def trace_to(directory: str, run) -> None:
    """Runs `run()` under a jax.profiler trace written into `directory`."""
    jax.profiler.start_trace(directory)
    try:
        run()
    finally:
        jax.profiler.stop_trace()


@contextlib.contextmanager
def _trace(run):
    """The .xplane.pb path of a jax.profiler trace of `run()`, in a temporary folder that lives
    while the context does."""
    with tempfile.TemporaryDirectory() as d:
        trace_to(d, run)
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


# ----------------------------------------------------------------------------- overlap in a trace

# Collective kernels by name, first match wins. NCCL names its kernels after the collective
# (ncclDevKernel_AllReduce_Sum_f32_RING_LL, ..._SendRecv); NCCL runs an all-to-all, ragged or not,
# as grouped sends and receives, so SendRecv counts as all-to-all (a pipeline's
# collective-permute would land there too). Words that XLA's compute fusions also use
# ("broadcast", "ragged" of ragged_dot) are not patterns.
COLLECTIVE_KINDS = (
    ("all_to_all", re.compile(r"all.?to.?all|send.?recv", re.I)),
    ("all_reduce", re.compile(r"all.?reduce", re.I)),
    ("all_gather", re.compile(r"all.?gather", re.I)),
    ("reduce_scatter", re.compile(r"reduce.?scatter", re.I)),
    ("other_collective", re.compile(r"nccl|collective.?permute", re.I)),
)


_COPY = re.compile(r"memcpy|memset", re.I)


def collective_kind(name: str) -> str | None:
    """The COLLECTIVE_KINDS kind of a GPU kernel's name, "copy" for memcpy/memset, or None for
    compute."""
    for kind, pattern in COLLECTIVE_KINDS:
        if pattern.search(name):
            return kind
    return "copy" if _COPY.search(name) else None


def _union(intervals):
    """Sorted, disjoint [start, end) intervals covering the given ones."""
    out = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _length(intervals) -> int:
    return sum(end - start for start, end in intervals)


def _intersection_length(a, b) -> int:
    """Length of the intersection of two sorted disjoint interval lists."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, hi - lo)
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return total


def collective_overlap(events) -> dict:
    """How much of one GPU's collective time runs under compute, from its kernels
    `events` = [(name, start_ns, end_ns)].

    Returns {"span_ms", "compute_ms", "copy_ms", "collectives": {kind: {"ms", "overlapped_ms",
    "overlap"}}}: per kind, the time some kernel of that kind runs (intervals merged), the part of
    it during which a compute kernel also runs on the device, and their ratio. Copies
    (memcpy/memset) are neither compute nor collective."""
    if not events:
        return {"span_ms": 0.0, "compute_ms": 0.0, "copy_ms": 0.0, "collectives": {}}
    by_kind: dict[str, list] = {}
    compute = []
    for name, start, end in events:
        kind = collective_kind(name)
        (by_kind.setdefault(kind, []) if kind else compute).append((start, end))
    compute = _union(compute)
    span = max(e for _, _, e in events) - min(s for _, s, _ in events)
    copies = _union(by_kind.pop("copy", []))
    out = {"span_ms": span / 1e6, "compute_ms": _length(compute) / 1e6,
           "copy_ms": _length(copies) / 1e6, "collectives": {}}
    for kind, _ in COLLECTIVE_KINDS:
        if kind not in by_kind:
            continue
        spans = _union(by_kind[kind])
        total, under = _length(spans), _intersection_length(spans, compute)
        out["collectives"][kind] = {"ms": total / 1e6, "overlapped_ms": under / 1e6,
                                    "overlap": under / total if total else None}
    return out


# Compute kernels by what they do, first match wins (names as the profiler reports them: ours
# are C++ templates, e.g. "void jax_ds::gemm::sm90_fp8_gemm_kernel<..., GroupedScheduler<...>>").
KERNEL_KINDS = (
    # the kernel's bf16 mode: the argument after the scheduler (kBf16) true, kBTrans after it
    ("ours grouped bf16 GEMM",
     re.compile(r"fp8_gemm_kernel.*GroupedScheduler<[^>]*>\s*,\s*true\b", re.I)),
    ("ours grouped FP8 GEMM", re.compile(r"fp8_gemm_kernel.*Grouped", re.I)),
    ("ours FP8 GEMM", re.compile(r"fp8_gemm_kernel", re.I)),
    ("ours quantize", re.compile(r"quantize_(rows|blocks)_kernel", re.I)),
    ("ours MoE routing", re.compile(r"jax_ds::moe|(count|permute|permute_fp8|zero_rows|"
                                    r"unpermute)_kernel", re.I)),
    ("ours MLA decode", re.compile(r"jax_ds::mla|mla_decode|CombineKernel", re.I)),
    ("XLA GEMM (cuBLAS, Triton)", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|cudnn|wgmma", re.I)),
    ("XLA fusion", re.compile(r"fusion|loop_|input_|reduce|transpose|concatenate|convert|"
                              r"slice|scatter|gather|copy|triton", re.I)),
)


@functools.lru_cache(maxsize=4096)  # a trace repeats a few hundred names thousands of times
def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel for `kernel_breakdown`: a collective's or "copy"
    (`collective_kind`), a KERNEL_KINDS name, else "other"."""
    kind = collective_kind(name)
    if kind:
        return kind
    return next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_breakdown(events, steps: int, top: int = 8) -> dict:
    """Kernel time per step of one GPU's `events` [(name, start_ns, end_ns)], summed (streams
    that overlap count twice): {"kinds": {kind: ms}, "top": [(name, ms)]} (the `top` kernels,
    names cut to 120 characters), both sorted by time."""
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    for name, start, end in events:
        ms, kind, short = (end - start) / 1e6 / steps, kernel_kind(name), name[:120]
        kinds[kind] = kinds.get(kind, 0.0) + ms
        names[short] = names.get(short, 0.0) + ms
    by_time = lambda d: sorted(d.items(), key=lambda kv: -kv[1])  # noqa: E731
    return {"kinds": dict(by_time(kinds)), "top": by_time(names)[:top]}


def gpu_kernels_by_device(trace_dir: str) -> dict[str, list]:
    """{GPU plane name: [(kernel name, start_ns, end_ns)]} from every .xplane.pb under
    trace_dir (empty when the trace holds no GPU, e.g. on CPU)."""
    out: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)):
        for plane, line in _gpu_stream_lines(path):
            out.setdefault(plane, []).extend(
                (ev.name, ev.start_ns, ev.start_ns + ev.duration_ns) for ev in line.events)
    return out
