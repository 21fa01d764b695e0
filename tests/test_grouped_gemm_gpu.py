"""Grouped FP8 GEMM kernels (contiguous and masked, impl="ffi") against a float32 numpy oracle.

Fresh random operands per case; group sizes include zeros, one huge group, sizes that are no
multiple of any tile, negative sizes and sums past M (traced, so they reach the kernel, which
clamps them as the contract says; concrete ones raise first); masked_m includes 0, Mmax and
out-of-range values. Outputs land in buffers that held NaNs, so a row the
kernel forgets shows. Checked per group: calc_diff against the oracle, and exact zeros wherever
the contract says zero. Skipped without the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
grouped = pytest.importorskip("jax_ds.ops.grouped_gemm")

import jax.numpy as jnp  # noqa: E402

from jax_ds import _ffi, testing  # noqa: E402
from jax_ds.ops import grouped_fp8_linear, quantize_fp8  # noqa: E402
from jax_ds.ops.gemm import CLUSTERS, TILES, GemmConfig  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    for target in (grouped.GROUPED_TARGET, grouped.MASKED_TARGET):
        why = _ffi.unavailable_reason(target)
        if why:
            pytest.skip(f"grouped FP8 GEMM kernels unavailable: {why}")


def _quantized(key, a_shape, g, n, k):
    ka, kb = jax.random.split(key)
    a8, sa = quantize_fp8(jax.random.normal(ka, (*a_shape, k)), block=(1, 128), impl="xla")
    b8, sb = quantize_fp8(jax.random.normal(kb, (g, n, k)), block=(128, 128), impl="xla")
    return a8, sa, b8, sb


def _dequant(a8, sa, b8, sb):
    """numpy float32 dequantized operands."""
    n, k = b8.shape[1:]
    a32 = np.asarray(a8).astype(np.float32) * np.repeat(np.asarray(sa), 128, axis=-1)[..., :k]
    sbn = np.repeat(np.repeat(np.asarray(sb), 128, axis=-2)[:, :n], 128, axis=-1)[..., :k]
    return a32, np.asarray(b8).astype(np.float32) * sbn


def _poison(shape, dtype):
    """Frees NaN buffers of the output's size: XLA's allocator hands them to the next call."""
    dirty = [jnp.full(shape, jnp.nan, dtype) for _ in range(2)]
    jax.block_until_ready(dirty)
    del dirty


def _check_rows(out, ref, what):
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), f"{what}: non-finite outputs"
    if ref.size == 0:
        return
    diff = testing.calc_diff(out, ref)
    assert diff < testing.tolerance(jnp.bfloat16, 128), f"{what}: calc_diff {diff:.2e}"


def _ffi_call(target, ops, sizes, out_shape, out_dtype, cfg):
    return grouped.ffi_grouped_fp8_gemm(target, *ops, sizes, out_shape, out_dtype, cfg)


def _check_contiguous(out, ops, sizes):
    a32, b32 = _dequant(*ops)
    m = a32.shape[0]
    ends = np.minimum(np.cumsum(np.maximum(np.asarray(sizes, np.int64), 0)), m)
    start = 0
    for g, end in enumerate(ends):
        _check_rows(out[start:end], a32[start:end] @ b32[g].T, f"group {g} rows {start}:{end}")
        start = end
    tail = np.asarray(out[start:], np.float32)
    assert (tail == 0).all(), f"rows {start}: past the groups must be zero"


def _check_masked(out, ops, masked_m):
    a32, b32 = _dequant(*ops)
    mmax = a32.shape[1]
    for g, valid in enumerate(np.clip(np.asarray(masked_m), 0, mmax)):
        _check_rows(out[g, :valid], a32[g, :valid] @ b32[g].T, f"group {g} ({valid} rows)")
        assert (np.asarray(out[g, valid:], np.float32) == 0).all(), f"group {g}: masked rows"


CONTIGUOUS = [  # (m, n, k, group sizes)
    (1000, 129, 256, [0, 300, 1, 599]),                       # 100 rows past the groups
    (2048, 2112, 1024, [0, 1500, 3, 0, 200, 77, 0, 268]),     # one huge group, zeros
    (4096, 512, 512, list(np.full(32, 128))),                 # aligned, sum == M
    (1000, 256, 256, [-5, 700, 600]),                         # negative, sum past M
    (64, 7168, 128, [0]),                                     # nothing but zeros
    (3000, 64, 128, list(np.random.default_rng(0).integers(0, 20, 300))),  # many groups
    (500, 256, 200, [100, 0, 350]),                           # K not a multiple of 128: padded
]


@pytest.mark.parametrize("m,n,k,sizes", CONTIGUOUS)
def test_grouped_matches_oracle(m, n, k, sizes):
    ops = _quantized(jax.random.key(m + n), (m,), len(sizes), n, k)
    sizes = jnp.asarray(sizes, jnp.int32)
    for out_dtype in (jnp.bfloat16, jnp.float32):
        _poison((m, n), out_dtype)
        out = jax.jit(lambda *o: grouped.grouped_fp8_gemm(*o, out_dtype=out_dtype, impl="ffi"))(
            *ops, sizes)
        assert out.shape == (m, n) and out.dtype == out_dtype
        _check_contiguous(out, ops, sizes)


MASKED = [  # (g, mmax, n, k, masked_m)
    (4, 64, 2112, 512, [0, 64, 17, 33]),
    (32, 200, 129, 256, list(np.random.default_rng(1).integers(-3, 260, 32))),
    (2, 512, 4096, 1024, [512, 300]),
    (3, 70, 300, 64, [70, 5, 0]),                             # K 64: padded to 128
]


@pytest.mark.parametrize("g,mmax,n,k,masked_m", MASKED)
def test_masked_matches_oracle(g, mmax, n, k, masked_m):
    ops = _quantized(jax.random.key(g * mmax), (g, mmax), g, n, k)
    masked_m = jnp.asarray(masked_m, jnp.int32)
    for out_dtype in (jnp.bfloat16, jnp.float32):
        _poison((g, mmax, n), out_dtype)
        # traced masked_m: out-of-range values reach the kernel (concrete ones raise first)
        out = jax.jit(lambda *o: grouped.masked_grouped_fp8_gemm(*o, out_dtype=out_dtype,
                                                                 impl="ffi"))(*ops, masked_m)
        assert out.shape == (g, mmax, n) and out.dtype == out_dtype
        _check_masked(out, ops, masked_m)


@pytest.mark.parametrize("cluster_n", CLUSTERS)
@pytest.mark.parametrize("block_m,block_n", TILES)
def test_every_tile(block_m, block_n, cluster_n):
    sizes = jnp.asarray([100, 0, 250, 1, 300], jnp.int32)  # 49 rows past the groups
    ops = _quantized(jax.random.key(7), (700,), 5, 300, 384)
    masked_m = jnp.asarray([0, 90, 37], jnp.int32)
    mops = _quantized(jax.random.key(8), (3, 90), 3, 300, 384)
    for num_sms in (3, _ffi.num_sms()):
        cfg = GemmConfig(block_m, block_n, num_sms, cluster_n)
        _poison((700, 300), jnp.bfloat16)
        out = _ffi_call(grouped.GROUPED_TARGET, ops, sizes, (700, 300), jnp.bfloat16, cfg)
        _check_contiguous(out, ops, sizes)
        out = _ffi_call(grouped.MASKED_TARGET, mops, masked_m, (3, 90, 300), jnp.bfloat16, cfg)
        _check_masked(out, mops, masked_m)


@pytest.mark.parametrize("cluster_n", CLUSTERS)
@pytest.mark.parametrize("block_n", [128, 192])
def test_masked_shared_space_is_the_same_kernel(block_n, cluster_n):
    """The masked 128x128 / 128x192 instances with shared-typed pointers (shared_space=1) give
    the generic ones' bits, poisoned outputs and odd sizes included."""
    masked_m = jnp.asarray([0, 200, 37, 256], jnp.int32)
    ops = _quantized(jax.random.key(block_n + cluster_n), (4, 256), 4, 500, 640)
    outs = {}
    for shared in (0, 1):
        cfg = GemmConfig(128, block_n, _ffi.num_sms(), cluster_n)
        _poison((4, 256, 500), jnp.bfloat16)
        outs[shared] = np.asarray(grouped.ffi_grouped_fp8_gemm(
            grouped.MASKED_TARGET, *ops, masked_m, (4, 256, 500), jnp.bfloat16, cfg,
            shared_space=shared)).view(np.uint16)
    np.testing.assert_array_equal(outs[1], outs[0])
    _check_masked(outs[1].view(jnp.bfloat16), ops, masked_m)


