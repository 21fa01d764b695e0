"""Batched generation over the paged KV cache: prefill, then one token per sequence per step.

    from jax_ds.models import generate
    out = generate.generate(model, [[1, 2, 3], [7, 8]], max_new_tokens=16)             # greedy
    out = generate.generate(model, prompts, 16, temperature=0.7, top_k=50, key=jax.random.key(0),
                            eos_id=tokenizer_eos)

Prompts may differ in length. Each sequence gets a cache slot with blocks for its prompt plus
`max_new_tokens` rows; prompts of one length are prefilled together in one `Transformer.decode`
call (its logits at the last prompt token give the first new token), then every step decodes the
last token of all sequences at once ([B, 1]: MLA decode over the cache, the CUDA kernel on a GPU
where `jax_ds.ops.mla_decode` takes it). The cache is donated to each step, so it is updated in
place. A sequence that produced `eos_id` is finished: its later tokens are dropped from the result
(it still rides along in the batch, shapes stay static), and the loop ends once all are finished.

Sampling (`sample`): temperature 0 is greedy (argmax, ties to the lowest id); otherwise the
logits are divided by the temperature, cut to the `top_k` largest (ties at the k-th value kept)
and/or to the smallest set whose probability reaches `top_p`, and one token is drawn per row with
`jax.random.categorical`. The key of step i is `fold_in(key, i)`: the same key and inputs give the
same tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ds.models import kv_cache
from jax_ds.ops._checks import is_int


def sample(logits_BV, key=None, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None):
    """One token id per row of logits [B, V] (int32 [B]); see the module docstring.

    temperature 0 takes the argmax and needs no key; a positive one needs `key`.
    """
    _check_sampling("sample", temperature, top_k, top_p)
    if logits_BV.ndim != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits_BV.shape)}")
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample: temperature > 0 draws tokens: pass key (a jax.random key)")
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        keep_sorted = before < top_p                 # the first token is always kept
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(op, temperature, top_k, top_p):
    """top_k past the vocabulary keeps every token (no error)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{op}: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k):
        raise ValueError(f"{op}: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"{op}: top_p must be None or a number in (0, 1], got {top_p!r}")


def _prompts(op: str, model, prompts) -> list[np.ndarray]:
    """The prompts as int32 rows, each checked by the model's own token check (an integer 1-D
    sequence of >= 1 ids in [0, vocab_size))."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"{op}: an array of prompts must be [B, T], got shape {arr.shape}")
        rows = list(arr)
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [np.asarray(p) for p in prompts]
    else:
        raise TypeError(f"{op}: prompts must be a list of token id sequences or a [B, T] array, "
                        f"got {type(prompts).__name__}")
    if not rows:
        raise ValueError(f"{op}: no prompts")
    for i, row in enumerate(rows):
        model._check_tokens(f"{op}: prompt {i}", row[None])  # [1, T]
    return [row.astype(np.int32) for row in rows]


@functools.partial(nnx.jit, static_argnames=("temperature", "top_k", "top_p"),
                   donate_argnames="cache")
def _step(model, tokens_BT, cache, seqs_B, key, *, temperature, top_k, top_p):
    """Decodes tokens [B, T] of slots seqs_B and samples the token after each row's last one."""
    logits_BTV, cache = model.decode(tokens_BT, cache, seqs_B)
    return sample(logits_BTV[:, -1], key, temperature=temperature, top_k=top_k,
                  top_p=top_p), cache


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, key=None,
             eos_id: int | None = None, fp8_cache: bool = False, cache_dtype=None,
             callback: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
    """Generates up to `max_new_tokens` tokens after each prompt; returns them per prompt.

    model: a `jax_ds.models.Transformer`.
    prompts: B token id sequences (lengths may differ; each >= 1 id in [0, vocab_size)) or an int
        [B, T] array.
    temperature / top_k / top_p: see `sample`; temperature > 0 needs `key` (a jax.random key).
    eos_id: a sequence ends after producing it (the eos token is included in its result).
    fp8_cache: cache rows in FlashMLA's FP8 layout (`kv_cache.init_cache(fp8=True)`).
    cache_dtype: the cache's dtype (default: the model's activation dtype).
    callback(step, tokens_B): called after each step with the new token of every sequence
        (numpy int32 [B]; step 0 is the prefill's; the entries of sequences finished at an
        earlier step mean nothing), e.g. to stream text or drive a progress bar.

    Raises ValueError / TypeError for bad arguments before anything runs, and kv_cache.check's
    RuntimeError if the cache reports an error (it is sized so that it cannot run out).
    """
    op = "generate"
    cfg = model.cfg
    rows = _prompts(op, model, prompts)
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(op, temperature, top_k, top_p)
    if temperature > 0 and key is None:
        raise ValueError(f"{op}: temperature > 0 draws tokens: pass key (a jax.random key)")
    if eos_id is not None and (not is_int(eos_id) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"{op}: eos_id must be None or an id in [0, {cfg.vocab_size}), got "
                         f"{eos_id!r}")
    max_new_tokens = int(max_new_tokens)
    b = len(rows)
    if max_new_tokens == 0:
        return [[] for _ in range(b)]
    key = jax.random.key(0) if key is None else key  # unused when greedy
    sampling = dict(temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p))

    # Blocks for every row a sequence will hold; the last step's token is never fed back.
    blocks = [-(-(len(r) + max_new_tokens - 1) // kv_cache.BLOCK_SIZE) for r in rows]
    cache = model.init_cache(num_blocks=sum(blocks), max_seqs=b, max_blocks_per_seq=max(blocks),
                             dtype=cache_dtype, fp8=fp8_cache)

    # Prefill: one call per distinct prompt length, its sequences together.
    last = np.zeros((b,), np.int32)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    for group, seqs in enumerate(by_length.values()):
        tokens = jnp.asarray(np.stack([rows[i] for i in seqs]))
        group_key = jax.random.fold_in(jax.random.fold_in(key, 0), group)
        first, cache = _step(model, tokens, cache, jnp.asarray(seqs, jnp.int32), group_key,
                             **sampling)
        last[seqs] = np.asarray(first)

    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros((b,), bool)
    all_seqs = jnp.arange(b, dtype=jnp.int32)
    for step in range(max_new_tokens):
        if step:
            nxt, cache = _step(model, jnp.asarray(last[:, None]), cache, all_seqs,
                               jax.random.fold_in(key, step), **sampling)
            last = np.asarray(nxt)
        for i in np.flatnonzero(~done):
            out[i].append(int(last[i]))
        if eos_id is not None:
            done |= last == eos_id
        if callback is not None:
            callback(step, last.copy())
        if done.all():
            break
    kv_cache.check(cache)
    return out
