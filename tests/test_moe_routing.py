"""MoE routing ops: moe_permute / moe_unpermute / moe_dispatch_layout.

CPU: the reference's contract (stable expert-major order, dropped slots, zero tail rows, exact
inverse, gradients against plain JAX expressions). GPU (`-m gpu`): the kernels against the
reference on fresh random routings: layout, perm and rows identical, the fused FP8 cast bit-exact,
the combine within float32 rounding, gradients equal.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_ds import _ffi, testing  # noqa: E402
from jax_ds.ops import moe  # noqa: E402
from jax_ds.ops import moe_dispatch_layout, moe_permute, moe_unpermute, quantize_fp8  # noqa: E402


def _routing(seed, n, k, e, drop=0.1):
    """Distinct experts per token, some slots -1 (dropped) and some ids out of range."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    mask = rng.random((n, k)) < drop
    idx[mask] = rng.choice([-1, e, e + 5], mask.sum())
    return jnp.asarray(idx)


def _expected_order(idx, e):
    """Rows by expert, then flat slot; returns (group_sizes, perm, list of (token, slot))."""
    idx = np.asarray(idx)
    n, k = idx.shape
    rows, sizes = [], np.zeros(e, np.int32)
    perm = -np.ones((n, k), np.int32)
    for ex in range(e):
        for flat in np.flatnonzero(idx.reshape(-1) == ex):
            perm[flat // k, flat % k] = len(rows)
            rows.append(flat // k)
            sizes[ex] += 1
    return sizes, perm, rows


@pytest.mark.parametrize("n,k,e", [(50, 4, 8), (7, 1, 3), (64, 8, 32)])
def test_permute_contract(n, k, e):
    x = jax.random.normal(jax.random.key(n), (n, 160), jnp.float32)
    idx = _routing(n, n, k, e)
    x_sorted, sizes, perm = moe_permute(x, idx, e, impl="xla")
    want_sizes, want_perm, rows = _expected_order(idx, e)
    np.testing.assert_array_equal(sizes, want_sizes)
    np.testing.assert_array_equal(perm, want_perm)
    np.testing.assert_array_equal(x_sorted[:len(rows)], np.asarray(x)[rows])
    assert (np.asarray(x_sorted[len(rows):]) == 0).all()
    # Exact inverse: weight 1 on each token's first kept slot (0 elsewhere) brings x back.
    kept = np.asarray(perm) >= 0
    first = kept & (np.cumsum(kept, axis=1) == 1)
    back = moe_unpermute(x_sorted, perm, jnp.asarray(first, jnp.float32), impl="xla")
    np.testing.assert_array_equal(back, np.where(kept.any(1, keepdims=True), np.asarray(x), 0))


def test_permute_fp8_is_quantize_of_sorted_rows():
    """The FP8 rows are the quantized tokens in the independently derived order (numpy), zero
    rows (with a zero block's scale) past the groups."""
    x = jax.random.normal(jax.random.key(0), (40, 300), jnp.bfloat16)
    idx = _routing(1, 40, 3, 6)
    q, s, sizes, perm = moe_permute(x, idx, 6, fp8=True, impl="xla")
    want_sizes, want_perm, rows = _expected_order(idx, 6)
    expected = np.zeros((40 * 3, 300), np.asarray(x).dtype)
    expected[:len(rows)] = np.asarray(x)[rows]
    rq, rs = quantize_fp8(jnp.asarray(expected), block=(1, 128), impl="xla")
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(rq).view(np.uint8))
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(sizes, want_sizes)
    np.testing.assert_array_equal(perm, want_perm)


def test_gradients_match_plain_jax():
    n, k, e, d = 20, 3, 5, 128
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    w = jax.random.uniform(jax.random.key(2), (n, k))
    idx = _routing(3, n, k, e)

    def ours(x, w):
        xs, _, perm = moe_permute(x, idx, e, impl="xla")
        return jnp.sum(jnp.sin(moe_unpermute(jnp.tanh(xs), perm, w, impl="xla")))

    def plain(x, w):
        keep = (idx >= 0) & (idx < e)
        return jnp.sum(jnp.sin(jnp.einsum("NK,ND->ND", jnp.where(keep, w, 0), jnp.tanh(x))))

    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_moe_permute_roundtrip_with_dropped_slots():
    n, d, e, topk = 12, 8, 5, 3
    kx, ki, kw = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (n, d))
    idx = jax.random.randint(ki, (n, topk), -1, e)
    w = jax.random.uniform(kw, (n, topk))
    xs, gs, perm = moe_permute(x, idx, e)
    assert int(gs.sum()) == int((idx >= 0).sum())
    assert np.all(np.asarray(xs)[int(gs.sum()):] == 0)
    out = moe_unpermute(xs, perm, w)
    want = np.einsum("nk,nd->nd", np.where(np.asarray(idx) >= 0, np.asarray(w), 0), np.asarray(x))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_dispatch_layout():
    idx = jnp.asarray([[0, 3], [2, -1], [7, 6], [1, 9]], jnp.int32)
    per_expert, per_rank, in_rank = moe_dispatch_layout(idx, 8, 4)
    np.testing.assert_array_equal(per_expert, [1, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(in_rank, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1],
                                            [1, 0, 0, 0]])
    np.testing.assert_array_equal(per_rank, [2, 2, 0, 1])


