"""Train the tiny DeepSeek MoE with DualPipe: one jitted SPMD program over a pipe x expert mesh.

Each DeepSeek block (MLA + DeepSeekMoE) is a pipeline stage. DualPipe puts stages r and P-1-r on
pipe rank r and feeds half the micro-batches from each end; the embedding runs before the
pipeline (its gradient comes back as the pipeline's input gradient) and the final norm + output
head is the pipeline's loss (its gradient comes back as the loss-parameter gradient). Before
training it prints the schedule as a timeline and the simulated bubble table of 1F1B, ZB1P,
DualPipe and DualPipeV at the same number of stages (DeepSeek's README table).

    python examples/dualpipe.py                          # 8 CPU devices: pipe=4 x expert=2
    python examples/dualpipe.py --schedule dualpipev --pipe 2 --steps 60
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from jax_ds import cli, data
from jax_ds.models import DeepSeekConfig, PipelineStages, Transformer
from jax_ds.parallel.mesh import EXPERT, make_mesh, request_cpu_devices
from jax_ds.parallel.pipeline import (Costs, execute, make_schedule, readme_bubble,
                                      simulate, timeline)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedule", default="dualpipe",
                   choices=("1f1b", "zb1p", "dualpipe", "dualpipev"))
    p.add_argument("--pipe", type=cli.at_least(1), default=4, help="pipeline ranks")
    p.add_argument("--expert", type=cli.at_least(1), default=2,
                   help="expert-axis size (splits micro-batches)")
    p.add_argument("--devices", type=cli.at_least(1), default=8,
                   help="virtual CPU devices (CPU only)")
    p.add_argument("--microbatches", type=cli.at_least(1), default=8)
    p.add_argument("--microbatch-size", type=cli.at_least(1), default=2,
                   help="sequences per micro-batch")
    p.add_argument("--seq-len", type=cli.at_least(1), default=64)
    p.add_argument("--steps", type=cli.at_least(0), default=40)
    p.add_argument("--lr", type=cli.positive_float, default=3e-3)
    p.add_argument("--ep", action="store_true",
                   help="split each stage's routed experts over the expert axis (all-to-all "
                        "dispatch inside the stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/dualpipe_timeline.png", help="timeline picture path")
    return p.parse_args()


args = parse_args()
request_cpu_devices(args.devices)  # CPU hosts: virtual devices (before any device use)

console = Console()
COSTS = Costs(F=1.0, B=2.0, W=1.0, FB=2.5)  # a forward = an input-gradient backward; F&B overlap


def bubble_table(num_stages: int, m: int) -> Table:
    """DeepSeek's README comparison at equal stages, simulated with COSTS."""
    table = Table(title=f"simulated: {num_stages} stages, {m} micro-batches, F={COSTS.F:g} "
                        f"B={COSTS.B:g} W={COSTS.W:g} F&B={COSTS.FB:g}",
                  caption="bubble: largest idle time of a rank; README: DeepSeek's formula; "
                          "idle: share of all ranks' time; act/dev: peak live chunks")
    for col in ("schedule", "devices", "bubble", "README", "idle", "act/dev", "param/dev"):
        table.add_column(col, justify="right")
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        ranks = num_stages // 2 if name == "dualpipev" else num_stages
        try:
            sim = simulate(make_schedule(name, ranks, m), COSTS)
        except ValueError:  # not defined at these sizes (DualPipe: m >= 2 x ranks, ranks even)
            table.add_row(name, str(ranks), *["-"] * 5)
            continue
        table.add_row(name, str(ranks), f"{max(sim.bubble):g}",
                      f"{readme_bubble(name, num_stages, COSTS):g}",
                      f"{sim.bubble_fraction:.1%}", str(max(sim.peak_activations)),
                      f"{max(sim.param_copies)}x")
    return table


