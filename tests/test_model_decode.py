"""Decoding through the paged cache (absorbed MLA + mla_decode) equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ds.models import DeepSeekConfig, Transformer, YarnConfig
from jax_ds.models import kv_cache as kvc

SMALL = dict(d_model=32, expert_hidden=16, num_layers=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, dense_hidden=64)


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=4.0, original_max_len=16, mscale=0.707,
                                                   mscale_all_dim=0.707)])
def test_prefill_then_token_by_token_matches_forward(yarn):
    cfg = DeepSeekConfig.tiny(**SMALL, yarn=yarn)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 70), 0, cfg.vocab_size)  # crosses a block
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    cache = model.init_cache(num_blocks=8, max_seqs=3, max_blocks_per_seq=2, dtype=jnp.float32)
    seqs = jnp.array([2, 0], jnp.int32)  # any slots
    step = nnx.jit(lambda m, t, c: m.decode(t, c, seqs))
    logits, cache = step(model, tokens[:, :5], cache)  # prefill
    got = [np.asarray(logits)]
    for i in range(5, 70):
        logits, cache = step(model, tokens[:, i:i + 1], cache)
        got.append(np.asarray(logits))
    kvc.check(cache)
    got = np.concatenate(got, axis=1)
    assert list(np.asarray(cache.lengths)) == [70, 0, 70]
    np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-5)


def test_mtp_style_multi_token_step_and_kernel_shaped_cache():
    """T = 2 per step (MTP drafts) and the V3 row width 512 + 64 (mla_decode proper)."""
    cfg = DeepSeekConfig.tiny(**{**SMALL, "kv_lora_rank": 512, "qk_rope_dim": 64,
                                 "num_heads": 2, "num_layers": 1})
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    cache = model.init_cache(num_blocks=2, max_seqs=1, max_blocks_per_seq=1, dtype=jnp.float32)
    step = nnx.jit(lambda m, t, c: m.decode(t, c, jnp.array([0])))
    got = []
    for start, stop in ((0, 3), (3, 5), (5, 7), (7, 9)):
        logits, cache = step(model, tokens[:, start:stop], cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, 1), full, rtol=2e-4, atol=2e-5)


def test_bf16_model_decodes_on_cpu():
    """A bf16 model (the HF loader's default dtype) decodes on CPU, where XLA has no batched
    bf16 x bf16 -> f32 dot: the absorbed-weight einsums widen their operands there."""
    model = Transformer(DeepSeekConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"),
                        rngs=nnx.Rngs(0))
    cache = kvc.allocate(model.init_cache(4, 1, 4), 0)
    tokens = jnp.array([[72, 101, 108]])
    logits, cache = model.decode(tokens, cache, jnp.array([0]))
    want = model(tokens)
    assert logits.shape == (1, 3, 256) and logits.dtype == jnp.float32
    assert float(jnp.abs(logits - want).max()) < 0.05 * float(jnp.abs(want).max())


def test_tokens_are_checked():
    model = Transformer(DeepSeekConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^Transformer.forward: token ids must lie in \[0, "
                                         r"vocab_size = 256\)"):
        model(jnp.array([[256, 3]]))
    with pytest.raises(TypeError, match="tokens must hold integer ids, got dtype float32"):
        model(jnp.array([[1.0, 3.0]]))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\] with B, T >= 1"):
        model(jnp.zeros((1, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"seqs must be \[B\]"):
        model.decode(jnp.array([[1, 2]]), model.init_cache(4, 2, 2), jnp.array([0, 1]))


def test_fp8_cache_decodes_close_to_the_float_cache():
    """An FP8 cache (FlashMLA's 656-byte rows) through the whole decode path: the cached rows are
    the quantized ones, and the logits stay close to the float cache's."""
    cfg = DeepSeekConfig.tiny(**{**SMALL, "kv_lora_rank": 512, "qk_rope_dim": 64,
                                 "num_heads": 2, "num_layers": 1})
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(3), (1, 7), 0, cfg.vocab_size)
    step = nnx.jit(lambda m, t, c: m.decode(t, c, jnp.array([0])))
    outs = {}
    for fp8 in (False, True):
        cache = model.init_cache(num_blocks=2, max_seqs=1, max_blocks_per_seq=1,
                                 dtype=jnp.float32, fp8=fp8)
        assert cache.fp8 == fp8
        logits_a, cache = step(model, tokens[:, :4], cache)
        logits_b, cache = step(model, tokens[:, 4:], cache)
        outs[fp8] = (np.concatenate([logits_a, logits_b], 1), cache)
    (ref, cache32), (got, cache8) = outs[False], outs[True]
    assert cache8.kv.dtype == jnp.uint8 and cache8.kv.shape[-1] == 656
    from jax_ds.ops import mla
    rows32 = kvc.gather(cache32, 0, 0)[:7]
    np.testing.assert_array_equal(np.asarray(kvc.gather(cache8, 0, 0)[:7]),
                                  np.asarray(mla.quantize_kv_fp8(rows32)))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.05 * scale
    # The same bytes typed float8_e4m3fn (FlashMLA's typing) are an FP8 cache too: writes store
    # the bytes, not values converted to e4m3, and decoding gives the same logits.
    cache_e4m3 = model.init_cache(num_blocks=2, max_seqs=1, max_blocks_per_seq=1, fp8=True)
    cache_e4m3 = cache_e4m3.replace(
        kv=jax.lax.bitcast_convert_type(cache_e4m3.kv, jnp.float8_e4m3fn))
    assert cache_e4m3.fp8
    logits_a, cache_e4m3 = step(model, tokens[:, :4], cache_e4m3)
    logits_b, cache_e4m3 = step(model, tokens[:, 4:], cache_e4m3)
    assert cache_e4m3.kv.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(cache_e4m3.kv, jnp.uint8)), np.asarray(cache8.kv))
    np.testing.assert_array_equal(np.concatenate([logits_a, logits_b], 1), got)
    with pytest.raises(ValueError, match="FP8 layout holds rows of 576"):
        Transformer(DeepSeekConfig.tiny(**SMALL), rngs=nnx.Rngs(0)).init_cache(2, 1, 1, fp8=True)


