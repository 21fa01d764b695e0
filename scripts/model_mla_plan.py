"""A CPU model of the MLA decode kernel's plan (ffi/mla/mla_decode.cu, PlanPart): how long its
longest part is, against the best a plan could do, on `bench mla`'s lengths.

    python scripts/model_mla_plan.py [--s-k 4096] [--parts 132] [--seeds 4]

Cost of a part (in 64-key blocks): its blocks plus FIXED blocks for every batch it touches,
the batches it resumes after a cut included (what the kernel pays: the Q load, the output or
partial write, the pipeline drained between batches). Printed per length draw (b = 128, lengths
as `bench mla` draws them; seed 0 is fixed lengths):
  floor    (sum of blocks + FIXED x batches) / parts: no part resumes a batch
  plan     the kernel's cut (payload = ceil(total / parts) on the cost line, rounded up to whole
           batches when every batch has the same block count and that adds <= FIXED)
  greedy   the least part capacity for which filling parts in batch order (a batch that does not
           fit is cut where the part is full, its rest resumed in the next part) needs <= parts
  snap s   the kernel's cuts moved to the nearest batch start within s blocks
"""
import argparse

import numpy as np

from jax_ds.ops.mla import plan_payload


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--s-k", type=int, default=4096)
parser.add_argument("--parts", type=int, default=132)
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--fixed-cost", type=int, default=5,
                    help="blocks per batch touched (5: the numbers NOTES-mla quotes; mla.FIXED_COST)")
args = parser.parse_args()
FIXED = args.fixed_cost


def lengths(seed, s_k, b=128):
    if seed == 0:
        return np.full(b, s_k)
    rng = np.random.default_rng(seed)  # bench mla's "varlen": normal(s_k, s_k / 2), >= 1
    return np.clip(rng.normal(s_k, s_k / 2, b), 1, 2 * s_k).astype(int)


def longest(nbs, cuts):
    """The costliest part for cut positions on the cost line (batch b spans cum[b]..cum[b+1])."""
    cum = np.concatenate([[0], np.cumsum(nbs + FIXED)])
    worst = 0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        cost = 0
        for b in range(len(nbs)):
            blocks = min(hi, cum[b + 1]) - max(lo, cum[b] + FIXED)
            if blocks > 0 or (nbs[b] == 0 and lo <= cum[b] < hi):
                cost += max(blocks, 0) + FIXED
        worst = max(worst, cost)
    return worst


def greedy_capacity(nbs, parts):
    def parts_needed(cap):
        used, load = 1, 0
        for nb in nbs:
            rest = int(nb)
            while load + rest + FIXED > cap:
                room = cap - load - FIXED
                if room > 0:
                    rest -= room
                used, load = used + 1, 0
            load += rest + FIXED
        return used
    cap = int(np.ceil((nbs + FIXED).sum() / parts))
    while parts_needed(cap) > parts:
        cap += 1
    return cap


for seed in range(args.seeds):
    nbs = -(-lengths(seed, args.s_k) // 64)
    payload, total = plan_payload(nbs, args.parts, FIXED)
    cuts = [min(i * payload, total) for i in range(args.parts + 1)]
    starts = np.concatenate([[0], np.cumsum(nbs + FIXED)])
    snapped = {}
    for slack in (2, 3, 5, 8, 12):
        moved = []
        for c in cuts:
            near = starts[np.argmin(np.abs(starts - c))]
            moved.append(int(near) if abs(near - c) <= slack else c)
        snapped[slack] = longest(nbs, list(np.maximum.accumulate(moved)))
    print(f"{'fixed' if seed == 0 else f'var seed {seed}'} (s_k {args.s_k}): "
          f"floor {total / args.parts:.1f}  plan {longest(nbs, cuts)}  "
          f"greedy {greedy_capacity(nbs, args.parts)}  "
          + "  ".join(f"snap {s}: {v}" for s, v in snapped.items()))
