"""Checkpoint a tiny DeepSeek MoE, kill the run, restore it on a different mesh, and continue.

Phase 1 (a child process) trains at mesh data=1 x expert=8, saving every --every steps
(asynchronously: training goes on while files are written), and is SIGKILLed at step --kill-at,
possibly mid-save. Phase 2 restores the latest committed step onto data=2 x expert=4, with the
optimizer state, the expert-load statistics and the data position, and trains to --steps. On
a 3FS mount (--dir /3fs/...) the same code moves shard bytes through USRBIO.

    python examples/checkpoint.py                      # ~20 s on 2 CPU cores
    python examples/checkpoint.py --dir /3fs/me/ckpt --steps 40 --every 10 --kill-at 27
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import optax
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from jax_ds import cli, data
from jax_ds.models import DeepSeekConfig, Transformer, train_step
from jax_ds.parallel.load_stats import init_expert_load, update_expert_load
from jax_ds.parallel.mesh import mesh_from_spec, request_cpu_devices, shard_batch, shard_model
from jax_ds.storage import CheckpointManager


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    p.add_argument("--steps", type=cli.at_least(0), default=20, help="total optimizer steps")
    p.add_argument("--every", type=cli.at_least(1), default=5, help="save every this many steps")
    p.add_argument("--kill-at", type=cli.at_least(1), default=13,
                   help="SIGKILL phase 1 at this step")
    p.add_argument("--train-mesh", default="data=1,expert=8", help="phase 1 mesh")
    p.add_argument("--resume-mesh", default="data=2,expert=4", help="phase 2 mesh")
    p.add_argument("--backend", default="auto", help="auto, orbax, posix or usrbio")
    p.add_argument("--batch", type=cli.at_least(1), default=8, help="sequences per step")
    p.add_argument("--seq-len", type=cli.at_least(1), default=64, help="tokens per sequence")
    p.add_argument("--devices", type=cli.at_least(1), default=8,
                   help="virtual CPU devices (CPU only)")
    p.add_argument("--phase", default="both", choices=["both", "train", "resume"],
                   help=argparse.SUPPRESS)
    return p.parse_args()


args = parse_args()
request_cpu_devices(args.devices)  # before the first device use

console = Console()
CFG = DeepSeekConfig.tiny()
TX = optax.adamw(3e-3, b1=0.9, b2=0.95)


def build(mesh, *, abstract: bool):
    """Model + optimizer on `mesh` (only shapes and shardings when abstract)."""
    def make():
        model = Transformer(CFG, rngs=nnx.Rngs(0), mesh=mesh)
        return model, nnx.Optimizer(model, TX, wrt=nnx.Param)
    if abstract:
        return nnx.eval_shape(make)
    model, optimizer = make()
    shard_model(model, mesh)
    shard_model(optimizer, mesh)
    return model, optimizer


def batches_from(position: int):
    """The data stream, advanced to `position` batches (the saved data position)."""
    train, _ = data.split_corpus(data.load_corpus())
    stream = data.batches(train, args.batch, args.seq_len, seed=0)
    for _ in range(position):
        next(stream)
    return stream


def train(model, optimizer, load, mesh, mngr, first: int, last: int, kill_at: int | None):
    stream, step_fn, losses = batches_from(first), nnx.jit(train_step), {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"mesh {dict(mesh.shape)}", total=last, completed=first,
                                 loss="-")
        for step in range(first, last):
            metrics = step_fn(model, optimizer, shard_batch(next(stream), mesh))
            load = update_expert_load(load, metrics["expert_counts"])
            losses[step + 1] = float(metrics["loss"])
            progress.update(task, advance=1, loss=f"{losses[step + 1]:.3f}")
            if kill_at is not None and step + 1 == kill_at:
                print(json.dumps({"losses": losses}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, maybe mid-save
            state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
                     "load": load}
            mngr.save(step + 1, state, meta={"data_position": step + 1})
    mngr.wait_until_finished()
    return losses


def phase_train(directory):
    mesh = mesh_from_spec(args.train_mesh)
    model, optimizer = build(mesh, abstract=False)
    load = init_expert_load(CFG.num_moe_layers + CFG.mtp_depth, CFG.num_experts)
    with CheckpointManager(directory, save_interval_steps=args.every, max_to_keep=2,
                           backend=args.backend) as mngr:
        train(model, optimizer, load, mesh, mngr, 0, args.steps, args.kill_at)


def phase_resume(directory):
    mesh = mesh_from_spec(args.resume_mesh)
    model, optimizer = build(mesh, abstract=True)
    load = jax.eval_shape(lambda: init_expert_load(CFG.num_moe_layers + CFG.mtp_depth,
                                                   CFG.num_experts))
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "load": load}
    with CheckpointManager(directory, save_interval_steps=args.every, max_to_keep=2,
                           backend=args.backend) as mngr:
        t0 = time.perf_counter()
        restored = mngr.restore(target=target, target_mesh=mesh)
        console.print(f"restored step {restored.step} ({mngr.backend} backend) onto mesh "
                      f"{dict(mesh.shape)} in {time.perf_counter() - t0:.2f}s; data position "
                      f"{restored.meta['data_position']}")
        nnx.update(model, restored.state["model"])
        nnx.update(optimizer, restored.state["optimizer"])
        first = restored.meta["data_position"]
        return first, train(model, optimizer, restored.state["load"], mesh, mngr, first,
                            args.steps, None)


def main():
    directory = args.dir or tempfile.mkdtemp(prefix="jax_ds_ckpt_")
    if args.phase == "train":
        return phase_train(directory)
    if args.phase == "resume":
        return phase_resume(directory)
    console.print(f"[bold]phase 1[/]: train at {args.train_mesh}, save every {args.every}, "
                  f"SIGKILL at step {args.kill_at} -> {directory}")
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--phase", "train",
           "--dir", directory]
    child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    before = json.loads(child.stdout.strip().splitlines()[-1])["losses"] if child.stdout else {}
    console.print(f"phase 1 ended with signal {-child.returncode}; committed steps on disk: "
                  f"{sorted(int(p) for p in os.listdir(directory) if p.isdigit())}")
    console.print(f"[bold]phase 2[/]: resume at {args.resume_mesh}")
    first, after = phase_resume(directory)
    lost = args.kill_at - first
    console.print(f"loss {before.get('1', float('nan')):.3f} (step 1) -> "
                  f"{before.get(str(args.kill_at), float('nan')):.3f} (step {args.kill_at}, "
                  f"killed) -> {after[args.steps]:.3f} (step {args.steps}, resumed from step "
                  f"{first}, {lost} steps redone)")
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main)
