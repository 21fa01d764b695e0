"""`python -m jax_ds.bench train`: the whole model's training step on a data x expert mesh.

This is the LAST issue's item 4. It reports the step time and tokens/s. From a profiler trace of
a few steps it also reports how much of the expert-parallel exchange runs while compute runs.

Setup:
  model  --model tiny (DeepSeekConfig.tiny), mid (the pipeline benchmark's mid-size MoE:
         d_model 1024, 16 experts of 512, top-4, bf16) or v3-slice (DeepSeek-V3's layer widths,
         32 routed experts: `model_config`). --layers of them, every layer MoE.
         --gemm bf16 fp8 runs both (FP8: the 1x128 / 128x128 GEMMs, on Hopper our kernels).
  mesh   --mesh, one device per rank. Default: data=2 x expert=<devices / 2> on an even count of
         at least 4 devices, else expert=<all>.
  batch  --batch sequences (the global batch) of --seq-len tokens, random ids.

Each --gemm x --microbatches combination (default bf16 x 1, 2) gets a fresh model and AdamW
optimizer. It runs:
  1. --warmup steps, which compile;
  2. --steps timed steps, each waiting for its loss (the median is reported);
  3. --trace-steps steps under jax.profiler. The trace is kept under --trace-dir; open it in
     TensorBoard's profile plugin or Perfetto.
With microbatches = 2, `train_step` cuts the batch into two parts whose gradients are averaged
in one program. XLA's scheduler may then run one part's all-to-all under the other's compute, the
way DeepSeek-V3 overlaps two micro-batches.

The trace's GPU kernels are read back per device (`_profile.collective_overlap`):
  - the time some collective kernel runs;
  - the part of that time during which a compute kernel also runs on the GPU.
All-to-all is the EP dispatch and combine; all-reduce is the data-parallel gradient sum.
The first GPU's kernel time per step is also summed by kind (`_profile.kernel_breakdown`: our
FP8 GEMMs, quantize, routing, XLA's GEMMs and fusions, collectives, copies), a second table, with
the top kernels by name in the JSON: where an FP8 step's time goes against a bf16 one's.

model TFLOP/s = 6 x activated parameters x tokens / step time. This is the usual estimate; the
attention scores' FLOPs are left out.

On CPU (8 virtual devices) the trace holds no GPU kernels, so the overlap columns are empty. The
timings there mean nothing; `--tiny` is a smoke run of the harness.

Leave NVLink multicast off on shared machines: NCCL_NVLS_ENABLE=0 is set here unless the
environment already sets it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from jax_ds.bench import _profile, environment, error_cell, print_table, write_json
from jax_ds.models import DeepSeekConfig, Transformer, param_counts, train_step
from jax_ds.parallel.mesh import mesh_from_spec, request_cpu_devices, shard_batch, shard_model

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

KINDS = ("all_to_all", "all_reduce")  # the table's columns; the JSON keeps every kind


def add_arguments(parser):
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--model", choices=("tiny", "mid", "v3-slice"), default="mid",
                        help="v3-slice: DeepSeek-V3's layer widths with 32 routed experts (one of "
                        "8 EP ranks' share of 256) and a 256-token vocabulary")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gemm", nargs="+", choices=("bf16", "fp8"), default=["bf16"],
                        help="GEMM precision(s): fp8 = 1x128 / 128x128 scaled FP8")
    parser.add_argument("--mesh", default="auto", help="e.g. data=2,expert=4 (one may be -1)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per step (global)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--trace-steps", type=int, default=3,
                        help="steps under the profiler (0: no trace)")
    parser.add_argument("--trace-dir", default="out/train-trace",
                        help="where the traces are kept (one folder per configuration)")
    parser.add_argument("--devices", type=int, default=8,
                        help="virtual CPU devices to create when running on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a CPU smoke run: tiny model, 2 layers, 16 x 32 tokens, 2 steps")


# The experts of one rank when DeepSeek-V3's 256 are spread over EP = 8.
V3_SLICE_EXPERTS = 32


def model_config(name: str, num_layers: int, fp8: bool) -> DeepSeekConfig:
    """tiny / mid: the pipeline benchmark's models. v3-slice: DeepSeek-V3's layer (d_model 7168,
    MLA with 128 heads, q / kv ranks 1536 / 512, experts of 2048, top-8 of 8 groups' top-4,
    sigmoid routing, one shared expert) with `V3_SLICE_EXPERTS` routed experts, every layer MoE,
    no MTP and a 256-token vocabulary (the embedding and head of V3's 129k would be a third of
    the memory). Its expert GEMMs have V3's widths, which the mid model's (1024 / 512) do not.
    About 1.64 G parameters a layer: with float32 parameters and AdamW, 26 GB a layer."""
    if name == "v3-slice":
        return DeepSeekConfig.v3(
            num_layers=num_layers, num_dense_layers=0, num_experts=V3_SLICE_EXPERTS,
            vocab_size=256, mtp_depth=0, max_seq_len=4096, yarn=None, dtype="bfloat16",
            fp8=fp8)
    from jax_ds.bench.pipeline import model_config as pipeline_model

    return pipeline_model(name, num_layers).replace(fp8=fp8)


def default_mesh(n: int) -> str:
    return f"data=2,expert={n // 2}" if n >= 4 and n % 2 == 0 else f"expert={n}"


def summarize(per_device: dict, steps: int) -> dict:
    """Mean over devices, per step, of each collective kind's time, and the share of it under
    compute (over all devices' time of that kind)."""
    out = {}
    kinds = sorted({k for d in per_device.values() for k in d["collectives"]})
    for kind in kinds:
        cells = [d["collectives"][kind] for d in per_device.values() if kind in d["collectives"]]
        total = sum(c["ms"] for c in cells)
        out[kind] = {"ms_per_step": total / len(per_device) / steps,
                     "overlap": sum(c["overlapped_ms"] for c in cells) / total if total else None}
    if per_device:
        out["span_ms_per_step"] = (sum(d["span_ms"] for d in per_device.values())
                                   / len(per_device) / steps)
    return out


def measure(cfg, mesh, microbatches, activated, args):
    tokens = args.batch * args.seq_len
    gemm = "fp8" if cfg.fp8 else "bf16"
    row = {"gemm": gemm, "microbatches": microbatches, "batch": args.batch,
           "seq_len": args.seq_len, "tokens": tokens}
    try:
        model = Transformer(cfg, rngs=nnx.Rngs(args.seed), mesh=mesh)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
        shard_model(model, mesh)
        shard_model(optimizer, mesh)
        step = nnx.jit(train_step, static_argnames="microbatches")
        rng = np.random.default_rng(args.seed)
        batches = [shard_batch(rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1),
                                            dtype=np.int32), mesh) for _ in range(2)]

        def run(i):
            return step(model, optimizer, batches[i % 2], microbatches=microbatches)

        for i in range(args.warmup):
            float(run(i)["loss"])
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            float(run(i)["loss"])  # waits for the step
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        row.update(step_ms=t * 1e3, tokens_per_s=tokens / t,
                   tokens_per_s_per_device=tokens / t / mesh.size,
                   model_tflops=6 * activated * tokens / t / 1e12)
        if args.trace_steps > 0:
            trace_dir = os.path.join(args.trace_dir, f"{gemm}-microbatches-{microbatches}")
            _profile.trace_to(trace_dir, lambda: jax.block_until_ready(
                [run(i) for i in range(args.trace_steps)]))
            kernels = _profile.gpu_kernels_by_device(trace_dir)
            per_device = {dev: _profile.collective_overlap(events)
                          for dev, events in kernels.items()}
            row.update(trace_dir=trace_dir, trace_steps=args.trace_steps, devices=per_device,
                       collectives=summarize(per_device, args.trace_steps))
            if kernels:  # the first GPU's kernel time by kind (all GPUs run the same program)
                first = sorted(kernels)[0]
                row["kernels"] = dict(_profile.kernel_breakdown(kernels[first],
                                                                args.trace_steps), device=first)
    except Exception as e:  # a failed configuration is a table cell, not the end of the run
        row["error"] = error_cell(e)
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run(args):
    if args.tiny:
        args.model, args.layers, args.batch, args.seq_len = "tiny", 2, 16, 32
        args.warmup, args.steps, args.trace_steps = 1, 2, 1
    request_cpu_devices(args.devices)
    n = jax.device_count()
    mesh = mesh_from_spec(default_mesh(n) if args.mesh == "auto" else args.mesh)
    cfgs = {g: model_config(args.model, args.layers, g == "fp8") for g in args.gemm}
    counts = param_counts(next(iter(cfgs.values())))  # FP8 changes no parameter count
    env = environment()
    rows = [measure(cfg, mesh, k, counts["activated"], args) for cfg in cfgs.values()
            for k in args.microbatches]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["gemm"], str(r["microbatches"]), r["error"]["error"][:80]] + [""] * 8)
            continue
        c = r.get("collectives", {})
        cell = lambda kind, key: c.get(kind, {}).get(key)  # noqa: E731
        table.append([r["gemm"], str(r["microbatches"]), f"{r['step_ms']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_device']:,.0f}",
                      f"{r['model_tflops']:.1f}",
                      *(v for kind in KINDS for v in (_fmt(cell(kind, "ms_per_step"), ".2f"),
                                                      _fmt(cell(kind, "overlap"), ".0%"))),
                      _fmt(c.get("span_ms_per_step"), ".1f")])
    mesh_text = " x ".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 device"
    print_table(
        f"Training step, {args.model} MoE x {args.layers} layers "
        f"({counts['activated'] / 1e6:.3g}M activated of {counts['total'] / 1e6:.3g}M), "
        f"{mesh_text} on {n} {env['device']}, batch {args.batch} x {args.seq_len} tokens",
        ["GEMMs", "micro-batches", "step ms", "tokens/s", "tokens/s/device", "model TFLOP/s",
         "a2a ms/step", "a2a under compute", "all-reduce ms/step", "all-reduce under compute",
         "GPU span ms/step"],
        table,
        ["step ms: median of --steps steps, each waiting for its loss; model TFLOP/s = 6 x "
         "activated parameters x tokens / step time",
         "a2a / all-reduce: per GPU and step (mean over GPUs) from the profiler trace, and the "
         "share of that time with a compute kernel running at the same time (- : no GPU trace)"])
    for r in rows:
        if r.get("kernels"):
            print_table(f"GPU kernel time per step by kind, {r['gemm']} GEMMs, "
                        f"{r['microbatches']} micro-batch(es), {r['kernels']['device']}",
                        ["kind", "ms/step"],
                        [[k, f"{v:.2f}"] for k, v in r["kernels"]["kinds"].items()],
                        ["summed over streams (overlapping kernels count twice); the JSON also "
                         "holds the top kernels by name"])
    path = write_json(args.out, "train", env, {
        "model": args.model, "layers": args.layers,
        "configs": {g: dataclasses.asdict(c) for g, c in cfgs.items()},
        "params": counts, "mesh": dict(mesh.shape), "rows": rows})
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1
