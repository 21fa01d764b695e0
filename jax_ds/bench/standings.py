"""`python -m jax_ds.bench standings FILE...`: result files of `bench gemm`, `moe` and `mla` against
the acceptance bars of their issues. Needs no GPU: it reads the JSON the suites wrote.

Bars (the issues' wording; ratios of TFLOP/s, GB/s or time measured in the same run):
  gemm  ours >= 1.0x torch blockwise `_scaled_mm` on every shape; >= 1.5x the XLA dequant path
        where m >= 128; >= 80% of DeepGEMM's published H800 figure on its shapes.
  moe   contiguous: >= 1.0x torch's grouped GEMM and >= 20x XLA `ragged_dot`; contiguous and
        masked: >= 80% of DeepGEMM's H800 figure; routing: permute + FP8 cast >= 1.5x XLA's
        argsort + gather.
  mla   h_q = 16: >= 85% of the copy ceiling measured in that run (GB/s of cache read); h_q = 128:
        >= 500 TFLOP/s; every shape >= 5x the XLA reference.

"ours" is the device-bound figure where the file has one (`device_*`: many calls in one
executable, as torch's CUDA-graph time), else the per-call one; both sides of a ratio are the same
kind. The kernel's own profiler time, where recorded, is shown beside the DeepGEMM bar as
"kernel/DeepGEMM" (not a bar: the figure the issues' goal is quoted against).
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict

from jax_ds.bench import print_table


def add_arguments(parser):
    parser.add_argument("files", nargs="+", type=pathlib.Path,
                        help="result JSON of bench gemm, moe or mla (benchmarks/results/...)")


def _figure(result: dict, metric: str, device: bool):
    """TFLOP/s, GB/s or us of one implementation: the device-bound figure if asked and present."""
    if result is None:
        return None
    value = result.get(f"device_{metric}") if device else None
    return result.get(metric) if value is None else value


def _has_device(results: dict) -> bool:
    return all(r.get("device_us") is not None or r.get("device_tflops") is not None
               for r in results.values()
               if isinstance(r, dict) and "error" not in r and "na" not in r)


def _check(checks, name, label, value, bar):
    """Appends (bar name, shape label, value, threshold, passed); a missing value is recorded
    as not measured (None), never as a pass."""
    checks.append((name, label, value, bar, None if value is None else value >= bar))


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _deepgemm(checks, row, label, ours):
    """Ours and the kernel's profiler figure against DeepGEMM's H800 figure, where it has one."""
    published = row.get("deepgemm_h800_tflops")
    if not published:
        return
    _check(checks, "ours/DeepGEMM H800 >= 0.8", label, _ratio(ours, published), 0.8)
    kernel = (row["results"].get("ours") or {}).get("kernel_tflops")
    if kernel is not None:
        _check(checks, "kernel/DeepGEMM H800 (not a bar)", label, _ratio(kernel, published), 0.8)


def gemm_checks(data: dict) -> list:
    checks = []
    for row in data["rows"]:
        res, label = row["results"], f"{row['m']}x{row['n']}x{row['k']}"
        dev = _has_device(res)
        ours = _figure(res.get("ours"), "tflops", dev)
        _check(checks, "ours/torch blockwise >= 1.0", label,
               _ratio(ours, _figure(res.get("torch_blockwise"), "tflops", dev)), 1.0)
        if row["m"] >= 128:
            _check(checks, "ours/XLA dequant >= 1.5 (m >= 128)", label,
                   _ratio(ours, _figure(res.get("xla_dequant"), "tflops", dev)), 1.5)
        _deepgemm(checks, row, label, ours)
    return checks


def moe_checks(data: dict) -> list:
    checks = []
    for row in data.get("rows", []):
        res = row["results"]
        label = f"{row['kind']} {row['groups']}x{row['rows']} n{row['n']} k{row['k']}"
        ours = (res.get("ours") or {}).get("tflops")
        if row["kind"] == "contiguous":
            _check(checks, "contiguous ours/torch >= 1.0", label,
                   _ratio(ours, (res.get("torch") or {}).get("tflops")), 1.0)
            _check(checks, "contiguous ours/XLA ragged_dot >= 20", label,
                   _ratio(ours, (res.get("xla_ragged") or {}).get("tflops")), 20.0)
        _deepgemm(checks, row, label, ours)
    routing = data.get("routing")
    if routing:
        res = routing["results"]
        label = (f"{routing['tokens']} tokens x {routing['hidden']}, "
                 f"top-{routing['top_k']}/{routing['experts']}")
        ours, xla = res.get("permute+fp8 ours"), res.get("permute+fp8 xla_argsort")
        _check(checks, "permute+FP8 XLA time/ours >= 1.5", label,
               _ratio(xla and xla.get("us"), ours and ours.get("us")), 1.5)
    return checks


def mla_checks(data: dict) -> list:
    checks = []
    ceiling = data.get("copy_ceiling_gbps")
    for row in data["rows"]:
        res = row["results"]
        label = (f"b{row['b']} s{row['s_k']} h{row['h_q']} sq{row['s_q']} "
                 f"{'var' if row['varlen'] else 'fixed'}")
        ours = res.get("ours") or {}
        dev = ours.get("device_us") is not None
        if row["h_q"] == 16:
            _check(checks, "h16 GB/s / copy ceiling >= 0.85", label,
                   _ratio(_figure(ours, "gbps", dev), ceiling), 0.85)
        if row["h_q"] == 128:
            _check(checks, "h128 TFLOP/s >= 500", label, _figure(ours, "tflops", dev), 500.0)
        xla_us = (res.get("xla") or {}).get("us")  # the reference is timed per call only
        _check(checks, "XLA time/ours >= 5", label, _ratio(xla_us, ours.get("us")), 5.0)
    return checks


CHECKS = {"gemm": gemm_checks, "moe": moe_checks, "mla": mla_checks}


def standings(data: dict) -> list:
    """(bar, shape, value, threshold, passed) for one result file's rows; passed is None where
    the value was not measured (a failed or missing column)."""
    suite = data.get("suite") if isinstance(data, dict) else None
    if suite not in CHECKS:
        raise ValueError(f"standings: not a gemm, moe or mla result file (suite {suite!r})")
    return CHECKS[suite](data)


def summary(checks) -> dict:
    """bar -> (passed, measured, shapes short of the bar, shapes not measured)."""
    out = defaultdict(lambda: [0, 0, [], []])
    for name, label, _, _, ok in checks:
        entry = out[name]
        if ok is None:
            entry[3].append(label)
            continue
        entry[1] += 1
        entry[0] += ok
        if not ok:
            entry[2].append(label)
    return {k: tuple(v) for k, v in out.items()}


def _note(name, passed, measured, short, missing):
    note = f"{name}: {passed} of {measured}"
    if short:
        note += f"; short: {', '.join(short)}"
    if missing:  # a whole column left out (bench mla --no-xla) would list every shape
        note += (f"; not measured: {', '.join(missing)}" if len(missing) <= 4
                 else f"; not measured: {len(missing)} shapes")
    return note


def run(args) -> int:
    for path in args.files:  # a glob (gemm-*.json) also matches sweeps and A/B files: skipped
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"{path}: skipped ({type(err).__name__}: {err})")
            continue
        try:
            checks = standings(data)
        except ValueError as err:  # not a result file of a suite with bars
            print(f"{path.name}: skipped ({err})")
            continue
        if not checks:
            print(f"{path.name}: no row that a bar is about (suite {data['suite']}, "
                  f"keys {sorted(k for k in data if k.endswith('rows'))})")
            continue
        head = (f"{path.name}: {data.get('device', '?')}, {data.get('date', '?')[:10]}"
                + ("" if data.get("complete", True) else " (incomplete run)"))
        rows = [[name, label, "n/a" if value is None else f"{value:.3g}", f"{bar:g}",
                 {True: "yes", False: "NO", None: "not measured"}[ok]]
                for name, label, value, bar, ok in checks]
        notes = [_note(name, *counts) for name, counts in summary(checks).items()]
        print_table(head, ("bar", "shape", "value", "needs", "met"), rows, notes)
    return 0
