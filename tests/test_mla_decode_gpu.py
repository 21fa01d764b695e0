"""The MLA decode kernel (impl="ffi") against the reference at FlashMLA's tolerances.

out: |diff| <= 8e-4 + (2/128) |ref| elementwise and calc_diff < 5e-6; lse: |diff| <= 1e-6 (plus a
float32 ulp-scale relative term); Inf/NaN at the same positions. B in (1, 33, 132), Sq in (1, 2),
Hq in (16, 64, 128), lengths 1..16384 per row, shuffled block tables, the cache rows past each
length set to NaN. Skipped unless the "jax_ds_mla_decode" kernel is built and a CUDA GPU is the
default backend.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds import _ffi
from jax_ds.ops import mla_decode
from jax_ds.ops.mla import TARGET
from jax_ds.testing import calc_diff

pytestmark = pytest.mark.gpu

MAX_LEN = 16384


@pytest.fixture(autouse=True)
def _needs_kernel():
    why = _ffi.unavailable_reason(TARGET)
    if why:
        pytest.skip(why)


def paged(seed, b, sq, hq, *, fixed_len=None, max_len=MAX_LEN, lens=None):
    """Random q and cache, lengths given, fixed or uniform in [1, max_len], a shuffled block
    table, and NaN in every cache row past a length."""
    rng = np.random.default_rng(seed)
    if lens is None:
        lens = np.full(b, fixed_len) if fixed_len else rng.integers(1, max_len + 1, b)
    max_blocks = max(1, -(-int(lens.max()) // 64))
    num_blocks = b * max_blocks
    table = rng.permutation(num_blocks).astype(np.int32).reshape(b, max_blocks)
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(key_q, (b, sq, hq, 576), jnp.bfloat16)
    kv = jax.random.normal(key_kv, (num_blocks, 64, 1, 576), jnp.bfloat16)
    # Poison the rows no sequence reaches: a kernel reading past a length shows NaN.
    pos = np.arange(max_blocks * 64)[None, :]
    unused_rows = (pos >= lens[:, None])
    poison = np.zeros((num_blocks, 64), bool)
    poison[table.reshape(-1)] = unused_rows.reshape(b, max_blocks, 64).reshape(-1, 64)
    kv = jnp.where(jnp.asarray(poison)[:, :, None, None], jnp.nan, kv)
    return q, kv, jnp.asarray(table), jnp.asarray(lens.astype(np.int32))


def same_nonfinite(name, a, r):
    """NaN, +Inf and -Inf at the same positions (an empty query's lse is +inf, FlashMLA's)."""
    for what, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        assert np.array_equal(test(a), test(r)), f"{name}: {what} positions differ"


def check(out, lse, ref_out, ref_lse):
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    same_nonfinite("out", out, ref_out)
    same_nonfinite("lse", lse, ref_lse)
    fin = np.isfinite(ref_out)
    assert np.all(np.abs(out[fin] - ref_out[fin]) <= 8e-4 + 2 / 128 * np.abs(ref_out[fin]))
    assert calc_diff(out[fin], ref_out[fin]) < 5e-6
    fin = np.isfinite(ref_lse)
    assert np.all(np.abs(lse[fin] - ref_lse[fin]) <= 1e-6 + 1e-6 * np.abs(ref_lse[fin]))


CASES = list(itertools.product((1, 33, 132), (1, 2), (16, 64, 128), (True, False)))


@pytest.mark.parametrize("b,sq,hq,causal", CASES)
def test_kernel_matches_reference(b, sq, hq, causal):
    q, kv, table, lens = paged(b * 1000 + sq * 100 + hq, b, sq, hq)
    run = jax.jit(lambda *a, impl: mla_decode(*a, causal=causal, impl=impl),
                  static_argnames="impl")
    out, lse = run(q, kv, table, lens, impl="ffi")
    ref_out, ref_lse = run(q, kv, table, lens, impl="xla")
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("sq", [1, 2])
def test_kernel_edge_lengths(sq):
    """Lengths 0, 1, 63, 64, 65 and Sq - 1 (an empty causal row) in one batch."""
    lens = np.array([0, 1, 63, 64, 65, max(sq - 1, 0), 4096], np.int32)
    q, kv, table, _ = paged(7, len(lens), sq, 64, fixed_len=4096)
    out, lse = mla_decode(q, kv, table, jnp.asarray(lens), impl="ffi")
    ref_out, ref_lse = mla_decode(q, kv, table, jnp.asarray(lens), impl="xla")
    check(out, lse, ref_out, ref_lse)


def test_kernel_clamps_traced_values():
    """Traced block ids outside [0, num_blocks) (huge, negative, INT32 extremes) and lengths past
    the table or below 0: the kernel clamps them as the reference does (and reads nothing out of
    bounds: scripts/check_mla.py --ffi-only runs this under memcheck). The cache is finite here:
    the wild values make rows that `paged` poisons reachable, and a NaN in a row a query sees is
    test_kernel_nan_in_a_visible_row's case."""
    q, kv, table, lens = paged(11, 6, 2, 64, max_len=2000)
    kv = jax.random.normal(jax.random.key(12), kv.shape, kv.dtype)
    table = np.asarray(table).copy()
    table[0, 0], table[1, -1], table[2, 0] = 2**31 - 1, -(2**31), -5
    table[3, :] = 10**6
    wild = np.asarray(lens).copy()
    wild[4], wild[5] = 2**31 - 1, -7
    run = jax.jit(lambda *a, impl: mla_decode(*a, impl=impl), static_argnames="impl")
    args = (q, kv, jnp.asarray(table), jnp.asarray(wild))
    check(*run(*args, impl="ffi"), *run(*args, impl="xla"))


