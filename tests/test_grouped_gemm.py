"""Grouped FP8 GEMMs (contiguous, masked) and grouped_fp8_linear: references vs float64 numpy."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds import _ffi, ops
from jax_ds.ops._checks import cdiv
from jax_ds.testing import calc_diff, dot_equations

KEY = jax.random.key(7)


def _operands(key, m, n, k, g, lead=()):
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (*lead, m, k)) * 3.0
    b = jax.random.normal(kb, (g, n, k))
    a8, sa = ops.quantize_fp8(a, block=(1, 128))
    b8, sb = ops.quantize_fp8(b, block=(128, 128))
    a64 = np.asarray(ops.dequantize_fp8(a8, sa, (1, 128)), np.float64)
    b64 = np.asarray(ops.dequantize_fp8(b8, sb, (128, 128)), np.float64)
    return (a8, sa, b8, sb), a64, b64


@pytest.mark.parametrize("sizes", [(5, 0, 17, 1), (0, 0, 0, 0), (40, 0, 0, 0), (3, 9, 0, 20)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [256, 200])  # 200: scales ceil(K/128) wide, the kernel pads K
def test_grouped_matches_float64(sizes, out_dtype, k):
    m, n = 48, 130  # rows past sum(sizes) (<= 40) must come out zero
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, m, n, k, len(sizes))
    gs = jnp.array(sizes, jnp.int32)
    out = jax.jit(lambda *x: ops.grouped_fp8_gemm(*x, out_dtype=out_dtype))(a8, sa, b8, sb, gs)
    assert out.shape == (m, n) and out.dtype == out_dtype
    want = np.zeros((m, n))
    start = 0
    for g, size in enumerate(sizes):
        want[start:start + size] = a64[start:start + size] @ b64[g].T
        start += size
    got = np.asarray(out, np.float64)
    assert np.all(got[start:] == 0)
    if start:
        assert calc_diff(got, want) < (1e-9 if out_dtype == jnp.float32 else 1e-5)


def test_grouped_sum_past_m_is_cut_at_m():
    """Traced sizes (jit) are clamped: a negative size counts as 0, groups are cut at row M;
    concrete ones that break the contract raise first."""
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, 8, 16, 128, 3)
    gemm = jax.jit(lambda *o: ops.grouped_fp8_gemm(*o, out_dtype=jnp.float32))
    out = gemm(a8, sa, b8, sb, jnp.array([6, -3, 10], jnp.int32))
    want = np.concatenate([a64[:6] @ b64[0].T, a64[6:] @ b64[2].T])
    assert calc_diff(np.asarray(out, np.float64), want) < 1e-9
    for sizes in ([6, 0, 10], [6, -3, 2]):
        with pytest.raises(ValueError, match=r"group_sizes must be >= 0 with sum <= M = 8"):
            ops.grouped_fp8_gemm(a8, sa, b8, sb, jnp.array(sizes, jnp.int32))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_grouped_non_finite_weight_reaches_its_own_rows_only(bad):
    """A NaN or Inf in one expert's weight (or its scale) touches only that expert's rows, as in
    the kernel, which never reads another group's weight: expert 0 has no rows (no token chose
    it), expert 2 has rows 5..8. XLA's ragged dot gave NaN in every row (0 * NaN)."""
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, 12, 16, 256, 4)
    value = float(bad)
    b8 = b8.at[0].set(jnp.asarray(value, jnp.float32).astype(b8.dtype))
    sb = sb.at[2, 0, 1].set(value)
    sizes = (0, 5, 4, 2)
    out = np.asarray(ops.grouped_fp8_gemm(a8, sa, b8, sb, jnp.array(sizes, jnp.int32),
                                          out_dtype=jnp.float32, impl="xla"), np.float64)
    want = np.zeros((12, 16))
    want[0:5] = a64[0:5] @ b64[1].T
    want[9:11] = a64[9:11] @ b64[3].T
    finite = np.r_[0:5, 9:12]
    assert calc_diff(out[finite], want[finite]) < 1e-9 and np.all(out[11] == 0)
    assert not np.isfinite(out[5:9]).all()


@pytest.mark.parametrize("sizes,ends", [((6, 2**31 - 1, 0), (6, 8, 8)),
                                        ((2**31 - 1, 2**31 - 1, 4), (8, 8, 8)),
                                        ((3, 2**31 - 2, 2**31 - 1), (3, 8, 8))])
