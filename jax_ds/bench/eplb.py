"""EPLB plan time at DeepSeek-V3 scale: ours under jit vs the plain-loop reference (and torch).

58 MoE layers x 256 experts in 8 groups, random lognormal loads (float32), for each placement of
`CONFIGS` (four hierarchical, one global):
  ours first   `rebalance_experts`' first call for the shape: tracing + compilation + one run
  ours         steady state, per call (median), loads rotating over 4 sets, results awaited
  numpy loops  `rebalance_experts_reference`, the same greedy as plain Python loops
  deepseek     DeepSeek's `eplb.rebalance_experts` (torch, eager), when `--reference
               path/to/eplb.py` is given: run by `--reference-python` (an interpreter with torch;
               torch's and this jax's wheels may need different Pythons) on the same loads, in
               the same run. The file is DeepSeek's (github.com/deepseek-ai/EPLB), not shipped.
Also whether the plans agree, all three outputs (log2phy padded to our static width): ours vs
numpy loops, and ours vs DeepSeek, whose sort's tie order (which replica rank of an expert goes
to which slot) ours follows (`jax_ds.parallel.eplb`). And the plan's balance: max / mean GPU
load, averaged over layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import cli
from jax_ds.bench import _timing, environment, print_table, write_json
from jax_ds.parallel.eplb import gpu_loads, rebalance_experts, rebalance_experts_reference

LAYERS, EXPERTS, GROUPS = 58, 256, 8
CONFIGS = (  # (replicas, nodes, gpus)
    (288, 4, 32),
    (288, 8, 32),
    (320, 4, 32),
    (320, 8, 64),
    (320, 16, 64),  # 8 groups on 16 nodes: the global policy, 320 replicas onto 64 GPUs
)
COLUMNS = ("slots", "nodes", "GPUs", "policy", "ours first ms", "ours ms", "numpy loops ms",
           "deepseek ms", "x vs deepseek", "same plan", "max/mean load")


def add_arguments(parser):
    parser.add_argument("--reference", default=None,
                        help="path to DeepSeek's eplb.py: adds its column (needs torch)")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="Python interpreter with torch that runs --reference")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--budget", type=cli.positive_float, default=0.5,
                        help="seconds per measurement")
    parser.add_argument("--repeats", type=cli.at_least(1), default=7)
    parser.add_argument("--seed", type=int, default=0)


# Runs in the --reference-python interpreter: times DeepSeek's planner on the saved loads.
_REFERENCE_SCRIPT = """
import importlib.util, json, statistics, sys, time
import numpy as np, torch
path, folder, configs, repeats, groups = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
eplb = importlib.util.module_from_spec(spec); spec.loader.exec_module(eplb)
loads = [torch.from_numpy(w) for w in np.load(folder + "/loads.npy")]
out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
for i, (r, n, g) in enumerate(json.loads(configs)):
    args = (r, int(groups), n, g)
    plan = eplb.rebalance_experts(loads[0], *args)  # also the warm-up
    for name, x in zip(("phy2log", "log2phy", "logcnt"), plan):
        np.save(f"{folder}/{name}{i}.npy", x.numpy())
    times = []
    for k in range(int(repeats)):
        t0 = time.perf_counter(); eplb.rebalance_experts(loads[k % len(loads)], *args)
        times.append(time.perf_counter() - t0)
    out["rows"].append({"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3})
print(json.dumps(out))
"""


def run_reference(args, loads):
    """DeepSeek's planner in a subprocess: ({config: (median ms, (phy2log, log2phy, logcnt))},
    status)."""
    if not args.reference:
        return {}, "not requested (--reference path/to/eplb.py [--reference-python PY])"
    with tempfile.TemporaryDirectory() as folder:
        np.save(f"{folder}/loads.npy", np.stack(loads))
        cmd = [args.reference_python, "-c", _REFERENCE_SCRIPT, args.reference, folder,
               json.dumps(CONFIGS), str(max(5, args.repeats)), str(GROUPS)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            return {}, f"unavailable: {done.stderr.strip().splitlines()[-1:]}"
        report = json.loads(done.stdout.strip().splitlines()[-1])
        rows = {config: (row["median_ms"], tuple(np.load(f"{folder}/{name}{i}.npy")
                                                 for name in ("phy2log", "log2phy", "logcnt")))
                for i, (config, row) in enumerate(zip(CONFIGS, report["rows"]))}
    return rows, (f"{args.reference} (torch {report['torch']}, {report['threads']} threads, "
                  f"{args.reference_python})")


def bench_config(config, loads, reference, args):
    replicas, nodes, gpus = config
    plan_args = (replicas, GROUPS, nodes, gpus)
    t0 = time.perf_counter()
    ours = jax.block_until_ready(rebalance_experts(jnp.asarray(loads[0]), *plan_args))
    first_ms = (time.perf_counter() - t0) * 1e3
    timing = _timing.time_jax(lambda w: rebalance_experts(w, *plan_args),
                              [(jnp.asarray(w),) for w in loads], budget_s=args.budget,
                              repeats=args.repeats)
    t0 = time.perf_counter()
    loops = rebalance_experts_reference(loads[0], *plan_args)
    loops_ms = (time.perf_counter() - t0) * 1e3
    gpu = np.asarray(gpu_loads(loads[0], ours, gpus))
    row = {"replicas": replicas, "nodes": nodes, "gpus": gpus,
           "policy": "hierarchical" if GROUPS % nodes == 0 else "global",
           "ours_first_ms": first_ms, "ours_ms": timing.median_s * 1e3,
           "ours_min_ms": timing.min_s * 1e3, "numpy_loops_ms": loops_ms,
           "same_as_numpy_loops": all(np.array_equal(a, b) for a, b in zip(ours, loops)),
           "deepseek_ms": None, "same_as_deepseek": None,
           "max_over_mean_gpu_load": float(np.mean(gpu.max(-1) / gpu.mean(-1)))}
    if config in reference:
        ms, (phy2log, log2phy, logcnt) = reference[config]
        width = ours.log2phy.shape[-1]
        padded = np.full((*log2phy.shape[:2], max(width, log2phy.shape[-1])), -1, np.int64)
        padded[..., :log2phy.shape[-1]] = log2phy
        row["deepseek_ms"] = ms
        row["same_as_deepseek"] = bool(np.array_equal(ours.phy2log, phy2log) and
                                       np.array_equal(ours.logcnt, logcnt) and
                                       np.array_equal(ours.log2phy, padded))
    return row


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def run(args):
    env = environment()
    rng = np.random.default_rng(args.seed)
    loads = [rng.lognormal(0.0, 1.0, (LAYERS, EXPERTS)).astype(np.float32) * 1000
             for _ in range(4)]
    reference, ref_status = run_reference(args, loads)  # first: the machine is otherwise idle
    print(f"device: {env['device']} ({env['platform']}); deepseek reference: {ref_status}")
    rows = []
    for i, config in enumerate(CONFIGS):
        rows.append(bench_config(config, loads, reference, args))
        print(f"[{i + 1}/{len(CONFIGS)}] {config}: ours {rows[-1]['ours_ms']:.3f} ms", flush=True)
    table = []
    for r in rows:
        speedup = r["deepseek_ms"] / r["ours_ms"] if r["deepseek_ms"] else None
        same = "yes" if r["same_as_numpy_loops"] else "NO"
        if r["same_as_deepseek"] is not None:
            same += " / " + ("yes" if r["same_as_deepseek"] else "NO")
        table.append([str(r["replicas"]), str(r["nodes"]), str(r["gpus"]), r["policy"],
                      _fmt(r["ours_first_ms"], ".0f"), _fmt(r["ours_ms"], ".3f"),
                      _fmt(r["numpy_loops_ms"], ".0f"), _fmt(r["deepseek_ms"], ".1f"),
                      _fmt(speedup, ".0f"), same, _fmt(r["max_over_mean_gpu_load"], ".3f")])
    print_table(f"EPLB plan, {LAYERS} layers x {EXPERTS} experts, {GROUPS} groups, on "
                f"{env['device']}", COLUMNS, table,
                ["ours: jitted, steady state per call (median), loads rotating over 4 sets",
                 "same plan: ours vs numpy loops / vs deepseek (all three outputs)"])
    path = write_json(args.out, "eplb", env, {
        "shape": {"layers": LAYERS, "experts": EXPERTS, "groups": GROUPS},
        "loads": "lognormal(0, 1) * 1000, float32", "deepseek_reference": ref_status,
        "cpu_count": os.cpu_count(), "load_average_1_5_15_min": os.getloadavg(), "rows": rows})
    print(f"wrote {path}")
    return 0