@pytest.mark.parametrize("b,s_k,sq,hq", [(128, 300, 1, 16), (2, 9000, 2, 16),
                                         (2, 9000, 1, 128)])
@pytest.mark.parametrize("col", [7, 575])
def test_kernel_nan_in_a_visible_row(b, s_k, sq, hq, col):
    """A NaN in a cache row that sequence 0's queries see (a value column, or the rope part):
    NaN out and lse there, as the reference gives, whether the sequence runs in one part (300)
    or is split across parts and merged (9000); the other sequences untouched. (128 x 300: 5
    blocks each, every batch whole in one part; 2 x 9000: each batch cut into many.)"""
    q, kv, table, lens = paged(col + b, b, sq, hq, fixed_len=s_k)
    kv = jax.random.normal(jax.random.key(col), kv.shape, kv.dtype)
    row = s_k // 2
    kv = kv.at[int(np.asarray(table)[0, row // 64]), row % 64, 0, col].set(jnp.nan)
    run = jax.jit(lambda *a, impl: mla_decode(*a, impl=impl), static_argnames="impl")
    out, lse = run(q, kv, table, lens, impl="ffi")
    assert np.isnan(np.asarray(lse)[0]).all() and np.isnan(np.asarray(out, np.float32)[0]).all()
    check(out, lse, *run(q, kv, table, lens, impl="xla"))


@pytest.mark.parametrize("b,sq,hq", [(5, 1, 24), (3, 2, 20), (4, 2, 40), (2, 3, 33)])
def test_kernel_odd_head_counts(b, sq, hq):
    """Hq * Sq not a multiple of 64: fewer rows than a tile (a short Q box, rounded up to 8 rows,
    reading into the next batch's rows) and a partial last tile."""
    q, kv, table, lens = paged(hq * 10 + sq, b, sq, hq, max_len=3000)
    run = jax.jit(lambda *a, impl: mla_decode(*a, impl=impl), static_argnames="impl")
    check(*run(q, kv, table, lens, impl="ffi"), *run(q, kv, table, lens, impl="xla"))


@pytest.mark.parametrize("softmax_scale", [None, 0.25])
@pytest.mark.parametrize("max_len", [900, 5000])
def test_kernel_growing_scores(softmax_scale, max_len):
    """Keys that grow along the sequence (x1 to x4), so row maxima keep rising from block to
    block, by more and by less than the kernel's lazy-rescale threshold (2^8 in the weights);
    with scale 0.25 a block's max jumps by ~10-40 in the exponent. Short rows take the two-pass
    P V (900), long ones the one-pass path and split batches (5000).

    Here the attention is peaked and the values large next to the outputs, so FlashMLA's
    elementwise bound does not hold for a bf16 P (nor for FlashMLA): checked against a float64
    truth with the bound bf16 weights allow, 2^-8 sum_j p_j |v_j| on top of FlashMLA's, and lse
    with 2^-18 of the largest scale * sum_d |q_d k_d| (the float32 dot products' rounding) on top;
    FlashMLA's cosine bound against the reference as in `check`."""
    b, sq, hq = 33, 2, 64
    q, kv, table, lens = paged(max_len + int(100 * (softmax_scale or 0)), b, sq, hq,
                               max_len=max_len)
    max_blocks = table.shape[1]
    ramp = 1 + 3 * np.arange(max_blocks * 64) / (max_blocks * 64)
    grow = np.ones((kv.shape[0], 64), np.float32)
    grow[np.asarray(table).reshape(-1)] = np.tile(ramp.reshape(max_blocks, 64), (b, 1))
    kv = (kv.astype(jnp.float32) * jnp.asarray(grow)[:, :, None, None]).astype(jnp.bfloat16)
    run = jax.jit(lambda *a, impl: mla_decode(*a, softmax_scale=softmax_scale, impl=impl),
                  static_argnames="impl")
    out, lse = run(q, kv, table, lens, impl="ffi")
    ref_out, ref_lse = run(q, kv, table, lens, impl="xla")
    out, ref_out = np.asarray(out, np.float64), np.asarray(ref_out, np.float64)
    lse, ref_lse = np.asarray(lse, np.float64), np.asarray(ref_lse, np.float64)
    assert np.array_equal(np.isnan(out), np.isnan(ref_out))
    same_nonfinite("lse", lse, ref_lse)
    assert not np.isnan(lse).any()
    fin = np.isfinite(ref_out)
    assert calc_diff(out[fin], ref_out[fin]) < 5e-6
    scale = softmax_scale or 576 ** -0.5
    qn, kn = np.asarray(q, np.float64), np.asarray(kv, np.float64)[:, :, 0, :]
    table, lens = np.asarray(table), np.asarray(lens)
    for i in range(b):
        keys = kn[table[i]].reshape(-1, 576)
        for s in range(sq):
            vis = lens[i] - (sq - 1 - s)
            if vis <= 0:
                continue
            k = keys[:vis]
            scores = qn[i, s] @ k.T * scale
            m = scores.max(1, keepdims=True)
            w = np.exp(scores - m)
            true_lse = m[:, 0] + np.log(w.sum(1))
            w /= w.sum(1, keepdims=True)
            true_out, spread = w @ k[:, :512], w @ np.abs(k[:, :512])
            assert np.all(np.abs(out[i, s] - true_out)
                          <= 8e-4 + 2 / 128 * np.abs(true_out) + 2 ** -8 * spread)
            mag = scale * (np.abs(qn[i, s]) @ np.abs(k).T).max(1)
            assert np.all(np.abs(lse[i, :, s] - true_lse)
                          <= 1e-6 + 1e-6 * np.abs(true_lse) + 2 ** -18 * mag)


@pytest.mark.parametrize("b,sq,hq,blocks,cuts", [
    (128, 1, 16, 64, True), (130, 1, 16, 64, True), (128, 2, 128, 64, False),
    (128, 1, 128, 64, True), (96, 1, 128, 64, False), (256, 1, 16, 64, False),
    (64, 1, 16, 64, False), (132, 2, 64, 3, True), (40, 1, 16, 0, True)])
def test_kernel_equal_block_counts(b, sq, hq, blocks, cuts):
    """Every sequence with the same block count (lengths differ inside the last block): the plan
    then cuts at batch boundaries where that costs at most one batch's fixed cost or the slack
    (mla.kernel_plan; some parts get no batch), and splits batches as usual where it does
    not; `cuts` says which the case takes on 132 SMs at mla.FIXED_COST and mla.ALIGN_SLACK_PCT
    (checked there, so a new default cannot leave a path untested)."""
    from jax_ds.ops import mla
    if _ffi.num_sms() == 132:
        plan = mla.kernel_plan(sq, hq)
        payload, _ = mla.plan_payload(np.full(b, blocks), plan["num_parts"],
                                      align_slack_pct=plan["align_slack_pct"])
        assert (payload % (blocks + mla.FIXED_COST) == 0) == cuts  # every cut between batches
    rng = np.random.default_rng(b + blocks)
    lens = np.maximum(blocks * 64 - rng.integers(0, 64, b), 0) if blocks else np.zeros(b, int)
    q, kv, table, lens = paged(b + sq + hq, b, sq, hq, lens=lens)
    run = jax.jit(lambda *a, impl: mla_decode(*a, impl=impl), static_argnames="impl")
    check(*run(q, kv, table, lens, impl="ffi"), *run(q, kv, table, lens, impl="xla"))


@pytest.mark.parametrize("fixed_cost", [1, 2, 64])
@pytest.mark.parametrize("equal", [False, True])
def test_kernel_any_fixed_cost(fixed_cost, equal):
    """The plan stays exact whatever price it puts on touching a batch (the `fixed_cost` attribute
    that scripts/sweep_mla_plan.py varies), with variable and with equal block counts."""
    from jax_ds.ops.mla import ffi_mla_decode
    b, sq, hq = 40, 2, 64
    rng = np.random.default_rng(fixed_cost)
    lens = (np.full(b, 1000) - rng.integers(0, 40, b)) if equal else None
    q, kv, table, lens = paged(fixed_cost + 7 * equal, b, sq, hq, max_len=5000, lens=lens)
    scale = 576 ** -0.5
    out, lse = jax.jit(lambda *a: ffi_mla_decode(*a, scale, True, 66, fixed_cost))(
        q, kv, table, lens)
    check(out, lse, *mla_decode(q, kv, table, lens, impl="xla"))


@pytest.mark.parametrize("b,sq,hq,blocks,slack", [
    (128, 1, 128, 64, 8), (128, 1, 128, 128, 8), (40, 1, 128, 64, 100), (100, 2, 64, 10, 50)])
def test_kernel_align_slack(b, sq, hq, blocks, slack):
    """Equal block counts with a slack in percent of a part (the `align_slack_pct` attribute):
    b128 s_k 4096 / 8192 h128 at 8% cut no batch (payload 128 -> 132, 253 -> 260 on 66 parts);
    at 100% and 50% 26 and 16 of the 66 parts get no batch (40 -> 66, 19 -> 24); against the
    reference."""
    from jax_ds.ops import mla
    parts = 66
    payload, _ = mla.plan_payload(np.full(b, blocks), parts, 2, slack)
    assert payload % (blocks + 2) == 0  # the case takes the cuts at batch ends
    rng = np.random.default_rng(b + blocks + slack)
    lens = np.maximum(blocks * 64 - rng.integers(0, 64, b), 0)
    q, kv, table, lens = paged(b + slack, b, sq, hq, lens=lens)
    scale = 576 ** -0.5
    for pct, cuts in ((slack, True), (0, False)):  # the kernel's own plan: no batch split at slack
        out, lse, plan, _ = jax.jit(lambda *a, s=pct: mla.ffi_mla_decode(
            *a, scale, True, parts, 2, 0, s, workspace=True))(q, kv, table, lens)
        assert bool((np.asarray(plan)[:b] == 1).all()) == cuts
        check(out, lse, *mla_decode(q, kv, table, lens, impl="xla"))


def test_align_slack_out_of_range_is_an_error():
    from jax_ds.ops.mla import ffi_mla_decode
    q, kv, table, lens = paged(5, 2, 1, 16, max_len=100)
    for slack in (-1, 101):
        with pytest.raises(Exception, match="align_slack_pct"):
            jax.block_until_ready(ffi_mla_decode(q, kv, table, lens, 0.05, True, 8, 2, 0, slack))


def test_fixed_cost_out_of_range_is_an_error():
    from jax_ds.ops.mla import ffi_mla_decode
    q, kv, table, lens = paged(3, 2, 1, 16, max_len=100)
    for cost in (0, 65):
        with pytest.raises(Exception, match="fixed_cost"):
            jax.block_until_ready(ffi_mla_decode(q, kv, table, lens, 0.05, True, 8, cost))


@pytest.mark.parametrize("b,sq,hq,max_len,parts", [
    (37, 1, 16, 3000, 132), (33, 2, 64, 5000, 66), (128, 1, 128, 4096, 66), (1, 2, 128, 16384, 66),
    (5, 1, 32, 9000, 66), (132, 2, 16, 700, 132), (5, 1, 32, 9000, 4), (3, 2, 64, 5000, 2),
    (4, 1, 16, 3000, 1)])
def test_fused_merge_equals_the_combine_kernel(b, sq, hq, max_len, parts):
    """Split batches merged in the decode kernel (by the warpgroup finishing the last piece) give
    the combine kernel's bits, for every bound on the pieces fused: none (0), 1 (= none), 2, 4
    and more (clamped to 4); with at most 4 parts every split batch is merged there and the
    combine kernel is not launched (the cases of 4, 2 and 1 parts). And the reference's
    values."""
    from jax_ds.ops.mla import ffi_mla_decode
    q, kv, table, lens = paged(b * 7 + hq, b, sq, hq, max_len=max_len)
    scale = 576 ** -0.5
    results = {fuse: jax.jit(lambda *a, f=fuse: ffi_mla_decode(*a, scale, True, parts, 2, f))(
        q, kv, table, lens) for fuse in (0, 1, 2, 4, 1000)}
    out0, lse0 = (np.asarray(x) for x in results[0])
    for fuse, (out, lse) in results.items():
        np.testing.assert_array_equal(np.asarray(out).view(np.uint16), out0.view(np.uint16),
                                      err_msg=f"fuse_max_splits={fuse}")
        np.testing.assert_array_equal(np.asarray(lse).view(np.uint32), lse0.view(np.uint32),
                                      err_msg=f"fuse_max_splits={fuse}")
    check(*results[4], *mla_decode(q, kv, table, lens, impl="xla"))


def test_fuse_max_splits_below_zero_is_an_error():
    from jax_ds.ops.mla import ffi_mla_decode
    q, kv, table, lens = paged(4, 2, 1, 16, max_len=100)
    with pytest.raises(Exception, match="fuse_max_splits"):
        jax.block_until_ready(ffi_mla_decode(q, kv, table, lens, 0.05, True, 8, 2, -1))
