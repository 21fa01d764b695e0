"""Device check of the MLA decode kernel against the reference: prints errors, asserts nothing.

    python scripts/check_mla.py            # a few shapes; one line per case
    python scripts/check_mla.py --nan-row  # a NaN in a row a query sees: kernel vs reference
Columns: max |out - ref|, calc_diff, max |lse - ref| (finite), NaN/Inf mismatches, and the batch
rows with the worst error (split batches go through the combine kernel, others do not).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds.ops import mla_decode
from jax_ds.testing import calc_diff

CASES = [  # b, sq, hq, causal, max_len, fixed
    (1, 1, 16, True, 64, True), (2, 1, 64, True, 200, False), (4, 1, 16, True, 1000, False),
    (8, 2, 16, True, 3000, False), (33, 1, 128, True, 5000, False), (33, 2, 128, False, 5000, False),
    (132, 2, 64, True, 16384, False), (128, 1, 128, True, 4096, True), (1, 1, 128, True, 16384, True),
]


def _paged(*args, **kwargs):
    """The GPU test's inputs (tests/test_mla_decode_gpu.py: NaN-poisoned cache tails)."""
    sys.path.insert(0, "tests")
    from test_mla_decode_gpu import paged
    return paged(*args, **kwargs)


def run(b, sq, hq, causal, max_len, fixed, seed=0):
    args = _paged(seed, b, sq, hq, fixed_len=max_len if fixed else None, max_len=max_len)
    lens = np.asarray(args[3])
    f = jax.jit(lambda *a, impl: mla_decode(*a, causal=causal, impl=impl), static_argnames="impl")
    out, lse = jax.block_until_ready(f(*args, impl="ffi"))
    ro, rl = f(*args, impl="xla")
    out, ro = np.asarray(out, np.float32), np.asarray(ro, np.float32)
    lse, rl = np.asarray(lse), np.asarray(rl)
    nan = int((np.isnan(out) != np.isnan(ro)).sum() + (np.isinf(lse) != np.isinf(rl)).sum()
              + np.isnan(lse).sum())
    fin = np.isfinite(ro) & np.isfinite(out)
    d = np.where(fin, np.abs(out - ro), 0)
    per_b = d.reshape(b, -1).max(1)
    fl = np.isfinite(rl) & np.isfinite(lse)
    dl = np.abs(np.where(fl, lse - rl, 0)).max()
    worst = np.argsort(per_b)[-3:][::-1]
    print(f"b{b} sq{sq} h{hq} causal={causal} len<={max_len}: out max {d.max():.2e} "
          f"calc_diff {calc_diff(out[fin], ro[fin]):.1e} lse {dl:.2e} nan/inf mismatch {nan} "
          f"worst b {list(worst)} lens {list(lens[worst])} err {[f'{per_b[i]:.1e}' for i in worst]}",
          flush=True)


def explain_test_case(b, sq, hq, causal):
    """Reproduces tests/test_mla_decode_gpu.py's case and prints the worst tolerance violations."""
    q, kv, table, lens = _paged(b * 1000 + sq * 100 + hq, b, sq, hq)
    f = jax.jit(lambda *a, impl: mla_decode(*a, causal=causal, impl=impl), static_argnames="impl")
    out, lse = (np.asarray(x, np.float32) for x in f(q, kv, table, lens, impl="ffi"))
    ro, rl = (np.asarray(x, np.float32) for x in f(q, kv, table, lens, impl="xla"))
    excess = np.abs(out - ro) - (8e-4 + 2 / 128 * np.abs(ro))
    idx = np.argsort(np.nan_to_num(excess, nan=1e9).ravel())[-8:][::-1]
    lens = np.asarray(lens)
    for i in idx:
        bi, si, hi, ci = np.unravel_index(i, out.shape)
        print(f"  b{bi} s{si} h{hi} col{ci}: ours {out[bi, si, hi, ci]:.6f} ref "
              f"{ro[bi, si, hi, ci]:.6f} excess {excess.ravel()[i]:.2e} len {lens[bi]}")
    le = np.abs(lse - rl) - (1e-6 + 1e-6 * np.abs(rl))
    j = np.nanargmax(np.where(np.isfinite(rl), le, -1))
    print(f"  worst lse excess {le.ravel()[j]:.2e} at {np.unravel_index(j, lse.shape)}")


if __name__ == "__main__" and sys.argv[1:2] == ["--profile"]:  # b s_k h_q s_q: 3 ffi calls
    from jax_ds.bench.mla import inputs
    b, s_k, h_q, s_q = map(int, sys.argv[2:6])
    args, _ = inputs(0, b, s_k, h_q, s_q, False)
    f = jax.jit(lambda *a: mla_decode(*a, impl="ffi"))
    for _ in range(3):
        jax.block_until_ready(f(*args))
