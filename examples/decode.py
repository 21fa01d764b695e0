"""Batched decoding over the paged KV cache: B prompts of different lengths, one token per
sequence per step, and the decode throughput.

Each step runs MLA decode over the whole batch's cache (`jax_ds.ops.mla_decode`: the CUDA
kernel on a GPU for bf16 caches of 576-wide rows and 16-128 heads, its pure-JAX reference
elsewhere; the `jax_ds` logger says which, once). The model is a Hugging Face checkpoint
(--checkpoint) or a preset with random weights (--preset). The first run compiles; the timed
second run gives tokens/s. --check verifies greedy decoding through the cache against one full
forward pass (no cache) per sequence: every token its argmax (a 16-bit model: within 2% of the
logits' range of it, as the two paths round differently).

    python examples/decode.py --preset tiny --batch 8 --prompt-lens 8-200 --max-new-tokens 32
    python examples/decode.py --checkpoint tests/data/hf_tiny/bf16 --batch 4 --check
    python examples/decode.py --preset v2_lite --layers 4 --batch 64 --fp8-cache    # on a GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from jax_ds import cli
from jax_ds.models import DeepSeekConfig, Transformer, load_hf_checkpoint
from jax_ds.models.generate import generate


def lengths(text: str) -> tuple[int, int]:
    """An argparse `type`: 'N' or 'LO-HI' prompt lengths, 1 <= LO <= HI."""
    lo, _, hi = text.partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LO-HI") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text}")
    return lo, hi


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint folder")
    src.add_argument("--preset", default="tiny", choices=["tiny", "v2_lite", "v3"],
                     help="random weights of this config preset")
    p.add_argument("--layers", type=cli.at_least(1), default=None,
                   help="--preset: this many layers instead of the preset's")
    p.add_argument("--batch", type=cli.at_least(1), default=8)
    p.add_argument("--prompt-lens", type=lengths, default=(8, 100),
                   help="prompt lengths, N or LO-HI (drawn uniformly)")
    p.add_argument("--max-new-tokens", type=cli.at_least(1), default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=cli.at_least(1), default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--fp8-cache", action="store_true",
                   help="KV cache rows in FlashMLA's FP8 layout (656 bytes; 512 + 64 rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="greedy only: compare with a full forward pass per sequence")
    return p.parse_args()


def load(args) -> Transformer:
    if args.checkpoint:
        return load_hf_checkpoint(args.checkpoint)
    changes = {"num_layers": args.layers} if args.layers else {}
    return Transformer(DeepSeekConfig.preset(args.preset, **changes), rngs=nnx.Rngs(args.seed))


def main():
    args = parse_args()
    if args.check and args.temperature > 0:
        raise ValueError("--check compares greedy decoding: leave --temperature at 0")
    console = Console()
    model = load(args)
    cfg = model.cfg
    rng = np.random.default_rng(args.seed)
    lo, hi = args.prompt_lens
    prompts = [rng.integers(0, cfg.vocab_size, rng.integers(lo, hi + 1)).tolist()
               for _ in range(args.batch)]

    def run():
        return generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed),
                        fp8_cache=args.fp8_cache)

    t0 = time.perf_counter()
    out = run()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = run()
    seconds = time.perf_counter() - t0
    if again != out:
        raise RuntimeError("a second run with the same key decoded different tokens")

    table = Table(title=f"{args.batch} sequences, {cfg.num_layers} layers, d_model {cfg.d_model},"
                        f" {cfg.num_heads} heads")
    for name in ("seq", "prompt", "new tokens (first 8)"):
        table.add_column(name)
    for i, (p, o) in enumerate(zip(prompts, out)):
        table.add_row(str(i), str(len(p)), " ".join(map(str, o[:8])))
    console.print(table)
    tokens = sum(map(len, out))
    console.print(f"first run (compiles): {compile_s:.1f}s; second: {tokens} tokens in "
                  f"{seconds:.2f}s = {tokens / seconds:.1f} tok/s "
                  f"({seconds / args.max_new_tokens * 1e3:.1f} ms per step incl. prefill)")
    if args.check:
        # Each chosen token against the full forward pass's logits at its position (same
        # context): 0 gap where greedy took its argmax. A float32 model must match exactly; a
        # 16-bit one may pick a near-tie differently (the paths round differently), within 2% of
        # the logits' range.
        tol = 0.0 if jnp.dtype(cfg.activation_dtype) == jnp.float32 else 0.02
        worst, exact, total = 0.0, 0, 0
        for p, o in zip(prompts, out):
            logits = np.asarray(model(jnp.asarray([p + o], jnp.int32))[0, len(p) - 1:-1],
                                np.float32)
            gap = logits.max(-1) - logits[np.arange(len(o)), o]
            worst = max(worst, float((gap / (logits.max(-1) - logits.min(-1))).max()))
            exact += int((gap == 0).sum())
            total += len(o)
        summary = (f"{exact} of {total} tokens are the full forward pass's argmax; worst gap "
                   f"{worst:.2g} of the logits' range (tolerance {tol:g})")
        if worst > tol:
            raise RuntimeError(f"check failed: {summary}")
        console.print(f"check: {summary}")


if __name__ == "__main__":
    cli.run(main)
