"""Times the MLA decode kernel's plan knobs on the `bench mla` shapes: the fixed cost per batch
touched (`fixed_cost`, KV blocks; mla.FIXED_COST is the default), the parts per head tile, and
how many pieces of a split batch the decode kernel merges itself (`fuse_max_splits`).
Per-call time of the jitted call, alternating the variants in rounds so drift hits them alike.

    python scripts/sweep_mla_plan.py [--s-k 4096 8192] [--costs 2 3 5 8 12 16] [--rounds 3]
    python scripts/sweep_mla_plan.py --costs --fuse 0 2 4 1000   # the merge in the decode kernel

Prints, per shape, GB/s (h_q < 64) or TFLOP/s of each variant and the best; writes
$OUT/sweep_mla_plan.json (OUT defaults to the current folder).
"""
import argparse
import functools
import json
import os

import jax
import numpy as np

from jax_ds import _ffi
from jax_ds.bench import _timing
from jax_ds.bench.mla import inputs, traffic
from jax_ds.ops import mla

parser = argparse.ArgumentParser()
parser.add_argument("--s-k", type=int, nargs="+", default=[4096, 8192])
parser.add_argument("--h-q", type=int, nargs="+", default=[16, 128])
parser.add_argument("--costs", type=int, nargs="*", default=[2, 3, 5, 8, 12, 16])
parser.add_argument("--parts", type=int, nargs="*", default=[],
                    help="extra parts counts per head tile, timed at the default cost")
parser.add_argument("--fuse", type=int, nargs="*", default=[],
                    help="fuse_max_splits values timed at the default cost (the costs' variants "
                         "use mla.FUSE_MAX_SPLITS)")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--budget", type=float, default=0.05)
args = parser.parse_args()
if not (args.costs or args.parts or args.fuse):
    parser.error("nothing to time: give --costs, --parts or --fuse values")

sms = _ffi.num_sms()
SCALE = mla.HEAD_DIM_QK ** -0.5  # mla_decode's default softmax scale
out_rows = []
for s_k in args.s_k:
    for h_q in args.h_q:
        for s_q in (1, 2):
            for varlen in (False, True):
                arg, lens = inputs(0, 128, s_k, h_q, s_q, varlen)
                nbytes, flops = traffic(lens, 128, h_q, s_q)
                plan = mla.kernel_plan(s_q, h_q)
                default_parts, cost0, fuse = (plan["num_parts"], plan["fixed_cost"],
                                              plan["fuse_max_splits"])
                variants = {f"cost{c}": (default_parts, c, fuse) for c in args.costs}
                variants.update({f"parts{p}": (p, cost0, fuse) for p in args.parts})
                variants.update({f"fuse{f}": (default_parts, cost0, f)
                                 for f in args.fuse})
                fns = {key: jax.jit(functools.partial(mla.ffi_mla_decode, scale=SCALE,
                                                      causal=True, num_parts=parts,
                                                      fixed_cost=cost, fuse_max_splits=f,
                                                      align_slack_pct=plan["align_slack_pct"]))
                       for key, (parts, cost, f) in variants.items()}
                times = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for key, fn in fns.items():
                        t = _timing.time_jax(fn, [arg], budget_s=args.budget, repeats=1)
                        times[key].append(t.median_s)
                med = {k: float(np.median(v)) for k, v in times.items()}
                rate = {k: (flops / t / 1e12 if h_q >= 64 else nbytes / t / 1e9)
                        for k, t in med.items()}
                unit = "TFLOP/s" if h_q >= 64 else "GB/s"
                best = max(rate, key=rate.get)
                print(f"s_k {s_k} h{h_q} sq{s_q} {'var' if varlen else 'fix'} ({unit}): "
                      + " ".join(f"{k} {v:.0f}" for k, v in rate.items()) + f"  best {best}",
                      flush=True)
                out_rows.append(dict(s_k=s_k, h_q=h_q, s_q=s_q, varlen=varlen, unit=unit,
                                     rate=rate, seconds=med, default_parts=default_parts,
                                     default_cost=mla.FIXED_COST,
                                     default_fuse=mla.FUSE_MAX_SPLITS, best=best))
                del arg
with open(os.path.join(os.environ.get("OUT", "."), "sweep_mla_plan.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, num_sms=sms, rows=out_rows), f, indent=1)