elif __name__ == "__main__" and sys.argv[1:2] == ["--ffi-only"]:  # for compute-sanitizer
    # The kernel alone (no XLA reference compiled under the sanitizer) on split/unsplit layouts,
    # poisoned tails, empty rows, Sq 1-2 and Hq 16-128, and equal lengths (the plan cuts at batch
    # boundaries, some parts get none); prints whether every output is finite.
    from jax_ds.bench.mla import inputs
    for i, (b, s_k, h_q, s_q, var, empty0) in enumerate([
            (3, 300, 16, 1, True, True), (33, 2000, 64, 2, True, True),
            (5, 4096, 128, 2, False, True), (1, 9000, 16, 1, False, True),
            (128, 4096, 16, 2, False, False), (128, 1000, 128, 1, False, False)]):
        args, lens = inputs(i, b, s_k, h_q, s_q, var)
        if empty0:
            lens = lens.copy()
            lens[0] = 0
            args = args[:3] + (jnp.asarray(lens),)
        out, lse = jax.block_until_ready(mla_decode(*args, impl="ffi"))
        out = np.asarray(out, np.float32)
        print(f"b{b} s_k{s_k} h{h_q} sq{s_q}: finite {bool(np.isfinite(out).all())}, "
              f"row 0 zero {bool((out[0] == 0).all())}", flush=True)
    # Wild traced values (clamped in the kernel): block ids past num_blocks, negative, INT32
    # extremes; lengths past the table and below 0.
    args, lens = inputs(9, 6, 1000, 64, 2, True)
    table = np.asarray(args[2]).copy()
    table[0, 0], table[1, -1], table[2, 0], table[3, :] = 2**31 - 1, -(2**31), -5, 10**6
    lens = lens.copy()
    lens[4], lens[5] = 2**31 - 1, -7
    out, lse = jax.block_until_ready(jax.jit(lambda *a: mla_decode(*a, impl="ffi"))(
        *args[:2], jnp.asarray(table), jnp.asarray(lens)))
    print(f"wild table and lengths: finite {bool(np.isfinite(np.asarray(out, np.float32)).all())}",
          flush=True)
elif __name__ == "__main__" and sys.argv[1:2] == ["--nan-row"]:
    # One NaN in a cache row that batch 0's queries see (its middle row; in a value column or
    # in the rope part), 128 x 300 (each batch whole in one part) and 2 x 9000 (each cut into
    # many): the NaN and +inf (no key) counts of out and lse, kernel against the reference, for
    # batch 0 and any other batch where they differ (NOTES-mla, 12-05).
    from jax_ds.bench.mla import inputs
    run_both = jax.jit(lambda *a, impl: mla_decode(*a, impl=impl), static_argnames="impl")
    for b, s_k, h_q, s_q in [(128, 300, 16, 1), (2, 9000, 16, 2), (2, 9000, 128, 1)]:
        for col in (7, 575):
            args, lens = inputs(3, b, s_k, h_q, s_q, False)
            row = int(lens[0]) // 2
            block = int(np.asarray(args[2])[0, row // 64])
            kv = args[1].at[block, row % 64, 0, col].set(jnp.nan)
            got = [[np.asarray(a, np.float32) for a in run_both(args[0], kv, *args[2:], impl=i)]
                   for i in ("ffi", "xla")]
            print(f"b{b} s_k{s_k} h{h_q} sq{s_q} NaN at row {row} col {col}:", flush=True)
            for bi in range(b):
                counts = [(np.isnan(o[bi]).sum(), np.isnan(l[bi]).sum(), np.isposinf(l[bi]).sum())
                          for o, l in got]
                if bi == 0 or counts[0] != counts[1]:
                    print(f"  batch {bi}: " + " | ".join(
                        f"{name} out nan {c[0]} lse nan {c[1]} +inf {c[2]}"
                        for name, c in zip(("ffi", "ref"), counts)), flush=True)
elif __name__ == "__main__" and sys.argv[1:2] == ["--test-case"]:
    explain_test_case(*map(int, sys.argv[2:5]), bool(int(sys.argv[5])))
elif __name__ == "__main__":
    for c in CASES[: int(sys.argv[1]) if len(sys.argv) > 1 else None]:
        try:
            run(*c)
        except Exception as e:
            print(c, "FAILED", type(e).__name__, str(e)[:300], flush=True)
