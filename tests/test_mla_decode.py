"""MLA decode over a paged cache: the reference against a float64 numpy oracle, and the contract.

Random paged layouts (shuffled block tables, lengths 0, 1, 63, 64, 65 and longer), Sq in 1..2 with
and without causal masking, Hq 16 and an odd small Hq; jit with traced block tables and lengths;
every validation error; the lse and empty-row conventions; clamping of traced values.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds import _ffi
from jax_ds.ops import mla_decode, mla_decode_reference, quantize_kv_fp8
from jax_ds.ops import mla as mla_mod
from jax_ds.testing import calc_diff, tolerance

D, DV, PAGE = 576, 512, 64
LENGTHS = (0, 1, 63, 64, 65, 200, 256)  # 256 = max_blocks * 64: a full table


def numpy_mla(q, kv, table, lens, scale, causal, dv=DV):
    """Straightforward float64 attention over each sequence's gathered rows."""
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    table, lens = np.asarray(table), np.asarray(lens)
    b, sq, hq, d = q.shape
    n, page = kv.shape[:2]
    out = np.zeros((b, sq, hq, dv))
    lse = np.full((b, hq, sq), np.inf)  # FlashMLA's lse of a query that sees no key
    for i in range(b):
        length = int(np.clip(lens[i], 0, table.shape[1] * page))
        rows = kv[np.clip(table[i], 0, n - 1)].reshape(-1, d)[:length]  # [S, d]
        for t in range(sq):
            seen = length - (sq - 1 - t) if causal else length
            if seen <= 0:
                continue
            s = scale * q[i, t] @ rows[:seen].T  # [Hq, S]
            m = s.max(-1, keepdims=True)
            p = np.exp(s - m)
            out[i, t] = (p / p.sum(-1, keepdims=True)) @ rows[:seen, :dv]
            lse[i, :, t] = m[:, 0] + np.log(p.sum(-1))
    return out, lse


def paged_inputs(seed, lens, hq, sq, dtype=jnp.bfloat16, max_blocks=4, d=D, page=PAGE):
    """q, kv_cache, a shuffled block table (spare entries out of range) and the lengths."""
    rng = np.random.default_rng(seed)
    b = len(lens)
    num_blocks = b * max_blocks + 3
    perm = rng.permutation(num_blocks)
    table = np.full((b, max_blocks), -7, np.int32)  # entries past a sequence's end are never read
    for i, length in enumerate(lens):
        used = -(-length // page)
        table[i, :used] = perm[i * max_blocks:i * max_blocks + used]
    q = jnp.asarray(rng.standard_normal((b, sq, hq, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((num_blocks, page, 1, d)), dtype)
    return q, kv, jnp.asarray(table), jnp.asarray(np.asarray(lens, np.int32))


def check_close(out, lse, ref_out, ref_lse, dtype):
    out, lse = np.asarray(out, np.float64), np.asarray(lse)
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse)), "inf positions of lse differ"
    np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=1e-5)
    assert calc_diff(out, ref_out) < tolerance(dtype)
    bound = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16 rounding of values around 1
    np.testing.assert_allclose(out, ref_out, atol=bound, rtol=bound)


