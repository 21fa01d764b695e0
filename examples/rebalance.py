"""Balance expert-parallel GPU loads with EPLB: redundant experts for skewed routing.

First DeepSeek's README example (its published phy2log, reproduced exactly), then DeepSeek-V3's
shape: 58 MoE layers x 256 experts on 32 GPUs. Routing is synthetic and skewed (expert popularity
~ 1 / rank^skew, different per layer, drifting a little each step); the per-expert counts are
averaged over steps (`update_expert_load`), EPLB plans 288 slots from the average, and the plan is
judged on a fresh step of routing. Prints the max / mean GPU load before (one expert per slot,
expert e on GPU e // 8) and after; saves a bar plot of one layer's GPU loads.

    python examples/rebalance.py
    python examples/rebalance.py --skew 1.4 --replicas 320 --nodes 8 --gpus 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import Progress

from jax_ds import cli
from jax_ds.parallel.eplb import gpu_loads, rebalance_experts
from jax_ds.parallel.load_stats import init_expert_load, update_expert_load

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=cli.at_least(1), default=58, help="MoE layers")
    p.add_argument("--experts", type=cli.at_least(1), default=256, help="logical experts per layer")
    p.add_argument("--replicas", type=cli.at_least(1), default=288,
                   help="physical expert slots per layer")
    p.add_argument("--groups", type=cli.at_least(1), default=8,
                   help="expert groups (group-limited routing)")
    p.add_argument("--nodes", type=cli.at_least(1), default=4, help="server nodes")
    p.add_argument("--gpus", type=cli.at_least(1), default=32, help="GPUs in all")
    p.add_argument("--top-k", type=cli.at_least(1), default=8, help="experts per token")
    p.add_argument("--tokens", type=cli.at_least(1), default=16384, help="tokens per step")
    p.add_argument("--steps", type=cli.at_least(1), default=50, help="steps of routing statistics")
    p.add_argument("--skew", type=float, default=1.0, help="popularity ~ 1 / rank^skew")
    p.add_argument("--decay", type=float, default=0.9, help="moving-average decay")
    p.add_argument("--layer", type=cli.at_least(0), default=0, help="layer shown in the plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="out/rebalance_gpu_load.png", help="bar plot PNG path")
    return p.parse_args()


def readme_example(console):
    plan = rebalance_experts(jnp.array(README_WEIGHT), 16, 4, 2, 8)
    console.print("DeepSeek EPLB README example (2 layers x 12 experts -> 16 slots, 4 groups, "
                  "2 nodes, 8 GPUs); phy2log:")
    console.print(np.asarray(plan.phy2log))
    same = np.array_equal(plan.phy2log, README_PHY2LOG)
    console.print(f"identical to the published output: {same}\n")
    return same


def popularity(rng, layers, experts, skew):
    """[L, E] routing probabilities: Zipf-like, a different expert order in every layer."""
    base = 1.0 / np.arange(1, experts + 1) ** skew
    p = np.stack([rng.permutation(base) for _ in range(layers)])
    return p / p.sum(-1, keepdims=True)


def route(rng, p_LE, tokens, top_k):
    """One step's assignments per expert: tokens x top_k draws, popularity drifting by ~10%."""
    p = p_LE * rng.lognormal(0.0, 0.1, p_LE.shape)
    p /= p.sum(-1, keepdims=True)
    return np.stack([rng.multinomial(tokens * top_k, row) for row in p])


def imbalance(loads_LG):
    """max / mean GPU load per layer."""
    loads_LG = np.asarray(loads_LG)
    return loads_LG.max(-1) / loads_LG.mean(-1)


def plot(path, before, after, layer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(gpus)), 4))
    ax.bar(gpus - 0.2, before, 0.4, label=f"before: max/mean {before.max() / before.mean():.2f}")
    ax.bar(gpus + 0.2, after, 0.4, label=f"after EPLB: max/mean {after.max() / after.mean():.2f}")
    ax.axhline(before.mean(), color="k", lw=0.8, ls="--", label="mean")
    ax.set_xlabel("GPU")
    ax.set_ylabel("token assignments in one step")
    ax.set_title(f"Layer {layer}: per-GPU expert load before and after rebalancing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    console = Console()
    ok = readme_example(console)

    rng = np.random.default_rng(args.seed)
    p_LE = popularity(rng, args.layers, args.experts, args.skew)
    load = init_expert_load(args.layers, args.experts)
    update = jax.jit(update_expert_load, static_argnames="decay")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("routing statistics", total=args.steps)
        for _ in range(args.steps):
            load = update(load, route(rng, p_LE, args.tokens, args.top_k), decay=args.decay)
            progress.advance(task)

    plan_args = (args.replicas, args.groups, args.nodes, args.gpus)
    t0 = time.perf_counter()
    plan = jax.block_until_ready(rebalance_experts(load.average, *plan_args))
    first_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    plan = jax.block_until_ready(rebalance_experts(load.average, *plan_args))
    plan_ms = (time.perf_counter() - t0) * 1e3

    fresh = route(rng, p_LE, args.tokens, args.top_k)  # judged on routing it has not seen
    # Without EPLB: one slot per expert, expert e on GPU e // (E / G).
    static = (np.tile(np.arange(args.experts), (args.layers, 1)), None,
              np.ones((args.layers, args.experts), np.int32))
    before = np.asarray(gpu_loads(fresh, static, args.gpus))
    after = np.asarray(gpu_loads(fresh, plan, args.gpus))
    plot(args.plot, before[args.layer], after[args.layer], args.layer)

    console.print(f"{args.layers} layers x {args.experts} experts -> {args.replicas} slots, "
                  f"{args.groups} groups, {args.nodes} nodes, {args.gpus} GPUs; plan in "
                  f"{plan_ms:.2f} ms ({first_ms:.0f} ms with compilation)")
    b, a = imbalance(before), imbalance(after)
    console.print(f"max/mean GPU load, mean over layers: before {b.mean():.3f}  after "
                  f"{a.mean():.3f}  (worst layer: {b.max():.3f} -> {a.max():.3f})")
    console.print(f"plot: {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    cli.run(main)
