"""Two sets of `bench mla` result files against each other, shape by shape.

For each shape: the device-bound figure of every run in each set (GB/s where h_q * s_q < 64,
the memory-bound side; TFLOP/s otherwise), the sets' medians, and B's median over A's. Then
the geometric mean, least and greatest of those ratios. Runs of the two sets should come from
one machine, interleaved (the lent GPUs differ by a few percent).

    cd benchmarks/results && python ../../scripts/compare_mla_runs.py \\
        --a mla-nvidia-h200-2026-12-05-fuse4*.json --b mla-nvidia-h200-2026-12-05-fuse0-r*.json
"""
import argparse
import json
import math
import pathlib
import statistics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--a", type=pathlib.Path, nargs="+", required=True)
parser.add_argument("--b", type=pathlib.Path, nargs="+", required=True)
args = parser.parse_args()


def load(path):
    data = json.loads(path.read_text())
    if data.get("suite") != "mla":
        raise SystemExit(f"{path}: not a bench mla result (suite {data.get('suite')!r})")
    out = {}
    for row in data["rows"]:
        ours = row["results"].get("ours") or {}
        key = (row["b"], row["s_k"], row["h_q"], row["s_q"], row["varlen"])
        metric = "tflops" if row["h_q"] * row["s_q"] >= 64 else "gbps"
        value = ours.get(f"device_{metric}", ours.get(metric))
        if value is not None:
            out[key] = (metric, value)
    return out


runs_a = [load(p) for p in args.a]
runs_b = [load(p) for p in args.b]
shapes = sorted(set.intersection(*(set(r) for r in runs_a + runs_b)))
if not shapes:
    raise SystemExit("no shape measured in every file")
ratios = []
print(f"{'shape':34} {'unit':6} {'A runs':>24} | {'B runs':>24}   B/A")
for key in shapes:
    metric = runs_a[0][key][0]
    a = [r[key][1] for r in runs_a]
    b = [r[key][1] for r in runs_b]
    ratio = statistics.median(b) / statistics.median(a)
    ratios.append(ratio)
    b_, s_k, h_q, s_q, var = key
    label = f"b{b_} s_k{s_k} h{h_q} sq{s_q} {'var' if var else 'fixed'}"
    print(f"{label:34} {metric:6} {' '.join(f'{x:.0f}' for x in a):>24} | "
          f"{' '.join(f'{x:.0f}' for x in b):>24}   {ratio:.3f}")
geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
print(f"{len(shapes)} shapes, {len(runs_a)} A runs, {len(runs_b)} B runs: B/A geometric mean "
      f"{geomean:.3f}, least {min(ratios):.3f}, greatest {max(ratios):.3f}; "
      f"B ahead on {sum(r > 1 for r in ratios)}")