@pytest.mark.parametrize("hq", [16, 3])
@pytest.mark.parametrize("sq", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy(hq, sq, causal):
    q, kv, table, lens = paged_inputs(hq * 10 + sq, LENGTHS, hq, sq)
    scale = 0.07
    out, lse = mla_decode(q, kv, table, lens, softmax_scale=scale, causal=causal)
    assert out.shape == (len(LENGTHS), sq, hq, DV) and out.dtype == jnp.bfloat16
    assert lse.shape == (len(LENGTHS), hq, sq) and lse.dtype == jnp.float32
    ref_out, ref_lse = numpy_mla(q.astype(jnp.float32), kv.astype(jnp.float32), table, lens,
                                 scale, causal)
    check_close(out, lse, ref_out, ref_lse, jnp.bfloat16)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_float32_any_chunking(chunk):
    """The online softmax gives the same answer whatever the number of blocks per step."""
    q, kv, table, lens = paged_inputs(5, LENGTHS, 5, 2, jnp.float32)
    out, lse = mla_mod._reference(q, kv, table, lens, np.float32(0.05), True, DV, chunk)
    ref_out, ref_lse = numpy_mla(q, kv, table, lens, 0.05, True)
    check_close(out, lse, ref_out, ref_lse, jnp.float32)


def test_reference_other_head_dims():
    """mla_decode_reference takes any d_qk / head_dim_v / block size (tiny model configs)."""
    q, kv, table, lens = paged_inputs(6, (0, 5, 17, 40), 4, 2, jnp.float32, max_blocks=3, d=80,
                                      page=16)
    out, lse = mla_decode_reference(q, kv, table, lens, softmax_scale=0.1, head_dim_v=64)
    ref_out, ref_lse = numpy_mla(q, kv, table, lens, 0.1, True, dv=64)
    check_close(out, lse, ref_out, ref_lse, jnp.float32)


def test_rows_past_the_length_may_hold_nan():
    q, kv, table, lens = paged_inputs(13, (1, 63, 100), 16, 2, jnp.float32)
    out, lse = mla_decode(q, kv, table, lens)
    rows = np.arange(4 * PAGE)[None, :] >= np.asarray(lens)[:, None]  # [B, max_blocks * 64]
    poison = np.zeros(kv.shape[:2], bool)
    table_np = np.asarray(table)
    for i in range(len(lens)):
        for j in range(-(-int(lens[i]) // PAGE)):
            poison[table_np[i, j]] = rows[i, j * PAGE:(j + 1) * PAGE]
    unused = np.setdiff1d(np.arange(kv.shape[0]), table_np[table_np >= 0])
    poison[unused] = True
    kv_nan = jnp.where(jnp.asarray(poison)[:, :, None, None], jnp.nan, kv)
    out2, lse2 = mla_decode(q, kv_nan, table, lens)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_nan_in_a_row_a_query_sees_propagates(impl):
    """A NaN in a cache row inside a length: NaN out and lse for the queries that see it (not
    out 0 / lse +inf, as for a query that sees no key); causal query 0 of 2 does not see the last
    row (the NaN is in its rope part, which is no value: in a value column it reaches every query
    through 0 * NaN, in FlashMLA too), and the other sequences are untouched."""
    q, kv, table, lens = paged_inputs(14, (70, 5, 0), 16, 2, jnp.float32)
    last = int(np.asarray(table)[0, 1])  # sequence 0's row 69: block 1, row 5
    kv_nan = kv.at[last, 5, 0, D - 1].set(jnp.nan)
    fn = mla_decode if impl == "xla" else mla_decode_reference
    kwargs = {"impl": "xla"} if impl == "xla" else {}
    out, lse = (np.asarray(a, np.float32) for a in fn(q, kv, table, lens, **kwargs))
    out2, lse2 = (np.asarray(a, np.float32) for a in fn(q, kv_nan, table, lens, **kwargs))
    assert np.isnan(out2[0, 1]).all() and np.isnan(lse2[0, :, 1]).all()
    np.testing.assert_array_equal(out2[0, 0], out[0, 0])
    np.testing.assert_array_equal(lse2[0, :, 0], lse[0, :, 0])
    np.testing.assert_array_equal(out2[1:], out[1:])
    np.testing.assert_array_equal(lse2[1:], lse[1:])
    assert (out2[2] == 0).all() and np.isposinf(lse2[2]).all()  # length 0: no key, no NaN


def test_jit_traced_table_and_lengths():
    q, kv, table, lens = paged_inputs(7, LENGTHS, 16, 2)
    eager = mla_decode(q, kv, table, lens)
    jitted = jax.jit(lambda t, s: mla_decode(q, kv, t, s))(table, lens)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_traced_values_are_clamped():
    """Lengths past the table clamp to max_blocks * 64, negative to 0; block ids into range."""
    q, kv, table, lens = paged_inputs(8, (64, 100, 256, 3), 16, 1, jnp.float32)
    n = kv.shape[0]
    table = table.at[1, 1].set(10**6).at[3, 0].set(-4)  # out of range, inside the length
    wild = jnp.array([64, 100, 10**6, -9], jnp.int32)
    out, lse = jax.jit(lambda s: mla_decode(q, kv, table, s))(wild)
    clamped_lens = np.clip(np.asarray(wild), 0, 256)
    ref_out, ref_lse = numpy_mla(q, kv, np.clip(np.asarray(table), 0, n - 1), clamped_lens,
                                 D ** -0.5, True)
    check_close(out, lse, ref_out, ref_lse, jnp.float32)
    assert np.all(np.isposinf(np.asarray(lse)[3])) and not np.asarray(out)[3].any()


def test_lse_and_empty_row_conventions():
    """lse = log(sum exp(scale * q.k)) (natural log, scaled scores); no key: out 0 and lse +inf,
    as FlashMLA's kernel and reference (tests/test_flash_mla_dense_decoding.py) give."""
    q, kv, table, lens = paged_inputs(9, (1, 0, 2), 16, 2, jnp.float32)
    out, lse = mla_decode(q, kv, table, lens)  # default scale 1/sqrt(576)
    out, lse = np.asarray(out), np.asarray(lse)
    k0 = np.asarray(kv)[np.asarray(table)[0, 0], 0, 0]  # the single key of sequence 0
    # Sequence 0 (one key), causal: query 0 sees nothing, query 1 sees the key with weight 1.
    np.testing.assert_allclose(lse[0, :, 1], np.asarray(q)[0, 1] @ k0 / 24.0, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out[0, 1], np.broadcast_to(k0[:DV], (16, DV)), rtol=1e-6)
    assert np.all(np.isposinf(lse[0, :, 0])) and not out[0, 0].any()
    assert np.all(np.isposinf(lse[1])) and not out[1].any()  # length 0
    assert np.all(np.isfinite(lse[2])) and np.all(np.isfinite(out))
    # Without causal masking every query of sequence 0 sees its key.
    _, lse_nc = mla_decode(q, kv, table, lens, causal=False)
    assert np.all(np.isfinite(np.asarray(lse_nc)[0]))
    # Scaling: an explicit scale equal to the default gives the same result.
    out2, lse2 = mla_decode(q, kv, table, lens, softmax_scale=1 / 24)
    np.testing.assert_allclose(np.asarray(lse2), lse, rtol=1e-6)


def test_impl_paths(caplog, no_kernels):
    q, kv, table, lens = paged_inputs(10, (5,), 16, 1)
    with pytest.raises(RuntimeError, match="jax_ds_mla_decode.*unavailable"):
        mla_decode(q, kv, table, lens, impl="ffi")
    _ffi._logged.discard(("mla_decode", "reference"))
    with caplog.at_level(logging.INFO, logger="jax_ds"):
        a = mla_decode(q, kv, table, lens, impl="auto")
        mla_decode(q, kv, table, lens, impl="auto")
    assert sum("mla_decode: reference" in r.getMessage() for r in caplog.records) == 1
    b = mla_decode(q, kv, table, lens, impl="xla")
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    with pytest.raises(ValueError, match="impl must be one of"):
        mla_decode(q, kv, table, lens, impl="cuda")
    assert _ffi.OPS["mla_decode"] == "jax_ds_mla_decode"


def _good():
    return paged_inputs(11, (5, 70), 16, 1, max_blocks=2)


def _replace(i, value):
    args = list(_good())
    args[i] = value
    return args


BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
BAD = [
    # (args, kwargs, error type, message fragment)
    (_replace(0, jnp.zeros((2, 16, 576), BF16)), {}, ValueError, "q must be 4-D"),
    (_replace(0, jnp.zeros((2, 1, 16, 512), BF16)), {}, ValueError, "q has shape"),
    (_replace(0, jnp.zeros((2, 0, 16, 576), BF16)), {}, ValueError, "Sq, Hq >= 1"),
    (_replace(0, jnp.zeros((2, 1, 16, 576), jnp.int8)), {}, TypeError, "q must have dtype"),
    (_replace(0, jnp.zeros((2, 1, 16, 576), F32)), {}, TypeError, "share a dtype"),
    (_replace(1, jnp.zeros((19, 64, 576), BF16)), {}, ValueError, "kv_cache must be 4-D"),
    (_replace(1, jnp.zeros((19, 32, 1, 576), BF16)), {}, ValueError, "block size 64"),
    (_replace(1, jnp.zeros((19, 64, 2, 576), BF16)), {}, ValueError, "kv_cache has shape"),
    (_replace(2, jnp.zeros((2,), I32)), {}, ValueError, "block_table must be 2-D"),
    (_replace(2, jnp.zeros((3, 2), I32)), {}, ValueError, "block_table has shape"),
    (_replace(2, jnp.zeros((2, 2), jnp.int64 if jax.config.x64_enabled else jnp.int16)), {},
     TypeError, "block_table must have dtype int32"),
    (_replace(3, jnp.zeros((3,), I32)), {}, ValueError, "cache_seqlens has shape"),
    (_replace(3, jnp.zeros((2,), jnp.float32)), {}, TypeError, "cache_seqlens must have dtype"),
    (_replace(3, jnp.array([5, 129], I32)), {}, ValueError, r"\[0, max_blocks \* block_size"),
    (_replace(3, jnp.array([-1, 5], I32)), {}, ValueError, "min -1"),
    (list(_good()), {"head_dim_v": 256}, ValueError, "head_dim_v must be 512"),
    (list(_good()), {"head_dim_v": 600}, ValueError, "head_dim_v must be an int"),
    (list(_good()), {"softmax_scale": 0.0}, ValueError, "softmax_scale must be finite and > 0"),
    (list(_good()), {"softmax_scale": -1.0}, ValueError, "softmax_scale must be finite and > 0"),
    (list(_good()), {"softmax_scale": float("inf")}, ValueError, "must be finite and > 0"),
    (list(_good()), {"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a static"),
    (list(_good()), {"softmax_scale": np.array([0.1, 0.2])}, TypeError, "must be a static"),
    # concrete block ids a length uses must name blocks (entries past a length may hold anything)
    (_replace(2, jnp.array([[3, -7], [4, 9]], I32)), {}, ValueError,
     r"block_table\[1, 1\] = 9 lies outside \[0, num_blocks = 7\)"),
    (_replace(2, jnp.array([[-1, 0], [4, 5]], I32)), {}, ValueError, r"block_table\[0, 0\] = -1"),
    # causal picks the mask: None / 0.0 / "no" / an array are not a bool (None dropped the mask)
    (list(_good()), {"causal": None}, TypeError, "causal must be a static Python bool .*, got NoneType None"),
    (list(_good()), {"causal": 0.0}, TypeError, "causal must be a static Python bool .*, got float"),
    (list(_good()), {"causal": "no"}, TypeError, "causal must be a static Python bool .*, got str"),
    (list(_good()), {"causal": np.array([1])}, TypeError, "causal must be a static"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_validation_errors(case):
    args, kwargs, err, fragment = BAD[case]
    with pytest.raises(err, match=fragment) as info:
        mla_decode(*args, **kwargs)
    assert "mla_decode" in str(info.value)


def test_static_arguments_traced_or_of_the_wrong_dtype():
    """A traced causal (it picks the mask at trace time) and a dequantize_kv_fp8 dtype that cannot
    hold the values exactly get a TypeError naming them (a traced causal failed deep inside with
    TracerBoolConversionError, an int dtype truncated silently)."""
    from jax_ds.ops.mla import dequantize_kv_fp8
    args = _good()
    for fn in (mla_decode, mla_decode_reference):
        with pytest.raises(TypeError, match="causal must be a static"):
            jax.jit(lambda c: fn(*args, causal=c))(True)
    packed = quantize_kv_fp8(jnp.ones((2, 576), jnp.float32))
    for dtype in (jnp.int32, jnp.float16):
        with pytest.raises(TypeError, match="dequantize_kv_fp8: dtype must be bfloat16 or float32"):
            dequantize_kv_fp8(packed, dtype)


def test_ffi_refuses_what_the_kernel_does_not_take(monkeypatch):
    """Even with the kernel present, f32 or Hq outside [16, 128] cannot take impl="ffi"."""
    monkeypatch.setattr(_ffi, "unavailable_reason", lambda target: None)
    q, kv, table, lens = paged_inputs(12, (5,), 3, 1)
    with pytest.raises(ValueError, match="Hq in"):
        mla_decode(q, kv, table, lens, impl="ffi")
    q, kv, table, lens = paged_inputs(12, (5,), 16, 1, jnp.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        mla_decode(q, kv, table, lens, impl="ffi")
    out, _ = mla_decode(q, kv, table, lens)  # auto: the reference serves it
    assert out.dtype == jnp.float32
    q, kv, table, lens = paged_inputs(12, (5,), 16, 1)
    with pytest.raises(ValueError, match="FP8 cache"):
        mla_decode(q, quantize_kv_fp8(kv), table, lens, impl="ffi")


def test_plan_payload():
    """The kernel plan's part size: ceil(total / parts) on the cost line, rounded up to whole
    batches for equal block counts when that adds at most the fixed cost."""
    plan_payload = mla_mod.plan_payload
    assert plan_payload([64] * 128, 132, 2) == (66, 128 * 66)     # 64 -> 66: whole batches
    assert plan_payload([64] * 256, 132, 2) == (128, 256 * 66)    # 128 -> 132 adds 4 > 2
    assert plan_payload([64] * 256, 132, 5) == (138, 256 * 69)    # 135 -> 138 adds 3 <= 5
    assert plan_payload([10, 20, 30], 4, 2) == (17, 66)           # unequal: never rounded
    assert plan_payload([0] * 40, 132, 2) == (2, 80)              # empty batches still cost 2
    # a slack in percent of the part: 128 -> 132 adds 4 <= 8% of 128; 253 -> 260 adds 7 <= 20
    assert plan_payload([64] * 128, 66, 2, 8) == (132, 128 * 66)
    assert plan_payload([128] * 128, 66, 2, 8) == (260, 128 * 130)
    assert plan_payload([128] * 128, 66, 2, 2) == (253, 128 * 130)   # 2% of 253 = 5 < 7
    assert plan_payload([10, 20, 30], 4, 2, 100) == (17, 66)     # unequal: never rounded


def test_kernel_plan():
    """The plan mla_decode hands the kernel: one wave of parts per 64-row head tile, the slack for
    Sq 1 with Hq >= 64 only, the module's fixed cost and fused-merge bound."""
    plan = mla_mod.kernel_plan
    common = dict(fixed_cost=mla_mod.FIXED_COST, fuse_max_splits=mla_mod.FUSE_MAX_SPLITS)
    slack = mla_mod.ALIGN_SLACK_PCT
    assert plan(1, 128, 132) == dict(num_parts=66, align_slack_pct=slack, **common)
    assert plan(2, 128, 132) == dict(num_parts=33, align_slack_pct=0, **common)   # 4 tiles
    assert plan(1, 64, 132) == dict(num_parts=132, align_slack_pct=slack, **common)
    assert plan(1, 16, 132) == dict(num_parts=132, align_slack_pct=0, **common)
    assert plan(2, 16, 132) == dict(num_parts=132, align_slack_pct=0, **common)   # 32 rows
    assert plan(3, 128, 132)["num_parts"] == 22                  # 384 rows: 6 tiles
    assert plan(1, 128, 1)["num_parts"] == 1                     # never 0


def _flashmla_fp8_rows(rows):
    """numpy statement of FlashMLA's FP8 cache row (its tests' quantize_k_cache, V32 layout):
    per 128 latent values scale = 2 ** ceil(log2(max(amax / 448, 1e-4))), e4m3(x / scale); the
    bytes: 512 e4m3, 4 float32 scales, 64 bf16 rope."""
    import ml_dtypes
    x = np.asarray(rows, np.float32)
    lead = x.shape[:-1]
    lat = x[..., :512].reshape(*lead, 4, 128)
    amax = np.abs(lat).max(-1)
    scale = (np.float32(2) ** np.ceil(np.log2(np.maximum(amax / np.float32(448),
                                                          np.float32(1e-4))))).astype(np.float32)
    q = (lat / scale[..., None]).astype(ml_dtypes.float8_e4m3fn).reshape(*lead, 512)
    rope = np.asarray(rows)[..., 512:].astype(ml_dtypes.bfloat16)
    return np.concatenate([q.view(np.uint8), scale.view(np.uint8).reshape(*lead, 16),
                           rope.view(np.uint8).reshape(*lead, 128)], axis=-1)


def test_fp8_cache_layout_and_decode():
    """quantize_kv_fp8 writes FlashMLA's FP8 bytes (tiles of zeros, of an exact power-of-two
    amax, of mixed magnitudes); dequantize_kv_fp8 is exact; mla_decode on the FP8 cache equals
    mla_decode on its dequantized bf16 cache (eager, jit); the kernel path refuses it."""
    from jax_ds.ops.mla import dequantize_kv_fp8
    key = jax.random.key(11)
    rows = (jax.random.normal(key, (6, 64, 1, 576)) *
            jnp.linspace(1e-3, 30, 576)).astype(jnp.bfloat16)
    rows = rows.at[0, 0, 0, :128].set(0).at[0, 1, 0, 128:256].set(448.0)
    rows = rows.at[0, 2, 0, 256:384].set(1e-6)
    packed = quantize_kv_fp8(rows)
    assert packed.dtype == jnp.uint8 and packed.shape == (6, 64, 1, 656)
    np.testing.assert_array_equal(np.asarray(packed), _flashmla_fp8_rows(rows))
    scales = np.asarray(packed[0, :3, 0, 512:528]).copy().view(np.float32)
    assert scales[0, 0] == 2.0 ** -13 and scales[1, 1] == 1.0 and scales[2, 2] == 2.0 ** -13
    back = dequantize_kv_fp8(packed)
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back[..., 512:]), np.asarray(rows[..., 512:]))
    x, y = np.asarray(rows, np.float32), np.asarray(back, np.float32)
    # e4m3 rounding: half an ulp (1/16 relative), or half the subnormal step (2^-10 x the scale)
    tile_scale = np.repeat(np.asarray(packed[..., 512:528]).copy().view(np.float32), 128, -1)
    err = np.abs(y - x)[..., :512]
    assert np.all(err <= np.maximum(np.abs(x)[..., :512] / 16, tile_scale * 2.0 ** -10))
    np.testing.assert_array_equal(np.asarray(dequantize_kv_fp8(packed, jnp.float32)), y)

    q = jax.random.normal(jax.random.key(12), (2, 2, 16, 576)).astype(jnp.bfloat16)
    table = jnp.array([[3, 1, 0], [5, 2, 4]], jnp.int32)
    lens = jnp.array([150, 77], jnp.int32)
    want = mla_decode(q, back, table, lens, impl="xla")
    as_e4m3 = jax.lax.bitcast_convert_type(packed, jnp.float8_e4m3fn)  # FlashMLA's typing
    for got in (mla_decode(q, packed, table, lens), mla_decode(q, as_e4m3, table, lens),
                jax.jit(lambda *a: mla_decode(*a))(q, packed, table, lens),
                mla_decode_reference(q, packed, table, lens)):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises((ValueError, RuntimeError)):
        mla_decode(q, packed, table, lens, impl="ffi")
    with pytest.raises(TypeError, match="FP8 cache"):
        mla_decode(q.astype(jnp.float32), packed, table, lens)
    with pytest.raises(ValueError, match="656"):
        mla_decode(q, packed[..., :600], table, lens)
    with pytest.raises(ValueError, match=r"\[\.\.\., 576\]"):
        quantize_kv_fp8(rows[..., :500])