def test_grouped_linear_grads_match_reference():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (600, 256), jnp.float32)
    w = jax.random.normal(kw, (4, 384, 256), jnp.float32) * 0.05
    sizes = jnp.asarray([200, 0, 150, 230], jnp.int32)

    def loss(x, w, impl):
        return jnp.sum(jnp.sin(grouped_fp8_linear(x, w, sizes, impl=impl)))

    grads = {impl: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, impl)
             for impl in ("ffi", "xla")}
    for got, want, name in zip(grads["ffi"], grads["xla"], ("dx", "dw")):
        diff = testing.calc_diff(got, want)
        assert diff < 1e-3, f"{name}: calc_diff {diff:.2e}"


@pytest.mark.parametrize("windows", [True, False])
def test_grouped_wgrad_bf16_matches_float64(windows):
    """The wgrad of grouped_fp8_linear on the GPU (bf16 operands to the matrix unit, float32
    accumulation): both ways against float64 per group, one huge group and an empty one."""
    sizes = np.array([3000, 0, 17, 1200, 800], np.int32)  # 5017 of 5120 rows: rows past the sum
    m, n, k = 5120, 192, 320
    kd, kx = jax.random.split(jax.random.key(11))
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    got = np.asarray(jax.jit(lambda *a: grouped.grouped_wgrad(*a, windows=windows))(
        dy, x, jnp.asarray(sizes)), np.float64)
    dy64, x64 = np.asarray(dy, np.float64), np.asarray(x, np.float64)
    ends = np.cumsum(sizes)
    for g, (lo, hi) in enumerate(zip(ends - sizes, ends)):
        want = dy64[lo:hi].T @ x64[lo:hi]
        if hi == lo:
            assert np.all(got[g] == 0)
        else:  # float32 sums of exact products: only their rounding differs
            assert testing.calc_diff(got[g], want) < 1e-10, g