def test_grouped_traced_sizes_near_int32_max_do_not_wrap(sizes, ends):
    """The clamp's running sum saturates at M: in int32 it wrapped past 2^31 - 1 (rows came back
    zero, or summed over two groups), while the kernel sums in 64 bits."""
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, 8, 16, 128, 3)
    gemm = jax.jit(lambda *o: ops.grouped_fp8_gemm(*o, out_dtype=jnp.float32))
    out = np.asarray(gemm(a8, sa, b8, sb, jnp.array(sizes, jnp.int32)), np.float64)
    starts = (0,) + ends[:-1]
    want = np.zeros((8, 16))
    for g, (lo, hi) in enumerate(zip(starts, ends)):
        want[lo:hi] = a64[lo:hi] @ b64[g].T
    assert calc_diff(out, want) < 1e-9


@pytest.mark.parametrize("k", [1, 64, 300])
def test_masked_takes_any_k(k):
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, 16, 64, k, 2, lead=(2,))
    assert sa.shape == (2, 16, -(-k // 128))
    got = np.asarray(ops.masked_grouped_fp8_gemm(a8, sa, b8, sb, jnp.array([16, 5], jnp.int32),
                                                 out_dtype=jnp.float32), np.float64)
    assert calc_diff(got[0], a64[0] @ b64[0].T) < 1e-9
    assert calc_diff(got[1, :5], a64[1, :5] @ b64[1].T) < 1e-9 and np.all(got[1, 5:] == 0)


def test_masked_m_out_of_range():
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, 16, 64, 128, 2, lead=(2,))
    gemm = jax.jit(lambda *o: ops.masked_grouped_fp8_gemm(*o, out_dtype=jnp.float32))
    got = np.asarray(gemm(a8, sa, b8, sb, jnp.array([-2, 40], jnp.int32)), np.float64)
    assert np.all(got[0] == 0)  # traced: clamped to [0, Mmax]
    assert calc_diff(got[1], a64[1] @ b64[1].T) < 1e-9
    for masked in ([-2, 4], [3, 17]):
        with pytest.raises(ValueError, match=r"masked_m must lie in \[0, Mmax = 16\]"):
            ops.masked_grouped_fp8_gemm(a8, sa, b8, sb, jnp.array(masked, jnp.int32))


@pytest.mark.parametrize("masked", [(0, 7, 16), (16, 16, 16)])
def test_masked_matches_float64(masked):
    g, mmax, n, k = len(masked), 16, 64, 384
    (a8, sa, b8, sb), a64, b64 = _operands(KEY, mmax, n, k, g, lead=(g,))
    out = ops.masked_grouped_fp8_gemm(a8, sa, b8, sb, jnp.array(masked, jnp.int32),
                                      out_dtype=jnp.float32)
    got = np.asarray(out, np.float64)
    for i, rows in enumerate(masked):
        assert np.all(got[i, rows:] == 0)
        if rows:
            assert calc_diff(got[i, :rows], a64[i, :rows] @ b64[i].T) < 1e-9


def test_grouped_validation_names_the_argument(no_kernels):
    (a8, sa, b8, sb), _, _ = _operands(KEY, 8, 16, 128, 2)
    gs = jnp.array([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="group_sizes"):
        ops.grouped_fp8_gemm(a8, sa, b8, sb, jnp.array([4, 4, 0], jnp.int32))
    with pytest.raises(ValueError, match="b_scale"):
        ops.grouped_fp8_gemm(a8, sa, b8, sb[:, :, :0], gs)
    with pytest.raises(ValueError, match=r"a_scale has shape \(8, 0\), expected \(8, 1\)"):
        ops.grouped_fp8_gemm(a8[:, :64], sa[:, :0], b8[:, :, :64], sb[:, :, :0], gs)
    with pytest.raises(ValueError, match="K must be >= 1"):
        ops.grouped_fp8_gemm(a8[:, :0], sa[:, :0], b8[:, :, :0], sb[:, :, :0], gs)
    with pytest.raises(ValueError, match="masked_m"):
        ops.masked_grouped_fp8_gemm(a8[None].repeat(2, 0), sa[None].repeat(2, 0), b8, sb, gs[:1])
    with pytest.raises(RuntimeError, match="jax_ds_grouped_fp8_gemm"):
        ops.grouped_fp8_gemm(a8, sa, b8, sb, gs, impl="ffi")


def test_grouped_fp8_linear_grads_match_float32():
    m, n, k, sizes = 40, 72, 200, (10, 0, 25)  # K and N unaligned: padded inside, exactly
    kx, kw, kd = jax.random.split(KEY, 3)
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (len(sizes), n, k)) * 0.1
    dy = jax.random.normal(kd, (m, n))
    gs = jnp.array(sizes, jnp.int32)

    def exact(x, w):  # float32 grouped product, rows past the sum zero
        rows = jnp.repeat(jnp.arange(len(sizes)), np.array(sizes), total_repeat_length=sum(sizes))
        y = jnp.einsum("MK,MNK->MN", x[:sum(sizes)], w[rows], precision="highest")
        return jnp.concatenate([y, jnp.zeros((m - sum(sizes), n))])

    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * dy)
    got = jax.jit(jax.grad(loss(lambda x, w: ops.grouped_fp8_linear(x, w, gs)), (0, 1)))(x, w)
    want = jax.grad(loss(exact), (0, 1))(x, w)
    for g, e in zip(got, want):
        assert calc_diff(np.asarray(g, np.float64), np.asarray(e, np.float64)) < 2e-3
    assert np.all(np.asarray(got[0])[sum(sizes):] == 0)


