"""`python -m jax_ds.bench pipeline`: step time of the pipeline schedules, and the measured
bubble against the simulator's.

For each schedule (1F1B, ZB1P, DualPipe, DualPipeV) and each pipe size in --pipe that the host has
devices for, one training step of a stack of DeepSeek blocks is run on a `pipe` mesh: MLA plus
DeepSeekMoE, every layer an MoE block, one stage a block. The step is loss and gradients,
through `jax_ds.parallel.pipeline.execute`. Two models: --model tiny (DeepSeekConfig.tiny) or mid
(d_model 1024, 16 experts of 512, bf16).

Per-op costs are measured on one device with one micro-batch. Each is timed device-bound, and
each backward's time has the timed forward taken off it (a `jax.vjp` call recomputes the
forward, but the executor reuses the forward's residuals):
  F    the forward of a stage;
  B    its full backward (input and weight gradients);
  W    the weight-gradient part: B minus the backward with respect to the input alone.
The fused F&B pair counts as F + B (no overlap credit).

With those costs the benchmark predicts the step two ways:
  simulated  `simulate(schedule, costs)`: event-driven makespan; each rank runs as soon as its
             inputs are there.
  lockstep   the executor's clock (`Tables.lockstep_makespan`): SPMD ranks advance tick by
             tick, so a tick lasts as long as its slowest rank's op. The predicted step is the
             sum over ticks of the largest op cost.

The measured bubble is 1 - mean(busy) / step, where busy is a rank's summed op costs. It is
compared with `SimResult.bubble_fraction`, the same quantity for the simulated makespan. Leave
NVLink multicast off on shared machines: NCCL_NVLS_ENABLE=0 is set unless the environment
already sets it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ds import cli
from jax_ds.bench import _timing, environment, error_cell, print_table, write_json
from jax_ds.models import DeepSeekConfig, PipelineStages, Transformer
from jax_ds.parallel.mesh import make_mesh
from jax_ds.parallel.pipeline import Costs, compile_tables, execute, make_schedule, simulate

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def add_arguments(parser):
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--pipe", type=cli.at_least(1), nargs="+", default=[4, 8],
                        help="pipe sizes (those the host has devices for are run)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES),
                        choices=SCHEDULE_NAMES)
    parser.add_argument("--model", choices=("tiny", "mid"), default="tiny")
    parser.add_argument("--microbatches", type=cli.at_least(1), default=16)
    parser.add_argument("--microbatch-size", type=cli.at_least(1), default=4, help="sequences")
    parser.add_argument("--seq-len", type=cli.at_least(1), default=256)
    parser.add_argument("--budget", type=cli.positive_float, default=0.5,
                        help="seconds per measurement")
    parser.add_argument("--repeats", type=cli.at_least(1), default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a CPU smoke test: pipe 2, 4 micro-batches of 2 x 16 tokens")


def model_config(name: str, num_layers: int) -> DeepSeekConfig:
    if name == "tiny":
        return DeepSeekConfig.tiny(num_layers=num_layers, num_dense_layers=0)
    return DeepSeekConfig.tiny(
        num_layers=num_layers, num_dense_layers=0, d_model=1024, num_heads=8, q_lora_rank=512,
        kv_lora_rank=256, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64, num_experts=16,
        expert_hidden=512, top_k=4, num_groups=4, topk_groups=2, dtype="bfloat16")


def op_costs(parts: PipelineStages, x_sets, args) -> dict:
    """Seconds of F, B (full backward) and W on one device for one micro-batch (see the module
    docstring for how each is taken)."""
    p0 = jax.tree.map(lambda a: a[0], parts.blocks)
    dy = jnp.ones_like(x_sets[0][0])

    def timed(fn):
        sets = [(p0, x, dy) for (x,) in x_sets]
        return _timing.time_jax_launch(jax.jit(fn), sets, budget_s=args.budget,
                                       repeats=args.repeats).median_s

    f = timed(lambda p, x, dy: parts.stage(p, x))
    full = timed(lambda p, x, dy: jax.vjp(parts.stage, p, x)[1](dy))
    dx_only = timed(lambda p, x, dy: jax.vjp(lambda x: parts.stage(p, x), x)[1](dy))
    b = max(full - f, 1e-9)
    w = min(max(full - dx_only, 0.0), b)
    return {"F": f, "B": b, "W": w}


def bench_schedule(name: str, pipe: int, args) -> dict:
    schedule = make_schedule(name, pipe, args.microbatches)
    cfg = model_config(args.model, schedule.num_stages)
    parts = PipelineStages(Transformer(cfg, rngs=nnx.Rngs(args.seed)))
    mesh = make_mesh(pipe=pipe, devices=jax.devices()[:pipe])
    m, b, t = args.microbatches, args.microbatch_size, args.seq_len
    dtype = cfg.activation_dtype
    sets, mb_sets = [], []
    for i in range(2):
        kx, kt = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), i))
        x = jax.random.normal(kx, (m, b, t, cfg.d_model), dtype)
        targets = jax.random.randint(kt, (m, b, t), 0, cfg.vocab_size, jnp.int32)
        sets.append((parts.blocks, parts.head, x, targets))
        mb_sets.append((x[0],))

    def step(params, head, x, targets):
        out = execute(schedule, parts.stage, params, (x, targets), parts.loss, mesh,
                      loss_params=head)
        return out.loss, out.grads, out.loss_grads

    row = {"schedule": name, "pipe": pipe, "stages": schedule.num_stages, "microbatches": m}
    try:
        measured = _timing.time_jax_launch(jax.jit(step), sets, budget_s=args.budget,
                                           repeats=args.repeats, max_reps=1).median_s
        c = op_costs(parts, mb_sets, args)
        costs = Costs(F=c["F"], B=c["B"], W=c["W"])
        sim = simulate(schedule, costs)
        lock = compile_tables(schedule).lockstep_makespan(costs)
        busy = float(np.mean(sim.busy))
        row.update({
            "step_ms": measured * 1e3, "costs_ms": {k: v * 1e3 for k, v in c.items()},
            "simulated_ms": sim.makespan * 1e3, "lockstep_ms": lock * 1e3,
            "busy_mean_ms": busy * 1e3,
            "bubble_measured": 1 - busy / measured, "bubble_simulated": sim.bubble_fraction,
            "bubble_lockstep": 1 - busy / lock, "peak_activations": max(sim.peak_activations)})
    except Exception as e:
        row.update(error_cell(e))
    return row


COLUMNS = ("pipe", "schedule", "stages", "step ms", "simulated ms", "lockstep ms",
           "bubble measured", "bubble simulated", "bubble lockstep", "F/B/W ms")


def run(args):
    if args.tiny:
        args.pipe, args.microbatches, args.microbatch_size, args.seq_len = [2], 4, 2, 16
    env = environment()
    count = jax.device_count()
    sizes = [p for p in args.pipe if 2 <= p <= count]
    skipped = [p for p in args.pipe if p not in sizes]
    print(f"{count} {jax.devices()[0].platform} device(s) ({env['device']}); pipe sizes {sizes}"
          + (f"; not run: {skipped}" if skipped else ""), flush=True)
    rows, table = [], []
    for pipe in sizes:
        for name in args.schedules:
            if name == "dualpipe" and pipe % 2:
                continue
            r = bench_schedule(name, pipe, args)
            rows.append(r)
            if "error" in r:
                table.append([str(pipe), name, str(r["stages"]), r["error"][:60]] +
                             ["-"] * (len(COLUMNS) - 4))
            else:
                c = r["costs_ms"]
                table.append([str(pipe), name, str(r["stages"]), f"{r['step_ms']:.2f}",
                              f"{r['simulated_ms']:.2f}", f"{r['lockstep_ms']:.2f}",
                              f"{r['bubble_measured']:.1%}", f"{r['bubble_simulated']:.1%}",
                              f"{r['bubble_lockstep']:.1%}",
                              f"{c['F']:.2f}/{c['B']:.2f}/{c['W']:.2f}"])
            print(" ".join(table[-1]), flush=True)
    print_table(
        f"Pipeline step, {args.model} model, {args.microbatches} micro-batches of "
        f"{args.microbatch_size} x {args.seq_len} tokens, on {env['device']}", COLUMNS, table,
        ["bubble: 1 - mean busy / step (busy: a rank's summed op costs, measured on one device)",
         "simulated: event-driven makespan from those costs; lockstep: the SPMD executor's "
         "clock (sum over ticks of the slowest rank's op)"])
    path = write_json(args.out, "pipeline", env, {
        "model": args.model, "microbatch_size": args.microbatch_size, "seq_len": args.seq_len,
        "timing": {"kind": "device-bound (time_jax_launch)", "budget_s": args.budget,
                   "repeats": args.repeats},
        "not_run_pipe": skipped, "rows": rows})
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1
