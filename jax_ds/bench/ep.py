"""`python -m jax_ds.bench ep`: expert-parallel dispatch and combine across the devices of one host.

The setting is DeepEP's normal-kernel benchmark. Each rank holds --tokens tokens of --hidden
(default 4096 x 7168). Each token is routed to top-8 of 256 experts: distinct experts, drawn
uniformly at random. The benchmark runs every EP size in --ep (default 2, 4, 8) that the host has
devices for, one rank per device. The mesh has one axis, `expert`.

Contestants, on the same inputs in the same run:
  ours       `ep_dispatch` / `ep_combine` (jax_ds.parallel.expert) with the ragged exchange
             (`jax.lax.ragged_all_to_all` on GPU; on CPU, which has no ragged all-to-all, its
             all_gather emulation). Lossless budget. bf16 dispatch, and FP8 dispatch
             (`fp8=True`: 1x128 scales travel with the rows). The combine is bf16.
  ours_dedup the same exchange with one row per (token, destination rank), as DeepEP sends
             (`ep_dispatch_tokens` / `ep_combine_tokens`; the gate weights travel along and are
             applied on the experts' rank).
  xla_a2a    the exchange of a plain XLA MoE layer: `jax.lax.all_to_all` of a padded
             [ep, C, D] buffer, C = --capacity-factor x the even share. Rows past C are dropped,
             and the dropped share is reported.
  ceiling    one large all_to_all of bf16 (--ceiling-mb per rank): bytes received from peers
             per GPU over time. This is the bandwidth the exchange could reach.

Times are device-bound (`_timing.time_jax_launch`), medians over repeats.
  dispatch   dispatch alone, up to the rows sorted by local expert.
  combine    (dispatch + combine) - dispatch. The combine's input is the received rows cast to
             bf16, as an expert FFN's output would be.
Bandwidth per GPU is counted as DeepEP counts it: the bytes of the tokens a rank receives, each
(token, destination rank) pair once, the rank's own tokens included, over the time. Bytes per
token: bf16 2D; FP8 D + 4 ceil(D/128). The mean over ranks is reported. `moved` is what ours
really moves: one row per (token, expert) pair for `ours`, one per (token, rank) pair for
`ours_dedup`.

Leave NVLink multicast off on shared machines: NCCL_NVLS_ENABLE=0 is set here unless the
environment already sets it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds import cli
from jax_ds.bench import _timing, environment, error_cell, print_table, write_json
from jax_ds.parallel import expert as ep_lib
from jax_ds.parallel.mesh import EXPERT, make_mesh

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


CONTESTANTS = ("ours", "ours_dedup", "xla_a2a")


def add_arguments(parser):
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--ep", type=cli.at_least(1), nargs="+", default=[2, 4, 8],
                        help="EP sizes (those the host has devices for are run)")
    parser.add_argument("--tokens", type=cli.at_least(1), default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=cli.at_least(1), default=7168)
    parser.add_argument("--experts", type=cli.at_least(1), default=256)
    parser.add_argument("--top-k", type=cli.at_least(1), default=8)
    parser.add_argument("--capacity-factor", type=cli.positive_float, default=1.25,
                        help="the padded all_to_all baseline's budget (x the even share)")
    parser.add_argument("--ceiling-mb", type=cli.positive_float, default=256.0,
                        help="bytes per rank of the all_to_all ceiling (MiB)")
    parser.add_argument("--budget", type=cli.positive_float, default=0.25,
                        help="seconds per measurement")
    parser.add_argument("--repeats", type=cli.at_least(1), default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a CPU smoke test: 64 tokens x 256, top-4 of 16 experts")
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=CONTESTANTS,
                        help="which exchanges to time (the ceiling is always measured)")
    parser.add_argument("--tag", default="",
                        help="suffix of the JSON's name, e.g. the XLA_FLAGS variant it ran under")


@dataclasses.dataclass(frozen=True)
class Problem:
    ep: int
    tokens: int     # per rank
    hidden: int
    experts: int
    top_k: int

    def row_bytes(self, fp8: bool) -> int:
        """Bytes of one token row: bf16, or what `pack_fp8_rows` makes of it."""
        if not fp8:
            return 2 * self.hidden
        row = jax.ShapeDtypeStruct((1, self.hidden), jnp.bfloat16)
        return jax.eval_shape(ep_lib.pack_fp8_rows, row).shape[1]


def routing(key, p: Problem):
    """[ep * tokens, top_k] distinct experts per token, uniform; gate weights."""
    n = p.ep * p.tokens
    k1, k2 = jax.random.split(key)
    scores = jax.random.uniform(k1, (n, p.experts))
    idx = jax.lax.top_k(scores, p.top_k)[1].astype(jnp.int32)
    return idx, jax.random.uniform(k2, (n, p.top_k), jnp.float32)


def received_pairs(idx: np.ndarray, p: Problem) -> tuple[float, float]:
    """Mean over ranks of (token, this rank) pairs received (DeepEP's count) and of
    (token, expert) rows received (what a per-assignment exchange moves)."""
    owner = idx // (p.experts // p.ep)                                   # [n, k] rank
    hit = np.zeros((idx.shape[0], p.ep), bool)
    np.put_along_axis(hit, owner, True, axis=1)
    return hit.sum() / p.ep, idx.size / p.ep


def _sharded(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P(EXPERT))) for a in arrays]


def make_fns(mesh, p: Problem, exchange: str, capacity: int, fp8: bool, dedup: bool = False):
    """(dispatch(x, idx, w), round_trip(x, idx, w)) as jitted shard_maps over `expert`."""
    kw = dict(num_experts=p.experts, axis_name=EXPERT, capacity=capacity, exchange=exchange,
              fp8=fp8)

    def send(x, idx, w):
        if dedup:
            return ep_lib.ep_dispatch_tokens(x, idx, w, **kw)
        return ep_lib.ep_dispatch(x, idx, **kw)

    def send_back(y, w, state):
        if dedup:
            return ep_lib.ep_combine_tokens(y, state, axis_name=EXPERT)
        return ep_lib.ep_combine(y, w, state, axis_name=EXPERT)

    def dispatch_body(x, idx, w):
        recv, sizes, _, _ = send(x, idx, w)
        return (recv[0] if fp8 else recv), sizes

    def round_trip_body(x, idx, w):
        recv, _, _, state = send(x, idx, w)
        y = (recv[0] if fp8 else recv).astype(jnp.bfloat16)   # an expert FFN's bf16 output
        return send_back(y, w, state)

    spec = (P(EXPERT),) * 3
    dispatch = jax.jit(jax.shard_map(dispatch_body, mesh=mesh, in_specs=spec,
                                     out_specs=(P(EXPERT), P(EXPERT))))
    round_trip = jax.jit(jax.shard_map(round_trip_body, mesh=mesh, in_specs=spec,
                                       out_specs=P(EXPERT)))
    return dispatch, round_trip


def ceiling(mesh, ep: int, nbytes: float, args):
    """(seconds, bytes received from peers per rank) of one bf16 all_to_all of `nbytes` a rank,
    over 2 input sets."""
    cols = 4096
    rows = max(1, int(nbytes / 2 / cols / ep))
    f = jax.jit(jax.shard_map(lambda a: jax.lax.all_to_all(a, EXPERT, 0, 0, tiled=True),
                              mesh=mesh, in_specs=P(EXPERT), out_specs=P(EXPERT)))
    sets = [tuple(_sharded(mesh, jax.random.normal(jax.random.key(i), (ep * ep * rows, cols),
                                                   jnp.bfloat16))) for i in range(2)]
    t = _timing.time_jax_launch(f, sets, budget_s=args.budget, repeats=args.repeats,
                                max_reps=4)
    return t.median_s, (ep - 1) * rows * cols * 2


def bench_ep(p: Problem, args, platform: str) -> dict:
    mesh = make_mesh(expert=p.ep, devices=jax.devices()[:p.ep])
    key = jax.random.key(args.seed)
    sets = []
    for i in range(2):
        kx, kr = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(kx, (p.ep * p.tokens, p.hidden), jnp.bfloat16)
        idx, w = routing(kr, p)
        sets.append(tuple(_sharded(mesh, x, idx, w)))
    pairs, rows = received_pairs(np.asarray(sets[0][1]), p)
    result = {"ep": p.ep, "recv_token_rank_pairs_per_rank": pairs,
              "recv_token_expert_rows_per_rank": rows, "cells": []}
    try:
        t, peer_bytes = ceiling(mesh, p.ep, args.ceiling_mb * 2 ** 20, args)
        result["ceiling"] = {"us": t * 1e6, "gbps": peer_bytes / t / 1e9,
                             "bytes_from_peers": peer_bytes}
    except Exception as e:
        result["ceiling"] = error_cell(e)

    ours = "ragged" if platform == "gpu" else "emulated"
    lossless = ep_lib.ep_capacity(p.tokens, p.top_k, p.experts, p.ep)
    tokens = ep_lib.ep_token_capacity(p.tokens, p.top_k, p.ep)
    padded = ep_lib.ep_capacity(p.tokens, p.top_k, p.experts, p.ep, args.capacity_factor)
    for name, exchange, capacity, dedup in (("ours", ours, lossless, False),
                                            ("ours_dedup", ours, tokens, True),
                                            ("xla_a2a", "padded", padded, False)):
        if name not in args.contestants:
            continue
        for fp8 in (False, True):
            cell = {"contestant": name, "exchange": exchange, "capacity": capacity,
                    "dtype": "fp8" if fp8 else "bf16"}
            try:
                dispatch, round_trip = make_fns(mesh, p, exchange, capacity, fp8, dedup)
                kept = int(np.asarray(dispatch(*sets[0])[1]).sum())
                cell["dropped_pct"] = 100 * (1 - kept / (rows * p.ep))
                moved = pairs if dedup else rows
                # At most 4 repeats in one executable: each keeps its outputs (the received
                # rows: 3.8 GB a call for `ours` at the default sizes on EP 8).
                td = _timing.time_jax_launch(dispatch, sets, budget_s=args.budget,
                                             repeats=args.repeats, max_reps=4).median_s
                tr = _timing.time_jax_launch(round_trip, sets, budget_s=args.budget,
                                             repeats=args.repeats, max_reps=4).median_s
                tc = max(tr - td, 1e-9)
                cell.update({
                    "dispatch_us": td * 1e6, "combine_us": tc * 1e6,
                    "dispatch_gbps": pairs * p.row_bytes(fp8) / td / 1e9,
                    "combine_gbps": pairs * p.row_bytes(False) / tc / 1e9,
                    "dispatch_moved_gbps": moved * p.row_bytes(fp8) / td / 1e9})
            except Exception as e:
                cell.update(error_cell(e))
            result["cells"].append(cell)
    return result


COLUMNS = ("ep", "contestant", "dispatch", "dropped", "dispatch us", "combine us",
           "dispatch GB/s", "combine GB/s", "% of a2a", "moved GB/s")


def _f(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)


def run(args):
    if args.tiny:
        args.tokens, args.hidden, args.experts, args.top_k = 64, 256, 16, 4
        args.ceiling_mb = min(args.ceiling_mb, 8.0)
    env = environment()
    platform = jax.devices()[0].platform
    count = jax.device_count()
    sizes = [e for e in args.ep if 2 <= e <= count and args.experts % e == 0]
    skipped = [e for e in args.ep if e not in sizes]
    print(f"{count} {platform} device(s) ({env['device']}); EP sizes {sizes}"
          + (f"; not run: {skipped} (devices: {count}, experts {args.experts})" if skipped
             else ""), flush=True)
    results, table = [], []
    for ep in sizes:
        p = Problem(ep, args.tokens, args.hidden, args.experts, args.top_k)
        r = bench_ep(p, args, platform)
        results.append(r)
        ceil_gbps = r["ceiling"].get("gbps")
        for c in r["cells"]:
            if "error" in c:
                table.append([str(ep), c["contestant"], c["dtype"], c["error"][:60]] +
                             ["-"] * (len(COLUMNS) - 4))
                continue
            table.append([str(ep), f"{c['contestant']} ({c['exchange']})", c["dtype"],
                          f"{c['dropped_pct']:.1f}%", _f(c["dispatch_us"]),
                          _f(c["combine_us"]), _f(c["dispatch_gbps"], "{:.1f}"),
                          _f(c["combine_gbps"], "{:.1f}"),
                          _f(None if not ceil_gbps else 100 * c["dispatch_gbps"] / ceil_gbps),
                          _f(c["dispatch_moved_gbps"], "{:.1f}")])
        print(f"ep {ep}: ceiling {_f(ceil_gbps, '{:.1f}')} GB/s per GPU", flush=True)
    print_table(
        f"EP dispatch/combine, {args.tokens} tokens x {args.hidden} per rank, top-{args.top_k} "
        f"of {args.experts} experts, on {env['device']}", COLUMNS, table,
        ["GB/s per GPU counted as DeepEP does: bytes of the (token, rank) pairs a rank receives "
         "(own tokens included) / time; mean over ranks",
         "% of a2a: dispatch GB/s over a large bf16 all_to_all's bytes from peers per GPU in "
         "the same run (" + ", ".join(f"ep {r['ep']}: {_f(r['ceiling'].get('gbps'), '{:.1f}')}"
                                      for r in results) + " GB/s)",
         "moved: bytes of the rows really sent / dispatch time (ours: one per (token, "
         "expert), ours_dedup: one per (token, rank)); combine "
         "= (dispatch + combine) - dispatch; xla_a2a drops rows past "
         f"{args.capacity_factor} x the even share"])
    path = write_json(args.out, "ep", env, {
        "tokens_per_rank": args.tokens, "hidden": args.hidden, "experts": args.experts,
        "top_k": args.top_k, "capacity_factor": args.capacity_factor,
        "ceiling_mb": args.ceiling_mb, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "timing": {"kind": "device-bound (time_jax_launch)", "budget_s": args.budget,
                   "repeats": args.repeats},
        "not_run_ep": skipped, "results": results}, args.tag)
    print(f"wrote {path}")
    return 0 if all("error" not in c for r in results for c in r["cells"]) else 1