def _scale_grad_float64(a8, b8, sb, sizes):
    """d sum(out) / d a_scale[m, j] in float64: row m's block j of a times its group's column sums
    of dequantized b; zero for rows past sum(sizes)."""
    b64 = np.asarray(ops.dequantize_fp8(b8, sb, (128, 128)), np.float64)
    group = np.repeat(np.arange(len(sizes)), np.asarray(sizes))
    colsum = np.zeros((a8.shape[0], b64.shape[2]))
    colsum[:len(group)] = b64.sum(1)[group]
    return (np.asarray(a8, np.float64) * colsum).reshape(a8.shape[0], -1, 128).sum(-1)


def test_grouped_vmap_with_shared_operands():
    """vmap over a (and the sizes) with b shared, or the sizes shared, and nested: ragged_dot's own
    batching rule refused all of these ("vmap over any dim but 0 - NYI")."""
    (a8, sa, b8, sb), _, _ = _operands(KEY, 3 * 24, 40, 256, 3)
    a8, sa = a8.reshape(3, 24, 256), sa.reshape(3, 24, 2)
    gs = jnp.array([[5, 0, 17], [0, 0, 0], [24, 0, 0]], jnp.int32)
    one = lambda i, j: ops.grouped_fp8_gemm(a8[i], sa[i], b8, sb, gs[j], out_dtype=jnp.float32)
    f32 = functools.partial(ops.grouped_fp8_gemm, out_dtype=jnp.float32)
    shared_b = jax.vmap(f32, in_axes=(0, 0, None, None, 0))(a8, sa, b8, sb, gs)
    shared_gs = jax.vmap(lambda a, s: f32(a, s, b8, sb, gs[0]))(a8, sa)
    nested = jax.jit(jax.vmap(jax.vmap(lambda a, s, g: f32(a, s, b8, sb, g),
                                       in_axes=(None, None, 0)), in_axes=(0, 0, None)))(a8, sa, gs)
    for i in range(3):
        np.testing.assert_array_equal(shared_b[i], one(i, i))
        np.testing.assert_array_equal(shared_gs[i], one(i, 0))
        for j in range(3):
            np.testing.assert_array_equal(nested[i, j], one(i, j))
    # the reference keeps its reverse-mode gradient (here in the scales of a)
    loss = lambda s: jnp.sum(ops.grouped_fp8_gemm(a8[0], s, b8, sb, gs[0], out_dtype=jnp.float32))
    np.testing.assert_allclose(jax.grad(loss)(sa[0]), _scale_grad_float64(a8[0], b8, sb, gs[0]),
                               rtol=1e-5, atol=1e-5)


def test_grouped_fp8_linear_under_vmap():
    """vmap of grouped_fp8_linear and of its gradients (dgrad and the ragged-dot wgrad) with the
    expert weights shared equals the per-example calls."""
    kx, kw = jax.random.split(KEY)
    x = jax.random.normal(kx, (2, 20, 130))
    w = jax.random.normal(kw, (3, 24, 130)) * 0.1
    gs = jnp.array([[4, 0, 10], [20, 0, 0]], jnp.int32)
    loss = lambda x, w, g: jnp.sum(ops.grouped_fp8_linear(x, w, g) ** 2)
    y = jax.vmap(ops.grouped_fp8_linear, in_axes=(0, None, 0))(x, w, gs)
    dx, dw = jax.vmap(jax.grad(loss, (0, 1)), in_axes=(0, None, 0))(x, w, gs)
    for i in range(2):
        np.testing.assert_array_equal(y[i], ops.grouped_fp8_linear(x[i], w, gs[i]))
        gx, gw = jax.grad(loss, (0, 1))(x[i], w, gs[i])
        np.testing.assert_allclose(dx[i], gx, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dw[i], gw, rtol=1e-5, atol=1e-5)


