"""A/B of builds of the kernel library on the GEMM benchmark shapes, each build in its own
process, rounds alternating (A B C, C B A, A B C, ...) so that clock and thermal drift fall on
every variant alike.

A variant is a directory holding a `jax_ds` package whose `_C` is the build under test (e.g. a
copy of the tree's `jax_ds/` with a patched library: scripts/ffma_yield.py). Each child process
runs with that directory first on PYTHONPATH, checks that it imported that package's `_C`, and
times every shape at the op's own pick (`impl="ffi"`). GEMM suites: the benchmark's device-bound
figure (one executable of many calls, time_jax_launch) and the profiler's kernel time. The mla
suite: `bench mla`'s per-call and device-bound figures at s_k 4096 (or --mla-shapes), in TFLOP/s
for h >= 64 and GB/s of cache below. Prints a table of
medians, writes $OUT/lib-ab-<device>-<date>.json (OUT defaults to .).

  python scripts/lib_ab.py DIR_A DIR_B [...] [--rounds 3] [--suite dense grouped] [--quick]
  python scripts/lib_ab.py A B --suite dense --shapes 4096x4096x7168 8192x8192x8192
  python scripts/lib_ab.py A B --suite dense --sets 4 --max-reps 4   # the defaults before 12-06
  python scripts/lib_ab.py A B --suite grouped --grouped-shapes contiguous:32x256:4096x7168
  python scripts/lib_ab.py A B --suite mla --mla-shapes 128:8192:128:1 128:4096:128:2:var
  python scripts/lib_ab.py A B --impl xla --tiny --rounds 2   # a dry run of the script on CPU
  python scripts/lib_ab.py --show benchmarks/results/lib-ab-h100-2026-12-06-scale-offsets.json

After the medians it prints each variant against the first: the ratio of the medians and every
round's device-bound (MLA: per-call) figure against the first variant's median.

A variant whose child process fails, or gives no result within --child-timeout seconds (300; a
kernel that hangs: one did on 2026-12-06 and took the whole device call), is dropped from the
remaining rounds and named under "dropped" in the file; the others go on. The first variant is
the baseline: if it fails, the run stops. The file is written once, after the last round: a run
cut short from outside (a device call's 600 s) leaves nothing, so keep --child-timeout and the
rounds under that limit.

The device-bound figure is timed as the benchmarks time it: bench gemm's input sets per shape
(4-16, `bench.gemm.input_set_count`), bench moe's 3 for the grouped suite, executables of up to
32 repeats. Until the twenty-fifth session (2026-12-06) the defaults were 4 sets and 4 repeats,
which moved tile decisions by up to 5 points against `bench gemm` (NOTES-gemm): the committed
lib-ab files from before then were timed that way.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

DENSE = [(4096, 2112, 7168), (4096, 24576, 1536), (4096, 32768, 512), (4096, 7168, 16384),
         (4096, 4096, 7168), (4096, 7168, 2048), (8192, 8192, 8192), (128, 7168, 16384),
         (128, 24576, 1536), (128, 7168, 2048)]
# (kind, groups, rows per group, n, k): the DeepGEMM shapes of `bench moe`
GROUPED = [("contiguous", 4, 8192, 4096, 7168), ("contiguous", 4, 8192, 7168, 2048),
           ("contiguous", 8, 4096, 4096, 7168), ("contiguous", 8, 4096, 7168, 2048),
           ("masked", 1, 1024, 4096, 7168), ("masked", 1, 1024, 7168, 2048),
           ("masked", 2, 512, 4096, 7168), ("masked", 4, 256, 4096, 7168)]


# (b, s_k, h_q, s_q, variable lengths): `bench mla`'s s_k 4096 shapes
MLA = [(128, 4096, h, sq, var) for h in (16, 128) for sq in (1, 2) for var in (False, True)]
# --quick: the shapes under a bar (NOTES-gemm, NOTES-moe, NOTES-mla)
QUICK_MLA = [(128, 4096, 128, 1, False), (128, 4096, 128, 1, True), (128, 4096, 16, 2, True)]
TINY_MLA = [(2, 128, 16, 1, True)]
QUICK_DENSE = [(4096, 7168, 16384), (4096, 4096, 7168), (4096, 32768, 512), (128, 32768, 512)]
QUICK_GROUPED = [GROUPED[2], GROUPED[4]]
TINY_DENSE = [(128, 256, 256)]
TINY_GROUPED = [("contiguous", 2, 128, 256, 256), ("masked", 2, 64, 256, 256)]


def _child(suites, quick, impl, tiny, dense_shapes=None, grouped_shapes=None, num_sets=None,
           max_reps=32, mla_shapes=None) -> list:
    """Runs in the variant's process: [(label, figure, figure)]. GEMM: device-bound and kernel
    TFLOP/s; MLA: per-call and device-bound, in the label's unit."""
    import jax
    import jax.numpy as jnp

    import jax_ds
    from jax_ds import _ffi
    from jax_ds.bench._profile import device_time_jax
    from jax_ds.bench._timing import time_jax_launch
    from jax_ds.bench.gemm import block_sets, input_set_count
    from jax_ds.bench.moe import SETS as MOE_SETS
    from jax_ds.bench.moe import _operands
    from jax_ds.ops import fp8_gemm, grouped_fp8_gemm, masked_grouped_fp8_gemm

    here = pathlib.Path.cwd().resolve()
    if not pathlib.Path(jax_ds.__file__).resolve().is_relative_to(here):
        raise SystemExit(f"imported {jax_ds.__file__}, not the variant's package in {here}")
    if impl == "ffi" and not _ffi.STATUS.loaded:
        raise SystemExit(f"the kernel library did not load: {_ffi.STATUS.error}")
    rows = []

    def shapes(full, quick_list, tiny_list):
        return tiny_list if tiny else quick_list if quick else full

    def record(label, a, b):
        rows.append((label, a, b))
        print(f"  {label:40s} {a:7.0f} {b:7.0f}", file=sys.stderr, flush=True)

    def timed(label, fn, sets, flops):
        t = time_jax_launch(fn, sets, max_reps=max_reps, budget_s=0.25, repeats=3)
        kern = device_time_jax(jax.jit(fn), sets, 2 * len(sets)) if impl == "ffi" else t.median_s
        record(label, flops / t.median_s / 1e12, flops / kern / 1e12)

    if "dense" in suites:
        for m, n, k in dense_shapes or shapes(DENSE, QUICK_DENSE, TINY_DENSE):
            timed(f"dense {m}x{n}x{k}", lambda *o: fp8_gemm(*o, impl=impl),
                  block_sets(m, n, k, num_sets or input_set_count(m, n, k)), 2 * m * n * k)
    if "grouped" in suites:
        for kind, g, r, n, k in grouped_shapes or shapes(GROUPED, QUICK_GROUPED, TINY_GROUPED):
            a_shape = (g, r) if kind == "masked" else (g * r,)
            sets = [(*_operands(jax.random.key(i), a_shape, g, n, k),
                     jnp.full((g,), r, jnp.int32)) for i in range(num_sets or MOE_SETS)]
            op = masked_grouped_fp8_gemm if kind == "masked" else grouped_fp8_gemm
            timed(f"{kind} {g}x{r} n{n} k{k}", lambda *o, op=op: op(*o, impl=impl), sets,
                  2 * g * r * n * k)
    if "mla" in suites:
        import functools

        from jax_ds.bench._timing import time_jax
        from jax_ds.bench.mla import inputs, second_set, traffic
        from jax_ds.ops import mla_decode
        for b, s_k, h, sq, var in mla_shapes or shapes(MLA, QUICK_MLA, TINY_MLA):
            arg, lens = inputs(0, b, s_k, h, sq, var)
            nbytes, flops = traffic(lens, b, h, sq)
            fn = jax.jit(functools.partial(mla_decode, causal=True, impl=impl))
            per = time_jax(fn, [arg], budget_s=0.06, repeats=3).median_s
            dev = time_jax_launch(fn, [arg, second_set(arg, 0)], budget_s=0.06,
                                  repeats=3).median_s
            # h16 is bound by the cache's bytes, h128 by the matrix rate (the bars)
            work, unit = (flops / 1e12, "TFLOP/s") if h >= 64 else (nbytes / 1e9, "GB/s")
            record(f"mla h{h} sq{sq} {'var' if var else 'fixed'} b{b} s_k{s_k} {unit}",
                   work / per, work / dev)
    return rows


