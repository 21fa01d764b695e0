"""The DeepSeek model: configs and their published sizes, MLA attention, rotary/YaRN, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_ds import data
from jax_ds.models import (DeepSeekConfig, MLAttention, Transformer, YarnConfig, attend,
                           attention_reference, lm_loss, param_counts, rope_inv_freq,
                           train_step)
from jax_ds.models.layers import apply_rope, attention_scale, yarn_mscale
from jax_ds.parallel.mesh import make_mesh, shard_batch, shard_model
from jax_ds.testing import calc_diff, tolerance

# Small enough to compile in seconds, with every mechanism on (MLA with q compression, dense
# and MoE layers, groups, shared expert, bias).
SMALL = dict(d_model=32, expert_hidden=16, num_layers=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, dense_hidden=64)


# ----------------------------------------------------------------------------- configs


def test_v3_preset_has_published_shapes():
    c = DeepSeekConfig.v3()
    assert (c.num_layers, c.d_model, c.num_heads, c.vocab_size) == (61, 7168, 128, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (c.num_experts, c.num_shared_experts, c.expert_hidden, c.top_k) == (256, 1, 2048, 8)
    assert (c.num_groups, c.topk_groups, c.num_dense_layers, c.dense_hidden) == (8, 4, 3, 18432)
    assert (c.score_func, c.router_bias, c.routed_scaling, c.mtp_depth) == ("sigmoid", True,
                                                                            2.5, 1)
    with pytest.raises(dataclasses_frozen_error()):
        c.num_layers = 3


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_v3_parameter_counts_match_the_report():
    """671B total, 37B activated (DeepSeek-V3 report); 685B on Hugging Face, whose checkpoint
    adds the MTP module (~11.6B) plus its own copies of embedding and head (~1.9B)."""
    counts = param_counts(DeepSeekConfig.v3())  # shapes only: nothing allocated
    assert counts["total"] == pytest.approx(671e9, rel=0.002)
    assert counts["activated"] == pytest.approx(37e9, rel=0.02)
    hf_total = counts["total"] + counts["mtp"] + 2 * counts["embedding"]
    assert hf_total == pytest.approx(685e9, rel=0.002)


def test_v2_lite_parameter_counts_match_the_release():
    counts = param_counts(DeepSeekConfig.v2_lite())
    assert counts["total"] == pytest.approx(15.7e9, rel=0.005)
    assert counts["activated"] == pytest.approx(2.4e9, rel=0.03)


@pytest.mark.parametrize("changes,match", [
    (dict(num_experts=10, num_groups=4), "not divisible by num_groups"),
    (dict(topk_groups=5), "topk_groups=5 exceeds num_groups=4"),
    (dict(top_k=5), "top_k=5 exceeds the 4 experts"),
    (dict(qk_rope_dim=7), "must be even"),
    (dict(num_dense_layers=4), "num_dense_layers=4"),
    (dict(score_func="relu"), "score_func"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(router_bias=False), "needs router_bias"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_configs_are_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        DeepSeekConfig.tiny(**changes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, np.dtype("float16")])
def test_config_takes_a_dtype_and_stores_its_name(dtype):
    name = np.dtype(dtype).name
    cfg = DeepSeekConfig.tiny(dtype=dtype, param_dtype=dtype)
    assert cfg == DeepSeekConfig.tiny(dtype=name, param_dtype=name)
    assert hash(cfg) == hash(DeepSeekConfig.tiny(dtype=name, param_dtype=name))
    assert cfg.dtype == cfg.param_dtype == name and isinstance(cfg.dtype, str)
    model = Transformer(cfg.replace(**SMALL), rngs=nnx.Rngs(0))
    assert model.embed.dtype == jnp.dtype(name)


@pytest.mark.parametrize("dtype, match", [(jnp.int8, "dtype='int8'"), (None, "dtype=None"),
                                          (3, "dtype=3")])
def test_config_rejects_other_dtypes(dtype, match):
    with pytest.raises(ValueError, match=match):
        DeepSeekConfig.tiny(dtype=dtype)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown config preset 'v4'"):
        DeepSeekConfig.preset("v4")


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kdim,vdim", [(24, 16), (192, 128)])
def test_padded_v_attention_equals_plain_attention(kdim, vdim):
    """dot_product_attention needs one head dim: V is zero-padded, the output sliced."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 9, 3, kdim))
    k = jax.random.normal(keys[1], (2, 9, 3, kdim))
    v = jax.random.normal(keys[2], (2, 9, 3, vdim))
    scale = kdim ** -0.5
    out = jax.jit(attend, static_argnums=3)(q, k, v, scale)
    assert out.shape == (2, 9, 3, vdim)
    assert calc_diff(out, attention_reference(q, k, v, scale)) < tolerance("float32", kdim)

    def grads_of(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a, scale))), argnums=(0, 1, 2)))

    grads, ref = grads_of(attend)(q, k, v), grads_of(attention_reference)(q, k, v)
    for g, r in zip(grads, ref):
        assert calc_diff(g, r) < tolerance("float32", kdim)


