"""Router: group-limited top-k, the selection-only bias, its update rule, counts, balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_ds.models import (DeepSeekConfig, Router, RouterBias, Transformer, balance_loss,
                           train_step, update_router_bias)


def make_router(e=8, groups=4, topk_groups=2, k=2, **changes):
    """A router whose logits equal its input (weight = identity, d_model = E)."""
    cfg = DeepSeekConfig.tiny(d_model=e, num_experts=e, num_groups=groups,
                              topk_groups=topk_groups, top_k=k, **changes)
    router = Router(cfg, rngs=nnx.Rngs(0))
    router.weight[...] = jnp.eye(e)
    return router


def logit(p):
    return float(np.log(p / (1 - p)))


def test_group_limit_uses_top2_sum_per_group():
    # Groups of 2. Group 0 holds the single best expert (0.99) but a poor partner (0.01);
    # groups 1 and 2 hold two good experts each, so V3's top-2-sum group score drops group 0.
    p = [0.99, 0.01, 0.8, 0.8, 0.7, 0.7, 0.1, 0.1]
    router = make_router()
    idx, w, scores = router(jnp.asarray([[[logit(v) for v in p]]]))
    assert set(np.asarray(idx).ravel()) == {2, 3}
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)  # normalised, scaling 1
    # Without group limiting, the best single expert wins.
    idx, _, _ = make_router(groups=1, topk_groups=1)(jnp.asarray([[[logit(v) for v in p]]]))
    assert 0 in set(np.asarray(idx).ravel())


def test_selected_experts_lie_in_topk_groups():
    e, groups, topk_groups, k = 16, 8, 3, 4
    router = make_router(e, groups, topk_groups, k)
    x = jax.random.normal(jax.random.key(0), (4, 64, e)) * 3
    idx, _, _ = router(x)
    groups_used = np.asarray(idx) // (e // groups)
    for row in groups_used.reshape(-1, k):
        assert len(set(row)) <= topk_groups
    assert len(set(np.asarray(idx).ravel())) > topk_groups * (e // groups)  # varies by token


def test_bias_steers_selection_but_not_weights():
    p = np.array([0.9, 0.8, 0.3, 0.2])
    router = make_router(e=4, groups=1, topk_groups=1, k=2, routed_scaling=2.5)
    x = jnp.asarray([[[logit(v) for v in p]]])
    idx, w, _ = router(x)
    assert set(np.asarray(idx).ravel()) == {0, 1}
    router.bias[...] = jnp.asarray([0.0, 0.0, 1.0, 0.0])  # expert 2 now beats expert 1
    idx, w, scores = router(x)
    assert set(np.asarray(idx).ravel()) == {0, 2}
    # Gate values come from the raw scores: 0.9 and 0.3, normalised, times the scaling.
    got = dict(zip(np.asarray(idx).ravel().tolist(), np.asarray(w).ravel().tolist()))
    np.testing.assert_allclose([got[0], got[2]], [2.5 * 0.9 / 1.2, 2.5 * 0.3 / 1.2], rtol=1e-5)


def test_softmax_router_v2_style():
    router = make_router(e=4, groups=2, topk_groups=1, k=2, score_func="softmax",
                         norm_topk_prob=False, router_bias=False, bias_update_rate=0.0,
                         routed_scaling=1.0)
    assert router.bias is None
    x = jnp.asarray([[[3.0, -5.0, 2.0, 2.0]]])  # group 0's max (3.0) beats group 1's (2.0)
    idx, w, scores = router(x)
    assert set(np.asarray(idx).ravel()) == {0, 1}
    np.testing.assert_allclose(w, jnp.take_along_axis(scores, idx, -1), rtol=1e-6)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-6)


def test_bias_update_is_sign_of_load_error():
    bias = jnp.asarray([0.0, 0.1, -0.1, 0.0])
    counts = jnp.asarray([10, 0, 5, 5])  # mean 5
    np.testing.assert_allclose(update_router_bias(bias, counts, 0.01),
                               [-0.01, 0.11, -0.1, 0.0], atol=1e-7)


def test_balance_loss_is_one_when_balanced():
    e, t = 4, 8  # top-2
    scores = jnp.ones((1, t, e))  # uniform affinities: P_i = 1/E
    idx = jnp.asarray([[[i % e, (i + 1) % e] for i in range(t)]])  # every expert 4 times
    np.testing.assert_allclose(balance_loss(scores, idx, e), 1.0, rtol=1e-6)
    # All load and all affinity on experts 0 and 1: f = (2, 2, 0, 0), P = (1/2, 1/2, 0, 0).
    skewed = jnp.zeros_like(idx).at[..., 1].set(1)
    peaked = jnp.zeros_like(scores).at[..., :2].set(1.0)
    assert float(balance_loss(peaked, skewed, e)) == pytest.approx(2.0)


def test_train_step_moves_bias_outside_the_gradient():
    cfg = DeepSeekConfig.tiny(d_model=32, expert_hidden=16, num_layers=2, q_lora_rank=16,
                              kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8,
                              dense_hidden=64, bias_update_rate=0.01)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    # The optimizer holds no state for the biases, so it cannot move them.
    opt_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))
    assert not any("bias" in jax.tree_util.keystr(path) for path, _ in opt_leaves)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    metrics = nnx.jit(train_step)(model, optimizer, tokens)
    counts = np.asarray(metrics["expert_counts"])
    assert counts.shape == (cfg.num_moe_layers, cfg.num_experts)
    assert (counts.sum(-1) == 4 * 16 * cfg.top_k).all()  # every MoE layer reports its counts
    bias = np.asarray(model.moe_layers()[0].router.bias[...])
    np.testing.assert_allclose(bias, 0.01 * np.sign(counts[0].mean() - counts[0]), atol=1e-7)
    assert isinstance(model.moe_layers()[0].router.bias, RouterBias)


# ----------------------------------------------------------------------------- against DeepSeek
# A numpy re-statement of DeepSeek's public gates: the V3 inference `Gate` and the Hugging Face
# `MoEGate` of DeepSeek-V2 (greedy / group_limited_greedy) and -V3 (noaux_tc).

GATE_FIELDS = ("num_groups", "topk_groups", "top_k", "score_func", "norm_topk_prob",
               "routed_scaling")


def deepseek_gate(logits_NE, bias_E, *, score_func, num_groups, topk_groups, top_k,
                  norm_topk_prob, routed_scaling, margin=1e-4):
    """(topk_idx [N, K] sorted ascending, weights [N, K] aligned, clear [N] bool), float64.

    Selection uses score + bias; groups are ranked by their top-2 biased sum when there is a bias
    (V3), else by their best score (V2); experts of other groups are excluded. Weights are the
    unbiased scores. Sigmoid (V3's inference Gate): normalised when norm_topk_prob, then times
    routed_scaling. Softmax (V2's MoEGate): normalised when top_k > 1 and norm_topk_prob, else
    times routed_scaling -- never both. `clear` marks rows free of near-ties at the group and
    expert cut-offs, where float32 rounding could legitimately pick differently.
    """
    x = np.asarray(logits_NE, np.float64)
    if score_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-x))
    else:
        s = np.exp(x - x.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    choice = s if bias_E is None else s + np.asarray(bias_E, np.float64)
    n, e = choice.shape
    clear = np.ones(n, bool)
    if num_groups > 1:
        grouped = choice.reshape(n, num_groups, e // num_groups)
        ranked = np.sort(grouped, -1)
        group = ranked[..., -2:].sum(-1) if bias_E is not None else ranked[..., -1]
        order = np.sort(group, -1)[:, ::-1]
        if topk_groups < num_groups:
            clear &= order[:, topk_groups - 1] - order[:, topk_groups] > margin
        kept = group >= order[:, topk_groups - 1:topk_groups]
        choice = np.where(np.repeat(kept, e // num_groups, -1), choice, -np.inf)
    best = np.sort(choice, -1)[:, ::-1]
    clear &= best[:, top_k - 1] - best[:, top_k] > margin
    idx = np.sort(np.argsort(-choice, -1)[:, :top_k], -1)
    w = np.take_along_axis(s, idx, -1)
    # Stated branch by branch as the two gates do it, not as the Router folds them together.
    if score_func == "sigmoid":            # V3: normalised, then scaled
        if norm_topk_prob:
            w = w / w.sum(-1, keepdims=True)
        w = w * routed_scaling
    elif top_k > 1 and norm_topk_prob:     # V2's MoEGate: normalised ...
        w = w / w.sum(-1, keepdims=True)
    else:                                  # ... or scaled
        w = w * routed_scaling
    return idx, w, clear


def check_against_deepseek(cfg, seed, n=512, bias_scale=0.1):
    router = make_router(cfg.num_experts, cfg.num_groups, cfg.topk_groups, cfg.top_k,
                         score_func=cfg.score_func, norm_topk_prob=cfg.norm_topk_prob,
                         routed_scaling=cfg.routed_scaling, router_bias=cfg.router_bias,
                         bias_update_rate=cfg.bias_update_rate)
    rng = np.random.default_rng(seed)
    bias = None
    if router.bias is not None:
        bias = (rng.standard_normal(cfg.num_experts) * bias_scale).astype(np.float32)
        router.bias[...] = jnp.asarray(bias)
    logits = (rng.standard_normal((n, cfg.num_experts)) * 2).astype(np.float32)
    idx, w, _ = router(jnp.asarray(logits)[None])
    idx, w = np.asarray(idx)[0], np.asarray(w)[0]
    order = np.argsort(idx, -1)
    idx, w = np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)
    want_idx, want_w, clear = deepseek_gate(
        logits, bias, **{f: getattr(cfg, f) for f in GATE_FIELDS})
    assert clear.mean() > 0.9  # the test is about routing, not about ties
    np.testing.assert_array_equal(idx[clear], want_idx[clear])
    np.testing.assert_allclose(w[clear], want_w[clear], rtol=2e-5, atol=1e-7)


V2 = DeepSeekConfig.v2_lite()


@pytest.mark.parametrize("name,cfg", [
    ("v3", DeepSeekConfig.v3()),
    ("tiny", DeepSeekConfig.tiny()),
    ("v3_no_groups", DeepSeekConfig.v3(num_groups=1, topk_groups=1)),
    ("v3_top1", DeepSeekConfig.v3(top_k=1)),
    ("sigmoid_no_bias", DeepSeekConfig.v3(router_bias=False, bias_update_rate=0.0)),
    ("v2_lite_greedy", V2),
    # DeepSeek-V2 (236B): 160 experts, group_limited_greedy over 8 groups, top-3 groups, x16.
    ("v2_group_limited", V2.replace(num_experts=160, num_groups=8, topk_groups=3,
                                    routed_scaling=16.0)),
    # DeepSeek-V2's MoEGate scales only gates it did not normalise.
    ("v2_norm", V2.replace(norm_topk_prob=True, routed_scaling=16.0)),
    ("v2_norm_top1", V2.replace(top_k=1, norm_topk_prob=True, routed_scaling=16.0)),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_matches_deepseek_gate(name, cfg, seed):
    check_against_deepseek(cfg, seed)


def test_router_matches_deepseek_gate_with_negative_biased_scores():
    # Large biases push some biased scores below 0: excluded groups must still lose (-inf, as in
    # DeepSeek's V3 inference Gate), not tie at 0.
    check_against_deepseek(DeepSeekConfig.v3(), seed=3, bias_scale=1.0)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_balance_loss_matches_deepseek_seq_aux(score_func):
    # V2 MoEGate's seq_aux loss (without alpha) = V3 eq. 17-20: per sequence, the hit counts
    # scaled by E / (T K) times the mean normalised affinity, summed over experts; mean over B.
    b, t, e, k = 3, 40, 16, 4
    router = make_router(e, 4, 2, k, score_func=score_func)
    x = jax.random.normal(jax.random.key(7), (b, t, e)) * 2
    idx, _, scores = router(x)
    s = np.asarray(scores, np.float64)
    s = s / s.sum(-1, keepdims=True)  # V3's s'; softmax scores already sum to 1
    hits = np.zeros((b, e))
    for bi in range(b):
        np.add.at(hits[bi], np.asarray(idx)[bi].ravel(), 1.0)
    want = ((hits / (t * k / e)) * s.mean(1)).sum(-1).mean()
    np.testing.assert_allclose(balance_loss(scores, idx, e), want, rtol=1e-5)
