"""The DeepSeek transformer: embedding, `Block`s (MLA + dense or MoE FFN), head, optional MTP.

Also the training objective and step, since both depend on what the model returns: next-token
cross-entropy, the MTP loss (V3 sec. 2.2, weight lambda), the sequence-wise balance loss (weight
alpha), and the aux-loss-free router-bias update applied after the optimizer, outside the gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jax_ds.models import kv_cache
from jax_ds.models.config import DeepSeekConfig
from jax_ds.models.layers import MLP, Dense, RMSNorm
from jax_ds.models.mla import MLAttention
from jax_ds.models.moe import DeepSeekMoE, MoEStats, update_router_bias
from jax_ds.ops._checks import concrete, is_int


class Block(nnx.Module):
    """Pre-norm residual block: x + MLA(norm x), then + FFN(norm x), FFN dense or DeepSeekMoE."""

    def __init__(self, cfg: DeepSeekConfig, layer: int, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None):
        self.attn_norm = RMSNorm(cfg.d_model, cfg)
        self.attn = MLAttention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg)
        self.is_moe = layer >= cfg.num_dense_layers
        if self.is_moe:
            self.ffn = DeepSeekMoE(cfg, rngs=rngs, mesh=mesh)
        else:
            self.ffn = MLP(cfg.d_model, cfg.dense_hidden, cfg, rngs=rngs)

    def _ffn_residual(self, x_BTD):
        """x + FFN(norm x) -> (x, MoEStats or None for a dense layer)."""
        if self.is_moe:
            y_BTD, stats = self.ffn(self.ffn_norm(x_BTD))
            return x_BTD + y_BTD, stats
        return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None

    def __call__(self, x_BTD, positions_BT):
        """-> (x [B, T, D], MoEStats or None for a dense layer)."""
        return self._ffn_residual(x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT))

    def decode(self, x_BTD, positions_BT, cache, layer: int, seqs_B):
        """`__call__` for new tokens over a paged cache (see `MLAttention.decode`) -> (x, cache)."""
        h_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), positions_BT, cache, layer, seqs_B)
        return self._ffn_residual(x_BTD + h_BTD)[0], cache


class MTPModule(nnx.Module):
    """Depth-k multi-token prediction (V3 eq. 21-22): h' = Block(W [norm Emb(t_{i+k}); norm h]).

    Shares the embedding and output head with the main model; keeps its own output norm.
    """

    def __init__(self, cfg: DeepSeekConfig, layer: int, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None):
        self.emb_norm = RMSNorm(cfg.d_model, cfg)
        self.hidden_norm = RMSNorm(cfg.d_model, cfg)
        self.proj = Dense(2 * cfg.d_model, cfg.d_model, cfg, rngs=rngs)
        self.block = Block(cfg, layer, rngs=rngs, mesh=mesh)
        self.norm = RMSNorm(cfg.d_model, cfg)

    def __call__(self, h_BTD, emb_BTD, positions_BT):
        # Embedding first, as in the released checkpoints (eh_proj's input order).
        x = self.proj(jnp.concatenate([self.emb_norm(emb_BTD), self.hidden_norm(h_BTD)], -1))
        return self.block(x, positions_BT)


class ModelAux(NamedTuple):
    """What a forward pass returns besides the logits (MoE layers in order, MTP layers last)."""
    expert_counts: jax.Array   # [L_moe, E] int32: per-expert assignments (bias update, EPLB)
    dropped: jax.Array         # [L_moe] int32: assignments dropped by an EP capacity budget
    balance_loss: jax.Array    # [] float32: sequence-wise balance loss summed over MoE layers
    mtp_logits: tuple          # D x [B, T, V]: depth k predicts the token k+1 ahead of targets


class Transformer(nnx.Module):
    """tokens [B, T] -> logits [B, T, V]. `forward` also returns `ModelAux`.

    With a mesh, routed experts run expert-parallel over its `expert` axis and token batches are
    split over (data, expert); place parameters with `jax_ds.parallel.mesh.shard_model`.
    """

    def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        self.embed = nnx.Param(cfg.init_std * jax.random.normal(
            rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.weight_dtype))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs, mesh=mesh)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg)
        # The output head stays out of FP8, as in V3 (sec. 3.3.1).
        self.head = Dense(cfg.d_model, cfg.vocab_size, cfg.replace(fp8=False, fp8_weights=False),
                          rngs=rngs)
        self.mtp = nnx.List([MTPModule(cfg, cfg.num_layers + k, rngs=rngs, mesh=mesh)
                             for k in range(cfg.mtp_depth)])

    def moe_layers(self) -> list[DeepSeekMoE]:
        """The MoE layers in `ModelAux.expert_counts` order."""
        blocks = list(self.blocks) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.is_moe]

    def _embed(self, tokens_BT):
        return self.embed[...].astype(self.cfg.activation_dtype)[tokens_BT]

    def _check_tokens(self, op: str, tokens_BT) -> tuple[int, int]:
        """tokens must be an integer [B, T] array, B, T >= 1, ids in [0, vocab_size) (checked
        when concrete; traced ids outside it are clamped by the gather, as jnp indexing does).
        `op` begins each error message ("Transformer.forward", "generate: prompt 2")."""
        if not hasattr(tokens_BT, "shape") or not hasattr(tokens_BT, "dtype"):
            raise TypeError(f"{op}: tokens must be an integer array [B, T], got "
                            f"{type(tokens_BT).__name__}")
        if len(tokens_BT.shape) != 2 or min(tokens_BT.shape) < 1:
            raise ValueError(f"{op}: tokens must be [B, T] with B, T >= 1, got shape "
                             f"{tuple(tokens_BT.shape)}")
        if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise TypeError(f"{op}: tokens must hold integer ids, got dtype "
                            f"{np.dtype(tokens_BT.dtype).name}")
        ids = concrete(tokens_BT)
        if ids is not None:
            v = self.cfg.vocab_size
            if ids.min() < 0 or ids.max() >= v:
                raise ValueError(f"{op}: token ids must lie in [0, vocab_size = {v}), "
                                 f"got min {ids.min()}, max {ids.max()}")
        return tuple(tokens_BT.shape)

    def forward(self, tokens_BT, positions_BT=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, ModelAux)."""
        b, t = self._check_tokens("Transformer.forward", tokens_BT)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        elif tuple(getattr(positions_BT, "shape", ())) != (b, t):
            raise ValueError(f"Transformer.forward: positions must be [B, T] = {(b, t)} like the "
                             f"tokens, got {getattr(positions_BT, 'shape', type(positions_BT))}")
        x_BTD = self._embed(tokens_BT)
        stats: list[MoEStats] = []
        for block in self.blocks:
            x_BTD, s = block(x_BTD, positions_BT)
            stats += [s] if s is not None else []
        logits_BTV = self.head(self.norm(x_BTD)).astype(jnp.float32)
        mtp_logits, h_BTD = [], x_BTD
        for k, module in enumerate(self.mtp, start=1):
            # Position i sees token i+k (zero-padded past the end; those positions are masked).
            ahead_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, min(k, t))))
            h_BTD, s = module(h_BTD, self._embed(ahead_BT), positions_BT)
            stats += [s] if s is not None else []
            mtp_logits.append(self.head(module.norm(h_BTD)).astype(jnp.float32))
        e = self.cfg.num_experts
        aux = ModelAux(
            expert_counts=jnp.stack([s.counts for s in stats]) if stats
            else jnp.zeros((0, e), jnp.int32),
            dropped=jnp.stack([s.dropped for s in stats]) if stats else jnp.zeros((0,), jnp.int32),
            balance_loss=sum((s.balance_loss for s in stats), jnp.zeros((), jnp.float32)),
            mtp_logits=tuple(mtp_logits))
        return logits_BTV, aux

    def __call__(self, tokens_BT, positions_BT=None):
        return self.forward(tokens_BT, positions_BT)[0]

    # ------------------------------------------------------------------------- inference

    def init_cache(self, num_blocks: int, max_seqs: int, max_blocks_per_seq: int,
                   dtype=None, *, fp8: bool = False) -> kv_cache.PagedKVCache:
        """An empty paged cache for this model: rows of kv_lora_rank + qk_rope_dim per layer
        (fp8=True: FlashMLA's FP8 rows, for V2/V3's 512 + 64; see `kv_cache.init_cache`)."""
        cfg = self.cfg
        return kv_cache.init_cache(cfg.num_layers, num_blocks, max_seqs, max_blocks_per_seq,
                                   cfg.kv_lora_rank + cfg.qk_rope_dim,
                                   dtype or cfg.activation_dtype, fp8=fp8)

    def decode(self, tokens_BT, cache: kv_cache.PagedKVCache, seqs_B):
        """Runs T new tokens of the sequences in cache slots `seqs_B` [B] after what they hold.

        Prefill (the prompt, T = its length) and each generation step (T = 1, or more for MTP
        drafts) are the same call: positions continue from cache.lengths, the new tokens attend
        causally to each other and to the cached prefix (MLA decode with absorbed weights), and
        their rows are appended. The MTP modules are not run.

        Returns (logits [B, T, V] float32, cache); check `cache.error` (kv_cache.check) outside
        jit if the pool may run out of blocks or a sequence outgrow max_blocks_per_seq * 64 rows
        (eagerly too: no error is raised; the logits of tokens whose rows were dropped are then
        meaningless).
        """
        b, t = self._check_tokens("Transformer.decode", tokens_BT)
        seqs_B = jnp.asarray(seqs_B, jnp.int32)
        if seqs_B.shape != (b,):
            raise ValueError(f"Transformer.decode: seqs must be [B] = ({b},) cache slots, one per "
                             f"row of tokens {tuple(tokens_BT.shape)}, got shape {seqs_B.shape}")
        positions_BT = cache.lengths[seqs_B][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        cache = kv_cache.reserve(cache, seqs_B, t)
        x_BTD = self._embed(tokens_BT)
        for layer, block in enumerate(self.blocks):
            x_BTD, cache = block.decode(x_BTD, positions_BT, cache, layer, seqs_B)
        cache = kv_cache.commit(cache, seqs_B, t)
        return self.head(self.norm(x_BTD)).astype(jnp.float32), cache


# ----------------------------------------------------------------------------- pipeline


class PipelineStages:
    """A Transformer cut for `jax_ds.parallel.pipeline`: every block one stage, the blocks'
    parameters stacked [num_layers, ...] (`blocks`), the final norm + output head the pipeline's
    loss (`loss(head, y, targets)` with `head` = {"norm", "head"} parameters). The embedding
    stays outside the pipeline. Stacking needs blocks of one structure: every layer an MoE
    layer (`num_dense_layers=0`)."""

    def __init__(self, model: Transformer):
        defs = {nnx.graphdef(b) for b in model.blocks}
        if len(defs) != 1:
            raise ValueError(f"PipelineStages: the {len(model.blocks)} blocks differ in structure "
                             f"(num_dense_layers={model.cfg.num_dense_layers}); a pipeline "
                             f"stacks one stage structure, so use num_dense_layers=0")
        (self.block_def,) = defs
        self.norm_def, self.head_def = nnx.graphdef(model.norm), nnx.graphdef(model.head)
        self.blocks = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in model.blocks])
        self.head = {"norm": nnx.state(model.norm), "head": nnx.state(model.head)}

    def stage(self, block, x_BTD):
        positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
        return nnx.merge(self.block_def, block)(x_BTD, positions_BT)[0]

    def loss(self, head, y_BTD, targets_BT):
        norm = nnx.merge(self.norm_def, head["norm"])
        logits_BTV = nnx.merge(self.head_def, head["head"])(norm(y_BTD))
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_BTV.astype(jnp.float32), targets_BT).mean()


