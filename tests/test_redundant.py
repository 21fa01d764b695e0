"""Redundant experts in the model: EPLB plans applied to live routing, and load statistics.

The model's function must not depend on the placement: same logits and expert counts before and
after a rebalance (8 virtual devices, experts over `expert`), and training with replicas follows
the one-slot-per-expert model, replicas staying identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_ds.models import DeepSeekConfig, DeepSeekMoE, Transformer, train_step
from jax_ds.models.redundant import (RedundantMoE, rebalance, round_robin_plan,
                                     with_redundant_experts)
from jax_ds.parallel.eplb import rebalance_experts
from jax_ds.parallel.load_stats import init_expert_load, update_expert_load
from jax_ds.parallel.mesh import EXPERT, make_mesh, shard_batch

CPU = jax.devices("cpu")
# Two MoE layers (3 layers, the first dense), 8 experts in 4 groups.
SMALL = dict(d_model=32, expert_hidden=16, num_layers=3, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, dense_hidden=64)
# Skewed loads for the 2 MoE layers: experts 0 and 4 (resp. 7) are hot.
SKEWED = jnp.array([[400, 10, 12, 9, 300, 20, 11, 8], [5, 7, 30, 6, 9, 8, 10, 500]])


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(CPU[0]):
        yield


def slot_weights_match(model, plain):
    for moe, ref in zip(model.moe_layers(), plain.moe_layers()):
        phy2log = np.asarray(moe.phy2log[...])
        for name in ("w_gate", "w_up", "w_down"):
            np.testing.assert_array_equal(getattr(moe, name)[...],
                                          np.asarray(getattr(ref, name)[...])[phy2log])


def test_rebalance_keeps_the_model_function_on_8_devices():
    cfg = DeepSeekConfig.tiny(**SMALL)
    mesh = make_mesh(data=2, expert=4, devices=CPU)
    tokens = shard_batch(jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size), mesh)
    forward = nnx.jit(lambda m, t: m.forward(t))
    model = with_redundant_experts(Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh), 16)
    assert all(isinstance(m, RedundantMoE) for m in model.moe_layers())
    logits0, aux0 = forward(model, tokens)  # round-robin placement: 16 slots, 4 per rank
    assert aux0.expert_counts.shape == (2, 8)  # per logical expert

    plan = rebalance_experts(SKEWED, 16, 4, 2, 4)  # 2 nodes x 2 GPUs = the 4 expert ranks
    assert (plan.logcnt[0, [0, 4]] > 1).all() and plan.logcnt[1, 7] > 1
    rebalance(model, plan)
    for i, moe in enumerate(model.moe_layers()):
        np.testing.assert_array_equal(moe.phy2log[...], plan.phy2log[i])
        assert moe.w_gate[...].sharding.spec[0] == EXPERT  # moved, still split over `expert`
    slot_weights_match(model, Transformer(cfg, rngs=nnx.Rngs(0)))
    logits, aux = forward(model, tokens)
    np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux.expert_counts, aux0.expert_counts)
    assert int(aux.dropped.sum()) == 0


def test_training_with_replicas_follows_the_plain_model():
    """Replica gradients are tied, so Adam keeps replicas identical; a rebalance mid-training
    (weights and Adam moments moved) changes nothing."""
    cfg = DeepSeekConfig.tiny(**{**SMALL, "num_layers": 2})  # one MoE layer: compiles faster
    plain = Transformer(cfg, rngs=nnx.Rngs(0))
    model = with_redundant_experts(Transformer(cfg, rngs=nnx.Rngs(0)), 12)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_plain = nnx.Optimizer(plain, tx, wrt=nnx.Param)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(train_step)
    batches = jax.random.randint(jax.random.key(1), (4, 4, 17), 0, cfg.vocab_size)
    for i, batch in enumerate(batches):
        if i == 2:
            rebalance(model, rebalance_experts(SKEWED[:1], 12, 4, 2, 2), opt)
        loss_plain = float(step(plain, opt_plain, batch)["loss"])
        metrics = step(model, opt, batch)
        assert float(metrics["loss"]) == pytest.approx(loss_plain, rel=1e-5)
    for moe, ref in zip(model.moe_layers(), plain.moe_layers()):
        w = np.asarray(moe.w_up[...])
        np.testing.assert_allclose(w, np.asarray(ref.w_up[...])[np.asarray(moe.phy2log[...])],
                                   rtol=1e-4, atol=1e-6)
        for e in range(cfg.num_experts):  # replicas bit-identical
            slots = np.asarray(moe.log2phy[...][e, :int(moe.logcnt[...][e])])
            assert (w[slots] == w[slots[0]]).all()


def test_replicas_share_an_experts_tokens():
    cfg = DeepSeekConfig.tiny(**SMALL)
    moe = RedundantMoE(DeepSeekMoE(cfg, rngs=nnx.Rngs(0)), 11)  # experts 0..2 get 2 slots
    assert moe.logcnt[...].tolist() == [2, 2, 2, 1, 1, 1, 1, 1]
    idx = jnp.broadcast_to(jnp.array([0, 5], jnp.int32), (4, 250, 2))
    slot = np.asarray(moe.slots(idx))
    assert set(np.unique(slot[..., 1])) == {5}
    hits = np.bincount(slot[..., 0].ravel(), minlength=11)
    assert set(np.nonzero(hits)[0]) == {0, 8} and abs(hits[0] - 500) < 60  # 1000 tokens, 2 ways


def test_hf_export_after_a_rebalance_saves_each_expert(tmp_path):
    """save_hf_checkpoint of a rebalanced model writes expert e's weights (a replica of it) as
    expert e, not whatever slot e holds: the reloaded plain model computes the same logits."""
    from jax_ds.models import load_hf_checkpoint, save_hf_checkpoint

    cfg = DeepSeekConfig.tiny(**SMALL)
    model = with_redundant_experts(Transformer(cfg, rngs=nnx.Rngs(0)), 12)
    rebalance(model, rebalance_experts(SKEWED, 12, 4, 2, 2))
    save_hf_checkpoint(model, tmp_path)
    back = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    np.testing.assert_allclose(back(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_round_robin_plan_and_bad_uses():
    phy2log, log2phy, logcnt = round_robin_plan(4, 6)
    assert phy2log.tolist() == [0, 1, 2, 3, 0, 1] and logcnt.tolist() == [2, 2, 1, 1]
    assert log2phy.tolist() == [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]
    cfg = DeepSeekConfig.tiny(**SMALL)
    with pytest.raises(ValueError, match="num_replicas=6 must be an int >= num_experts=8"):
        RedundantMoE(DeepSeekMoE(cfg, rngs=nnx.Rngs(0)), 6)
    mesh = make_mesh(expert=8, devices=CPU)
    with pytest.raises(ValueError, match="num_experts=12 is not divisible"):
        RedundantMoE(DeepSeekMoE(cfg, rngs=nnx.Rngs(0), mesh=mesh), 12)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="with_redundant_experts"):
        rebalance(model, rebalance_experts(SKEWED, 8, 4, 2, 2))
    with_redundant_experts(model, 12)
    with pytest.raises(ValueError, match=r"do not fit the model: expected \[2, 12\]"):
        rebalance(model, rebalance_experts(SKEWED, 16, 4, 2, 2))


def test_expert_load_moving_average():
    load = init_expert_load(2, 3)
    counts = jnp.array([[3, 0, 1], [2, 2, 2]])
    update = jax.jit(update_expert_load, static_argnames="decay")
    load = update(load, counts, decay=0.5)
    np.testing.assert_array_equal(load.average, counts)  # first step: the counts themselves
    load = update(load, counts * 3, decay=0.5)
    np.testing.assert_allclose(load.average, counts * 2.0)
    assert int(load.steps) == 2
    with pytest.raises(ValueError, match="decay=1.0 must be in"):
        update_expert_load(load, counts, decay=1.0)
    with pytest.raises(ValueError, match=r"counts have shape \(3,\)"):
        update_expert_load(load, counts[0])
