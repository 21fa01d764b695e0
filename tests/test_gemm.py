"""fp8_gemm / fp8_linear on CPU: the reference against float64 numpy, validation, transforms."""

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds import _ffi, ops
from jax_ds.testing import calc_diff, dot_equations, tolerance


def random(shape, dtype=jnp.bfloat16, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def dequant_f64(q, s, block_m):
    """Independent float64 dequantization: q * s with s expanded over (block_m, 128) blocks."""
    q = np.asarray(q, np.float64)
    s = np.repeat(np.repeat(np.asarray(s, np.float64), block_m, axis=0), 128, axis=1)
    return q * s[:q.shape[0], :q.shape[1]]


def operands(m, n, k, seed=0, dtype=jnp.bfloat16):
    x, w = random((m, k), dtype, seed), random((n, k), dtype, seed + 1)
    a, a_scale = ops.quantize_fp8(x, block=(1, 128))
    b, b_scale = ops.quantize_fp8(w, block=(128, 128))
    return x, w, (a, a_scale, b, b_scale)


SHAPES = [(1, 1, 128), (7, 129, 256), (130, 200, 384), (64, 300, 1024),
          (3, 5, 1), (2, 7, 64), (9, 130, 200)]  # any K: scales ceil(K/128) wide


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_reference_matches_float64(m, n, k, out_dtype):
    x, w, (a, sa, b, sb) = operands(m, n, k, seed=m + n + k)
    out = ops.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    truth = dequant_f64(a, sa, 1) @ dequant_f64(b, sb, 128).T
    assert calc_diff(out, truth) < tolerance(out_dtype, k)
    # Against the unquantized product: FP8's own error, DeepGEMM's bound.
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert calc_diff(out, exact) < tolerance("fp8")


def test_scale_indexing():
    # Ones everywhere, distinct powers of two per scale block: every output is an exact sum.
    m, n, k = 3, 260, 384
    a = jnp.ones((m, k), jnp.float8_e4m3fn)
    b = jnp.ones((n, k), jnp.float8_e4m3fn)
    sa = jnp.exp2(jnp.arange(m * 3, dtype=jnp.float32).reshape(m, 3) - 4)
    sb = jnp.exp2(-jnp.arange(3 * 3, dtype=jnp.float32).reshape(3, 3))
    out = ops.fp8_gemm(a, sa, b, sb, out_dtype=jnp.float32)
    expected = 128 * np.einsum("mk,nk->mn", np.asarray(sa), np.repeat(np.asarray(sb), 128, 0)[:n])
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_jit_and_vmap():
    _, _, args = operands(16, 48, 256, seed=1)
    eager = ops.fp8_gemm(*args)
    np.testing.assert_array_equal(np.asarray(jax.jit(ops.fp8_gemm)(*args)), np.asarray(eager))
    a, sa, b, sb = args
    batched = jax.vmap(ops.fp8_gemm)(jnp.stack([a, a[::-1]]), jnp.stack([sa, sa[::-1]]),
                                     jnp.stack([b, b]), jnp.stack([sb, sb]))
    assert batched.shape == (2, 16, 48)
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(eager)[::-1])
    shared_b = jax.vmap(ops.fp8_gemm, in_axes=(0, 0, None, None))(a[None], sa[None], b, sb)
    np.testing.assert_array_equal(np.asarray(shared_b[0]), np.asarray(eager))


