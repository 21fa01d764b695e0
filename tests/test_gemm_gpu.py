"""FP8 GEMM kernel (impl="ffi") against its float32 reference, on a CUDA GPU.

Every case draws fresh random operands whose 1x128 / 128x128 blocks span magnitudes 1e-3..1e3
(unit magnitudes where a dropped or doubled block must show), quantizes them with the reference,
and requires of the kernel: no NaN/Inf, calc_diff within `testing.tolerance(out_dtype, k)`, and
every element within |out - ref| <= 1e-2 |ref| + 1e-2 e, where e = sqrt(sum_k (a_mk b_nk)^2) is the
natural size of a rounding error in that dot product. Skipped without the kernel.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
gemm = pytest.importorskip("jax_ds.ops.gemm")

import jax.numpy as jnp  # noqa: E402

from jax_ds import _ffi, arg_specs, testing  # noqa: E402
from jax_ds.ops import dequantize_fp8, fp8_gemm, fp8_gemm_reference, quantize_fp8  # noqa: E402

pytestmark = pytest.mark.gpu

OUT_DTYPES = (jnp.bfloat16, jnp.float32)
HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture(autouse=True, scope="module")
def _kernel():
    why = _ffi.unavailable_reason(gemm.TARGET)
    if why:
        pytest.skip(f"FP8 GEMM kernel unavailable: {why}")


def _operands(key, m, n, k, spread):
    """Quantized a [m,k] (1x128) and b [n,k] (128x128), block magnitudes 10^U(-spread, spread)."""
    ka, kb, ksa, ksb = jax.random.split(key, 4)
    mag_a = 10.0 ** jax.random.uniform(ksa, (m, -(-k // 128)), minval=-spread, maxval=spread)
    mag_b = 10.0 ** jax.random.uniform(ksb, (-(-n // 128), -(-k // 128)), minval=-spread,
                                       maxval=spread)
    a = jax.random.normal(ka, (m, k)) * jnp.repeat(mag_a, 128, 1)[:, :k]
    b = jax.random.normal(kb, (n, k)) * jnp.repeat(jnp.repeat(mag_b, 128, 0)[:n], 128, 1)[:, :k]
    a8, sa = quantize_fp8(a, block=(1, 128), impl="xla")
    b8, sb = quantize_fp8(b, block=(128, 128), impl="xla")
    return a8, sa, b8, sb


def _reference(a8, sa, b8, sb):
    """float32 reference and the per-element error scale sqrt(sum_k (a_mk b_nk)^2)."""
    ref = fp8_gemm_reference(a8, sa, b8, sb, out_dtype=jnp.float32)
    a2 = jnp.square(dequantize_fp8(a8, sa, (1, 128)))
    b2 = jnp.square(dequantize_fp8(b8, sb, (128, 128)))
    return ref, jnp.sqrt(jnp.einsum("MK,NK->MN", a2, b2, precision=HIGHEST))


# Two programs on purpose: inside one, XLA on GPU may fold the f32 -> e4m3 -> f32 round trip away
# (excess precision), and the "reference" would then skip the FP8 rounding (seen: 3% off on H100).
# Autotuning the reference's big float32 dots took ~8 s per shape; test_reference_is_exact checks
# that the untuned dots are still exact enough.
_operands_jit = jax.jit(_operands, static_argnums=(1, 2, 3, 4))
_reference_jit = jax.jit(_reference, compiler_options={"xla_gpu_autotune_level": 0})


def _make_case(key, m, n, k, spread):
    ops = _operands_jit(key, m, n, k, spread)
    return ops, *_reference_jit(*ops)


@functools.lru_cache(maxsize=1)
def _case(m, n, k, spread=3.0, seed=0):
    """(operands, reference, error scale), all on the device."""
    return _make_case(jax.random.key(seed), m, n, k, spread)


@jax.jit
def _mismatches(out, ref, err_scale):
    """Elements outside |out - ref| <= 1e-2 |ref| + 1e-2 err_scale (NaN included): count, first."""
    bad = ~(jnp.abs(out.astype(jnp.float32) - ref) <= 1e-2 * jnp.abs(ref) + 1e-2 * err_scale)
    return jnp.sum(bad), jnp.argmax(bad), jnp.sum(~jnp.isfinite(out))


def _check(out, ref, err_scale, k, what):
    """Asserts the kernel's `out` matches the float32 `ref` (see the module docstring)."""
    kind = "float32" if out.dtype == jnp.float32 else "bfloat16"
    what = f"{what} -> {kind}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape}, expected {ref.shape}"
    count, first, nonfinite = (int(v) for v in _mismatches(out, ref, err_scale))
    assert nonfinite == 0, f"{what}: {nonfinite} non-finite outputs"
    if count:
        i = np.unravel_index(first, out.shape)
        pytest.fail(f"{what}: {count} of {out.size} elements off; first at {i}: got "
                    f"{float(out[i])}, reference {float(ref[i])} "
                    f"(error scale {float(err_scale[i]):.3e})")
    diff = testing.calc_diff(np.asarray(out, np.float32), np.asarray(ref))
    limit = testing.tolerance(kind, k)
    assert diff < limit, f"{what}: calc_diff {diff:.3e} >= {limit:.1e}"


