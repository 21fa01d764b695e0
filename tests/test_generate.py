"""`jax_ds.models.generate`: batched generation over the paged cache against a loop of full
forward passes without a cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ds.models import DeepSeekConfig, Transformer
from jax_ds.models.generate import generate, sample

SMALL = dict(d_model=32, expert_hidden=16, num_layers=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, dense_hidden=64)


@pytest.fixture(scope="module")
def model():
    return Transformer(DeepSeekConfig.tiny(**SMALL), rngs=nnx.Rngs(3))


def is_greedy_continuation(model, prompt, tokens):
    """The oracle: one full forward pass (no cache) of prompt + tokens; causal, so its logits at
    each position see only what came before, and greedy decoding picked their argmax."""
    seq = jnp.asarray([list(prompt) + list(tokens)], jnp.int32)
    logits = np.asarray(model(seq))[0, len(prompt) - 1:-1]
    return list(np.argmax(logits, axis=-1)) == list(tokens)


def test_greedy_batch_of_unequal_prompts_matches_full_forward(model):
    """Prompts of 60, 3 and 60 ids (two prefill calls), 9 new tokens: the first sequence crosses
    a 64-row block; each equals its own no-cache greedy loop and its own generate call."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, 60), rng.integers(0, 256, 3), rng.integers(0, 256, 60)]
    got = generate(model, prompts, 9)
    assert [len(g) for g in got] == [9, 9, 9]
    for prompt, tokens in zip(prompts, got):
        assert is_greedy_continuation(model, prompt, tokens)
    assert generate(model, [prompts[1]], 9) == [got[1]]


def test_eos_ends_a_sequence_and_the_callback_sees_every_step(model):
    prompts = np.asarray([[5, 6, 7], [9, 10, 11]], np.int32)  # an array of prompts
    free = generate(model, prompts, 6)
    eos = free[0][2]
    steps = []
    got = generate(model, prompts, 6, eos_id=eos, callback=lambda i, t: steps.append((i, t)))
    first = free[0].index(eos)
    assert got[0] == free[0][:first + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 6
    assert got[1] == free[1][:cut]
    assert [i for i, _ in steps] == list(range(max(first + 1, cut)))
    assert [int(t[1]) for _, t in steps][:cut] == got[1]


def test_sampling_is_reproducible_and_its_limits_reduce_to_greedy(model):
    prompts = [[1, 2, 3, 4], [200, 100]]
    greedy = generate(model, prompts, 5)
    key = jax.random.key(7)
    hot = generate(model, prompts, 5, temperature=1.5, key=key)
    assert hot == generate(model, prompts, 5, temperature=1.5, key=key)
    assert hot != generate(model, prompts, 5, temperature=1.5, key=jax.random.key(8))
    assert generate(model, prompts, 5, temperature=1.0, top_k=1, key=key) == greedy
    assert generate(model, prompts, 5, temperature=1.0, top_p=1e-6, key=key) == greedy


def test_sample_top_k_and_top_p_cut_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 3)
    k2 = np.asarray(sample(logits, keys[0], temperature=1.0, top_k=2))
    assert set(k2) == {0, 1} and abs((k2 == 0).mean() - 0.5 / 0.8) < 0.03
    p = np.asarray(sample(logits, keys[1], temperature=1.0, top_p=0.7))  # 0.5 + 0.3 reach it
    assert set(p) == {0, 1}
    full = np.asarray(sample(logits, keys[2], temperature=1.0))
    assert set(full) == {0, 1, 2, 3}
    assert list(np.asarray(sample(jnp.asarray([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]])))) == [1, 2]


def test_zero_new_tokens_and_bad_arguments(model):
    assert generate(model, [[1], [2, 3]], 0) == [[], []]
    with pytest.raises(ValueError, match=r"^generate: prompt 1: token ids must lie in \[0, "
                                         r"vocab_size = 256\), got min 0, max 256"):
        generate(model, [[1], [0, 256]], 2)
    with pytest.raises(ValueError, match=r"prompt 0: tokens must be \[B, T\] with B, T >= 1, "
                                         r"got shape \(1, 0\)"):
        generate(model, [[]], 2)
    with pytest.raises(TypeError, match="prompt 0: tokens must hold integer ids"):
        generate(model, [[1.5]], 2)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        generate(model, [[1]], -1)
    with pytest.raises(ValueError, match="temperature > 0 draws tokens: pass key"):
        generate(model, [[1]], 2, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate(model, [[1]], 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        generate(model, [[1]], 2, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be None or a number in \(0, 1\]"):
        generate(model, [[1]], 2, top_p=0.0)
    with pytest.raises(ValueError, match=r"eos_id must be None or an id in \[0, 256\)"):
        generate(model, [[1]], 2, eos_id=256)
    with pytest.raises(TypeError, match="prompts must be a list of token id sequences"):
        generate(model, "hello", 2)
