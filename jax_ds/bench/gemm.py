"""Dense FP8 GEMM (DeepSeek-V3 scaling) against XLA and cuBLAS, measured in one run.

For each (m, n, k) of `arg_specs.gemm_bench_shapes()`, on fresh random inputs quantized outside the
timed region (a: 1x128 groups, b: 128x128 blocks, float32 scales):
  ours            `fp8_gemm(impl="ffi")` under jax.jit
  xla_dequant     dequantize a and b to bf16 (scale multiply), a bf16 dot: what a JAX user writes
  xla_fp8_tensor  `lax.dot_general` on e4m3fn inputs (bf16 result) times one per-tensor scale
  torch_blockwise cuBLASLt blockwise scaling through torch (same inputs and scales as ours)
  torch_rowwise   torch `_scaled_mm` with per-row / per-column scales, the older cuBLAS anchor
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi, arg_specs, cli
from jax_ds.bench import (_profile, _timing, _torch_gemm, bar_plot, environment, error_cell,
                          print_table, write_json)
from jax_ds.ops import dequantize_fp8, fp8_gemm, fp8_gemm_reference, gemm_config, quantize_fp8
from jax_ds.testing import calc_diff

QUICK = ((64, 2112, 7168), (128, 4096, 7168), (4096, 7168, 16384))
TINY = ((64, 256, 512), (128, 384, 256), (256, 512, 1024))  # CPU smoke test
IMPLS = ("ours", "xla_dequant", "xla_fp8_tensor", "torch_blockwise", "torch_rowwise")
# Input sets per shape: 4..16, each call in a device-bound launch gets its own (see _timing), and
# the sets (three quantized copies each) stay under SET_BYTES. Always well over H100's 50 MB L2.
SETS = (4, 16)
SET_BYTES = 2e9
DIFF_LIMIT = 1e-3
E4M3_MAX = 448.0
TARGET = "jax_ds_fp8_gemm"


def add_arguments(parser):
    parser.add_argument("--shapes", choices=("all", "quick", "tiny"), default="all",
                        help="all: arg_specs.gemm_bench_shapes(); quick: 3 of them; "
                             "tiny: a CPU smoke test")
    parser.add_argument("--m", type=cli.at_least(1), nargs="+", default=None,
                        help="only the shapes with these m (to split a long run)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and plot")
    parser.add_argument("--iters", type=cli.at_least(1), default=None,
                        help="calls per timing repeat (default: what fills --budget)")
    parser.add_argument("--budget", type=cli.positive_float, default=0.25,
                        help="seconds per measurement")
    parser.add_argument("--repeats", type=cli.at_least(1), default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch/cuBLAS columns")
    parser.add_argument("--impl", choices=("ffi", "xla"), default="ffi",
                        help="what the 'ours' column runs; xla (the reference) smoke-tests this "
                             "command on a machine without the kernel")


def _quantize_per(x, axis):
    """e4m3 with one scale per tensor (axis=None) or per row (axis=1): x ≈ x8 * s."""
    s = jnp.maximum(jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None), 1e-12) / E4M3_MAX
    return (x / s).astype(jnp.float8_e4m3fn), s


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _make_set(key, m, n, k):
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (n, k), jnp.float32)
    a8, sa = quantize_fp8(a, block=(1, 128))
    b8, sb = quantize_fp8(b, block=(128, 128))
    at8, ta = _quantize_per(a, None)
    bt8, tb = _quantize_per(b, None)
    ar8, ra = _quantize_per(a, 1)
    br8, rb = _quantize_per(b, 1)
    return {"block": (a8, sa, b8, sb), "tensor": (at8, bt8, ta * tb), "row": (ar8, ra, br8, rb)}


def block_sets(m, n, k, count, seed=0):
    """`count` fresh random operand sets (a8, sa, b8, sb) of the block-scaled recipe (1x128 /
    128x128 scales), distinct arrays (XLA cannot merge calls on them): for the GEMM scripts."""
    keys = jax.random.split(jax.random.key(seed), count)
    return [_make_set(key, m, n, k)["block"] for key in keys]


@jax.jit
def xla_dequant(a8, sa, b8, sb):
    a = dequantize_fp8(a8, sa, (1, 128), out_dtype=jnp.bfloat16)
    b = dequantize_fp8(b8, sb, (128, 128), out_dtype=jnp.bfloat16)
    return a @ b.T


@jax.jit
def xla_fp8_tensor(a8, b8, s):
    nt = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a8, b8, nt, preferred_element_type=jnp.bfloat16) * s.astype(
        jnp.bfloat16)


def _measure(fn, arg_sets, row, args, *, torch=False, span=False):
    """Per-call and device-bound timing of fn over arg_sets -> the result dict of one cell."""
    kw = {"budget_s": args.budget, "repeats": args.repeats}
    t = (_timing.time_torch if torch else _timing.time_jax)(fn, arg_sets, iters=args.iters, **kw)
    result = {}
    try:
        launch = _timing.time_torch_graph if torch else _timing.time_jax_launch
        d = launch(fn, arg_sets, **kw)
        result.update(_rates("device_", d.median_s, row))
    except Exception as e:  # e.g. a graph capture torch refuses: keep the per-call number
        result["device_error"] = error_cell(e)["error"]
    if span:  # ours: the GPU's own span of that executable (torch's graph time is already that)
        try:
            result.update(_rates("span_", _timing.span_jax_launch(fn, arg_sets), row))
        except Exception as e:  # no GPU, no profiler
            result["span_error"] = error_cell(e)["error"]
    return {**_rates("", t.median_s, row), "min_us": t.min_s * 1e6, "calls": t.calls, **result}


def _rates(prefix, seconds, row):
    frac = _timing.roofline_fraction(row["peak"], row["flops"], row["bytes"], seconds)
    return {f"{prefix}us": seconds * 1e6, f"{prefix}tflops": row["flops"] / seconds / 1e12,
            f"{prefix}gbps": row["bytes"] / seconds / 1e9,
            f"{prefix}roofline_pct": None if frac is None else 100 * frac}


def input_set_count(m, n, k) -> int:
    """Input sets of a shape (SETS, under SET_BYTES): scripts/lib_ab.py times the same way."""
    return int(np.clip(SET_BYTES // (3 * (m * k + n * k)), *SETS))


def bench_shape(m, n, k, key, args, *, ours_na, num_sms, peak, torch_gemm):
    """One row: every implementation timed on the same input sets; failures land in their cell."""
    kb, nb = math.ceil(k / 128), math.ceil(n / 128)
    row = {"m": m, "n": n, "k": k, "flops": 2 * m * n * k, "diff": None,
           "bytes": m * k + n * k + 4 * (m * kb + nb * kb) + 2 * m * n, "peak": peak,
           "deepgemm_h800_tflops": arg_specs.DEEPGEMM_H800_TFLOPS.get((m, n, k)), "results": {}}
    res = row["results"]
    try:
        cfg = gemm_config(m, n, k, num_sms)
        row["config"] = cfg.key()  # the sweeps' key, e.g. 128x192c2so
        row["split"] = [cfg.split_units, cfg.splits]
    except Exception as e:  # a bad config is a row's problem, not the run's
        row["config"] = error_cell(e)["error"]
    try:
        count = input_set_count(m, n, k)
        sets = [_make_set(jax.random.fold_in(key, i), m, n, k) for i in range(count)]
        jax.block_until_ready(sets)
    except Exception as e:
        res.update({name: error_cell(e) for name in IMPLS})
        return row
    row["input_sets"] = count
    block = [s["block"] for s in sets]
    try:
        ref = np.asarray(jax.jit(functools.partial(fp8_gemm_reference, out_dtype=jnp.float32))(
            *block[0]))
    except Exception as e:  # still time everything; only the checks need the reference
        ref, row["reference_error"] = None, error_cell(e)["error"]
    res["ours"] = {"na": ours_na}
    if ours_na is None:
        try:
            ours = jax.jit(functools.partial(fp8_gemm, impl=args.impl))
            out = np.asarray(ours(*block[0]), np.float32)
            row["diff"] = None if ref is None else float(calc_diff(out, ref))
            row["nonfinite"] = int(np.size(out) - np.isfinite(out).sum())
            res["ours"] = _measure(ours, block, row, args, span=True)
            try:  # kernel time alone (profiler), the kind of number DeepGEMM publishes
                t = _profile.device_time_jax(ours, block, calls=2 * len(block))
                res["ours"].update(_rates("kernel_", t, row))
            except Exception as e:
                res["ours"]["kernel_error"] = error_cell(e)["error"]
        except Exception as e:
            res["ours"] = error_cell(e)
    for name, fn, arg_sets in (("xla_dequant", xla_dequant, block),
                               ("xla_fp8_tensor", xla_fp8_tensor, [s["tensor"] for s in sets])):
        try:
            res[name] = _measure(fn, arg_sets, row, args)
        except Exception as e:
            res[name] = error_cell(e)
    measure = functools.partial(_measure, row=row, args=args, torch=True)
    for name in ("torch_blockwise", "torch_rowwise"):
        res[name] = torch_gemm.measure(name, sets, ref, measure)
    del sets, block
    return row


def _fmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _cell(result, key):
    if result.get(key) is not None:
        return _fmt(result[key])
    return "err" if "error" in result or "device_error" in result else "n/a"


def _ratio(x, y, suffix=""):
    return f"{x / y:.2f}{suffix}" if x and y else "-"


def _table_row(row, prefix=""):
    """The table's cells for one row; prefix "" = per-call numbers, "device_" = device-bound
    (with ours' kernel time after ours, and the DeepGEMM ratio taken from it when present)."""
    r = {name: row["results"].get(name, {}) for name in IMPLS}
    tf = {name: r[name].get(f"{prefix}tflops") for name in IMPLS}
    kernel = r["ours"].get("kernel_tflops") if prefix else None
    span = r["ours"].get("span_tflops") if prefix else None
    torch_tf, suffix = (tf["torch_blockwise"], "") if tf["torch_blockwise"] else (
        tf["torch_rowwise"], " (rw)")
    diff, roof = row["diff"], r["ours"].get(f"{prefix}roofline_pct")
    bad = diff is not None and not diff <= DIFF_LIMIT  # NaN fails too
    cells = [str(row["m"]), str(row["n"]), str(row["k"]), str(row.get("config", "-"))[:12],
             *(_cell(r[name], f"{prefix}tflops") for name in IMPLS),
             _ratio(tf["ours"], torch_tf, suffix), _ratio(tf["ours"], tf["xla_dequant"]),
             str(row["deepgemm_h800_tflops"] or "-"),
             _ratio(kernel or tf["ours"], row["deepgemm_h800_tflops"]),
             "-" if roof is None else f"{roof:.0f}%",
             "-" if diff is None else f"{diff:.1e}" + (" FAIL" if bad else "")]
    if prefix:  # after ours: its kernel time and GPU span; after ours/torch: span/torch
        cells[5:5] = [_cell(r["ours"], "kernel_tflops"), _cell(r["ours"], "span_tflops")]
        cells.insert(12, _ratio(span, torch_tf, suffix))
    return cells


COLUMNS = ("m", "n", "k", "config", "ours", "XLA-dequant", "XLA-fp8-tensor", "torch-blockwise",
           "torch-rowwise", "ours/torch", "ours/XLA-deq", "DeepGEMM H800", "ours/DeepGEMM",
           "%roofline", "diff")


def _notes(rows, args, floor, ours_desc, peak, torch_gemm):
    per = f"{args.iters} calls" if args.iters else f"~{args.budget:g} s"
    notes = [f"TFLOP/s = 2mnk / median time per call ({args.repeats} repeats of {per}, inputs "
             f"rotating over sets); JAX dispatch floor {floor * 1e6:.1f} us/call.",
             f"ours = {ours_desc}; torch = {torch_gemm.status}, blockwise recipe: "
             f"{torch_gemm.chosen}; (rw) = ratio against torch rowwise scaling.",
             f"%roofline of ours vs {peak.source}; diff = calc_diff(ours, f32 reference), "
             f"FAIL above {DIFF_LIMIT:g}.",
             "device-bound table: one executable of many calls (JAX: outputs "
             + ("written in place, donated back in" if _timing.outputs_in_place()
                else "fresh each execution") +
             "; torch: a CUDA graph); 'ours kernel' = GPU kernel time from jax.profiler (the "
             "kind of figure DeepGEMM publishes); ours/DeepGEMM uses it when present. 'ours "
             "span' = the "
             "GPU's span (first kernel start to last end) of the executable of many calls, / "
             "calls: the device's time without the host's per-execution work (torch's CUDA "
             "graph replay is device time already)."]
    problems = {}  # (impl, message) -> shapes, so a cause shared by every row is said once
    for row in rows:
        for name, result in row["results"].items():
            for key in ("error", "na", "device_error", "kernel_error", "span_error"):
                if result.get(key):
                    where = problems.setdefault((name, f"{key}: {result[key]}"), [])
                    where.append(f"{row['m']}x{row['n']}x{row['k']}")
    for (name, why), where in problems.items():
        where = "all rows" if len(where) == len(rows) else ", ".join(where)
        notes.append(f"{name} {why} [{where}]")
    return notes


def run(args):
    env = environment()
    peak = _timing.device_peak(env["device"])
    num_sms = _ffi.num_sms()
    ours_na = None
    if args.impl == "ffi":
        ours_na = _ffi.unavailable_reason(TARGET)
        if ours_na is None and os.environ.get(_ffi.ENV_IMPL, "").strip().lower() == "xla":
            ours_na = f"{_ffi.ENV_IMPL}=xla routes every op to its reference"
    ours_desc = f"n/a ({ours_na})" if ours_na else TARGET if args.impl == "ffi" else "reference"
    torch_gemm = _torch_gemm.TorchGemm(enabled=not args.no_torch)
    shapes = {"all": arg_specs.gemm_bench_shapes(), "quick": QUICK, "tiny": TINY}[args.shapes]
    floor = _timing.dispatch_floor_s()
    sms = f"{num_sms} SMs" + ("" if getattr(jax.devices()[0], "core_count", None)
                              else ", assumed for the tile picks")
    print(f"device: {env['device']} ({sms}); peak: {peak.source}\nours: {ours_desc}; "
          f"torch: {torch_gemm.status}; jax dispatch floor {floor * 1e6:.1f} us/call")
    # a part of the shapes writes its own file (a full run's is never overwritten): a run of
    # some m (two runs, two device calls, make the set), or the quick / tiny shapes
    tag = "" if args.shapes == "all" else args.shapes
    if args.m:
        shapes = [s for s in shapes if s[0] in args.m]
        if not shapes:
            raise SystemExit(f"bench gemm: no {args.shapes!r} shape has m in {args.m}")
        tag = "-".join(filter(None, (tag, "m" + "-".join(str(m) for m in sorted(set(args.m))))))
    meta = {
        "ours_impl": ours_desc, "peak": peak.source, "num_sms": num_sms,
        "dispatch_floor_us": floor * 1e6, "torch": torch_gemm.report(), "shapes": args.shapes,
        "m_filter": args.m,
        "timing": {"per_call": "median over repeats of T(n calls)/n, inputs rotating over sets",
                   "device": _timing.DEVICE_BOUND,
                   "kernel": "ours only: sum of GPU kernel durations from jax.profiler / calls",
                   "span": "ours only: GPU span (first kernel start to last end, jax.profiler) "
                           "of the device-bound executable at 4 repeats, / calls",
                   "budget_s": args.budget, "repeats": args.repeats, "iters": args.iters}}
    rows = []
    for i, (m, n, k) in enumerate(shapes):
        key = jax.random.fold_in(jax.random.key(args.seed), i)
        try:
            row = bench_shape(m, n, k, key, args, ours_na=ours_na, num_sms=num_sms, peak=peak,
                              torch_gemm=torch_gemm)
        except Exception as e:  # keep going: the row records what broke
            row = {"m": m, "n": n, "k": k, "diff": None, "deepgemm_h800_tflops": None,
                   "results": {name: error_cell(e) for name in IMPLS}}
        row.pop("peak", None)
        rows.append(row)
        print(f"[{i + 1}/{len(shapes)}] per call: " + " ".join(_table_row(row)[4:9]) +
              " | device-bound (ours, kernel, span first): " +
              " ".join(_table_row(row, "device_")[4:11]) +
              f" | diff {'-' if row['diff'] is None else format(row['diff'], '.1e')}", flush=True)
        # after every shape, so a run cut short by a time limit still leaves what it measured
        write_json(args.out, "gemm", env, {**meta, "complete": False, "rows": rows}, tag)
    title = f"FP8 GEMM (NT, 1x128 x 128x128 scales) on {env['device']}, TFLOP/s"
    print_table(f"{title}, per call (dispatch included)", COLUMNS,
                [_table_row(r) for r in rows])
    print_table(f"{title}, device-bound (one jit launch or CUDA graph of many calls)",
                COLUMNS[:5] + ("ours kernel", "ours span") + COLUMNS[5:10] + ("span/torch",)
                + COLUMNS[10:],
                [_table_row(r, "device_") for r in rows],
                _notes(rows, args, floor, ours_desc, peak, torch_gemm))
    path = write_json(args.out, "gemm", env, {**meta, "complete": True, "rows": rows}, tag)
    print(f"wrote {path}")
    labels = [f"{r['m']}x{r['n']}x{r['k']}" for r in rows]
    series = {name: [r["results"].get(name, {}).get("device_tflops") for r in rows]
              for name in IMPLS}
    series = {name: v for name, v in series.items() if any(x is not None for x in v)}
    plot = bar_plot(pathlib.Path(path).with_suffix(".png"),
                    f"FP8 GEMM on {env['device']} (device-bound)", labels, series, "TFLOP/s")
    if plot:
        print(f"wrote {plot}")
    failed = [r for r in rows if r["diff"] is not None and not r["diff"] <= DIFF_LIMIT]
    return 1 if failed else 0