def test_reference_is_exact():
    """The oracle itself, against float64 on the host from the same FP8 operands."""
    (a8, sa, b8, sb), ref, _ = _case(300, 2112, 7168)
    a64 = np.asarray(dequantize_fp8(a8, sa, (1, 128)), np.float64)
    b64 = np.asarray(dequantize_fp8(b8, sb, (128, 128)), np.float64)
    diff = testing.calc_diff(np.asarray(ref), a64 @ b64.T)
    assert diff < 1e-9, f"float32 reference vs float64: calc_diff {diff:.2e}"


# Full M x N at the smallest and the largest K; the two middle K on a corner subset.
SHAPES = [(m, n, k) for k in (128, 7168)
          for m in arg_specs.GEMM_TEST_M for n in arg_specs.GEMM_TEST_N]
SHAPES += [(m, n, k) for k in arg_specs.GEMM_TEST_K[1:-1] for m in (7, 4096) for n in (129, 2112)]


@jax.jit
def _fp8_gemm_both(a8, sa, b8, sb):  # one compile per shape for both output dtypes
    return [fp8_gemm(a8, sa, b8, sb, out_dtype=d, impl="ffi") for d in OUT_DTYPES]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp8_gemm_matches_reference(m, n, k):
    ops, ref, err_scale = _case(m, n, k)
    for out_dtype, out in zip(OUT_DTYPES, _fp8_gemm_both(*ops)):
        assert out.dtype == out_dtype
        _check(out, ref, err_scale, k, f"fp8_gemm {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k", [(7, 129, 1), (130, 300, 200), (64, 2112, 7000)])
def test_fp8_gemm_pads_an_unaligned_k(m, n, k):
    """K not a multiple of 128 (scales ceil(K/128) wide): fp8_gemm zero-pads a and b to the
    kernel's whole 128-blocks, exact against the reference on the unpadded operands."""
    ops, ref, err_scale = _case(m, n, k)
    for out_dtype, out in zip(OUT_DTYPES, _fp8_gemm_both(*ops)):
        _check(out, ref, err_scale, k, f"fp8_gemm {m}x{n}x{k} (K padded)")


def _ffi_gemm(ops, out_dtype, block_m, block_n, num_sms, cluster_n=1, overlap=False):
    """The kernel with an explicit tile and cluster size, bypassing gemm_config."""
    cfg = gemm.GemmConfig(block_m, block_n, num_sms, cluster_n, overlap=overlap)
    return gemm.ffi_fp8_gemm(*ops, cfg, out_dtype)


def _overlaps(block_m, block_n):
    """The epilogue overlap settings a tile runs with (only the one-set tiles have the choice)."""
    return (False, True) if (block_m, block_n) in gemm.OVERLAP_TILES else (False,)


TILES = list(gemm.DENSE_TILES)  # every tile compiled into the dense GEMM


@pytest.mark.parametrize("cluster_n", gemm.CLUSTERS)
@pytest.mark.parametrize("block_m,block_n", TILES)
@pytest.mark.parametrize("m,n,k", [(7, 129, 256), (200, 300, 384), (4095, 2112, 1024),
                                   (130, 48, 640)])
