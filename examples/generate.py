"""Generation from a Hugging Face DeepSeek-V2/V3 checkpoint (bf16, or FP8 kept as FP8): greedy, or
sampled with --temperature (--top-k, --top-p, --seed), through `jax_ds.models.generate`.

The prompt is prefilled into a paged KV cache in one call, then each step decodes one token
over the cache (MLA with absorbed weights through `jax_ds.ops.mla_decode`: its CUDA kernel on a
GPU for bf16 caches of 576-wide rows and 16-128 heads; the op's pure-JAX reference elsewhere, on
CPU and for the FP8 cache; the `jax_ds` logger says which, once). Text goes through the
checkpoint's tokenizer.json when the `tokenizers` package is installed, else through bytes (a
byte-level vocabulary), or give token ids with --prompt-ids.

    python examples/generate.py --checkpoint tests/data/hf_tiny/fp8 --prompt-ids 1,2,3
    python examples/generate.py --checkpoint PATH --prompt "The capital of France is" \\
        --max-new-tokens 32 --mesh expert=8
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from jax_ds import cli
from jax_ds.models import load_hf_checkpoint
from jax_ds.models.generate import generate
from jax_ds.parallel.mesh import mesh_from_spec, request_cpu_devices


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--prompt", default="DeepSeek", help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (no tokenizer)")
    p.add_argument("--max-new-tokens", type=cli.at_least(0), default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--fp8", default="keep", choices=["keep", "dequant"],
                   help="FP8 checkpoints: keep e4m3 weights (FP8 GEMMs) or dequantize")
    p.add_argument("--fp8-cache", action="store_true",
                   help="KV cache rows in FlashMLA's FP8 layout (656 bytes; needs 512 + 64 rows)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; > 0 samples (with --top-k / --top-p, --seed)")
    p.add_argument("--top-k", type=cli.at_least(1), default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-id", type=cli.at_least(0), default=None,
                   help="stop when this token id is generated")
    p.add_argument("--mesh", default=None, help="e.g. expert=8 (routed experts split over it)")
    p.add_argument("--devices", type=cli.at_least(1), default=8,
                   help="virtual CPU devices (CPU only)")
    return p.parse_args()


args = parse_args()
if args.mesh:
    request_cpu_devices(args.devices)

console = Console()


class Codec:
    """tokenizer.json through `tokenizers` if both are there, else UTF-8 bytes."""

    def __init__(self, folder: str, vocab_size: int):
        self.tokenizer = None
        path = os.path.join(folder, "tokenizer.json")
        if os.path.exists(path):
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(path)
            except ImportError:
                console.print("tokenizer.json found but `tokenizers` is not installed: bytes")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text).ids
        if self.vocab_size < 256:
            raise SystemExit(f"vocabulary of {self.vocab_size} < 256 bytes: use --prompt-ids")
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def main():
    mesh = mesh_from_spec(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    model = load_hf_checkpoint(args.checkpoint, dtype=jnp.dtype(args.dtype), fp8=args.fp8,
                               mesh=mesh)
    cfg = model.cfg
    console.print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s: "
                  f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_experts} experts "
                  f"top-{cfg.top_k}, vocab {cfg.vocab_size}, weights "
                  f"{'FP8 (e4m3 + 128x128 scales)' if cfg.fp8_weights else args.dtype}")
    codec = Codec(args.checkpoint, cfg.vocab_size)
    prompt = [int(i) for i in args.prompt_ids.split(",")] if args.prompt_ids else \
        codec.encode(args.prompt)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("prefill + generating (first steps compile)",
                                 total=args.max_new_tokens)
        generated = generate(
            model, [prompt], args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed),
            eos_id=args.eos_id, fp8_cache=args.fp8_cache,
            callback=lambda step, tokens: progress.update(task, advance=1,
                                                          description="generating"))[0]
    seconds = time.perf_counter() - start
    console.print(f"[bold]prompt[/]: {codec.decode(prompt)!r}  ids {prompt}")
    console.print(f"[bold]generated[/]: {codec.decode(generated)!r}  ids {generated}")
    console.print(f"{len(generated)} tokens in {seconds:.1f}s incl. compile "
                  f"({len(generated) / seconds:.1f} tok/s)")


if __name__ == "__main__":
    cli.run(main)
