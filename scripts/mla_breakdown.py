"""Where an MLA decode call's time goes on the GPU: per-call wall time and each kernel's own time.

    python scripts/mla_breakdown.py                    # b128 s_k 4096: h16 / h128, Sq 1 / 2
    python scripts/mla_breakdown.py 128 4096 16 1 var  # one shape: b s_k h_q s_q [var]
    python scripts/mla_breakdown.py --parts 128 132 66  # each shape with these parts per head tile
Per-call time, GB/s and TFLOP/s are `python -m jax_ds.bench mla`'s (back-to-back jitted calls,
the same byte and FLOP counts); the kernel times come
from `jax.profiler` (the same trace reader as the GEMM benchmarks). The difference between the
call and the sum of its kernels is launch gaps.
"""
import collections
import functools
import sys

import jax

from jax_ds.bench import _profile, _timing
from jax_ds.bench.mla import inputs, traffic
from jax_ds.ops import mla

SHAPES = [(128, 4096, 16, 1, False), (128, 4096, 16, 1, True), (128, 4096, 16, 2, False),
          (128, 4096, 128, 1, False), (128, 4096, 128, 2, False)]


def kernel_times(fn, args, calls=20):
    """{kernel name: microseconds per call} from a profiler trace of `calls` calls."""
    totals = collections.Counter()
    for name, ns in _profile.kernel_events(fn, [args], calls):
        totals[name[:60]] += ns
    return {k: v / calls / 1e3 for k, v in totals.items()}


def main(argv):
    parts = [None]  # None: mla_decode's own choice (one wave)
    if "--parts" in argv:
        i = argv.index("--parts")
        parts, argv = [int(x) for x in argv[i + 1:]], argv[:i]
    shapes = SHAPES
    if argv:
        b, s_k, h, sq = (int(x) for x in argv[:4])
        shapes = [(b, s_k, h, sq, len(argv) > 4 and argv[4] == "var")]
    for i, (b, s_k, h, sq, var) in enumerate(shapes):
        args, lens = inputs(i, b, s_k, h, sq, var)
        nbytes, flops = traffic(lens, b, h, sq)
        plan = mla.kernel_plan(sq, h)
        for p in (plan["num_parts"] if p is None else p for p in parts):
            # mla_decode's call with its default scale and plan, at `p` parts per head tile
            fn = jax.jit(functools.partial(mla.ffi_mla_decode, scale=mla.HEAD_DIM_QK ** -0.5,
                                           causal=True, **{**plan, "num_parts": p}))
            t = _timing.time_jax(fn, [args], budget_s=0.2, repeats=3)
            ks = kernel_times(fn, args)
            print(f"b{b} s_k{s_k} h{h} sq{sq}{' var' if var else ''} parts "
                  f"{p}: call {t.median_s * 1e6:.1f} us "
                  f"({nbytes / t.median_s / 1e9:.0f} GB/s, {flops / t.median_s / 1e12:.0f} "
                  f"TFLOP/s); kernels {sum(ks.values()):.1f} us: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1])),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
