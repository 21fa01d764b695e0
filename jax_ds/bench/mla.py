"""`python -m jax_ds.bench mla`: MLA decode over a paged cache, ours vs the XLA reference.

Grid (FlashMLA's benchmark): b = 128, s_k in (4096, 8192, 16384), h_q in (16, 32, 64, 128),
Sq in (1, 2), lengths fixed at s_k or variable (normal(s_k, s_k / 2) clipped to [Sq, 2 s_k],
FlashMLA's "varlen"); bf16,
576-wide rows in 64-row blocks, causal. Columns: ours (mla_decode impl="ffi"; "n/a" and why when
the kernel is unavailable), the XLA reference (impl="xla"); GB/s = cache bytes read (each
sequence's rows once) + q + out per call, TFLOP/s = 2 * Hq * Sq * sum(len) * (576 + 512).
The ceiling is a device copy measured in the same run (a jitted x + 0 over --copy-gb GB: read +
write bytes). Ours is timed twice: per call (one jitted call per execution, back to back: XLA's
per-execution work between calls included) and device-bound ("dev": one executable of many
calls on two input sets, `_timing.time_jax_launch`, as `bench gemm` does; what a decode step that
calls it inside one larger program sees). --tiny runs a few small shapes (CPU smoke test);
--quick one s_k and h_q in (16, 128); --s-k / --h-q pick parts of the grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi, cli
from jax_ds.bench import _timing, environment, error_cell, print_table, write_json
from jax_ds.ops.mla import BLOCK_SIZE, HEAD_DIM_QK, HEAD_DIM_V, TARGET, mla_decode

IMPLS = ("ours", "xla")


def add_arguments(parser):
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--budget", type=cli.positive_float, default=0.25,
                        help="seconds per measurement")
    parser.add_argument("--repeats", type=cli.at_least(1), default=5)
    parser.add_argument("--quick", action="store_true", help="s_k 4096, h_q 16 and 128")
    parser.add_argument("--s-k", type=cli.at_least(1), nargs="+",
                        help="only these s_k (default: the grid's)")
    parser.add_argument("--h-q", type=cli.at_least(1), nargs="+",
                        help="only these h_q (default: the grid's)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (runs on CPU)")
    parser.add_argument("--no-xla", action="store_true", help="skip the reference column")
    parser.add_argument("--copy-gb", type=cli.positive_float, default=2.0,
                        help="size of the copy ceiling")
    parser.add_argument("--seed", type=int, default=0)


def shapes(args):
    """(b, s_k, h_q, s_q, varlen) rows."""
    if args.tiny:
        return [(2, 200, 16, 1, False), (3, 130, 16, 2, True)]
    s_ks = args.s_k or ((4096,) if args.quick else (4096, 8192, 16384))
    h_qs = args.h_q or ((16, 128) if args.quick else (16, 32, 64, 128))
    return [(128, s_k, h, s_q, varlen) for s_k in s_ks for h in h_qs for s_q in (1, 2)
            for varlen in (False, True)]


def inputs(seed, b, s_k, h_q, s_q, varlen):
    rng = np.random.default_rng(seed)
    if varlen:  # FlashMLA: normal around s_k (std s_k / 2), at least s_q
        lens = np.clip(rng.normal(s_k, s_k / 2, b), s_q, 2 * s_k).astype(np.int32)
    else:
        lens = np.full(b, s_k, np.int32)
    max_blocks = -(-int(lens.max()) // BLOCK_SIZE)
    table = rng.permutation(b * max_blocks).astype(np.int32).reshape(b, max_blocks)
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, HEAD_DIM_QK), jnp.bfloat16)
    kv = jax.random.normal(kk, (b * max_blocks, BLOCK_SIZE, 1, HEAD_DIM_QK), jnp.bfloat16)
    return (q, kv, jnp.asarray(table), jnp.asarray(lens)), lens


def copy_ceiling(gb, args):
    """GB/s of a jitted x + 0 over `gb` GB (bytes read + written): the bandwidth ceiling."""
    n = max(1, int(gb * 1e9 / 2 / 2))  # bf16 elements, half the bytes read and half written
    x = jnp.zeros((n,), jnp.bfloat16)
    t = _timing.time_jax(jax.jit(lambda a: a + 0), [(x,)], budget_s=args.budget,
                         repeats=args.repeats)
    return 2 * n * 2 / t.median_s / 1e9


def second_set(arg, seed):
    """Another q and cache of the same shapes, table and lengths (a distinct input set, so XLA
    cannot merge the device-bound executable's calls)."""
    q, kv, table, lens = arg
    kq, kk = jax.random.split(jax.random.key(seed + 10**6))
    return (jax.random.normal(kq, q.shape, q.dtype), jax.random.normal(kk, kv.shape, kv.dtype),
            table, lens)


def traffic(lens, b, h_q, s_q):
    """(bytes, FLOPs) of one call: the cache rows each sequence reads once plus q and out, and
    2 Hq Sq sum(len) (576 + 512)."""
    keys = int(lens.sum())
    nbytes = keys * HEAD_DIM_QK * 2 + b * s_q * h_q * (HEAD_DIM_QK + HEAD_DIM_V) * 2
    return nbytes, 2 * h_q * s_q * keys * (HEAD_DIM_QK + HEAD_DIM_V)


def _rates(t, nbytes, flops, prefix=""):
    return {f"{prefix}us": t.median_s * 1e6, f"{prefix}gbps": nbytes / t.median_s / 1e9,
            f"{prefix}tflops": flops / t.median_s / 1e12}


def run(args):
    env = environment()
    ours_na = _ffi.unavailable_reason(TARGET)
    print(f"device: {env['device']}; ours: {ours_na or TARGET}", flush=True)
    copy_gb = 0.01 if args.tiny else args.copy_gb
    ceiling = copy_ceiling(copy_gb, args)
    print(f"copy ceiling ({copy_gb} GB x + 0): {ceiling:.1f} GB/s", flush=True)
    rows = []
    grid = shapes(args)
    for i, (b, s_k, h_q, s_q, varlen) in enumerate(grid):
        arg, lens = inputs(args.seed + i, b, s_k, h_q, s_q, varlen)
        nbytes, flops = traffic(lens, b, h_q, s_q)
        row = dict(b=b, s_k=s_k, h_q=h_q, s_q=s_q, varlen=varlen, bytes=nbytes, flops=flops,
                   results={})
        for name in IMPLS:
            if name == "ours" and ours_na:
                row["results"][name] = {"na": ours_na}
                continue
            if name == "xla" and args.no_xla:
                continue
            impl = "ffi" if name == "ours" else "xla"
            fn = jax.jit(functools.partial(mla_decode, causal=True, impl=impl))
            try:
                t = _timing.time_jax(fn, [arg], budget_s=args.budget, repeats=args.repeats)
            except Exception as e:  # report and keep going: one failure is one cell
                row["results"][name] = error_cell(e)
                continue
            row["results"][name] = res = _rates(t, nbytes, flops)
            if name == "ours":
                try:
                    sets = [arg, second_set(arg, args.seed + i)]
                    res.update(_rates(_timing.time_jax_launch(
                        fn, sets, budget_s=args.budget, repeats=args.repeats), nbytes, flops,
                        "device_"))
                    del sets
                except Exception as e:
                    res["device_error"] = error_cell(e)["error"]
        rows.append(row)
        print(f"[{i + 1}/{len(grid)}] b{b} s_k{s_k} h_q{h_q} s_q{s_q}"
              f"{' var' if varlen else ''}: " + " ".join(
                  f"{n} {_cell(row['results'].get(n, {}), 'gbps')}" for n in IMPLS), flush=True)
    table = [[str(r["b"]), str(r["s_k"]), str(r["h_q"]), str(r["s_q"]),
              "var" if r["varlen"] else "fixed"] +
             [_cell(r["results"].get(n, {}), k) for n in IMPLS for k in ("us", "gbps", "tflops")] +
             [_ratio(r, "ours", "xla"), _frac(r, ceiling)] +
             [_cell(r["results"].get("ours", {}), k)
              for k in ("device_us", "device_gbps", "device_tflops")] +
             [_frac(r, ceiling, "device_gbps")] for r in rows]
    print_table(f"MLA decode on {env['device']} (bf16, paged 64, causal)",
                ("b", "s_k", "h_q", "s_q", "lens", "ours us", "ours GB/s", "ours TFLOP/s",
                 "xla us", "xla GB/s", "xla TFLOP/s", "ours/xla", "ours/copy", "ours dev us",
                 "dev GB/s", "dev TFLOP/s", "dev/copy"), table,
                [f"copy ceiling: {ceiling:.1f} GB/s (jitted x + 0 over {copy_gb} GB, read + "
                 f"write)", f"ours: {ours_na or TARGET}; per call, and device-bound (dev: one "
                 f"executable of many calls, two input sets)"])
    # a part of the grid writes its own file: a full run's is never overwritten
    tag = ("tiny" if args.tiny else "quick" if args.quick
           else "part" if args.s_k or args.h_q else "")
    path = write_json(args.out, "mla", env, {"ours": ours_na or TARGET,
                                             "copy_ceiling_gbps": ceiling, "rows": rows}, tag)
    print(f"wrote {path}")
    return 0


def _cell(res, key="gbps"):
    if key in res:
        return f"{res[key]:.1f}" if not key.endswith("tflops") else f"{res[key]:.2f}"
    return "err" if "error" in res or f"{key.split('_')[0]}_error" in res else "n/a"


def _ratio(row, a, b):
    x, y = row["results"].get(a, {}).get("gbps"), row["results"].get(b, {}).get("gbps")
    return f"{x / y:.1f}" if x and y else "-"


def _frac(row, ceiling, key="gbps"):
    x = row["results"].get("ours", {}).get(key)
    return f"{x / ceiling:.2f}" if x and ceiling else "-"