def test_grouped_config_keeps_the_swept_tiles():
    """The grouped tile follows the H200 grouped sweeps: 128-row tiles from 128 rows per group,
    128x192 where its waves (up to 16 k blocks: its tiles) take less time than 128x128's, pairs
    for 128-row tiles whose column blocks pair up (the sweeps themselves:
    test_grouped_config_against_the_h200_sweep)."""
    from jax_ds.ops.grouped_gemm import grouped_config
    for (rows, g, n, k), want in [((8192, 4, 4096, 7168), (128, 192, 2)),
                                  ((4096, 8, 7168, 2048), (128, 192, 2)),
                                  ((256, 32, 4096, 7168), (128, 192, 2)),
                                  ((512, 2, 4096, 7168), (128, 128, 2)),  # 176 tiles: 2 waves
                                  ((128, 32, 7168, 2048), (128, 192, 2)),  # k2048: tiles
                                  ((1024, 1, 7168, 2048), (128, 192, 1)),  # 304 vs 448 tiles,
                                  ((256, 4, 7168, 2048), (128, 192, 1)),  # < 4 waves: singles
                                  ((1024, 1, 7168, 7168), (128, 128, 2)),  # 3 vs 4 waves
                                  ((64, 32, 4096, 7168), (64, 128, 1)),
                                  ((256, 8, 2112, 7168), (128, 192, 1))]:  # 11 column blocks
        cfg = grouped_config(rows, g, n, k, 132)
        assert (cfg.block_m, cfg.block_n, cfg.cluster_n) == want, (rows, g, n, k, cfg)
        assert (cfg.split_units, cfg.splits) == (0, 1)


def test_grouped_long_k_knob(monkeypatch):
    """GROUPED_WIDE_MAX_KBLOCKS (off by default: the H100 A/B of 2026-12-06 did not gain): past
    that many k blocks 128x192 gives way to 128x128 where its columns are emptier (n4096: 22 x
    192), not where they are as full (n2112: 11 x 192), nor at or under the limit."""
    from jax_ds.ops import grouped_gemm
    pick = lambda *a: (lambda c: (c.block_m, c.block_n, c.cluster_n))(
        grouped_gemm.grouped_config(*a, 132))
    assert grouped_gemm.GROUPED_WIDE_MAX_KBLOCKS is None
    monkeypatch.setattr(grouped_gemm, "GROUPED_WIDE_MAX_KBLOCKS", 15)
    assert pick(256, 32, 4096, 7168) == (128, 128, 2)  # 56 k blocks
    assert pick(4096, 8, 7168, 2048) == (128, 128, 2)  # 16
    assert pick(256, 8, 2112, 7168) == (128, 192, 1)  # columns as full
    monkeypatch.setattr(grouped_gemm, "GROUPED_WIDE_MAX_KBLOCKS", 16)
    assert pick(4096, 8, 7168, 2048) == (128, 192, 2)


RESULTS = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"


@pytest.mark.parametrize("name,count", [
    ("gemm-grouped-tiles-sweep-h200-2026-12-03.json", 18),
    ("gemm-grouped-tiles-sweep-h200-2026-12-03-short-k.json", 18),
    # the masked 256-1024 rows a group shapes, with the tail split of branch wip/grouped-split
    # (keys ending in "s"; they lost to 128x128 pairs, so they only raise the bar here)
    ("gemm-grouped-tiles-sweep-h200-2026-12-04-masked-tail-split.json", 6)])
def test_grouped_config_against_the_h200_sweep(name, count):
    """On every shape of each H200 grouped sweep (three sessions, three machines) the pick is
    within 3% of the fastest tile."""
    from jax_ds.ops.grouped_gemm import grouped_config
    rows = json.loads((RESULTS / name).read_text())
    assert len(rows) == count
    for row in rows:
        cfg = grouped_config(row["rows"], row["groups"], row["n"], row["k"], 132)
        got = row["tflops"][cfg.key()]
        assert got >= 0.97 * max(row["tflops"].values()), (row, cfg)


@pytest.mark.parametrize("sizes,m", [
    ((10, 0, 25, 20), 64),            # a zero group, rows past the sum
    ((0, 0, 300, 0, 1), 301),         # one group holds (nearly) everything
    ((7, 7, 7, 7, 7, 7, 7), 49),      # M / G whole
    ((1, 2, 3, 4, 5, 6, 7, 8, 9), 50),
    ((0, 0, 0, 0), 16),               # no rows at all
    ((33, 8), 41), ((5,), 9)])
