"""EPLB plan time at DeepSeek-V3 scale: ours under jit vs the plain-loop reference (and torch).

58 MoE layers x 256 experts in 8 groups, random lognormal loads (float32), for each placement of
`CONFIGS` (four hierarchical, one global):
  ours first   `rebalance_experts`' first call for the shape: tracing + compilation + one run
  ours         steady state, per call (median), loads rotating over 4 sets, results awaited
  numpy loops  `rebalance_experts_reference`, the same greedy as plain Python loops
  deepseek     DeepSeek's `eplb.rebalance_experts` (torch), when `--reference path/to/eplb.py`
               is given and torch imports; the file is theirs, not shipped here
Also whether the plans agree (ours vs numpy loops exactly; vs DeepSeek phy2log and logcnt, the
outputs its unstable sort cannot change, see `jax_ds.parallel.eplb`), and the plan's balance:
max / mean GPU load, averaged over layers.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

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
                        help="path to DeepSeek's eplb.py (needs torch) for its column")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)


def _load_reference(path):
    if not path:
        return None, "not requested (--reference path/to/eplb.py)"
    try:
        spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import torch

        return module, f"{path} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    except Exception as e:  # a missing file or torch: report it in the table, keep going
        return None, f"unavailable: {type(e).__name__}: {e}"


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
    same = all(np.array_equal(a, b) for a, b in zip(ours, loops))
    row = {"replicas": replicas, "nodes": nodes, "gpus": gpus,
           "policy": "hierarchical" if GROUPS % nodes == 0 else "global",
           "ours_first_ms": first_ms, "ours_ms": timing.median_s * 1e3,
           "ours_min_ms": timing.min_s * 1e3, "numpy_loops_ms": loops_ms,
           "same_as_numpy_loops": same, "deepseek_ms": None, "same_as_deepseek": None,
           "max_over_mean_gpu_load": float(np.mean(
               np.max(gpu_loads(loads[0], ours, gpus), -1) /
               np.mean(gpu_loads(loads[0], ours, gpus), -1)))}
    if reference is not None:
        import torch

        w = torch.from_numpy(loads[0])
        ref = reference.rebalance_experts(w, *plan_args)
        row["deepseek_ms"] = _median_ms(lambda: reference.rebalance_experts(w, *plan_args),
                                        max(3, args.repeats // 2))
        row["same_as_deepseek"] = bool(np.array_equal(ours.phy2log, ref[0].numpy()) and
                                       np.array_equal(ours.logcnt, ref[2].numpy()))
    return row


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def run(args):
    env = environment()
    reference, ref_status = _load_reference(args.reference)
    rng = np.random.default_rng(args.seed)
    loads = [rng.lognormal(0.0, 1.0, (LAYERS, EXPERTS)).astype(np.float32) * 1000
             for _ in range(4)]
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
                 "same plan: ours vs numpy loops (all outputs) / vs deepseek (phy2log, logcnt)"])
    path = write_json(args.out, "eplb", env, {
        "shape": {"layers": LAYERS, "experts": EXPERTS, "groups": GROUPS},
        "loads": "lognormal(0, 1) * 1000, float32", "deepseek_reference": ref_status,
        "rows": rows})
    print(f"wrote {path}")
    return 0