def test_mla_is_causal():
    cfg = DeepSeekConfig.tiny(**SMALL)
    attn = MLAttention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, cfg.d_model))
    pos = jnp.arange(8)[None]
    run = nnx.jit(lambda a, x: a(x, pos))
    y1 = run(attn, x)
    y2 = run(attn, x.at[:, 5:].set(7.0))  # change the future only
    np.testing.assert_allclose(y1[:, :5], y2[:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y1[:, 5:], y2[:, 5:])


# ----------------------------------------------------------------------------- rotary / YaRN


def test_rope_is_relative():
    """<rope(q, m), rope(k, n)> depends on m - n only."""
    inv = rope_inv_freq(16, 10000.0, YarnConfig(factor=4.0, original_max_len=64))
    q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 16))

    def score(m, n):
        qm = apply_rope(q, jnp.asarray([[m]]), inv)
        kn = apply_rope(k, jnp.asarray([[n]]), inv)
        return float(jnp.sum(qm * kn))

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)


def test_yarn_keeps_high_and_stretches_low_frequencies():
    dim, theta = 64, 10000.0
    yarn = YarnConfig(factor=40.0, original_max_len=4096, beta_fast=32, beta_slow=1)
    base, scaled = rope_inv_freq(dim, theta), rope_inv_freq(dim, theta, yarn)
    np.testing.assert_allclose(base, theta ** (-np.arange(0, dim, 2) / dim), rtol=1e-6)
    np.testing.assert_allclose(scaled[:5], base[:5], rtol=1e-6)  # many turns: kept
    np.testing.assert_allclose(scaled[-5:], base[-5:] / 40.0, rtol=1e-6)  # < 1 turn: / s
    assert np.all(np.diff(np.asarray(scaled / base)) <= 1e-7)  # a monotone blend in between
    cfg = DeepSeekConfig.v3()
    expected = cfg.qk_head_dim ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
    assert attention_scale(cfg) == pytest.approx(expected)
    assert yarn_mscale(1.0, 1.0) == 1.0


# ----------------------------------------------------------------------------- the model


