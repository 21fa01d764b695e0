"""quantize_fp8 / dequantize_fp8 on CPU: the reference against an independent numpy version."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_ds import ops
from jax_ds.testing import calc_diff

E4M3 = ml_dtypes.float8_e4m3fn
INV_448 = np.float32(1) / np.float32(448)


def quantize_np(x, block_m, ue8m0):
    """DeepGEMM's per_token_cast_to_fp8 / per_block_cast_to_fp8, in numpy float32 + ml_dtypes.

    `amax / 448.0` is written as torch runs it on CUDA: times float32(1/448); `1.0 / sf` is
    torch's reciprocal, an IEEE division (numpy float32 divides the same way).
    """
    x = np.asarray(x, np.float32)
    m, k = x.shape
    mb, kb = -(-m // block_m), -(-k // 128)
    xp = np.zeros((mb * block_m, kb * 128), np.float32)
    xp[:m, :k] = x
    finite = np.isfinite(xp)
    view = np.where(finite, np.abs(xp), 0).reshape(mb, block_m, kb, 128)
    amax = np.maximum(view.max(axis=(1, 3)), np.float32(1e-4))
    if ue8m0:  # 2 ** ceil(log2(.)), log2 in float64 is exact enough for the ceil
        sf = (2.0 ** np.ceil(np.log2(np.float64(amax * INV_448)))).astype(np.float32)
        inv = np.float32(1) / sf
    else:
        sf = amax * INV_448
        inv = np.float32(1) / sf
    inv_full = np.repeat(np.repeat(inv, block_m, axis=0), 128, axis=1)
    with np.errstate(invalid="ignore"):
        q = np.where(finite, xp * inv_full, np.nan)[:m, :k].astype(E4M3)
    return q, sf


def random(shape, dtype=jnp.bfloat16, seed=0, scale=1.0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale
    return x.astype(dtype)


def assert_same_fp8(q, q_ref):
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_ref).view(np.uint8))


SHAPES = [(1, 1), (7, 100), (128, 128), (130, 300), (257, 513)]


@pytest.mark.parametrize("block_m", [1, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("scale_format", ["f32", "ue8m0"])
def test_reference_matches_numpy(block_m, shape, dtype, scale_format):
    # Magnitudes spread over many binades so scales and subnormals are exercised.
    x = random(shape, dtype, seed=sum(shape)) * jnp.exp2(
        jax.random.randint(jax.random.key(1), shape, -12, 12).astype(dtype))
    q, s = ops.quantize_fp8(x, block=(block_m, 128), scale_format=scale_format)
    q_ref, s_ref = quantize_np(x, block_m, scale_format == "ue8m0")
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    assert s.shape == (-(-shape[0] // block_m), -(-shape[1] // 128))
    assert_same_fp8(q, q_ref)
    np.testing.assert_array_equal(np.asarray(s), s_ref)


def test_roundtrip_error():
    x = random((64, 1024), jnp.float32, seed=3)
    for block in [(1, 128), (128, 128)]:
        q, s = ops.quantize_fp8(x, block=block)
        assert calc_diff(ops.dequantize_fp8(q, s, block), x) < 1e-3


def test_zero_block_gets_minimum_scale():
    x = random((4, 256), seed=4).at[1, :128].set(0)
    q, s = ops.quantize_fp8(x)
    assert s[1, 0] == np.float32(1e-4) * INV_448
    assert not np.asarray(q[1, :128], np.float32).any()
    assert s[1, 1] > s[1, 0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_become_nan_and_keep_scale(bad):
    x = random((3, 200), jnp.float32, seed=5)
    x_bad = x.at[1, 7].set(bad).at[2, 150].set(bad)
    for block in [(1, 128), (128, 128)]:
        q, s = ops.quantize_fp8(x_bad, block=block)
        q0, s0 = ops.quantize_fp8(x.at[1, 7].set(0).at[2, 150].set(0), block=block)
        qf, q0f = np.asarray(q, np.float32), np.asarray(q0, np.float32)
        assert np.isnan(qf[1, 7]) and np.isnan(qf[2, 150])
        assert np.isnan(qf).sum() == 2
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
        mask = np.isfinite(qf)
        np.testing.assert_array_equal(qf[mask], q0f[mask])


def test_ue8m0_scales_are_powers_of_two_and_do_not_overflow():
    x = random((16, 1024), jnp.float32, seed=6, scale=37.0)
    q, s = ops.quantize_fp8(x, scale_format="ue8m0")
    mantissa, _ = np.frexp(np.asarray(s))
    assert (mantissa == 0.5).all()
    assert np.isfinite(np.asarray(q, np.float32)).all()
    amax = np.abs(np.asarray(x)).reshape(16, 8, 128).max(-1)
    assert (np.asarray(s) >= amax / 448).all() and (np.asarray(s) < amax / 224).all()


def test_ue8m0_exact_at_powers_of_two():
    # amax / 448 an exact power of two: the scale must be that power, not the next one.
    x = jnp.zeros((2, 128), jnp.float32).at[0, 0].set(448.0 * 2.0**-3).at[1, 5].set(448.0)
    _, s = ops.quantize_fp8(x, scale_format="ue8m0")
    np.testing.assert_array_equal(np.asarray(s)[:, 0], [2.0**-3, 1.0])


def test_batch_dims():
    x = random((2, 3, 5, 300), seed=7)
    q, s = ops.quantize_fp8(x)
    assert q.shape == x.shape and s.shape == (2, 3, 5, 3)
    q2, s2 = ops.quantize_fp8(x.reshape(30, 300))
    assert_same_fp8(q.reshape(30, 300), q2)
    np.testing.assert_array_equal(np.asarray(s).reshape(30, 3), np.asarray(s2))

    w = random((4, 130, 260), seed=8)
    q, s = ops.quantize_fp8(w, block=(128, 128))
    assert s.shape == (4, 2, 3)
    q1, s1 = ops.quantize_fp8(w[1], block=(128, 128))
    assert_same_fp8(q[1], q1)
    np.testing.assert_array_equal(np.asarray(s[1]), np.asarray(s1))


def test_1d_input():
    x = random((300,), seed=9)
    q, s = ops.quantize_fp8(x)
    assert q.shape == (300,) and s.shape == (3,)


def test_jit_and_vmap_match_eager():
    x = random((4, 16, 256), seed=10)
    q, s = ops.quantize_fp8(x[0], block=(128, 128))
    qj, sj = jax.jit(lambda v: ops.quantize_fp8(v, block=(128, 128)))(x[0])
    assert_same_fp8(qj, q)
    np.testing.assert_array_equal(np.asarray(sj), np.asarray(s))
    qv, sv = jax.vmap(lambda v: ops.quantize_fp8(v, block=(128, 128)))(x)
    assert sv.shape == (4, 1, 2)
    assert_same_fp8(qv[0], q)
    np.testing.assert_array_equal(np.asarray(sv[0]), np.asarray(s))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(block=(1, 64)), ValueError, "block"),
    (dict(block=(64, 128)), ValueError, "block"),
    (dict(scale_format="e8m0"), ValueError, "scale_format"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(block=128), ValueError, r"block must be one of .* got 128"),
    (dict(block=None), ValueError, r"block must be one of .* got None"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.quantize_fp8(random((4, 128)), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"x must have dtype .* got int32"):
        ops.quantize_fp8(jnp.ones((4, 128), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have at least 2 dims .* got shape \(128,\)"):
        ops.quantize_fp8(random((128,)), block=(128, 128))
    with pytest.raises(ValueError, match=r"x must have K"):
        ops.quantize_fp8(jnp.ones((4, 0), jnp.float32))
    q, s = ops.quantize_fp8(random((4, 256)))
    with pytest.raises(ValueError, match=r"scales has shape \(4, 2\), expected \(1, 2\)"):
        ops.dequantize_fp8(q, s, (128, 128))
    with pytest.raises(TypeError, match="x_fp8"):
        ops.dequantize_fp8(q.astype(jnp.float32), s)
    with pytest.raises(ValueError, match=r"x_fp8 must have at least 1 dims"):
        ops.dequantize_fp8(jnp.asarray(1.0, jnp.float8_e4m3fn), jnp.float32(1))
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype, got int8"):
        ops.dequantize_fp8(q, s, out_dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"x must be an array .* got list"):
        ops.quantize_fp8([[1.0] * 128])


def test_impl_ffi_without_kernel_raises(no_kernels):
    with pytest.raises(RuntimeError, match=r'quantize_fp8\(impl="ffi"\).*jax_ds_quantize_fp8'):
        ops.quantize_fp8(random((4, 128)), impl="ffi")


def test_impl_xla_and_env_switch(monkeypatch):
    x = random((4, 128), seed=11)
    q, s = ops.quantize_fp8(x, impl="xla")
    q_ref, s_ref = ops.quantize_fp8_reference(x)
    assert_same_fp8(q, q_ref)
    monkeypatch.setenv("JAX_DS_IMPL", "xla")
    q2, _ = ops.quantize_fp8(x, impl="ffi")  # the switch wins over impl="ffi"
    assert_same_fp8(q2, q_ref)
    monkeypatch.setenv("JAX_DS_IMPL", "triton")
    with pytest.raises(ValueError, match="JAX_DS_IMPL"):
        ops.quantize_fp8(x)


def test_multiplier_is_the_reciprocal_of_the_scale():
    """DeepGEMM's `x * (1.0 / sf)`: here 1/sf = 372.36362 and 448/amax = 372.36365, and
    0.01275634765625 * those straddles an e4m3 rounding midpoint (bytes 73 and 74)."""
    x = jnp.zeros((1, 128), jnp.bfloat16).at[0, 0].set(1.203125).at[0, 1].set(0.01275634765625)
    q, s = ops.quantize_fp8(x)
    assert np.asarray(s)[0, 0] == np.float32(1.203125) * INV_448
    assert np.asarray(q).view(np.uint8)[0, 1] == 73