def save_timeline(schedule, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        console.print("no picture: matplotlib is not installed")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = simulate(schedule, COSTS)
    colors = {"F": "#8ecae6", "B": "#ffb703", "W": "#90be6d", "BW": "#fb8500", "FB": "#c77dff"}
    fig, ax = plt.subplots(figsize=(max(8, sim.makespan * 0.45), 0.6 * schedule.num_ranks + 1))
    for r, ops in enumerate(schedule.ops):
        for op, t0, t1 in zip(ops, sim.start[r], sim.end[r]):
            ax.barh(r, t1 - t0, left=t0, color=colors[op.kind], edgecolor="k", lw=0.5)
            ax.text((t0 + t1) / 2, r, schedule.label(op), ha="center", va="center", fontsize=6)
    ax.set(yticks=range(schedule.num_ranks), yticklabels=[f"rank {r}" for r in
                                                          range(schedule.num_ranks)],
           xlabel="simulated time (F = 1)",
           title=f"{schedule.name}, {schedule.num_microbatches} micro-batches ( ' : reverse "
                 f"direction / way back)\nF blue, B (input grad) yellow, W (weight grad) green, "
                 f"full backward orange, F&B pair purple")
    ax.invert_yaxis()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return True


def main():
    if args.microbatch_size % args.expert:
        raise SystemExit(f"--microbatch-size {args.microbatch_size} must be a multiple of "
                         f"--expert {args.expert} (each micro-batch is split over that axis)")
    schedule = make_schedule(args.schedule, args.pipe, args.microbatches)
    # pipe x expert of the devices (8 virtual CPU devices serve --pipe 2 too).
    mesh = make_mesh(pipe=args.pipe, expert=args.expert,
                     devices=jax.devices()[:args.pipe * args.expert])
    stages, m = schedule.num_stages, args.microbatches
    console.print(f"[bold]{schedule.name}[/]: {stages} stages on {args.pipe} pipe ranks x "
                  f"{args.expert} expert, {m} micro-batches of {args.microbatch_size} x "
                  f"{args.seq_len} tokens")
    print(timeline(schedule))  # plain print: rich would wrap the long rows
    console.print(bubble_table(stages, m))
    if save_timeline(schedule, args.plot):
        console.print(f"timeline picture: {args.plot}")

    # Every layer an MoE block (stages must share one structure to stack).
    cfg = DeepSeekConfig.tiny(num_layers=stages, num_dense_layers=0)
    model = Transformer(cfg, rngs=nnx.Rngs(args.seed), mesh=mesh if args.ep else None)
    parts = PipelineStages(model)
    params = {"embed": model.embed[...], "blocks": parts.blocks, "head": parts.head}

    # Router biases get zero gradients (they move by the load rule, which needs per-expert
    # counts the pipeline does not return yet): Adam leaves them where they are.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr, b1=0.9, b2=0.95))
    opt_state = tx.init(params)
    split = NamedSharding(mesh, P(None, EXPERT))  # micro-batch rows over the expert axis

    @jax.jit
    def train_step(params, opt_state, tokens_MBS):
        inputs, targets = tokens_MBS[..., :-1], tokens_MBS[..., 1:]
        x, embed_vjp = jax.vjp(lambda e: e[inputs].astype(cfg.activation_dtype), params["embed"])
        out = execute(schedule, parts.stage, params["blocks"], (x, targets), parts.loss, mesh,
                      loss_params=params["head"], input_grads=True)
        (d_embed,) = embed_vjp(out.input_grads)
        grads = {"embed": d_embed, "blocks": out.grads, "head": out.loss_grads}
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out.loss

    train, _ = data.split_corpus(data.load_corpus())
    batches = data.batches(train, m * args.microbatch_size, args.seq_len, seed=args.seed)
    losses, start = [], time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("compiling", total=args.steps, loss="-")
        for _ in range(args.steps):
            tokens = next(batches).reshape(m, args.microbatch_size, args.seq_len + 1)
            params, opt_state, loss = train_step(params, opt_state, jax.device_put(tokens, split))
            losses.append(float(loss))
            progress.update(task, advance=1, description="training", loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    console.print(f"loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-3:]):.3f} (mean of first / "
                  f"last 3 steps) in {args.steps} {schedule.name} steps, {seconds:.0f}s incl. "
                  f"compile")


if __name__ == "__main__":
    cli.run(main)