def test_decoding_past_the_slot_flags_the_cache_eagerly_as_under_jit():
    """A step past max_blocks_per_seq * 64 rows sets SEQ_TOO_LONG (the documented status) and
    gives the same logits eagerly and under jit; eagerly it raised mla_decode's ValueError about
    cache_seqlens instead, since the attention was given lengths past the table's rows."""
    model = Transformer(DeepSeekConfig.tiny(**SMALL), rngs=nnx.Rngs(0))
    cache = model.init_cache(num_blocks=4, max_seqs=1, max_blocks_per_seq=1, dtype=jnp.float32)
    _, cache = model.decode(jnp.ones((1, 60), jnp.int32), cache, jnp.array([0]))
    tokens = jnp.full((1, 8), 7, jnp.int32)
    eager, cache_e = model.decode(tokens, cache, jnp.array([0]))
    jitted, cache_j = nnx.jit(lambda m, t, c: m.decode(t, c, jnp.array([0])))(model, tokens, cache)
    for c in (cache_e, cache_j):
        assert int(c.error) == kvc.SEQ_TOO_LONG and int(c.lengths[0]) == 64
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cached", [0, 60])
def test_an_exhausted_pool_flags_the_cache_eagerly_as_under_jit(cached):
    """Slot 1 needs a block the pool no longer has (slot 0 holds the only one): a new sequence
    (cached 0) or one crossing into its next block (cached 60). OUT_OF_BLOCKS is set, eagerly
    and under jit alike, and the step attends over the rows slot 1's blocks hold: never over a
    -1 table entry, which mla_decode refused eagerly and clamped to slot 0's block under jit
    (slot 1's logits then changed with slot 0's tokens)."""
    model = Transformer(DeepSeekConfig.tiny(**SMALL), rngs=nnx.Rngs(0))
    tokens = jnp.full((1, 8), 7, jnp.int32)
    results = []
    for other in (1, 5):  # slot 0's tokens: slot 1's logits must not depend on them
        cache = model.init_cache(num_blocks=1 + (cached > 0), max_seqs=2, max_blocks_per_seq=2,
                                 dtype=jnp.float32)
        if cached:
            _, cache = model.decode(jnp.ones((1, cached), jnp.int32), cache, jnp.array([1]))
        _, cache = model.decode(jnp.full((1, 3), other, jnp.int32), cache, jnp.array([0]))
        assert int(cache.error) == 0
        eager, cache_e = model.decode(tokens, cache, jnp.array([1]))
        jitted, cache_j = nnx.jit(lambda m, t, c: m.decode(t, c, jnp.array([1])))(
            model, tokens, cache)
        for c in (cache_e, cache_j):
            assert int(c.error) == kvc.OUT_OF_BLOCKS
            np.testing.assert_array_equal(np.asarray(c.block_table), np.asarray(cache.block_table))
        assert np.isfinite(np.asarray(eager)).all()
        np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-6)
        results.append(np.asarray(eager))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_one_sequence_decodes_on_an_expert_parallel_mesh():
    """A single sequence (batch 1) on data=2 x expert=4: its tokens are padded up to the 8 shards
    inside the MoE layers, and the logits equal the unsharded model's forward."""
    from jax_ds.parallel.mesh import make_mesh, shard_model
    cpu = jax.devices("cpu")
    mesh = make_mesh(data=2, expert=4, devices=cpu[:8])
    cfg = DeepSeekConfig.tiny(**SMALL)
    with jax.default_device(cpu[0]):
        tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.vocab_size)
        full = np.asarray(nnx.jit(lambda m, t: m(t))(Transformer(cfg, rngs=nnx.Rngs(0)), tokens))
        model = shard_model(Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
        cache = model.init_cache(num_blocks=2, max_seqs=1, max_blocks_per_seq=1,
                                 dtype=jnp.float32)
        step = nnx.jit(lambda m, t, c: m.decode(t, c, jnp.array([0])))
        logits, cache = step(model, tokens[:, :5], cache)  # prefill: 5 tokens over 8 shards
        got = [np.asarray(logits)]
        for i in range(5, 12):
            logits, cache = step(model, tokens[:, i:i + 1], cache)
            got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=2e-4, atol=2e-5)
