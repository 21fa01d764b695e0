"""The MLA decode kernel's timeline, from a tracing build: where a call's time goes per CTA.

Build the library with the trace (each decode CTA stamps %globaltimer at fixed points, the
combine kernel its first start and last end; the default build compiles none of it, and its
SASS is the same as without the trace points):

    cmake -S . -B build/trace -G Ninja -DJAX_DS_MLA_TRACE=ON -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE=$(which python) && cmake --build build/trace
    cp build/trace/_C.*.so jax_ds/

then

    python scripts/mla_trace.py                          # b128 s_k 4096 h128 Sq1, fixed and var
    python scripts/mla_trace.py 128 8192 128 1 [var]     # one shape: b s_k h_q s_q [var]
    python scripts/mla_trace.py --rounds 5 --npz trace.npz ...
    python scripts/mla_trace.py --summarize trace.npz ...  # again from saved slots (no GPU)

Per shape it prints the means over the CTAs (and rounds) of: the launch spread (a CTA's entry
after the first), the plan, the segments that wrote split partials, each segment's parts (Q
wait, first KV wait, the body from Q to the epilogue, warpgroup 0's epilogue, warpgroup 1's wait
for the first P), the CTA's end, and the grid's tail (the last CTA's end against the mean); the
body's time per KV block; the combine kernel's start and end against the decode grid's end.
"isolated": one call, synchronized before and after; "back-to-back": the last of 8 calls
dispatched together (its decode slots only).
A stamp after a store (the epilogue's end) marks when the stores were issued, not when they
reached memory. The tracing build's own stores are a few per segment; its ptxas spills differ
slightly from the default build's (40 / 60 B against 32 / 56), so time the default build for
rates (`python -m jax_ds.bench mla`).
"""
import argparse
import functools
import importlib

import jax
import numpy as np

from jax_ds import _ffi
from jax_ds.bench.mla import inputs
from jax_ds.ops import mla

# the kernel's slots (TraceSlot in ffi/mla/mla_decode.cu; tests/test_mla_trace.py compares them)
CTAS, SLOTS, SEGS = 1024, 64, 6
ENTRY, PLANNED, PRODUCER_DONE, WG0_END, WG1_END, NSEG, NBLK, SPLITS = range(8)
Q_ISSUE, Q_FULL, FIRST_KV, LAST_S, EPI_START, EPI_END, WG1_FIRST_P, WG1_SEG_END = (
    8, 14, 20, 26, 32, 38, 44, 50)
NO_COMBINE = np.array([-1, -1, -1, -1])  # the combine kernel's values where none were kept


def library():
    lib = importlib.import_module("jax_ds._C") if _ffi.STATUS.loaded else None
    if lib is None or not hasattr(lib, "mla_trace_read"):
        raise SystemExit("mla_trace: needs jax_ds._C built with -DJAX_DS_MLA_TRACE=ON")
    return lib


def read(lib, ctas):
    raw = np.frombuffer(lib.mla_trace_read(), np.uint64)
    if raw.size != CTAS * SLOTS + 4:  # g_trace in ffi/mla/mla_decode.cu
        raise SystemExit(f"mla_trace: the library's trace holds {raw.size} values, this script "
                         f"reads {CTAS * SLOTS + 4}: its slots (TraceSlot) changed")
    slots = raw[:CTAS * SLOTS].reshape(CTAS, SLOTS)[:ctas].astype(np.int64)
    return slots, raw[CTAS * SLOTS:].astype(np.int64)