def _bad(**changes):
    _, _, (a, sa, b, sb) = operands(8, 130, 256, seed=2)
    args = dict(a=a, a_scale=sa, b=b, b_scale=sb, out_dtype=jnp.bfloat16)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, exc, match", [
    (dict(a=jnp.zeros((2, 8, 256), jnp.float8_e4m3fn)), ValueError,
     r"a must be 2-D .* \(2, 8, 256\)"),
    (dict(b=jnp.zeros((256,), jnp.float8_e4m3fn)), ValueError, r"b must be 2-D .* \(256,\)"),
    (dict(a=jnp.zeros((8, 256), jnp.bfloat16)), TypeError, r"a must have dtype float8_e4m3fn"),
    (dict(b=jnp.zeros((130, 256), jnp.float8_e5m2)), TypeError, r"b must have dtype float8_e4m3fn"),
    (dict(a_scale=jnp.ones((8, 2), jnp.bfloat16)), TypeError, r"a_scale must have dtype float32"),
    (dict(b_scale=jnp.ones((2, 2), jnp.float16)), TypeError, r"b_scale must have dtype float32"),
    (dict(a_scale=jnp.ones((8, 3), jnp.float32)), ValueError,
     r"a_scale has shape \(8, 3\), expected \(8, 2\)"),
    (dict(b_scale=jnp.ones((1, 2), jnp.float32)), ValueError,
     r"b_scale has shape \(1, 2\), expected \(2, 2\) = \[ceil\(N/128\), ceil\(K/128\)\]"),
    (dict(b=jnp.zeros((130, 384), jnp.float8_e4m3fn)), ValueError, r"b has shape \(130, 384\)"),
    (dict(a=jnp.zeros((8, 200), jnp.float8_e4m3fn), b=jnp.zeros((130, 200), jnp.float8_e4m3fn),
          a_scale=jnp.ones((8, 1), jnp.float32)),  # K 200 takes ceil(200/128) = 2 scales
     ValueError, r"a_scale has shape \(8, 1\), expected \(8, 2\)"),
    (dict(a=jnp.zeros((8, 0), jnp.float8_e4m3fn), b=jnp.zeros((130, 0), jnp.float8_e4m3fn)),
     ValueError, r"K must be >= 1"),
    (dict(a=jnp.zeros((0, 256), jnp.float8_e4m3fn), a_scale=jnp.ones((0, 2), jnp.float32)),
     ValueError, r"M and N must be >= 1"),
    (dict(out_dtype=jnp.float16), TypeError, r"out_dtype must be bfloat16 or float32, got float16"),
    (dict(out_dtype="foo"), TypeError, r"out_dtype must be bfloat16 or float32, got 'foo'"),
    (dict(a_scale=[[1.0]]), TypeError, r"a_scale must be an array .* got list"),
])
def test_validation_errors_name_the_argument(changes, exc, match):
    args = _bad(**changes)
    with pytest.raises(exc, match=match):
        ops.fp8_gemm(**args)
    with pytest.raises(exc, match=match):
        ops.fp8_gemm_reference(**args)


def test_impl_choices(monkeypatch, caplog, no_kernels):
    _, _, args = operands(4, 8, 128, seed=3)
    with pytest.raises(RuntimeError, match=r'fp8_gemm\(impl="ffi"\): the FFI kernel'):
        ops.fp8_gemm(*args, impl="ffi")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.fp8_gemm(*args, impl="cutlass")
    ref = np.asarray(ops.fp8_gemm_reference(*args))
    np.testing.assert_array_equal(np.asarray(ops.fp8_gemm(*args, impl="xla")), ref)
    monkeypatch.setenv("JAX_DS_IMPL", "xla")
    np.testing.assert_array_equal(np.asarray(ops.fp8_gemm(*args, impl="ffi")), ref)
    # The path taken is logged once per op and path, not per call.
    monkeypatch.delenv("JAX_DS_IMPL")
    monkeypatch.setattr(_ffi, "_logged", set())
    with caplog.at_level(logging.INFO, logger="jax_ds"):
        ops.fp8_gemm(*args)
        ops.fp8_gemm(*args)
    assert [r.getMessage() for r in caplog.records].count(
        f"jax_ds.fp8_gemm: reference ({_ffi.unavailable_reason(ops.gemm.TARGET)})") == 1

RESULTS = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"