def test_every_tile(m, n, k, block_m, block_n, cluster_n):
    # Unit magnitudes: a tile or k-block dropped or counted twice moves calc_diff by >= 1e-3.
    # Odd column-block counts leave the second tile of a cluster past N; 3 and 5 SMs leave a
    # CTA without a cluster partner (the grid is rounded down to whole clusters).
    ops, ref, err_scale = _case(m, n, k, spread=0.0, seed=1)
    tiles = -(-m // block_m) * -(-n // block_n)
    for out_dtype in OUT_DTYPES:
        for num_sms in sorted({min(tiles, _ffi.num_sms()), 3, 5, _ffi.num_sms()}):
            for overlap in _overlaps(block_m, block_n):
                out = _ffi_gemm(ops, out_dtype, block_m, block_n, num_sms, cluster_n, overlap)
                _check(out, ref, err_scale, k, f"tile {block_m}x{block_n} cluster {cluster_n}, "
                       f"{num_sms} SMs, overlap {overlap}, {m}x{n}x{k}")


@pytest.mark.parametrize("block_m,block_n,cluster_n",
                         [(128, 128, 1), (128, 128, 2), (64, 64, 1), (128, 16, 2), (64, 128, 2),
                          (128, 192, 1), (128, 192, 2), (192, 128, 1), (192, 128, 2)])
@pytest.mark.parametrize("m,n,k", [(4095, 2112, 1024), (200, 300, 384), (1000, 129, 7168),
                                   (130, 48, 640)])
def test_split_k_tail(m, n, k, block_m, block_n, cluster_n):
    """The last `split_units` units computed as K slices on several SMs, partial sums added in the
    workspace: every unit split or a few, 2 slices up to one per k block, several grid sizes (a
    CTA may run several slices of one tile), both output dtypes, and the same bits twice."""
    ops, ref, err_scale = _case(m, n, k, spread=0.0, seed=2)
    k_blocks = k // 128
    units = gemm.work_units(m, n, block_m, block_n, cluster_n)
    plans = {(units, k_blocks), (units, 2), (min(units, 3), max(2, k_blocks // 3)), (1, k_blocks)}
    for i, (split_units, splits) in enumerate(sorted(plans)):
        out_dtype = OUT_DTYPES[i % 2]
        for num_sms in sorted({_ffi.num_sms(), 4}):
            for overlap in _overlaps(block_m, block_n):
                cfg = gemm.GemmConfig(block_m, block_n, num_sms, cluster_n, split_units, splits,
                                      overlap)
                run = jax.jit(functools.partial(gemm.ffi_fp8_gemm, cfg=cfg, out_dtype=out_dtype))
                out = run(*ops)
                _check(out, ref, err_scale, k, f"{cfg}, {m}x{n}x{k}")
                np.testing.assert_array_equal(np.asarray(run(*ops)), np.asarray(out),
                                              err_msg=f"not deterministic: {cfg}")


def test_split_k_chosen_for_a_short_last_wave():
    """gemm_config splits the last wave of 1024x7168x16384 (224 pairs of 128x128 tiles on 66
    clusters: 26 units left, in 2 slices of 64 k blocks); the kernel with that plan matches the
    reference."""
    m, n, k = 1024, 7168, 16384
    cfg = gemm.gemm_config(m, n, k, _ffi.num_sms())
    if _ffi.num_sms() == 132:
        assert cfg.key() == "128x128c2s" and (cfg.split_units, cfg.splits) == (26, 2), cfg
    ops, ref, err_scale = _case(m, n, k)
    _check(fp8_gemm(*ops, impl="ffi"), ref, err_scale, k, f"gemm_config {cfg}")


def test_bad_split_plans_are_errors_not_launches():
    ops, ref, err_scale = _case(256, 256, 512, spread=0.0)
    units = 4  # 128x128 tiles, cluster 1
    for split_units, splits in ((units + 1, 2), (1, 5), (-1, 2), (1, 0)):
        cfg = gemm.GemmConfig(128, 128, 8, 1, split_units, splits)
        with pytest.raises(Exception, match="fp8_gemm"):
            jax.block_until_ready(gemm.ffi_fp8_gemm(*ops, cfg))
    _check(fp8_gemm(*ops, impl="ffi"), ref, err_scale, 512, "after errors")


def test_bad_attributes_are_errors_not_launches():
    ops, ref, err_scale = _case(64, 128, 256, spread=0.0)
    for block_m, block_n, num_sms, cluster_n in ((96, 64, 8, 1), (64, 48, 8, 1), (64, 64, 0, 1),
                                                 (64, 64, 8, 3), (64, 64, 8, 0)):
        with pytest.raises(Exception, match="fp8_gemm"):
            jax.block_until_ready(_ffi_gemm(ops, jnp.bfloat16, block_m, block_n, num_sms,
                                            cluster_n))
    with pytest.raises(Exception, match="overlap"):
        jax.block_until_ready(_ffi_gemm(ops, jnp.bfloat16, 128, 192, 8, 1, overlap=2))
    # ... and the device is still healthy afterwards.
    _check(fp8_gemm(*ops, impl="ffi"), ref, err_scale, 256, "after errors")


@pytest.mark.parametrize("m,n,k", [(4095, 129, 384), (1000, 2112, 7168), (1, 7168, 128)])
def test_no_stale_memory(m, n, k):
    """Output buffers XLA hands the kernel held NaNs before: every element must be written."""
    ops, ref, err_scale = _case(m, n, k)
    for out_dtype in OUT_DTYPES:
        # Free NaN buffers of the output's size (and larger): the allocator reuses them.
        dirty = [jnp.full(shape, jnp.nan, out_dtype) for shape in ((m, n), (m, n), (4096, 8192))]
        jax.block_until_ready(dirty)
        del dirty
        out = jax.jit(functools.partial(fp8_gemm, out_dtype=out_dtype, impl="ffi"))(*ops)
        _check(out, ref, err_scale, k, f"after NaN fill {m}x{n}x{k}")


def test_jit_vmap():
    m, n, k, batch = 100, 300, 512, 3
    cases = [_make_case(jax.random.key(10 + i), m, n, k, 3.0) for i in range(batch)]
    a8, sa, b8, sb = (jnp.stack(x) for x in zip(*(ops for ops, _, _ in cases)))
    shared_b = jax.jit(jax.vmap(lambda a, s: fp8_gemm(a, s, b8[0], sb[0], impl="ffi")))(a8, sa)
    all_batched = jax.jit(jax.vmap(functools.partial(fp8_gemm, impl="ffi")))(a8, sa, b8, sb)
    for i, (_, ref, err_scale) in enumerate(cases):
        _check(all_batched[i], ref, err_scale, k, f"vmap[{i}]")
        ref, err_scale = _reference_jit(a8[i], sa[i], b8[0], sb[0])
        _check(shared_b[i], ref, err_scale, k, f"vmap, shared b, [{i}]")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_linear_grad_matches_xla(dtype):
    """Forward, dgrad (FP8 kernel) and wgrad agree with impl="xla" on the same quantized values."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 65, 300), dtype)
    w = (jax.random.normal(kw, (520, 300)) * 0.05).astype(dtype)
    g = jax.random.normal(kg, (2, 65, 520), dtype)

    def loss(x, w, impl):
        return jnp.vdot(gemm.fp8_linear(x, w, impl=impl).astype(jnp.float32), g.astype(jnp.float32))

    def run(impl):
        y = jax.jit(functools.partial(gemm.fp8_linear, impl=impl))(x, w)
        return (y, *jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, impl))

    for name, got, want in zip(("y", "dx", "dw"), run("ffi"), run("xla")):
        assert got.dtype == want.dtype == dtype, name
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all(), name
        diff = testing.calc_diff(got, want)
        assert diff < testing.tolerance(dtype, 520), f"fp8_linear {name}: calc_diff {diff:.3e}"


def test_many_gemms_in_one_program():
    """Enough kernels in one jitted program for XLA to capture them into a CUDA graph (the
    handlers are command-buffer compatible); run twice on new buffers, so the graph is updated."""
    cases = [_case(m, n, 512, seed=s) for s, (m, n) in enumerate(
        [(256, 384), (129, 2112), (4096, 256), (64, 96), (300, 130), (1, 4096), (512, 512),
         (1024, 640)])]
    run = jax.jit(lambda ops: [fp8_gemm(*o, impl="ffi") for o in ops])
    for attempt in range(2):
        outs = run([jax.tree.map(jnp.copy, c[0]) for c in cases])
        for (ops, ref, err_scale), out in zip(cases, outs):
            _check(out, ref, err_scale, 512, f"in one program, run {attempt}, {out.shape}")
