"""Train a tiny DeepSeek-V3-style MoE (MLA, routed + shared experts, aux-loss-free balancing).

Byte-level language modelling on the docstrings of Python's standard library (nothing to
download), expert-parallel over a data x expert mesh. On a CPU-only machine it makes 8 virtual
devices and uses mesh data=2 x expert=4; on GPUs the same command puts every GPU on `expert`.

    python examples/train_moe.py                       # tiny, 150 steps: ~1.5 min on 2 cores
    python examples/train_moe.py --steps 500 --mesh data=1,expert=8 --fp8
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from jax_ds import cli, data
from jax_ds.models import (DeepSeekConfig, Transformer, lm_loss, param_counts,
                           save_hf_checkpoint, train_step)
from jax_ds.parallel.mesh import mesh_from_spec, request_cpu_devices, shard_batch, shard_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=cli.at_least(0), default=150, help="optimizer steps")
    p.add_argument("--config", default="tiny", help="preset: tiny, v2_lite or v3")
    p.add_argument("--mesh", default="auto",
                   help="axis sizes, e.g. data=2,expert=4 (one may be -1); 'auto': CPU "
                        "data=2,expert=-1, GPU expert=<all GPUs>")
    p.add_argument("--devices", type=cli.at_least(1), default=8,
                   help="virtual CPU devices to create when running on CPU")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs (1x128 / 128x128 scaling)")
    p.add_argument("--batch", type=cli.at_least(1), default=16, help="sequences per step")
    p.add_argument("--seq-len", type=cli.at_least(1), default=128, help="tokens per sequence")
    p.add_argument("--lr", type=cli.positive_float, default=8e-3, help="peak learning rate")
    p.add_argument("--warmup", type=cli.at_least(0), default=15, help="linear warmup steps")
    p.add_argument("--mtp", type=cli.at_least(0), default=None, help="multi-token-prediction depth")
    p.add_argument("--capacity-factor", type=cli.positive_float, default=None,
                   help="EP exchange budget (default: lossless)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/train_moe_loss.png", help="loss-curve PNG path")
    p.add_argument("--save-hf", default=None, metavar="DIR",
                   help="save the trained model as a Hugging Face checkpoint "
                        "(then: examples/generate.py --checkpoint DIR)")
    return p.parse_args()


args = parse_args()
request_cpu_devices(args.devices)  # CPU hosts: virtual devices (before any device use)

console = Console()


def choose_mesh(spec: str):
    n = jax.device_count()
    if spec == "auto":
        spec = "expert=-1" if jax.default_backend() == "gpu" else "data=2,expert=-1"
        if n % 2 and jax.default_backend() != "gpu":
            spec = "expert=-1"
    return mesh_from_spec(spec)  # over the first devices it needs (expert=4 of 8, say)


def main():
    changes = {"fp8": args.fp8}
    if args.mtp is not None:
        changes["mtp_depth"] = args.mtp
    if args.capacity_factor is not None:
        changes["capacity_factor"] = args.capacity_factor
    cfg = DeepSeekConfig.preset(args.config, **changes)
    if cfg.vocab_size < data.VOCAB_SIZE:
        raise SystemExit(f"config {args.config} has vocab {cfg.vocab_size} < 256 bytes")
    mesh = choose_mesh(args.mesh)
    counts = param_counts(cfg)
    mtp = f" + {counts['mtp'] / 1e6:.2f}M MTP" if cfg.mtp_depth else ""
    console.print(f"[bold]{args.config}[/]: {counts['total'] / 1e6:.2f}M parameters{mtp} "
                  f"({counts['activated'] / 1e6:.2f}M activated), {cfg.num_experts} experts "
                  f"top-{cfg.top_k}, fp8={cfg.fp8}, mtp={cfg.mtp_depth} | mesh "
                  f"{dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")

    train, val = data.split_corpus(data.load_corpus())
    console.print(f"corpus: stdlib docstrings, {len(train) / 1e3:.0f} KB train, "
                  f"{len(val) / 1e3:.0f} KB validation (bytes)")
    batches = data.batches(train, args.batch, args.seq_len, seed=args.seed)

    model = Transformer(cfg, rngs=nnx.Rngs(args.seed), mesh=mesh)
    warmup = min(args.warmup, args.steps // 2)  # short runs still reach the peak rate
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1),
                                                  end_value=args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shard_model(model, mesh)
    shard_model(optimizer, mesh)  # optimizer moments follow their parameters' placement
    step_fn = nnx.jit(train_step)
    eval_fn = nnx.jit(lambda m, t: lm_loss(m, t)[1]["ce"])

    losses, tokens_per_step = [], args.batch * args.seq_len
    dropped = 0
    start = time.perf_counter()
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("compiling", total=args.steps, loss="-", tps="-")
        for step in range(args.steps):
            t0 = time.perf_counter()
            metrics = step_fn(model, optimizer, shard_batch(next(batches), mesh))
            loss = float(metrics["loss"])  # waits for the step: honest tokens/s
            dropped += int(metrics["dropped"])
            losses.append(loss)
            tps = tokens_per_step / (time.perf_counter() - t0)
            progress.update(task, advance=1, description="training", loss=f"{loss:.3f}",
                            tps="-" if step == 0 else f"{tps:,.0f}")
    train_time = time.perf_counter() - start

    val_batches = data.batches(val, args.batch, args.seq_len, seed=args.seed + 1)
    val_ce = float(np.mean([float(eval_fn(model, shard_batch(next(val_batches), mesh)))
                            for _ in range(4)]))
    bias = np.stack([np.asarray(moe.router.bias[...]) for moe in model.moe_layers()
                     if moe.router.bias is not None] or [np.zeros(1)])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    console.print(f"loss {first:.3f} -> {last:.3f} (mean of first/last 5 steps); validation "
                  f"{val_ce:.3f} nats/byte = {val_ce / np.log(2):.2f} bits/byte; "
                  f"{args.steps} steps in {train_time:.0f}s incl. compile; "
                  f"router bias range [{bias.min():+.3f}, {bias.max():+.3f}]; "
                  f"dropped assignments {dropped}")
    if save_plot(losses, val_ce, args.plot):
        console.print(f"loss curve: {args.plot}")
    if args.save_hf:
        save_hf_checkpoint(model, args.save_hf)
        console.print(f"Hugging Face checkpoint: {args.save_hf}")


def save_plot(losses, val_ce, path):
    try:
        import matplotlib
    except ImportError:
        console.print("no plot: matplotlib is not installed (pip install matplotlib)")
        return False

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="train loss (per step)")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"train loss ({window}-step mean)")
    ax.axhline(val_ce, color="k", ls="--", lw=1, label=f"validation CE {val_ce:.3f}")
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title=f"jax-ds: {args.config} DeepSeek MoE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    cli.run(main)