def test_gemm_config():
    for m, n, k in [(1, 1, 128), (64, 2112, 7168), (128, 7168, 16384), (4096, 24576, 1536)]:
        cfg = ops.gemm_config(m, n, k, 132)
        assert (cfg.block_m, cfg.block_n) in ops.gemm.DENSE_TILES
        tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        assert 0 < cfg.num_sms <= min(132, tiles)
        assert cfg.cluster_n in ops.gemm.CLUSTERS
        if -(-n // cfg.block_n) == 1:
            assert cfg.cluster_n == 1  # nothing to pair with
        if m <= 64:
            assert cfg.block_m == 64
    # m > 128: 128x192 where it fills the SMs and N's tail does not empty it (H200 sweep), with
    # the epilogue overlap from 8 k blocks on, then in pairs where the column blocks pair up and
    # the pairs' last wave is not 3% worse
    G = ops.GemmConfig
    assert ops.gemm_config(4096, 2112, 7168, 132) == G(128, 192, 132, 1, overlap=True)  # 11
    # up to TALL_MAX_KBLOCKS k blocks 192x128 in its place (4096 rows: 0.97 used; >= 8 waves)
    assert ops.gemm_config(4096, 24576, 1536, 132) == G(192, 128, 132, 2, overlap=True)
    assert ops.gemm_config(4096, 32768, 512, 132) == G(192, 128, 132, 1)  # 4 k blocks: no
    assert ops.gemm_config(4096, 7168, 2048, 132) == G(192, 128, 132, 2, overlap=True)
    assert ops.gemm_config(1024, 7168, 2048, 132) == G(128, 128, 132, 2)  # 1024 of 1152 rows
    assert ops.gemm_config(1536, 7168, 2048, 132) == G(128, 128, 132, 2)  # 3.4 waves of 192x128
    assert ops.gemm_config(129, 32768, 512, 132) == G(128, 192, 132, 1)  # 129 of 192
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops.gemm, "TALL_MAX_KBLOCKS", None)
        assert ops.gemm_config(4096, 24576, 1536, 132) == G(128, 192, 132, 2, overlap=True)
        assert ops.gemm_config(4096, 32768, 512, 132) == G(128, 192, 132, 1)
        assert ops.gemm_config(4096, 7168, 2048, 132) == G(128, 128, 132, 2)
    assert ops.gemm_config(8192, 8256, 8192, 132) == G(128, 192, 132, 1, overlap=True)  # 43
    # over WIDE_MAX_KBLOCKS k blocks 128x192 only where its columns are as full as 128x128's
    assert ops.gemm_config(8192, 8192, 8192, 132) == G(128, 128, 132, 2)  # 43 x 192 > 8192
    assert ops.gemm_config(100000, 48, 256, 132).block_n == 128  # 48 of 192 columns: no
    assert ops.gemm_config(256, 7168, 7168, 132) == ops.GemmConfig(128, 128, 112, 2)
    # 64 < m <= 128 (the H200 tile sweep): one 128-row tile when 128x192, 128x128 or 128x64
    # tiles fill 3/4 of the SMs, the one whose waves are fullest (128x64 pays 10%); else 64-row
    # tiles as at m <= 64, without clusters or split (the split lost 17% at 64x24576x1536).
    assert ops.gemm_config(128, 32768, 512, 132) == ops.GemmConfig(128, 128, 132, 1)
    assert ops.gemm_config(128, 24576, 1536, 132) == ops.GemmConfig(128, 192, 128, 1)  # 1 wave
    assert ops.gemm_config(100, 7168, 2048, 132) == ops.GemmConfig(128, 64, 112, 1)
    assert ops.gemm_config(128, 4096, 7168, 132) == ops.GemmConfig(64, 64, 128, 1)
    assert ops.gemm_config(128, 2112, 7168, 132).block_m == 64
    assert ops.gemm_config(64, 24576, 1536, 132) == ops.GemmConfig(64, 128, 132, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.gemm_config(1, 1, 128, 132).block_m = 128


def test_gemm_config_is_always_a_valid_launch():
    """Over a grid of shapes, every pick is something the kernel takes: a compiled tile and
    cluster size, pairs only over an even column-block count, a split within the units and k
    blocks (and only above m = 128), the overlap only on 128x192 from 8 k blocks on."""
    cdiv = lambda a, b: -(-a // b)
    for m in (1, 7, 64, 65, 128, 129, 200, 4095, 4096, 8192):
        for n in (1, 48, 129, 2112, 4096, 7168, 24576):
            for k in (128, 512, 1536, 7168):
                cfg = ops.gemm_config(m, n, k, 132)
                bm, bn, cn = cfg.block_m, cfg.block_n, cfg.cluster_n
                assert (bm, bn) in ops.gemm.DENSE_TILES and cn in ops.gemm.CLUSTERS, cfg
                assert cn == 1 or cdiv(n, bn) % 2 == 0, (m, n, k, cfg)
                assert 1 <= cfg.num_sms <= min(132, cdiv(m, bm) * cdiv(n, bn)), (m, n, k, cfg)
                units = ops.gemm.work_units(m, n, bm, bn, cn)
                if cfg.split_units:
                    assert m > 128 and 0 < cfg.split_units <= units, (m, n, k, cfg)
                    assert 2 <= cfg.splits <= k // 128, (m, n, k, cfg)
                else:
                    assert cfg.splits == 1 and cfg.workspace_floats() == 1, (m, n, k, cfg)
                if cfg.overlap:
                    assert (bm, bn) in ops.gemm.OVERLAP_TILES and k // 128 >= 8, (m, n, k, cfg)
                if bm == 192:
                    assert m > 128 and k // 128 <= ops.gemm.TALL_MAX_KBLOCKS, (m, n, k, cfg)
                if m <= 64:
                    assert bm == 64, (m, n, k, cfg)


def test_split_plan():
    plan = ops.gemm.split_plan
    assert ops.gemm.SPLIT_MIN_KBLOCKS == 16
    # 544 units on 132 SMs: 4 full waves and 16 units; 3 slices of 19 k blocks each (at least
    # 16 a slice) + 2 for the partial sums instead of a fifth 56-block wave.
    assert plan(544, 132, 56) == (16, 3, 4 * 56 + 19 + 2)
    assert plan(528, 132, 56) == (0, 1, 4 * 56)  # no partial wave
    assert plan(100, 132, 56) == (0, 1, 56)  # less than a wave: smaller tiles' business
    assert plan(17, 132, 56, short_grid=True) == (17, 3, 19 + 2)  # ... unless asked (sweeps)
    assert plan(100, 132, 56, short_grid=True) == (0, 1, 56)  # 132 // 100 = 1 slice
    # slices under 16 k blocks are not worth it (H100, 2026-12-06: 8-block slices lost 9%)
    assert plan(544, 132, 4) == (0, 1, 5 * 4)
    assert plan(224, 66, 16) == (0, 1, 4 * 16)  # 1024x7168x2048 in 128x128 pairs
    assert plan(2048, 66, 64) == (0, 1, 32 * 64)  # 8192^3: 2 units left, saves under 5%
    assert plan(288, 66, 56) == (24, 2, 4 * 56 + 28 + 2)  # 2 slices fit the 42 idle clusters
    # the units: 4096x2112 in 128x128 tiles, 32 x 17; in pairs 32 x 9 (the 18th tile past N)
    assert ops.gemm.work_units(4096, 2112, 128, 128) == 544
    assert ops.gemm.work_units(4096, 2112, 128, 128, 2) == 288
    # Never more slices than idle clusters can take at once, nor than k blocks / 16.
    for units in range(1, 700, 7):
        for k_blocks in (1, 4, 12, 56, 128):
            split_units, splits, t = plan(units, 132, k_blocks)
            assert t <= -(-units // 132) * k_blocks
            if split_units:
                assert split_units == units % 132 and split_units * splits <= 132
                assert 2 <= splits <= k_blocks // ops.gemm.SPLIT_MIN_KBLOCKS


def test_gemm_config_splits_a_short_last_wave(monkeypatch):
    # 4096x7168 in pairs of 128x192 tiles: 32 x 19 = 608 units (9.2 waves on 66 clusters); the
    # last 14 units in 4 slices of 32 k blocks (1186 k-block steps instead of 1280). (Today's
    # rule takes 128x128 pairs there, without a split: the split's plan is tested on the tile
    # without the long-K limit.)
    monkeypatch.setattr(ops.gemm, "WIDE_MAX_KBLOCKS", None)
    cfg = ops.gemm_config(4096, 7168, 16384, 132)
    assert cfg == ops.GemmConfig(128, 192, 132, 2, 14, 4, overlap=True)
    assert cfg.workspace_floats() == 14 * 4 * 2 * 128 * 192 + 14 * 2 * 2
    assert cfg.split_attrs()["splits"] == 4 and "splits" not in cfg.attrs()
    assert cfg.split_attrs()["overlap"] == 1 and cfg.key() == "128x192c2so"
    assert ops.gemm_config(4096, 4096, 7168, 132) == ops.GemmConfig(128, 192, 132, 2, 22, 3,
                                                                     overlap=True)
    for m, n, k in [(4096, 2112, 7168), (4096, 24576, 1536), (4096, 32768, 512),
                    (4096, 7168, 2048), (8192, 8192, 8192), (128, 7168, 16384)]:
        cfg = ops.gemm_config(m, n, k, 132)
        assert (cfg.split_units, cfg.splits) == (0, 1) and cfg.workspace_floats() == 1, (m, n, k)


# (sweep, within, shapes checked): the m > 128 picks follow the kernels of 2026-12-05
# (WIDE_MAX_KBLOCKS, checked against that day's sweep and the H100 A/Bs below); these sweeps,
# from before those kernels, judge the m <= 128 rule only, which did not change.
@pytest.mark.parametrize("sweep,within,checked", [
    ("gemm-tiles-sweep-h100-2026-11-24.json", 0.98, 11),
    ("gemm-tiles-sweep-h200-2026-12-03.json", 0.98, 11),
    ("gemm-tiles-sweep-h200-2026-12-03-m64-128-split.json", 0.92, 12),
    ("gemm-tiles-sweep-h100-2026-12-06-short-grid-splits.json", 0.94, 6),
    ("gemm-tiles-sweep-h100-2026-12-06-acc-sets-4.json", 0.95, 12)])
def test_gemm_config_against_tile_sweeps(sweep, within, checked):
    """gemm_config's docstring claim, from the committed sweeps (scripts/sweep_gemm.py kernel
    times of every tile): on every swept shape its pick is within 2% of the fastest tile; in the
    m <= 128 sweep with short-grid splits (which gemm_config does not use: 64x2112x7168 cut 7
    ways in 64x32 tiles is 8% faster there; 128x4096x7168 moved 4% between H200 runs) within
    8%, which still catches a split that loses (64x24576x1536: 0.81 of the best); in the H100's
    of 2026-12-06 (forced splits, two input sets: 64x2112x7168 in 64x32 halves 5% ahead there,
    6% behind with four sets in lib-ab-h100-2026-12-06-narrow-split.json) within 6%; in the
    H100's with four accumulator sets for BN <= 64 (the kernels of now; four input sets) within
    5% (128x24576x1536: 128x192 at 0.956 of 128x64).
    A shape whose pick a sweep did not time (a sweep from before the tile, the split or the
    overlap) is skipped; `checked` counts the others, so a rule change that moves picks out of
    every sweep fails here instead of passing on nothing (then sweep again)."""
    data = json.loads((RESULTS / sweep).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    compared = 0
    for row in rows:
        if row["m"] > 128:
            continue
        cfg = ops.gemm_config(row["m"], row["n"], row["k"], 132)
        key = cfg.key()
        if key not in row["tflops"]:  # a sweep from before the tile or the split
            continue
        pick = row["tflops"][key]
        best = max(row["tflops"].values())
        assert pick >= within * best, (row["m"], row["n"], row["k"], pick, best)
        compared += 1
    assert compared == checked, (sweep, compared)


def test_wide_max_kblocks_against_the_2026_12_05_sweep(monkeypatch):
    """gemm.WIDE_MAX_KBLOCKS = 15 (the default since the H100's sustained A/B of 2026-12-06)
    against main's two runs in the H200 sweep of 2026-12-05 (128x128 tiles and the picks of
    then, kernel times): within 3% of the fastest timed config on all seven m >= 4096 shapes
    (4096x7168x2048 takes 128x128 pairs, 2.5% under single CTAs there), and 128x128 exactly at
    the four long-K shapes whose 192-wide columns are not full."""
    from jax_ds.ops import gemm
    assert gemm.WIDE_MAX_KBLOCKS == 15
    monkeypatch.setattr(gemm, "TALL_MAX_KBLOCKS", None)  # (a sweep from before 192x128)
    data = json.loads((RESULTS / "gemm-tiles-sweep-h200-2026-12-05-one-acc-128.json").read_text())
    runs = [r["rows"] for r in data["runs"] if r["variant"].startswith("main")]
    assert len(runs) == 2
    for rows in runs:
        assert len(rows) == 7
        for row in rows:
            m, n, k = row["m"], row["n"], row["k"]
            key = ops.gemm_config(m, n, k, 132).key()
            assert key.startswith("128x128") == (n in (4096, 7168, 8192) and k >= 2048), key
            assert row["tflops"][key] >= 0.97 * max(row["tflops"].values()), (m, n, k, key)


def test_short_grid_fill_picks(monkeypatch):
    """gemm.SHORT_GRID_FILL (off by default): at m <= 128 a grid of fewer tiles than that share of
    the SMs is cut along K into as many slices as fit one wave, each of at least
    SHORT_GRID_MIN_KBLOCKS k blocks; fuller grids and m > 128 keep their picks."""
    from jax_ds.ops import gemm
    assert gemm.SHORT_GRID_FILL is None
    assert ops.gemm_config(64, 576, 7168, 132) == ops.GemmConfig(64, 16, 36, 1)
    monkeypatch.setattr(gemm, "SHORT_GRID_FILL", 0.5)
    assert ops.gemm_config(64, 576, 7168, 132) == ops.GemmConfig(64, 16, 108, 1, 36, 3)
    assert ops.gemm_config(5, 256, 7168, 132) == ops.GemmConfig(64, 16, 112, 1, 16, 7)
    assert ops.gemm_config(64, 576, 2048, 132) == ops.GemmConfig(64, 16, 72, 1, 36, 2)
    for shape, key in [((64, 576, 1024), "64x16c1"),      # one slice of 8 k blocks at most
                       ((128, 576, 7168), "64x16c1"),     # 72 tiles: over half the SMs
                       ((64, 2112, 7168), "64x16c1")]:    # a full wave
        assert ops.gemm_config(*shape, 132).key() == key, shape
    monkeypatch.setattr(gemm, "SHORT_GRID_FILL", None)
    off = ops.gemm_config(512, 576, 7168, 132)  # m > 128: the other rule, unchanged
    monkeypatch.setattr(gemm, "SHORT_GRID_FILL", 0.5)
    assert ops.gemm_config(512, 576, 7168, 132) == off


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_linear_forward_and_grads(dtype):
    x = random((2, 5, 300), dtype, seed=4)  # ragged K: padded to 384 inside
    w = random((200, 300), dtype, seed=5)  # ragged N: padded to 256 in the backward
    r = random((2, 5, 200), jnp.float32, seed=6)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w).astype(jnp.float32) * r)

    def exact(x, w):
        return jnp.einsum("BTK,NK->BTN", x.astype(jnp.float32), w.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    y = ops.fp8_linear(x, w)
    assert y.shape == (2, 5, 200) and y.dtype == dtype
    assert calc_diff(y, exact(x, w)) < tolerance("fp8")
    dx, dw = jax.jit(jax.grad(lambda x, w: loss(ops.fp8_linear, x, w), argnums=(0, 1)))(x, w)
    dx_ref, dw_ref = jax.grad(lambda x, w: loss(exact, x, w), argnums=(0, 1))(x, w)
    assert dx.shape == x.shape and dx.dtype == dtype and dw.shape == w.shape and dw.dtype == dtype
    assert calc_diff(dx, dx_ref) < tolerance("fp8")
    assert calc_diff(dw, dw_ref) < tolerance(dtype)  # wgrad is float32 math (not FP8)


@pytest.mark.parametrize("grouped,bf16_windows", [
    (False, None), (2, None), (3, None),  # fp8_linear, grouped_fp8_linear with G groups
    (3, True), (3, False)])               # grouped_linear (bf16 experts), the rule forced
def test_fp8_linear_inside_shard_map_sums_the_weight_gradient(grouped, bf16_windows, monkeypatch):
    """x split over a mesh axis, w replicated: inside shard_map the weight's cotangent varies
    over the axis where w does not, and its gradient is the sum over the shards, as outside."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ds.ops import grouped_gemm as gg
    if bf16_windows is not None:
        monkeypatch.setattr(gg, "uses_windows", lambda *args: bf16_windows)

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices("cpu")[:4])
    x = random((16, 256), jnp.float32, seed=11)
    w = random((grouped, 64, 256) if grouped else (64, 256), jnp.float32, seed=12)
    sizes = jnp.array([2, 2] if grouped == 2 else [1, 0, 3], jnp.int32)  # per shard of 4 rows

    def linear(x, w):
        if bf16_windows is not None:
            return gg.grouped_linear(x, w, sizes)
        return ops.grouped_fp8_linear(x, w, sizes) if grouped else ops.fp8_linear(x, w)

    def loss(x, w):
        return jnp.sum(linear(x, w).astype(jnp.float32) ** 2)

    def sharded_loss(x, w):
        body = lambda x, w: jax.lax.psum(loss(x, w), "data")  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())(x, w)

    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    dx, dw = jax.jit(jax.grad(sharded_loss, argnums=(0, 1)))(xs, ws)
    per_shard = [jax.grad(loss, argnums=(0, 1))(x[i:i + 4], w) for i in range(0, 16, 4)]
    np.testing.assert_allclose(np.asarray(dx), np.concatenate([g[0] for g in per_shard]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), sum(np.asarray(g[1]) for g in per_shard),
                               rtol=1e-4, atol=1e-4)


def test_fp8_linear_vmap_and_errors(no_kernels):
    x, w = random((3, 4, 256), seed=7), random((64, 256), seed=8)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda v: ops.fp8_linear(v, w))(x)),
                                  np.asarray(ops.fp8_linear(x, w)))
    with pytest.raises(ValueError, match=r"x \[..., K\] and w \[N, K\], got x \(3, 4, 256\)"):
        ops.fp8_linear(x, w.T)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.fp8_linear(x, w.astype(jnp.int8))
    with pytest.raises(RuntimeError, match=r'fp8_linear\(impl="ffi"\)'):
        ops.fp8_linear(x, w, impl="ffi")


def test_ffi_path_lowers_for_cuda(monkeypatch):
    """The kernel path's ffi_calls (shapes, attribute types, vmap, custom_vjp) lower for CUDA even
    on a machine without a GPU, so a broken call shows up in CPU CI."""
    monkeypatch.setattr(_ffi, "resolve_impl", lambda op, target, impl: "ffi")

    def forward(x, w):
        q, s = ops.quantize_fp8(x)
        wq, ws = ops.quantize_fp8(w, block=(128, 128), scale_format="ue8m0")
        return ops.fp8_gemm(q, s, wq, ws)

    def lower(fn, *args):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    x, w = jnp.ones((300, 256), jnp.bfloat16), jnp.ones((130, 256), jnp.bfloat16)
    text = lower(forward, x, w)
    assert "@jax_ds_quantize_fp8" in text and "ue8m0 = true" in text
    assert "block_m = 128 : i32" in text
    cfg = ops.gemm_config(300, 130, 256, _ffi.num_sms())
    assert (f"block_m = {cfg.block_m} : i32, block_n = {cfg.block_n} : i32, "
            f"cluster_n = {cfg.cluster_n} : i32, num_sms = {cfg.num_sms} : i32") in text
    assert lower(jax.vmap(forward, in_axes=(0, None)), x[None], w).count("custom_call") == 3
    grad = jax.grad(lambda x, w: jnp.sum(ops.fp8_linear(x, w) ** 2), argnums=(0, 1))
    assert lower(grad, x.astype(jnp.float32), w.astype(jnp.float32)).count("@jax_ds_fp8_gemm") == 2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_fp8_linear_wgrad_runs_at_the_operands_dtype(dtype):
    """The wgrad dot takes 16-bit operands as they are (float32 accumulation: every product of two
    is exact in float32, so it equals the float32 dot up to summation order, and on a GPU it runs
    at the 16-bit matrix rate rather than as a float32 GEMM); float32 operands stay at HIGHEST."""
    x = random((3, 130, 300), dtype, seed=21)
    w = random((200, 300), dtype, seed=22)
    r = random((3, 130, 200), dtype, seed=23)
    dw_fn = jax.grad(lambda w: jnp.sum((ops.fp8_linear(x, w) * r).astype(jnp.float32)))
    dots = dot_equations(jax.make_jaxpr(dw_fn)(w).jaxpr, "dot_general")
    name = jnp.dtype(dtype).name
    wgrad = [d for d in dots if d[3] == (200, 300)]  # [N, K]: no FP8 reference GEMM makes it
    assert len(wgrad) == 1 and wgrad[0][0] == (name, name) and wgrad[0][2] == "float32", dots
    highest = jax.lax.Precision.HIGHEST
    assert (wgrad[0][1] in ((highest, highest), highest)) == (dtype == jnp.float32), wgrad
    # its value: the float32 dot of the same (16-bit) values
    dy = r.reshape(-1, 200)
    want = jnp.einsum("MN,MK->NK", dy.astype(jnp.float32), x.reshape(-1, 300).astype(jnp.float32),
                      precision=highest).astype(dtype)
    got = jax.jit(dw_fn)(w)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2 if dtype != jnp.float32 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_matmul_equals_the_float32_dot_on_cpu(dtype):
    """`matmul_operands` / `matmul_precision`'s claim: the 16-bit dot with float32 accumulation
    has the values of the float32 HIGHEST dot of the same numbers (each product of two 16-bit
    values is exact in float32; both sum in float32), up to the order of the float32 sums. The
    order is XLA's: jax 0.12.0's XLA:CPU gave the same bits, 0.12.1's does not (27% of the
    elements differ in the last bits). So: within the float32 summation bound of both sums,
    2 k 2^-24 sum|a b| per element, which a 16-bit accumulation (2^-9 / 2^-12 of the partial
    sum per addition) leaves on most elements (checked below on the same data)."""
    from jax_ds.ops.gemm import matmul_operands, matmul_precision
    a, b = random((390, 200), dtype, seed=31), random((390, 300), dtype, seed=32)
    got = jax.jit(lambda a, b: jnp.einsum("MN,MK->NK", *matmul_operands(a, b),
                                          preferred_element_type=jnp.float32,
                                          precision=matmul_precision(dtype)))(a, b)
    want = jax.jit(lambda a, b: jnp.einsum("MN,MK->NK", a.astype(jnp.float32),
                                           b.astype(jnp.float32),
                                           precision=jax.lax.Precision.HIGHEST))(a, b)
    assert got.dtype == jnp.float32
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact = a64.T @ b64
    bound = 2 * a.shape[0] * 2.0 ** -24 * (np.abs(a64).T @ np.abs(b64))
    for name, x in (("16-bit dot", got), ("float32 dot", want)):
        err = np.abs(np.asarray(x, np.float64) - exact)
        assert (err <= bound).all(), (name, float((err / bound).max()))
    # the bound catches a 16-bit accumulation: the same sums with every partial sum rounded to
    # `dtype` (on a 20 x 30 corner) leave it on most elements
    np_dtype = jnp.dtype(dtype).type
    acc = np.zeros((20, 30), np_dtype)
    for i in range(a.shape[0]):
        prod = (a64[i, :20, None] * b64[i, None, :30]).astype(np.float32)
        acc = (acc.astype(np.float32) + prod).astype(np_dtype)
    err16 = np.abs(acc.astype(np.float64) - exact[:20, :30])
    assert (err16 > bound[:20, :30]).mean() > 0.5


# The H100's sustained A/Bs of 2026-12-06 (scripts/lib_ab.py, device-bound TFLOP/s, 3 rounds) and
# the gemm constants each variant ran with (scripts/make_variant.py overrides).
_BEFORE = {"SPLIT_MIN_KBLOCKS": 4, "WIDE_KEEP_FULL_WAVES": False,  # the rules of then
           "TALL_MAX_KBLOCKS": None}
LIB_AB_2026_12_06 = {
    "lib-ab-h100-2026-12-06-wide-max-kblocks.json": {
        "ab/A": {**_BEFORE, "WIDE_MAX_KBLOCKS": None},
        "ab/B": {**_BEFORE, "WIDE_MAX_KBLOCKS": 15}},
    "lib-ab-h100-2026-12-06-mid-m-splits.json": {
        "ab/A": {**_BEFORE, "WIDE_MAX_KBLOCKS": None},
        "ab/B": {**_BEFORE, "WIDE_MAX_KBLOCKS": 15},
        "ab/C": {**_BEFORE, "WIDE_MAX_KBLOCKS": 15, "SPLIT_MIN_GAIN": 1.0}},
    # 192x128 (twenty-fifth session): A the picks of then, T every 128-row pick >= 128 wide
    "lib-ab-h100-2026-12-06-tall-tile.json": {
        "ab/next/A": {"TALL_MAX_KBLOCKS": None},
        "ab/next/T": {"TALL_TILE": True}},
    # the same session, with bench gemm's repeats and 16 input sets (--sets 16 --max-reps 32):
    # the short-K rule against none, and the long-K rule against none
    "lib-ab-h100-2026-12-06-tall-tile-bench-timing.json": {
        "ab/next/N": {"TALL_MAX_KBLOCKS": None},
        "ab/next/D": {}},
    "lib-ab-h100-2026-12-06-long-k-bench-timing-a.json": {
        "ab/next/D": {},
        "ab/next/W": {"WIDE_MAX_KBLOCKS": None}},
    "lib-ab-h100-2026-12-06-long-k-bench-timing-b.json": {
        "ab/next/D": {},
        "ab/next/W": {"WIDE_MAX_KBLOCKS": None}},
}
# How close to the fastest variant the pick's must be (0.98 unless named): in the bench-timed
# long-K A/Bs 128x192 (W) ran 1-4% ahead of the rule's 128x128 pairs at 4096x7168x16384 (3.9% in
# one call, 0.3% in the next, the same hour), 8192^3 and 16384x4096x7168, while the rule won 3-20%
# at 1024-2048 rows (NOTES-gemm, twenty-fifth session): the rule stays, these files bound its cost.
LIB_AB_WITHIN = {"lib-ab-h100-2026-12-06-long-k-bench-timing-a.json": 0.96,
                 "lib-ab-h100-2026-12-06-long-k-bench-timing-b.json": 0.97}


@pytest.mark.parametrize("name", sorted(LIB_AB_2026_12_06))
def test_gemm_config_against_the_h100_ab(name, monkeypatch):
    """gemm_config's m > 128 rule against the H100's sustained A/Bs: on every shape, the config
    it picks today is one some variant ran, and that variant's median is within 2% of the
    fastest variant's (the rounds agree within 1-4%; LIB_AB_WITHIN names the looser files). A
    192x128 pick on a shape of an A/B from before that tile is judged by the tall-tile A/B,
    which must have run the shape."""
    from jax_ds.ops import gemm
    data = json.loads((RESULTS / name).read_text())
    variants = LIB_AB_2026_12_06[name]
    tall = json.loads((RESULTS / "lib-ab-h100-2026-12-06-tall-tile.json").read_text())
    tall_ran = tall["results"]["ab/next/T"]  # the shapes 192x128 ran on
    assert sorted(data["results"]) == sorted(variants) and data["rounds"] in (2, 3)
    for label in next(iter(data["results"].values())):
        m, n, k = (int(x) for x in label.split()[1].split("x"))
        ran = {}  # config key -> median device-bound TFLOP/s of the variants that ran it
        for variant, constants in variants.items():
            with monkeypatch.context() as patch:
                for attr, value in constants.items():
                    patch.setattr(gemm, attr, value)
                key = ops.gemm_config(m, n, k, 132).key()
            median = float(np.median([r[0] for r in data["results"][variant][label]]))
            ran[key] = max(ran.get(key, 0.0), median)
        if name.endswith("mid-m-splits.json") and (m, n, k) == (768, 4096, 7168):
            # what the variants ran (NOTES-gemm's table), reconstructed from their constants
            assert sorted(ran) == ["128x128c2", "128x128c2s", "128x192c2"], ran
        pick = ops.gemm_config(m, n, k, 132).key()
        if pick.startswith("192x128") and pick not in ran:
            # a tile from after this A/B: the tall-tile A/B must have run the shape instead
            assert label in tall_ran, label
            continue
        assert pick in ran, (label, pick, ran)
        assert ran[pick] >= LIB_AB_WITHIN.get(name, 0.98) * max(ran.values()), (label, pick, ran)