# ----------------------------------------------------------------------------- training


def lm_loss(model: Transformer, tokens_BS):
    """Next-token loss on tokens [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]).

    loss = CE + lambda * mean_k CE_mtp_k + alpha * balance. Returns (loss, metrics dict). A depth
    k >= T has no targets: it is left out of the mean (mtp_ce is 0 when no depth has any).
    """
    cfg = model.cfg
    inputs_BT, targets_BT = tokens_BS[:, :-1], tokens_BS[:, 1:]
    logits_BTV, aux = model.forward(inputs_BT)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    loss = ce + cfg.balance_loss_weight * aux.balance_loss
    mtp_ce = jnp.zeros((), jnp.float32)
    t = inputs_BT.shape[1]
    depths = [(k, mtp_BTV) for k, mtp_BTV in enumerate(aux.mtp_logits, start=1) if k < t]
    for k, mtp_BTV in depths:
        # Depth k at position i predicts targets[i + k]; the last k positions have no target.
        target_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)))
        valid_T = (jnp.arange(t) < t - k).astype(jnp.float32)
        token_ce = optax.softmax_cross_entropy_with_integer_labels(mtp_BTV, target_BT)
        mtp_ce += (token_ce * valid_T).sum() / (valid_T.sum() * inputs_BT.shape[0])
    if depths:
        mtp_ce = mtp_ce / len(depths)
        loss = loss + cfg.mtp_loss_weight * mtp_ce
    metrics = dict(loss=loss, ce=ce, mtp_ce=mtp_ce, balance_loss=aux.balance_loss,
                   expert_counts=aux.expert_counts, dropped=aux.dropped.sum())
    return loss, metrics