@pytest.mark.parametrize("windows", [True, False])  # both ways, whatever the rule would pick
def test_grouped_wgrad_matches_float64(sizes, m, windows):
    from jax_ds.ops.grouped_gemm import grouped_wgrad
    kd, kx = jax.random.split(jax.random.fold_in(KEY, m))
    dy = jax.random.normal(kd, (m, 24), jnp.float32)
    x = jax.random.normal(kx, (m, 40), jnp.float32)
    wgrad = jax.jit(functools.partial(grouped_wgrad, windows=windows))
    got = np.asarray(wgrad(dy, x, jnp.array(sizes, jnp.int32)))
    ends = np.cumsum(sizes)
    dy64, x64 = np.asarray(dy, np.float64), np.asarray(x, np.float64)
    want = np.stack([dy64[e - s:e].T @ x64[e - s:e] for s, e in zip(sizes, ends)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_wgrad_windows_under_vmap(dtype):
    from jax_ds.ops.grouped_gemm import grouped_wgrad
    kd, kx = jax.random.split(KEY)
    dy, x = jax.random.normal(kd, (2, 30, 8), dtype), jax.random.normal(kx, (2, 30, 16), dtype)
    sizes = jnp.array([[4, 0, 10], [30, 0, 0]], jnp.int32)
    wgrad = functools.partial(grouped_wgrad, windows=True)
    got = jax.jit(jax.vmap(wgrad))(dy, x, sizes)
    for i in range(2):
        np.testing.assert_allclose(got[i], wgrad(dy[i], x[i], sizes[i]), rtol=1e-6, atol=1e-6)


def test_grouped_wgrad_takes_the_ragged_dot_when_it_costs_less():
    """Few rows (or G <= 2): XLA's ragged dot, on the operands' dtype."""
    from jax_ds.ops.grouped_gemm import grouped_wgrad, uses_windows
    assert not uses_windows("wgrad", 64, 4, 4096, 7168)
    assert not uses_windows("wgrad", 10 ** 6, 2, 4096, 7168)
    assert not uses_windows("wgrad", 10 ** 6, 4, 512, 1024)  # small N, K: the gathers dominate
    assert uses_windows("wgrad", 8192, 32, 4096, 7168)
    assert uses_windows("wgrad", 32768, 4, 4096, 7168)
    dy, x = jnp.ones((64, 8), jnp.bfloat16), jnp.ones((64, 16), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(grouped_wgrad)(dy, x, jnp.array([10, 0, 30, 24], jnp.int32)).jaxpr
    dots = [d for d in dot_equations(jaxpr, "ragged_dot_general") if d[3] == (4, 8, 16)]
    assert len(dots) == 1 and dots[0][0] == ("bfloat16", "bfloat16"), dots


def test_grouped_wgrad_windows_cover_any_sizes():
    """The static window count is enough for the worst placement of the rows, and the rows the
    window GEMM runs over stay under about 2 M (XLA's ragged dot: G x M)."""
    from jax_ds.ops.grouped_gemm import group_windows
    rng = np.random.default_rng(0)
    for m, g in [(50, 9), (8192, 32), (32768, 4), (262144, 16), (7, 8), (1, 3), (1000, 3)]:
        window, count = group_windows(m, g)
        assert window * count <= 2 * m + 2 * window, (m, g, window, count)
        tries = [np.full(g, window + 1)[:m // (window + 1)],   # each group one row past W
                 np.full(g, m // g)]
        for _ in range(200):  # random sizes of a random total <= m
            total = rng.integers(0, m + 1)
            tries.append(np.diff(np.sort(rng.integers(0, total + 1, g - 1)), prepend=0,
                                 append=total))
        for sizes in tries:
            assert -(-sizes // window).sum() <= count, (m, g, sizes)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_fp8_linear_wgrad_runs_at_the_operands_dtype(dtype):
    """The grouped wgrad of a large enough problem is one batched dot over windows of the
    groups' rows (not XLA's ragged dot) that takes bf16 operands as they are, float32
    accumulation; float32 operands at HIGHEST (the jaxpr only: nothing runs; the values are
    test_grouped_wgrad_matches_float64's)."""
    from jax_ds.ops.grouped_gemm import group_windows, uses_windows
    m, n, k, g = 8192, 2048, 7168, 32
    assert uses_windows("wgrad", m, g, n, k)
    x = jax.ShapeDtypeStruct((m, k), dtype)
    w = jax.ShapeDtypeStruct((g, n, k), dtype)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)
    dw_fn = jax.grad(lambda w, x, gs: jnp.sum(ops.grouped_fp8_linear(x, w, gs)
                                              .astype(jnp.float32)))
    jaxpr = jax.make_jaxpr(dw_fn)(w, x, gs).jaxpr
    from jax_ds.ops.grouped_gemm import WINDOW_BUFFER_BYTES
    window, count = group_windows(m, g)
    lead = min(count, WINDOW_BUFFER_BYTES // (4 * n * k))  # windows a chunk (here: chunked)
    assert not [d for d in dot_equations(jaxpr, "ragged_dot_general") if d[3] == (g, n, k)]
    name = jnp.dtype(dtype).name
    dots = [d for d in dot_equations(jaxpr, "dot_general")
            if d[3] == (lead, n, k) and d[0] == (name, name)]
    assert len(dots) == 1 and dots[0][2] == "float32", dots
    highest = jax.lax.Precision.HIGHEST
    assert (dots[0][1] in ((highest, highest), highest)) == (dtype == jnp.float32), dots


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("windows,copies", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("sizes,m", [((10, 0, 25, 20), 64), ((0, 0, 300, 0, 1), 301),
                                     ((1, 2, 3, 4, 5, 6, 7, 8, 9), 50), ((0, 0, 0), 8)])
def test_grouped_matmul_matches_float64(sizes, m, windows, copies, transpose_w):
    from jax_ds.ops.grouped_gemm import grouped_matmul
    n, k, g = 24, 40, len(sizes)
    kx, kw = jax.random.split(jax.random.fold_in(KEY, m))
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (g, k, n) if transpose_w else (g, n, k))
    f = functools.partial(grouped_matmul, transpose_w=transpose_w, windows=windows,
                          weight_copies=copies)
    got = np.asarray(jax.jit(f)(x, w, jnp.array(sizes, jnp.int32)))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want = np.zeros((m, n))
    for gi, (lo, hi) in enumerate(zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))):
        want[lo:hi] = x64[lo:hi] @ (w64[gi] if transpose_w else w64[gi].T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.all(got[sum(sizes):] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("windows", [True, False])
def test_grouped_linear_grads(dtype, windows, monkeypatch):
    """grouped_linear (the bf16 experts' GEMM): value and gradients against the per-group float32
    product, both ways (the rule forced), traced group sizes with a negative one and a sum
    past M (clamped, as grouped_fp8_linear does)."""
    from jax_ds.ops import grouped_gemm as gg
    monkeypatch.setattr(gg, "uses_windows", lambda *args: windows)
    m, n, k = 48, 24, 40
    kx, kw, kd = jax.random.split(KEY, 3)
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.random.normal(kw, (4, n, k), jnp.float32) * 0.2   # float32 weights, bf16 compute
    dy = jax.random.normal(kd, (m, n), jnp.float32)
    gs = jnp.array([10, -3, 30, 20], jnp.int32)                # clamped: 10, 0, 30, 8
    clamped = (10, 0, 30, 8)

    def exact(x, w):
        rows = np.repeat(np.arange(4), clamped)
        xs, ws = x.astype(jnp.float32)[:m], w.astype(dtype).astype(jnp.float32)[rows]
        return jnp.einsum("MK,MNK->MN", xs, ws, precision="highest")

    loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * dy)
    y = jax.jit(lambda x, w, g: gg.grouped_linear(x, w, g))(x, w, gs)  # a fresh trace per rule
    assert y.dtype == dtype and y.shape == (m, n)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(exact(x, w)),
                               rtol=2e-2, atol=2e-2)
    grads = jax.grad(lambda x, w, g: loss(lambda x, w: gg.grouped_linear(x, w, g))(x, w), (0, 1))
    got = jax.jit(grads)(x, w, gs)
    want = jax.grad(loss(exact), (0, 1))(x, w)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    for a, b in zip(got, want):
        assert calc_diff(np.asarray(a, np.float64), np.asarray(b, np.float64)) < 1e-4


@pytest.mark.parametrize("x_shape, w_shape, g", [((0, 8), (3, 4, 8), 3), ((5, 8), (0, 4, 8), 0),
                                                  ((5, 8), (3, 0, 8), 3), ((5, 0), (3, 4, 0), 3)])
def test_grouped_linear_empty_operands_give_zeros(x_shape, w_shape, g):
    """The public op (jax_ds.ops.grouped_linear): no rows, groups, N or K: zeros, and gradients
    of the operands' shapes."""
    x, w = jnp.ones(x_shape, jnp.bfloat16), jnp.ones(w_shape, jnp.bfloat16)
    gs = jnp.full((g,), x_shape[0] // max(g, 1), jnp.int32)  # sum <= M
    y = ops.grouped_linear(x, w, gs)
    assert y.shape == (x_shape[0], w_shape[1]) and not np.asarray(y, np.float32).any()
    dx, dw = jax.grad(lambda x, w: jnp.sum(ops.grouped_linear(x, w, gs).astype(jnp.float32)),
                      (0, 1))(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("x, w, gs, match", [
    (jnp.ones((5, 8)), jnp.ones((3, 4, 9)), jnp.ones(3, jnp.int32), "expected x"),
    (jnp.ones((5, 8)), jnp.ones((3, 4, 8)), jnp.ones(2, jnp.int32), "group_sizes"),
    (jnp.ones((5, 8)), jnp.ones((3, 4, 8)), jnp.ones(3, jnp.float32), "group_sizes"),
    (jnp.ones((5, 8), jnp.int32), jnp.ones((3, 4, 8)), jnp.ones(3, jnp.int32), "x"),
    (jnp.ones((2, 5, 8)), jnp.ones((3, 4, 8)), jnp.ones(3, jnp.int32), "x"),
])
def test_grouped_linear_validation(x, w, gs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.grouped_linear(x, w, gs)


@pytest.mark.parametrize("sizes", [[2, -1, 1], [2, 2, 2]])
def test_grouped_linears_refuse_concrete_bad_sizes(sizes):
    """Concrete sizes negative or summing past M: a ValueError naming the op called (the FP8
    linear named the GEMM inside it; the bf16 one clamped them silently)."""
    x, w, gs = jnp.ones((5, 128)), jnp.ones((3, 4, 128)), jnp.array(sizes, jnp.int32)
    for op in (ops.grouped_linear, ops.grouped_fp8_linear):
        with pytest.raises(ValueError, match=rf"^{op.__name__}: group_sizes must be >= 0 with "
                                             r"sum <= M = 5"):
            op(x, w, gs)


@pytest.mark.parametrize("windows", [True, False])  # False: the ragged dot, w shared
def test_grouped_linear_under_vmap(windows, monkeypatch):
    from jax_ds.ops import grouped_gemm as gg
    monkeypatch.setattr(gg, "uses_windows", lambda *args: windows)
    kx, kw = jax.random.split(KEY)
    x = jax.random.normal(kx, (2, 20, 16))
    w = jax.random.normal(kw, (3, 8, 16))
    gs = jnp.array([[4, 0, 10], [20, 0, 0]], jnp.int32)
    loss = lambda x, w, g: jnp.sum(gg.grouped_linear(x, w, g) ** 2)
    y = jax.vmap(gg.grouped_linear, in_axes=(0, None, 0))(x, w, gs)
    dx, dw = jax.vmap(jax.grad(loss, (0, 1)), in_axes=(0, None, 0))(x, w, gs)
    for i in range(2):
        np.testing.assert_allclose(y[i], gg.grouped_linear(x[i], w, gs[i]), rtol=1e-6, atol=1e-6)
        gx, gw = jax.grad(loss, (0, 1))(x[i], w, gs[i])
        np.testing.assert_allclose(dx[i], gx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw[i], gw, rtol=1e-5, atol=1e-5)


def test_grouped_linear_empty_edges():
    """No groups, or no rows: zeros and zero gradients, both ways (the ragged dot gave them)."""
    from jax_ds.ops import grouped_gemm as gg
    x, w0 = jnp.ones((8, 16)), jnp.ones((0, 8, 16))
    none = jnp.zeros((0,), jnp.int32)
    np.testing.assert_array_equal(gg.grouped_linear(x, w0, none), np.zeros((8, 8)))
    assert jax.grad(lambda w: gg.grouped_linear(x, w, none).sum())(w0).shape == (0, 8, 16)
    x0, w = jnp.ones((0, 16)), jnp.ones((3, 8, 16))
    for windows in (True, False):
        assert gg.grouped_matmul(x0, w, jnp.zeros((3,), jnp.int32), windows=windows).shape == \
            (0, 8)
        dw = gg.grouped_wgrad(jnp.ones((0, 8)), x0, jnp.zeros((3,), jnp.int32), windows=windows)
        np.testing.assert_array_equal(dw, np.zeros((3, 8, 16)))


def test_windows_stay_under_the_buffer_cap(monkeypatch):
    """Many experts on one device: a forward's weight copies past WINDOW_BUFFER_BYTES leave it to
    the ragged dot; the wgrad's products go in chunks (a scan), with the same values."""
    from jax_ds.ops import grouped_gemm as gg
    assert not gg.uses_windows("forward", 8192, 256, 2048, 7168)
    assert gg.uses_windows("forward", 8192, 32, 2048, 7168)
    assert gg.uses_windows("forward", 8192, 32, 4096, 7168)     # 3.8 GB of copies: 4.9x on H200
    assert gg.uses_windows("wgrad", 8192, 256, 2048, 7168)      # chunked
    for kind in ("wgrad", "forward"):
        assert not gg.uses_windows(kind, 0, 4, 64, 64) and not gg.uses_windows(kind, 64, 0, 8, 8)
    sizes = jnp.array([0, 0, 300, 0, 1, 7, 40], jnp.int32)
    kd, kx = jax.random.split(KEY)
    dy, x = jax.random.normal(kd, (400, 8)), jax.random.normal(kx, (400, 16))
    whole = gg.grouped_wgrad(dy, x, sizes, windows=True)
    monkeypatch.setattr(gg, "WINDOW_BUFFER_BYTES", 3 * 4 * 8 * 16)  # 3 windows a chunk
    chunked = jax.jit(lambda *a: gg.grouped_wgrad(*a, windows=True))(dy, x, sizes)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        gg.uses_windows("dgrad", 64, 4, 8, 8)


def test_cudnn_ragged_dot_flag_parses():
    """NOTES-moe: XLA's cuDNN ragged-dot fusion flag (the one to measure against the windows) is
    known to this jaxlib."""
    from jax_ds.testing import xla_flags_parse
    for value in ("true", "false"):
        ok, err = xla_flags_parse(f"--xla_gpu_experimental_use_ragged_dot_fusion={value}")
        assert ok, err


# ------------------------------------------------------------- the bf16 kernel's Python side

BF16_COMPILED = {(64, 64, 1), (64, 128, 1), (128, 128, 1), (128, 128, 2), (128, 192, 1),
                 (128, 192, 2)}


@pytest.mark.parametrize("g", [1, 4, 8, 32, 256])
def test_bf16_grouped_config_takes_compiled_tiles(g):
    """Every pick is a tile the bf16 handler compiles, and pairs only where the column blocks
    pair up (a widened tile kept grouped_config's pairs at n = 1408: 11 blocks)."""
    from jax_ds.ops import grouped_gemm as gg
    for rows in (1, 7, 64, 100, 128, 256, 1024, 8192):
        for n in (64, 129, 512, 1408, 2048, 4096, 7168):
            for k in (128, 1024, 2048, 7168):
                cfg = gg.bf16_grouped_config(rows * g, g, n, k, 132)
                assert (cfg.block_m, cfg.block_n, cfg.cluster_n) in BF16_COMPILED, cfg
                assert cfg.cluster_n == 1 or cdiv(n, cfg.block_n) % 2 == 0, (rows, n, k, cfg)


def test_grouped_linear_routes_to_the_bf16_kernel(monkeypatch):
    """With the kernel "available", impl="auto" takes it for bf16 x with K, N multiples of 8
    (forward and dgrad, the dgrad reading w as it is) and the windows otherwise; "ffi" refuses
    what the kernel cannot take."""
    from jax_ds.ops import grouped_gemm as gg
    calls = []

    def fake_kernel(a, b, sizes, out_dtype, cfg=None, *, transpose_b=False):
        calls.append((a.shape, b.shape, transpose_b))
        return gg.grouped_matmul(a, b, sizes, transpose_w=transpose_b).astype(out_dtype)

    monkeypatch.setattr(_ffi, "unavailable_reason", lambda target: None)
    monkeypatch.setattr(gg, "ffi_grouped_bf16_gemm", fake_kernel)
    x = jnp.ones((48, 40), jnp.bfloat16)
    w = jnp.ones((3, 24, 40), jnp.bfloat16)
    gs = jnp.array([10, 0, 30], jnp.int32)
    jax.grad(lambda x, w: jnp.sum(gg.grouped_linear(x, w, gs).astype(jnp.float32)),
             (0, 1))(x, w)
    assert calls == [((48, 40), (3, 24, 40), False), ((48, 24), (3, 24, 40), True)]
    calls.clear()
    for xx, ww in ((x.astype(jnp.float32), w), (x[:, :36], w[:, :, :36]), (x, w[:, :20])):
        gg.grouped_linear(xx, ww, gs)  # f32 x, K 36, N 20: the windows
        with pytest.raises(ValueError, match="grouped_linear"):
            gg.grouped_linear(xx, ww, gs, impl="ffi")
    assert calls == []
    gg.grouped_linear(x, w, gs, impl="xla")
    assert calls == []


def test_kernel_calls_get_k_padded_to_whole_blocks(monkeypatch):
    """K = 200 (scales 2 wide): the custom calls of all three FP8 GEMMs, lowered for CUDA on this
    machine, take a and b zero-padded to K = 256 and the scales as they are."""
    monkeypatch.setattr(_ffi, "resolve_impl", lambda op, target, impl, unsupported=None: "ffi")
    f8 = jnp.float8_e4m3fn
    dense = (jnp.ones((8, 200), f8), jnp.ones((8, 2)), jnp.ones((130, 200), f8), jnp.ones((2, 2)))
    grouped_b = (jnp.ones((3, 130, 200), f8), jnp.ones((3, 2, 2)))
    cases = [(ops.fp8_gemm, dense, "jax_ds_fp8_gemm", ("8x256", "130x256")),
             (ops.grouped_fp8_gemm, (*dense[:2], *grouped_b, jnp.array([3, 0, 5], jnp.int32)),
              "jax_ds_grouped_fp8_gemm", ("8x256", "3x130x256")),
             (ops.masked_grouped_fp8_gemm, (jnp.ones((3, 8, 200), f8), jnp.ones((3, 8, 2)),
                                            *grouped_b, jnp.array([3, 0, 5], jnp.int32)),
              "jax_ds_masked_grouped_fp8_gemm", ("3x8x256", "3x130x256"))]
    for fn, args, target, shapes in cases:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        call = next(line for line in text.splitlines() if f"custom_call @{target}(" in line)
        operands = call[call.index(": (") + 3:call.index(") ->")]
        assert [f"tensor<{s}xf8E4M3FN>" in operands for s in shapes] == [True, True], call
        assert "x200x" not in operands, call