@pytest.mark.parametrize("windows", [True, False])
def test_grouped_matmul_bf16_matches_float64(windows):
    """The bf16 experts' forward on the GPU (`grouped_matmul`, and its dgrad form with w
    transposed), both ways, against float64 per group; rows past the sum exactly zero."""
    sizes = np.array([3000, 0, 17, 1200, 800], np.int32)
    m, n, k = 5120, 192, 320
    kx, kw = jax.random.split(jax.random.key(12))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (len(sizes), n, k), jnp.bfloat16)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ends = np.cumsum(sizes)
    for transpose_w in (False, True):
        wt = jnp.swapaxes(w, 1, 2) if transpose_w else w
        got = np.asarray(jax.jit(lambda *a: grouped.grouped_matmul(
            *a, transpose_w=transpose_w, windows=windows))(x, wt, jnp.asarray(sizes)), np.float64)
        for g, (lo, hi) in enumerate(zip(ends - sizes, ends)):
            if hi > lo:
                assert testing.calc_diff(got[lo:hi], x64[lo:hi] @ w64[g].T) < 1e-10, g
        assert np.all(got[ends[-1]:] == 0)


def test_bad_attributes_are_errors_not_launches():
    ops = _quantized(jax.random.key(9), (256,), 2, 128, 256)
    sizes = jnp.asarray([100, 100], jnp.int32)
    for cfg in (GemmConfig(96, 64, 8, 1), GemmConfig(64, 64, 0, 1), GemmConfig(64, 64, 8, 3)):
        with pytest.raises(Exception, match="grouped_fp8_gemm"):
            jax.block_until_ready(
                _ffi_call(grouped.GROUPED_TARGET, ops, sizes, (256, 128), jnp.bfloat16, cfg))
    _check_contiguous(grouped.grouped_fp8_gemm(*ops, sizes, impl="ffi"), ops, sizes)


