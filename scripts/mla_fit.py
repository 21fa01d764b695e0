"""Splits each `bench mla` shape's device-bound time into a part that grows with s_k and one that
does not: a straight line through its (s_k, us) points, one per s_k of the file.

    python scripts/mla_fit.py benchmarks/results/mla-nvidia-h100-80gb-hbm3-2026-12-06-head-7ed7483.json

Per (h_q, s_q, lengths): the device-bound us at each s_k, the slope as us per 4096 keys, the
intercept (the per-call cost that no s_k changes: plan, pipeline start, split batches' partials
and their merge) and the rate the slope alone gives at the largest s_k (TFLOP/s for h_q >= 64,
else GB/s of the bytes `bench mla` counts). Variable lengths are drawn per shape, so their
points fit a line less well.
"""
import json
import sys

import numpy as np


def fits(rows):
    """[(h_q, s_q, varlen, [(s_k, us)], us per 4096 keys, intercept us, slope-only rate)]."""
    shapes = {}
    for r in rows:
        shapes.setdefault((r["h_q"], r["s_q"], r["varlen"]), []).append(r)
    out = []
    for (h, sq, var), rs in sorted(shapes.items()):
        rs = sorted(rs, key=lambda r: r["s_k"])
        s_k = np.array([r["s_k"] for r in rs], float)
        us = np.array([r["results"]["ours"]["device_us"] for r in rs])
        slope, intercept = np.polyfit(s_k, us, 1)
        last = rs[-1]
        work = last["flops"] / 1e12 if h >= 64 else last["bytes"] / 1e9
        rate = work / (slope * last["s_k"] * 1e-6)
        out.append((h, sq, var, list(zip(s_k.astype(int).tolist(), us.tolist())),
                    slope * 4096, intercept, rate))
    return out


def main(argv):
    rows = json.loads(open(argv[0]).read())["rows"]
    for h, sq, var, pts, per4096, intercept, rate in fits(rows):
        unit = "TFLOP/s" if h >= 64 else "GB/s"
        pts_text = " / ".join(f"{u:.1f}" for _, u in pts)
        print(f"h{h:<3d} Sq{sq} {'var  ' if var else 'fixed'}  us {pts_text}  per 4096 keys "
              f"{per4096:.1f}  intercept {intercept:.1f}  slope alone {rate:.0f} {unit}")


if __name__ == "__main__":
    main(sys.argv[1:])