def _mnk(text: str) -> tuple:
    try:
        m, n, k = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MxNxK, e.g. 4096x7168x2048")
    if min(m, n, k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1")
    return m, n, k


def _mla(text: str) -> tuple:
    """B:SK:H:SQ[:var] (e.g. 128:8192:128:1, 128:4096:128:2:var) -> (b, s_k, h_q, s_q, var)."""
    parts = text.lower().split(":")
    try:
        b, s_k, h, sq = (int(x) for x in parts[:4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected B:SK:H:SQ[:var], e.g. 128:8192:128:1")
    if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "var") or min(b, s_k, h, sq) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected B:SK:H:SQ[:var] with sizes >= 1, e.g. 128:4096:128:2:var")
    return b, s_k, h, sq, len(parts) == 5


def _grouped(text: str) -> tuple:
    """KIND:GxR:NxK (e.g. masked:32x256:7168x2048) -> (kind, g, rows per group, n, k)."""
    try:
        kind, gr, nk = text.lower().split(":")
        (g, r), (n, k) = ((int(x) for x in part.split("x")) for part in (gr, nk))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KIND:GxR:NxK, e.g. contiguous:32x256:4096x7168")
    if kind not in ("contiguous", "masked") or min(g, r, n, k) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: KIND is contiguous or masked, and sizes are >= 1")
    return kind, g, r, n, k


def _median(runs, i):
    return statistics.median(r[i] for r in runs) if runs else float("nan")


def _change(x, ref):
    """x / ref - 1, NaN where ref is 0 or NaN (a cell that failed or timed nothing)."""
    return x / ref - 1 if ref else float("nan")


def report(results: dict, dropped: dict | None = None) -> None:
    """Prints the medians of every variant and shape, then each variant against the first: the
    ratio of the medians (first figure, second figure) and of every round's first figure to the
    first variant's median (the spread a decision has to clear); last, the variants dropped and
    why."""
    labels = list(next(iter(results.values())))
    head = "".join(f" | {pathlib.Path(v).name[:18]:>18s}" for v in results)
    print(f"{'shape (GEMM: device-bound / kernel TFLOP/s; MLA: per call / device-bound)':46s}"
          f"{head}")
    for label in labels:
        cells = [f" | {_median(results[v].get(label, []), 0):8.0f} / "
                 f"{_median(results[v].get(label, []), 1):7.0f}" for v in results]
        print(f"{label:46s}{''.join(cells)}")
    base, *others = results
    for v in others:
        print(f"{pathlib.Path(v).name} / {pathlib.Path(base).name} (medians; each round's first "
              "figure):")
        for label in labels:
            a, b = results[base].get(label, []), results[v].get(label, [])
            if not a or not b:
                continue
            ref = _median(a, 0)
            rounds = " ".join(f"{_change(r[0], ref):+.1%}" for r in b)
            print(f"  {label:44s} {_change(_median(b, 0), ref):+6.1%} / "
                  f"{_change(_median(b, 1), _median(a, 1)):+6.1%}   rounds {rounds}")
    for v, why in (dropped or {}).items():
        print(f"{v}: dropped, {why}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--suite", nargs="+", default=["dense", "grouped"],
                    choices=["dense", "grouped", "mla"])
    ap.add_argument("--quick", action="store_true", help="only the shapes under a bar")
    ap.add_argument("--impl", default="ffi", choices=["ffi", "xla"],
                    help="xla: the references, no kernel time (a dry run of this script on CPU)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (with --impl xla on CPU)")
    ap.add_argument("--shapes", nargs="+", metavar="MxNxK", type=_mnk,
                    help="the dense suite's shapes instead of its list (e.g. the ones a knob moves)")
    ap.add_argument("--grouped-shapes", nargs="+", metavar="KIND:GxR:NxK", type=_grouped,
                    help="the grouped suite's shapes instead of its list")
    ap.add_argument("--mla-shapes", nargs="+", metavar="B:SK:H:SQ[:var]", type=_mla,
                    help="the mla suite's shapes instead of its list")
    ap.add_argument("--sets", type=int, default=None,
                    help="GEMM suites: input sets the calls rotate over (default: as bench gemm "
                         "per shape, 4-16; grouped as bench moe, 3)")
    ap.add_argument("--max-reps", type=int, default=32,
                    help="GEMM suites: time_jax_launch's max_reps (the benchmarks': 32)")
    ap.add_argument("--child-timeout", type=float, default=300, metavar="SECONDS",
                    help="a variant whose process gives no result in this time (a hung kernel) "
                         "or fails is dropped from the remaining rounds; the first variant, the "
                         "baseline, ends the run instead (default 300: under a device call's "
                         "600 s, which would end the run with nothing written)")
    ap.add_argument("--show", type=pathlib.Path, metavar="FILE",
                    help="print the report of a lib-ab JSON file written before (no runs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.show:
        data = json.loads(args.show.read_text())
        report(data["results"], data.get("dropped"))
        return 0
    if args.child:
        json.dump(_child(args.suite, args.quick, args.impl, args.tiny, args.shapes,
                         args.grouped_shapes, args.sets, args.max_reps, args.mla_shapes),
                  sys.stdout)
        return 0
    if len(args.variants) < 2:
        ap.error("give at least two variant directories")
    for flag, given, suite in (("--shapes", args.shapes, "dense"),
                               ("--grouped-shapes", args.grouped_shapes, "grouped"),
                               ("--mla-shapes", args.mla_shapes, "mla")):
        if given and suite not in args.suite:
            ap.error(f"{flag} sets the {suite} suite's shapes, and --suite leaves it out")
    for v in args.variants:
        if not (v / "jax_ds").is_dir() or (args.impl == "ffi" and
                                            not list((v / "jax_ds").glob("_C*.so"))):
            ap.error(f"{v}: no jax_ds package with its _C*.so in it")

    results = {str(v): {} for v in args.variants}
    dropped = {}  # variant -> why
    for rnd in range(args.rounds):
        order = args.variants if rnd % 2 == 0 else args.variants[::-1]
        for v in order:
            if str(v) in dropped:
                continue
            print(f"round {rnd} {v}", file=sys.stderr, flush=True)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(v.resolve())] + [p for p in os.environ.get("PYTHONPATH", "").split(
                    os.pathsep) if p]))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", args.impl,
                   "--suite", *args.suite]
            cmd += ["--sets", str(args.sets)] if args.sets else []
            cmd += ["--max-reps", str(args.max_reps)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--tiny"] if args.tiny else []
            cmd += ["--shapes", *(f"{m}x{n}x{k}" for m, n, k in args.shapes)] if args.shapes else []
            cmd += (["--grouped-shapes", *(f"{kd}:{g}x{r}:{n}x{k}"
                                           for kd, g, r, n, k in args.grouped_shapes)]
                    if args.grouped_shapes else [])
            cmd += (["--mla-shapes", *(f"{b}:{sk}:{h}:{sq}" + (":var" if var else "")
                                       for b, sk, h, sq, var in args.mla_shapes)]
                    if args.mla_shapes else [])
            try:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=v,
                                     timeout=args.child_timeout)
                err = out.stderr
                why = f"the child process failed (exit {out.returncode})" if out.returncode else ""
            except subprocess.TimeoutExpired as e:  # run() has killed the child
                # (its captured output comes as bytes even with text=True)
                err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
                why = f"no result within {args.child_timeout:g} s (a hung kernel?)"
            sys.stderr.write((err or "")[-4000:])
            if why:
                if v == args.variants[0]:
                    raise SystemExit(f"{v}: {why}; the others are compared with it, run stopped")
                print(f"{v}: {why}; dropped from the remaining rounds", file=sys.stderr,
                      flush=True)
                dropped[str(v)] = why
                continue
            for label, dev, kern in json.loads(out.stdout):
                results[str(v)].setdefault(label, []).append((dev, kern))

    from jax_ds.bench import environment, write_json
    sets_note = str(args.sets) if args.sets else "the benchmarks'"
    path = write_json(os.environ.get("OUT", "."), "lib-ab", environment(), {
        "note": "per variant and shape, each round: GEMM [device-bound, kernel] TFLOP/s "
                f"(time_jax_launch max_reps {args.max_reps} median of 3, over "
                f"{sets_note} input sets; profiler kernel time); "
                "MLA [per call, "
                "device-bound] in the label's unit (time_jax, time_jax_launch over two input "
                "sets); rounds alternate the variants' order",
        "variants": [str(v) for v in args.variants], "rounds": args.rounds, "dropped": dropped,
        "results": results})
    report(results, dropped)  # after the file: a report that fails loses no run
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