def apply_router_bias_update(model: Transformer, expert_counts_LE, rate: float | None = None):
    """b += rate * sign(mean - load) in every MoE layer; outside the gradient, after the step."""
    rate = model.cfg.bias_update_rate if rate is None else rate
    for i, moe in enumerate(model.moe_layers()):
        if moe.router.bias is not None and rate:
            moe.router.bias[...] = update_router_bias(moe.router.bias[...], expert_counts_LE[i],
                                                      rate)


_SUMMED_METRICS = ("expert_counts", "dropped")  # counts add up over micro-batches; the rest average


def train_step(model: Transformer, optimizer: nnx.Optimizer, tokens_BS, microbatches: int = 1):
    """One optimizer step on tokens [B, T+1]; wrap in `nnx.jit` (with `microbatches` static).
    Returns the metrics dict.

    Gradients are taken w.r.t. `nnx.Param` only: the router biases (`RouterBias`) are moved by
    the load-balance rule afterwards, never by the optimizer.

    microbatches: the batch is cut into this many equal parts (B divisible by it; part i holds
      rows i, i + microbatches, ..., so a batch sharded in contiguous blocks keeps every part on
      every device) and their gradients are averaged in the same program. The parts are
      independent until that sum, so XLA's scheduler may run one part's expert all-to-all
      under another's compute, DeepSeek-V3's two-micro-batch overlap. The step equals the
      whole batch's wherever the loss is a mean over tokens or sequences (CE, MTP, the
      sequence-wise balance loss); capacity limits apply per part. Loss-like metrics are the
      parts' mean, expert counts and drops their sum.
    """
    if not is_int(microbatches) or microbatches < 1:
        raise ValueError(f"train_step: microbatches must be an int >= 1, got {microbatches!r}")
    b = tokens_BS.shape[0]
    if b % microbatches:
        raise ValueError(f"train_step: batch size {b} is not a multiple of microbatches "
                         f"{microbatches}")
    grad_fn = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
    if microbatches == 1:
        (_, metrics), grads = grad_fn(model, tokens_BS)
    else:
        parts_BKS = tokens_BS.reshape(b // microbatches, microbatches, *tokens_BS.shape[1:])
        parts = [grad_fn(model, parts_BKS[:, i]) for i in range(microbatches)]
        grads = jax.tree.map(lambda *g: sum(g) / microbatches, *[g for _, g in parts])
        metrics = {}
        for key in parts[0][0][1]:
            total = sum(m[key] for (_, m), _ in parts)
            metrics[key] = total if key in _SUMMED_METRICS else total / microbatches
    optimizer.update(model, grads)
    apply_router_bias_update(model, metrics["expert_counts"])
    return metrics


# ----------------------------------------------------------------------------- sizes


def param_counts(cfg: DeepSeekConfig) -> dict[str, int]:
    """Parameter counts from shapes alone (`nnx.eval_shape`: nothing is allocated).

    Returns dict with
      total      main model (embedding, layers, norm, head), MTP modules excluded;
      activated  per token in the main model: total minus the routed experts a token skips and
                 minus the input embedding (a row lookup, no compute), the convention that gives
                 the published 37B (V3) and 2.4B (V2-Lite);
      mtp        the MTP modules' own parameters (they share embedding and head);
      embedding  the input embedding (a released checkpoint stores it again in each MTP
                 module, with the head: V3's 685B = 671B + MTP + those copies).
    Router biases are buffers, not parameters, and are not counted.
    """
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    sizes = {"total": 0, "mtp": 0, "routed": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        keys = [str(next(getattr(p, a) for a in ("key", "name", "idx") if hasattr(p, a)))
                for p in path]
        n = int(leaf.size)
        if keys[0] == "mtp":
            sizes["mtp"] += n
            continue
        sizes["total"] += n
        if keys[-2 if keys[-1] == "value" else -1] in ("w_gate", "w_up", "w_down"):
            sizes["routed"] += n
    skipped = sizes["routed"] * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    embedding = cfg.vocab_size * cfg.d_model
    return dict(total=sizes["total"], activated=sizes["total"] - skipped - embedding,
                mtp=sizes["mtp"], embedding=embedding)
