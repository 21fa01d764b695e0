"""Times every compiled tile (block_m x block_n, cluster 1 or 2) on the benchmark shapes; prints
the best per shape next to gemm_config's pick and writes JSON (for tuning gemm_config).
With --split, each tile x cluster whose last wave gemm.split_plan would split (short_grid: a grid
of under one wave too, every unit cut along K) is also timed with that split (key suffix "s");
the tiles of one accumulator set (128x192, 192x128) with and without the epilogue overlap
(suffix "o"); 192x128 (gemm.DENSE_EXTRA_TILES) only when --tiles names it.
With --splits S ..., each tile x cluster whose grid fits one wave is also timed with every unit cut
into S K slices, for each S whose slices still fit one wave (key suffix "s" + S, e.g. "64x64c1s4").
gemm_config's pick is timed as it is configured. Keys: GemmConfig.key().
Operands rotate over --sets input sets (2 by default, as in the committed sweeps): at m <= 128 two
sets of B fit in the 50 MB L2, which favoured splits that `bench gemm` (16 sets) and
`scripts/lib_ab.py` (4) then measured slower (NOTES-gemm, twenty-third session): use --sets 4 or more
there.

  python scripts/sweep_gemm.py --shapes 64x2112x7168 128x4096x7168 --splits 2 3 4 7"""
import argparse, json, os
import jax
from jax_ds.arg_specs import gemm_bench_shapes
from jax_ds.bench.gemm import block_sets
from jax_ds.bench._profile import device_time_jax
from jax_ds.ops import gemm

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--m", type=int, nargs="+", help="only the shapes of these m")
parser.add_argument("--tiles", nargs="+", metavar="BMxBN",
                    help="only these tiles (e.g. 128x128 128x64), each with both cluster sizes")
parser.add_argument("--shapes", nargs="+", metavar="MxNxK",
                    type=lambda t: tuple(int(v) for v in t.split("x")),
                    help="these shapes instead of the benchmark's")
parser.add_argument("--splits", type=int, nargs="+", default=[], metavar="S",
                    help="also cut every unit of a grid under one wave into S K slices")
parser.add_argument("--sets", type=int, default=2, help="input sets the calls rotate over")
parser.add_argument("--split", action="store_true",
                    help="also time each tile x cluster with split_plan's K split of its last wave")
args = parser.parse_args()
sms = jax.devices()[0].core_count
rows = []
for (m, n, k) in args.shapes or gemm_bench_shapes():
    if args.m and m not in args.m:
        continue
    sets = block_sets(m, n, k, args.sets, seed=1)
    res = {}

    def measure(cfg, suffix=""):
        f = jax.jit(lambda *o: gemm.ffi_fp8_gemm(*o, cfg))
        res[cfg.key() + suffix] = 2 * m * n * k / device_time_jax(f, sets, 12) / 1e12

    for bm, bn in gemm.DENSE_TILES:
        if (m <= 64 and bm >= 128 or args.tiles and f"{bm}x{bn}" not in args.tiles
                or not args.tiles and (bm, bn) in gemm.DENSE_EXTRA_TILES):
            continue
        for cn in gemm.CLUSTERS:
            units = gemm.work_units(m, n, bm, bn, cn)
            split = gemm.split_plan(units, sms // cn, k // 128, short_grid=True)[:2]
            plans = [(0, 1)] + ([split] if args.split and split[0] else [])
            for overlap in ((False, True) if (bm, bn) in gemm.OVERLAP_TILES else (False,)):
                for plan in plans:
                    measure(gemm.GemmConfig(bm, bn, sms, cn, *plan, overlap))
                for s in args.splits:  # the whole grid in S slices each, in one wave
                    if 1 < s <= k // 128 and units * s <= sms // cn:
                        measure(gemm.GemmConfig(bm, bn, sms, cn, units, s, overlap), str(s))
    pick = gemm.gemm_config(m, n, k, sms)
    pk = pick.key()
    if pk not in res:  # --tiles (or no --split) left the pick out: time it too
        measure(pick)
    best = max(res, key=res.get)
    print(f"{m:5d} {n:6d} {k:6d} best {best:7s} {res[best]:7.0f}  pick {pk:7s} {res[pk]:7.0f}  "
          + " ".join(f"{t}:{v:.0f}" for t, v in res.items()), flush=True)
    rows.append(dict(m=m, n=n, k=k, tflops=res, best=best, pick=pk))
    # after every shape: a sweep cut short by a time limit still leaves what it measured
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "sweep.json"), "w"), indent=1)