def test_transformer_forward_shapes_and_causality():
    cfg = DeepSeekConfig.tiny(**SMALL, mtp_depth=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    forward = nnx.jit(lambda m, t: m.forward(t))
    logits, aux = forward(model, tokens)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux.expert_counts.shape == (cfg.num_moe_layers + 1, cfg.num_experts)  # + MTP's
    assert len(aux.mtp_logits) == 1 and aux.mtp_logits[0].shape == logits.shape
    logits2, _ = forward(model, tokens.at[:, 8:].set(0))
    np.testing.assert_allclose(logits[:, :8], logits2[:, :8], rtol=1e-4, atol=1e-5)
    # MTP depth 1 at position i sees token i+1, not beyond.
    _, aux2 = forward(model, tokens.at[:, 9:].set(0))
    np.testing.assert_allclose(aux.mtp_logits[0][:, :8], aux2.mtp_logits[0][:, :8], rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(aux.mtp_logits[0][:, 8], aux2.mtp_logits[0][:, 8])


def test_mtp_loss_trains_the_mtp_module():
    cfg = DeepSeekConfig.tiny(**SMALL, mtp_depth=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 13), 0, cfg.vocab_size)
    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))(model, tokens)
    assert float(metrics["mtp_ce"]) > 0
    expected = metrics["ce"] + cfg.mtp_loss_weight * metrics["mtp_ce"] + \
        cfg.balance_loss_weight * metrics["balance_loss"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    g = float(jnp.abs(grads["mtp"][0]["proj"]["kernel"][...]).sum())
    assert g > 0


def test_mtp_depths_without_targets_add_nothing():
    """T <= mtp_depth: depth k >= T has no target (not 0/0 = NaN); the depths that have some are
    averaged, and one training step keeps every weight finite."""
    cfg = DeepSeekConfig.tiny(**SMALL, mtp_depth=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    loss, m = lm_loss(model, jnp.array([[1, 2]], jnp.int32))  # T = 1: no depth has a target
    assert float(m["mtp_ce"]) == 0 and np.isfinite(float(loss))
    assert float(loss) == pytest.approx(float(m["ce"] + cfg.balance_loss_weight
                                              * m["balance_loss"]), rel=1e-6)
    tokens = jnp.array([[1, 2, 3]], jnp.int32)  # T = 2: depth 1 has one target, depth 2 none
    _, m = lm_loss(model, tokens)
    logits, aux = model.forward(tokens[:, :-1])
    want = optax.softmax_cross_entropy_with_integer_labels(aux.mtp_logits[0][:, 0], tokens[:, 2])
    assert float(m["mtp_ce"]) == pytest.approx(float(want.mean()), rel=1e-5)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    train_step(model, opt, jnp.array([[1, 2]], jnp.int32))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_sharded_model_matches_unsharded():
    """data=2 x expert=4 over 8 devices: same loss and gradients as one device."""
    cfg = DeepSeekConfig.tiny(**SMALL)
    tokens = jax.random.randint(jax.random.key(5), (8, 17), 0, cfg.vocab_size)
    grad_fn = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))
    cpus = jax.devices("cpu")  # the 8 virtual CPU devices, also on a GPU host
    with jax.default_device(cpus[0]):
        (loss0, _), g0 = grad_fn(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)
        mesh = make_mesh(data=2, expert=4, devices=cpus)
        model = shard_model(Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
        (loss, _), g = grad_fn(model, shard_batch(tokens, mesh))
    assert float(loss) == pytest.approx(float(loss0), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        assert calc_diff(a, b) < tolerance("float32")


def test_fp8_model_trains_on_an_expert_mesh():
    """FP8 expert FFNs inside the EP shard_map (data=2 x expert=4): the same gradients as on
    one device. The expert weights are replicated over `data` while the tokens vary over it, so
    the custom_vjp's weight cotangent must be summed over `data` (it failed to trace before).

    The bound is FP8's, not float32's: a last-bit float32 difference upstream (the sharded and
    one-device programs accumulate their dots in different orders, and XLA:CPU's order changes
    between jax releases) moves a value across an e4m3 rounding boundary, and 1-ulp noise on the
    parameters alone moves these gradients by calc_diff ~2e-5 (jax 0.10 and 0.12 alike). A
    missing or doubled sum over `data` would be calc_diff > 0.1."""
    cfg = DeepSeekConfig.tiny(**{**SMALL, "d_model": 128, "expert_hidden": 128}, fp8=True)
    tokens = jax.random.randint(jax.random.key(5), (8, 17), 0, cfg.vocab_size)
    grad_fn = nnx.jit(nnx.grad(lambda m, t: lm_loss(m, t)[0]))
    cpus = jax.devices("cpu")
    with jax.default_device(cpus[0]):
        g0 = grad_fn(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)
        mesh = make_mesh(data=2, expert=4, devices=cpus)
        model = shard_model(Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
        g = grad_fn(model, shard_batch(tokens, mesh))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        assert calc_diff(a, b) < tolerance("fp8")


def test_fp8_model_stays_close_to_full_precision():
    pytest.importorskip("jax_ds.ops")
    # d_model and expert_hidden 128: the FP8 paths (K % 128 == 0) are really taken.
    cfg = DeepSeekConfig.tiny(**{**SMALL, "d_model": 128, "expert_hidden": 128})
    tokens = jax.random.randint(jax.random.key(6), (2, 17), 0, cfg.vocab_size)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    fp8_model = Transformer(cfg.replace(fp8=True), rngs=nnx.Rngs(0))
    assert fp8_model.blocks[0].attn.wkv_a.fp8 and not fp8_model.head.fp8
    loss_fn = nnx.jit(lambda m: lm_loss(m, tokens)[0])
    loss, fp8_loss = float(loss_fn(model)), float(loss_fn(fp8_model))
    assert fp8_loss != loss and fp8_loss == pytest.approx(loss, rel=0.02)
    grads = nnx.jit(nnx.grad(lambda m: lm_loss(m, tokens)[0]))(fp8_model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_tiny_model_loss_falls_in_30_steps():
    cfg = DeepSeekConfig.tiny()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, b2=0.95, weight_decay=0.1),
                              wrt=nnx.Param)
    step = nnx.jit(train_step)
    train, _ = data.split_corpus(data.load_corpus(max_bytes=200_000))
    batches = data.batches(train, 8, 64, seed=0)
    losses = [float(step(model, optimizer, jnp.asarray(next(batches)))["loss"])
              for _ in range(30)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def test_microbatched_step_equals_the_whole_batch():
    """train_step(microbatches=2) on data=2 x expert=4: the same update (plain SGD, so the
    parameters move by the gradient itself), the same router-bias move and summed counts, on a
    config with MTP and the sequence-wise balance loss (means over tokens or sequences)."""
    cfg = DeepSeekConfig.tiny(**SMALL, mtp_depth=1, balance_loss_weight=0.01)
    tokens = jax.random.randint(jax.random.key(8), (16, 17), 0, cfg.vocab_size)
    mesh = make_mesh(data=2, expert=4, devices=jax.devices("cpu"))
    params, metrics = [], []
    for k in (1, 2):
        with jax.default_device(jax.devices("cpu")[0]):
            model = shard_model(Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh), mesh)
            optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
            step = nnx.jit(train_step, static_argnames="microbatches")
            metrics.append(step(model, optimizer, shard_batch(tokens, mesh), microbatches=k))
            params.append(nnx.state(model))
    for key in ("loss", "ce", "mtp_ce", "balance_loss"):
        assert float(metrics[1][key]) == pytest.approx(float(metrics[0][key]), rel=1e-5), key
    np.testing.assert_array_equal(metrics[1]["expert_counts"], metrics[0]["expert_counts"])
    assert int(metrics[1]["dropped"]) == int(metrics[0]["dropped"])
    moved = 0
    for a, b, init in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[0]),
                          jax.tree.leaves(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))):
        a, b, init = (np.asarray(x, np.float64) for x in (a, b, init))
        if not np.array_equal(b, init):
            moved += 1
            assert calc_diff(a - init, b - init) < tolerance("float32")
    assert moved > 10


@pytest.mark.parametrize("microbatches, match", [(3, "multiple"), (0, ">= 1"), (True, ">= 1")])
def test_microbatches_must_divide_the_batch(microbatches, match):
    cfg = DeepSeekConfig.tiny(**SMALL)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    with pytest.raises(ValueError, match=match):
        train_step(model, optimizer, jnp.zeros((4, 9), jnp.int32), microbatches=microbatches)


def test_batches_draw_every_window():
    """data.batches: windows of seq_len + 1 tokens from every start that fits (the corpus's last
    token is a target too); a corpus of exactly one window is enough, one token less is not."""
    tokens = np.arange(10, dtype=np.uint8)
    gen = data.batches(tokens, 64, 5, seed=1)
    starts = {int(s) for _ in range(20) for s in next(gen)[:, 0]}
    assert starts == set(range(5))   # 0 .. len - seq_len - 1
    one = next(data.batches(tokens, 2, 9))
    assert one.dtype == np.int32 and one.tolist() == [list(range(10))] * 2
    with pytest.raises(ValueError, match="too short for seq_len=10"):
        next(data.batches(tokens, 2, 10))