# ------------------------------------------------------------------ bf16 grouped kernel

BF16_TILES = [(64, 64, 1), (64, 128, 1), (128, 128, 1), (128, 128, 2), (128, 192, 1),
              (128, 192, 2)]


def _bf16_kernel():
    why = _ffi.unavailable_reason(grouped.BF16_TARGET)
    if why:
        pytest.skip(f"bf16 grouped kernel unavailable: {why}")


def _check_bf16(out, x, w, sizes, what, out_dtype=jnp.bfloat16):
    """Per group against float64 (the products of bf16 are exact, the sums float32: calc_diff
    well under bf16's output rounding); rows past the groups exactly zero."""
    got = np.asarray(out, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite outputs"
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ends = np.minimum(np.cumsum(np.maximum(np.asarray(sizes, np.int64), 0)), x.shape[0])
    limit = 1e-10 if out_dtype == jnp.float32 else testing.tolerance(jnp.bfloat16, 1)
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            diff = testing.calc_diff(got[start:end], x64[start:end] @ w64[g].T)
            assert diff < limit, f"{what}: group {g} rows {start}:{end}: calc_diff {diff:.2e}"
        start = end
    assert np.all(got[start:] == 0), f"{what}: rows {start}: past the groups must be zero"


@pytest.mark.parametrize("block_m,block_n,cluster_n", BF16_TILES)
def test_bf16_every_tile(block_m, block_n, cluster_n):
    """Each compiled bf16 tile, on 3 SMs and on all: group sizes with zeros, one row, rows past
    the groups; K not a multiple of the 64-wide k block (the TMA reads zeros past it; with b
    [G, K, N] a 3-D map stops the block at the group's last row); N not a multiple of the tile
    (bf16 rows of 300 take register stores; f32 rows and rows of 296 or 512 TMA stores); both
    output dtypes; b NT and (N a multiple of 8) MN-major."""
    _bf16_kernel()
    sizes = jnp.asarray([100, 0, 250, 1, 300], jnp.int32)  # 49 rows past the groups
    kx, kw = jax.random.split(jax.random.key(21))
    for n, k in ((300, 200), (296, 200), (512, 384)):
        x = jax.random.normal(kx, (700, k), jnp.bfloat16)
        w = jax.random.normal(kw, (5, n, k), jnp.bfloat16)
        for num_sms in (3, _ffi.num_sms()):
            for out_dtype in (jnp.bfloat16, jnp.float32):
                for trans in (False, True):  # b [G, N, K], or [G, K, N] read MN-major
                    if trans and n % 8:
                        continue
                    cfg = GemmConfig(block_m, block_n, num_sms, cluster_n)
                    _poison((700, n), out_dtype)
                    b = jnp.swapaxes(w, 1, 2) if trans else w
                    # group 1 is empty: Inf there shows a k block of group 0 reading past its
                    # last row (a 2-D map over [G * K, N] would, 0 x Inf = NaN)
                    b = b.at[1].set(jnp.inf)
                    out = jax.jit(lambda *a: grouped.ffi_grouped_bf16_gemm(
                        *a, out_dtype, cfg, transpose_b=trans))(x, b, sizes)
                    _check_bf16(out, x, w, sizes, f"{block_m}x{block_n}c{cluster_n} n{n} k{k} "
                                f"{num_sms} SMs transpose_b {trans}", out_dtype)


@pytest.mark.parametrize("m,n,k,sizes", [
    (8192, 4096, 7168, [2048, 0, 4000, 2144]),                           # DeepSeek-V3 widths
    (4096, 7168, 2048, list(np.full(16, 256))),                           # aligned, sum == M
    (3000, 64, 128, list(np.random.default_rng(3).integers(0, 20, 300))),  # many groups
    (1000, 256, 256, [-5, 700, 600]),                                     # traced: clamped
])
def test_bf16_grouped_linear_uses_the_kernel(m, n, k, sizes):
    """grouped_linear(impl="ffi") forward and dgrad (w read MN-major) through the kernel,
    against float64; the windows path agrees with it."""
    _bf16_kernel()
    kx, kw, kd = jax.random.split(jax.random.key(m + n + k), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (len(sizes), n, k), jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    clamped = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
    clamped = np.diff(np.concatenate([[0], clamped]))
    _poison((m, n), jnp.bfloat16)
    y = jax.jit(lambda x, w, g: grouped.grouped_linear(x, w, g, impl="ffi"))(x, w, gs)
    _check_bf16(y, x, w, clamped, "forward")
    y_xla = jax.jit(lambda x, w, g: grouped.grouped_linear(x, w, g, impl="xla"))(x, w, gs)
    assert testing.calc_diff(np.asarray(y, np.float64), np.asarray(y_xla, np.float64)) < 1e-5
    vjp = jax.jit(lambda x, w, g, dy: jax.vjp(
        lambda x, w: grouped.grouped_linear(x, w, g, impl="ffi"), x, w)[1](dy))
    _poison((m, k), jnp.bfloat16)
    dx, dw = vjp(x, w, gs, dy)
    _check_bf16(dx, dy, jnp.swapaxes(w, 1, 2), clamped, "dgrad")
    dx_xla, dw_xla = jax.jit(lambda x, w, g, dy: jax.vjp(
        lambda x, w: grouped.grouped_linear(x, w, g, impl="xla"), x, w)[1](dy))(x, w, gs, dy)
    # the same wgrad (the windows' batched dot in both programs; compiled apart, so not
    # necessarily to the bit)
    assert testing.calc_diff(np.asarray(dw, np.float64), np.asarray(dw_xla, np.float64)) < 1e-6


def test_bf16_bad_attributes_are_errors_not_launches():
    _bf16_kernel()
    x = jnp.ones((256, 128), jnp.bfloat16)
    w = jnp.ones((2, 128, 128), jnp.bfloat16)
    sizes = jnp.asarray([100, 100], jnp.int32)
    for cfg in (GemmConfig(128, 64, 8, 1), GemmConfig(64, 64, 0, 1), GemmConfig(64, 64, 8, 2)):
        with pytest.raises(Exception, match="grouped_bf16_gemm"):
            jax.block_until_ready(grouped.ffi_grouped_bf16_gemm(x, w, sizes, jnp.bfloat16, cfg))
    with pytest.raises(Exception, match="grouped_bf16_gemm"):  # [G, K, N] with N 100
        jax.block_until_ready(grouped.ffi_grouped_bf16_gemm(
            x, jnp.ones((2, 128, 100), jnp.bfloat16), sizes, jnp.bfloat16, transpose_b=True))
    with pytest.raises(Exception, match="grouped_bf16_gemm"):  # K not a multiple of 8
        jax.block_until_ready(grouped.ffi_grouped_bf16_gemm(
            jnp.ones((256, 100), jnp.bfloat16), jnp.ones((2, 128, 100), jnp.bfloat16), sizes,
            jnp.bfloat16))