def summarize(slots, combine):
    """{name: microseconds} for one traced call (means over the CTAs that own a segment; the
    launch's first entry is time 0)."""
    t0 = slots[:, ENTRY].min()
    idle = int((slots[:, NSEG] == 0).sum())
    slots = slots[slots[:, NSEG] > 0]
    ends = np.maximum(slots[:, WG0_END], slots[:, WG1_END])
    nseg = slots[:, NSEG]
    us = lambda x: float(np.mean(x)) / 1e3  # noqa: E731
    out = {"ctas": len(slots), "idle ctas": idle, "segments per CTA": float(nseg.mean()),
           "blocks per CTA": float(slots[:, NBLK].mean()),
           "entry spread": us(slots[:, ENTRY] - t0),
           "plan": us(slots[:, PLANNED] - slots[:, ENTRY]),
           "CTA span": us(ends - slots[:, ENTRY]),
           "grid end": float(ends.max() - t0) / 1e3,
           "tail (last end - mean end)": float(ends.max() - ends.mean()) / 1e3}
    out["split segments per CTA"] = float(np.mean([bin(int(x)).count("1")
                                                   for x in slots[:, SPLITS]]))
    parts = {"Q issue -> Q full": (Q_ISSUE, Q_FULL), "Q full -> first KV": (Q_FULL, FIRST_KV),
             "body (Q full -> epilogue)": (Q_FULL, EPI_START),
             "last S -> epilogue": (LAST_S, EPI_START),
             "WG0 epilogue": (EPI_START, EPI_END),
             "WG1 first P after Q full": (Q_FULL, WG1_FIRST_P),
             "WG1 end after WG0's": (EPI_END, WG1_SEG_END)}
    # [CTAs, SEGS]: the segments stamped (the kernel stamps the first SEGS of a CTA's)
    stamped = np.arange(SEGS)[None, :] < np.minimum(nseg, SEGS)[:, None]
    span = lambda a, b: slots[:, b:b + SEGS] - slots[:, a:a + SEGS]  # noqa: E731
    for name, (a, b) in parts.items():
        vals = span(a, b)[stamped]
        out[name + " (per segment)"] = us(vals) if vals.size else 0.0
    if (nseg <= SEGS).all():  # every segment stamped: sums per CTA
        out["body per KV block"] = (float(span(Q_FULL, EPI_START)[stamped].sum())
                                    / max(int(slots[:, NBLK].sum()), 1) / 1e3)
        out["epilogues per CTA"] = float(span(EPI_START, EPI_END)[stamped].sum()) / len(slots) / 1e3
        # from an epilogue's end to the next segment's Q full
        gaps = slots[:, Q_FULL + 1:Q_FULL + SEGS] - slots[:, EPI_END:EPI_END + SEGS - 1]
        out["between segments per CTA"] = float(gaps[stamped[:, 1:]].sum()) / len(slots) / 1e3
        out["entry -> first Q full"] = us(slots[:, Q_FULL] - slots[:, ENTRY])
        last_epilogue = slots[np.arange(len(slots)), EPI_END + nseg - 1]
        out["last epilogue -> CTA end"] = us(ends - last_epilogue)
    # reset values (or NO_COMBINE): the combine kernel did not run, or its values were not kept
    if combine[0] != -1 and combine[3] > 0:
        dec_end = ends.max()
        out["combine first start - decode end"] = float(combine[0] - dec_end) / 1e3
        out["combine first after wait - decode end"] = float(combine[1] - dec_end) / 1e3
        # its last CTA to get an SM: a grid of many small CTAs is still being scheduled then
        out["combine last after wait - decode end"] = float(combine[2] - dec_end) / 1e3
        out["combine last end - decode end"] = float(combine[3] - dec_end) / 1e3
    return out


def report(title, runs):
    print(title)
    for key in runs[0]:
        vals = [run.get(key, np.nan) for run in runs]
        print(f"  {key:42s} {np.mean(vals):9.2f}  (min {np.min(vals):.2f}, max {np.max(vals):.2f})")


def summarize_files(paths):
    """The tables again from --npz files (decode slots, and the combine's four values of isolated
    calls under "<name> combine" keys)."""
    for path in paths:
        z = np.load(path)
        groups = {}
        for key in z.files:
            if key.endswith(" combine"):
                continue
            groups.setdefault(key.rsplit(" ", 1)[0], []).append(key)
        for name, keys in groups.items():
            runs = [summarize(z[k], z[k + " combine"] if k + " combine" in z.files else NO_COMBINE)
                    for k in keys]
            report(f"{path}: {name} ({len(runs)} calls, us)", runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="*", help="b s_k h_q s_q [var]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--npz", help="write every round's raw slots here")
    ap.add_argument("--summarize", nargs="+", metavar="NPZ", help="print saved traces, no GPU")
    args = ap.parse_args()
    if args.summarize:
        summarize_files(args.summarize)
        return
    lib = library()
    if args.shape:
        b, s_k, h, sq = (int(x) for x in args.shape[:4])
        shapes = [(b, s_k, h, sq, len(args.shape) > 4 and args.shape[4] == "var")]
    else:
        shapes = [(128, 4096, 128, 1, False), (128, 4096, 128, 1, True)]
    raw = {}
    for i, (b, s_k, h, sq, var) in enumerate(shapes):
        (q, kv, table, lens), _ = inputs(i, b, s_k, h, sq, var)
        parts = mla.kernel_plan(sq, h)["num_parts"]
        ctas = -(-h * sq // 64) * parts
        if ctas > CTAS:
            raise SystemExit(f"mla_trace: {ctas} CTAs, the trace keeps {CTAS}")
        fn = jax.jit(functools.partial(mla.mla_decode, impl="ffi"))  # the op as users call it
        for _ in range(3):
            jax.block_until_ready(fn(q, kv, table, lens))
        name = f"b{b} s_k{s_k} h{h} sq{sq}{' var' if var else ''}"
        reports = []
        for mode in ("isolated", "back-to-back"):
            runs = []
            for r in range(args.rounds):
                lib.mla_trace_reset()
                if mode == "isolated":
                    jax.block_until_ready(fn(q, kv, table, lens))
                else:
                    outs = [fn(q, kv, table, lens) for _ in range(8)]
                    jax.block_until_ready(outs)
                slots, combine = read(lib, ctas)
                raw[f"{name} {mode} {r}"] = slots
                if mode == "isolated":  # (over 8 calls the atomics mix the calls)
                    raw[f"{name} {mode} {r} combine"] = combine
                else:
                    combine = NO_COMBINE
                runs.append(summarize(slots, combine))
            reports.append((f"{name} ({mode}, {parts} parts per head tile, {ctas} CTAs; means of "
                            f"{args.rounds} calls, us)", runs))
        if args.npz:  # the slots so far, before printing (a reader that stops early, `| head`,
            np.savez_compressed(args.npz, **raw)  # ends the script at its next print)
        for title, runs in reports:
            report(title, runs)


if __name__ == "__main__":
    main()