def test_bad_inputs_are_clear_errors():
    x = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="moe_permute: expected x"):
        moe_permute(x, jnp.zeros((5, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match="num_experts"):
        moe_permute(x, jnp.zeros((4, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_unpermute(x, jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        moe_dispatch_layout(jnp.zeros((4, 2), jnp.int32), 6, 4)
    with pytest.raises(TypeError, match="topk_idx"):  # 2.7 would truncate onto expert 2
        moe_dispatch_layout(jnp.full((4, 2), 2.7), 8, 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        moe_dispatch_layout(jnp.zeros((4, 2), jnp.int32), 8.0, 4)
    with pytest.raises(TypeError, match="y must be a floating-point array, got bool"):
        moe_unpermute(x.astype(bool), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2)))
    with pytest.raises(TypeError, match="topk_weights must be a floating-point array"):
        moe_unpermute(x, jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2), jnp.int32))
    for fp8 in ("no", None, 1.0):  # a path picked by truthiness: "no" quantized
        with pytest.raises(TypeError, match="moe_permute: fp8 must be a Python bool"):
            moe_permute(x, jnp.zeros((4, 2), jnp.int32), 4, fp8=fp8)


def test_zero_rows_resolve_impl_too(no_kernels, monkeypatch):
    """y of 0 rows (every slot dropped) returned zeros before impl was resolved: impl="ffi"
    without a kernel and a bad JAX_DS_IMPL passed there, and raised at any other size."""
    perm, w = jnp.full((1, 2), -1, jnp.int32), jnp.ones((1, 2))
    for rows in (0, 1):
        with pytest.raises(RuntimeError, match="kernels disabled by the test"):
            moe_unpermute(jnp.ones((rows, 3)), perm, w, impl="ffi")
    monkeypatch.setenv("JAX_DS_IMPL", "bogus")
    with pytest.raises(ValueError, match="JAX_DS_IMPL"):
        moe_unpermute(jnp.ones((0, 3)), perm, w)
    with pytest.raises(TypeError, match="moe_permute: x must be a floating-point array"):
        moe_permute(jnp.ones((4, 8), jnp.int32), jnp.zeros((4, 2), jnp.int32), 4, fp8=True)


def test_every_slot_dropped_and_wide_ids():
    x = jnp.ones((3, 8))
    x_sorted, sizes, perm = moe_permute(x, jnp.full((3, 1), -1, jnp.int32), 4)
    out = moe_unpermute(x_sorted[:int(sizes.sum())], perm, jnp.ones((3, 1)))  # y is [0, 8]
    assert out.shape == (3, 8) and not np.asarray(out).any()
    # host int64 ids past int32 are dropped, not wrapped onto expert 0
    ids = np.array([[1, 2], [3, 0], [2**32, 1]], np.int64)
    _, sizes, perm = moe_permute(x, ids, np.int64(4))
    assert sizes.tolist() == [1, 2, 1, 1] and perm.tolist()[2][0] == -1
    # so are int64 jax ids (jax_enable_x64), eager and traced, and in moe_dispatch_layout
    with jax.enable_x64(True):
        ids = jnp.array([[2**32, 1], [3, 2**32 + 2], [-(2**32), 0]], jnp.int64)
        for permute in (moe_permute, jax.jit(moe_permute, static_argnums=2)):
            _, sizes, perm = permute(x, ids, 4)
            assert sizes.tolist() == [1, 1, 0, 1] and perm.tolist() == [[-1, 1], [2, -1], [-1, 0]]
        assert moe_dispatch_layout(ids, 4, 2)[0].tolist() == [1, 1, 0, 1]


# ------------------------------------------------------------------------------------ GPU


def _need_kernels():
    for target in (moe.LAYOUT_TARGET, moe.UNPERMUTE_TARGET):
        why = _ffi.unavailable_reason(target)
        if why:
            pytest.skip(f"routing kernels unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,e,d,dtype", [(4096, 8, 256, 7168, jnp.bfloat16),
                                           (333, 6, 64, 300, jnp.float32),
                                           (1, 1, 1, 128, jnp.bfloat16),
                                           (1000, 4, 4096, 200, jnp.bfloat16)])
def test_kernels_match_reference(n, k, e, d, dtype):
    _need_kernels()
    x = jax.random.normal(jax.random.key(n), (n, d), dtype)
    idx = _routing(n + e, n, k, e)
    w = jax.random.uniform(jax.random.key(1), (n, k))
    ref = moe_permute(x, idx, e, impl="xla")
    got = jax.jit(lambda x, i: moe_permute(x, i, e, impl="ffi"))(x, idx)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q, s, sizes, perm = jax.jit(lambda x, i: moe_permute(x, i, e, fp8=True, impl="ffi"))(x, idx)
    rq, rs, _, _ = moe_permute(x, idx, e, fp8=True, impl="xla")
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(rq).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    y = jnp.tanh(ref[0])
    out = moe_unpermute(y, ref[2], w, impl="ffi")
    want = moe_unpermute(y, ref[2], w, impl="xla")
    assert testing.calc_diff(out, want) < 1e-6
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.gpu
def test_kernel_gradients_match_reference():
    _need_kernels()
    n, k, e, d = 300, 4, 16, 256
    x = jax.random.normal(jax.random.key(5), (n, d), jnp.float32)
    w = jax.random.uniform(jax.random.key(6), (n, k))
    idx = _routing(7, n, k, e)

    def loss(x, w, impl):
        xs, _, perm = moe_permute(x, idx, e, impl=impl)
        return jnp.sum(jnp.sin(moe_unpermute(jnp.tanh(xs), perm, w, impl=impl)))

    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, "ffi")
    want = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, "xla")
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
