"""DeepSeekMoE (DeepSeek-V3 sec. 2.1.2): shared experts plus fine-grained routed experts.

  Router        sigmoid (V3) or softmax (V2) affinities; node/group-limited top-k; the
                aux-loss-free bias b_i shifts *selection* only -- gate weights come from the raw
                scores -- and is moved outside the gradient by `update_router_bias`.
  expert_ffn    every routed expert's SwiGLU over its contiguous rows: three grouped GEMMs.
  DeepSeekMoE   router -> permute -> expert_ffn -> unpermute (+ shared experts); under a mesh the
                routed part runs expert-parallel (`jax_ds.parallel.expert.ep_moe`).

Each layer returns `MoEStats`: tokens per expert (for the bias update and for EPLB), rows dropped
by an EP capacity budget, and the sequence-wise balance loss.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jax_ds.models.config import DeepSeekConfig
from jax_ds.models.layers import FP8_BLOCK, MLP, init_fp8_weight, init_weight
from jax_ds.ops._checks import gemm_out_dtype, pad_to
from jax_ds.ops.grouped_gemm import grouped_fp8_gemm, grouped_fp8_linear, grouped_linear
from jax_ds.ops.moe import moe_permute, moe_unpermute
from jax_ds.ops.quant import quantize_fp8
from jax_ds.parallel.expert import check_ep, ep_moe
from jax_ds.parallel.mesh import EXPERT



class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias [E]: not an `nnx.Param`, so optimizers and grads skip it."""


class MoEStats(NamedTuple):
    counts: jax.Array        # [E] int32: assignments per routed expert in this batch
    dropped: jax.Array       # [] int32: assignments dropped by the EP capacity budget
    balance_loss: jax.Array  # [] float32: sum_i f_i P_i, averaged over sequences


class Router(nnx.Module):
    """Top-k routing with group limiting; returns expert ids, gate weights and raw scores."""

    def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
        # [E, D] float32 whatever param_dtype: routing is computed (and checkpoints keep it) in
        # float32, and a bf16 copy would move near-tied experts.
        self.weight = init_weight(rngs, (cfg.num_experts, cfg.d_model),
                                  cfg.replace(param_dtype="float32"))
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32)) \
            if cfg.router_bias else None
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.num_groups, self.topk_groups = cfg.num_groups, cfg.topk_groups
        self.score_func, self.norm_topk_prob = cfg.score_func, cfg.norm_topk_prob
        self.routed_scaling = cfg.routed_scaling

    def __call__(self, x_BTD):
        """x [B, T, D] -> (topk_idx [B,T,K] int32, topk_weights [B,T,K] f32, scores [B,T,E] f32)."""
        # Gating stays in float32 (V3 keeps it out of low precision: routing is sensitive).
        logits_BTE = jnp.einsum("BTD,ED->BTE", x_BTD.astype(jnp.float32),
                                self.weight[...].astype(jnp.float32))
        if self.score_func == "sigmoid":
            scores_BTE = jax.nn.sigmoid(logits_BTE)
        else:
            scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
        select_BTE = scores_BTE
        if self.bias is not None:
            select_BTE = scores_BTE + jax.lax.stop_gradient(self.bias[...])
        if self.num_groups > 1:
            select_BTE = self._limit_groups(select_BTE)
        _, topk_idx = jax.lax.top_k(select_BTE, self.top_k)
        weights = jnp.take_along_axis(scores_BTE, topk_idx, axis=-1)  # bias-free gate values
        # V3 (sigmoid): normalise the k gates, then scale. V2 (softmax): normalise (k > 1) *or*
        # scale, as DeepSeek-V2's MoEGate does; its releases keep norm_topk_prob off.
        sigmoid = self.score_func == "sigmoid"
        normalise = self.norm_topk_prob and (sigmoid or self.top_k > 1)
        if normalise:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        if sigmoid or not normalise:
            weights = weights * self.routed_scaling
        return topk_idx.astype(jnp.int32), weights, scores_BTE

    def _limit_groups(self, select_BTE):
        """Keeps the topk_groups best groups of each token, masking the rest to -inf.

        A group's score is the sum of its two best biased scores when the bias is on (V3: a group
        must hold more than one good expert), else its best score (V2's device-limited routing).
        """
        b, t, e = select_BTE.shape
        per_group = e // self.num_groups
        groups_BTGX = select_BTE.reshape(b, t, self.num_groups, per_group)
        if self.bias is not None:
            group_BTG = jax.lax.top_k(groups_BTGX, min(2, per_group))[0].sum(-1)
        else:
            group_BTG = groups_BTGX.max(-1)
        _, top_groups = jax.lax.top_k(group_BTG, self.topk_groups)
        keep_BTG = jax.nn.one_hot(top_groups, self.num_groups, dtype=jnp.bool_).any(-2)
        return jnp.where(keep_BTG[..., None], groups_BTGX, -jnp.inf).reshape(b, t, e)


def balance_loss(scores_BTE, topk_idx_BTK, num_experts: int):
    """Sequence-wise balance loss of V3 eq. 17-20 (without alpha): sum_i f_i P_i, mean over B.

    f_i = E / (K T) * (tokens of the sequence routed to i); P_i = mean over the sequence of the
    token's normalised score s_i / sum_j s_j. Gradients flow through P only.
    """
    t, k = topk_idx_BTK.shape[1], topk_idx_BTK.shape[2]
    hits_BE = jax.nn.one_hot(topk_idx_BTK, num_experts, dtype=jnp.float32).sum((1, 2))
    f_BE = num_experts / (k * t) * hits_BE
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def update_router_bias(bias_E, counts_E, rate: float):
    """Aux-loss-free update (V3 sec. 2.1.2): b_i += rate * sign(mean load - load_i).

    Overloaded experts become less likely to be selected, underloaded more; no gradient involved.
    """
    load = counts_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(load.mean() - load)


# ----------------------------------------------------------------------------- expert FFN


def grouped_gemm(x_MK, w_GNK, group_sizes_G):
    """out[rows of group g] = x[rows] @ w[g]^T (rows sorted by group; rows past the sum are zero).

    `jax.lax.ragged_dot` semantics with the weight in [G, N, K] ("NT") layout, in x's dtype with
    float32 accumulation: `jax_ds.ops.grouped_gemm.grouped_linear`, which avoids the ragged dot's
    one dense GEMM per group on GPUs where windows of the groups' rows cost less.
    """
    return grouped_linear(x_MK, w_GNK, group_sizes_G.astype(jnp.int32))


def grouped_gemm_fp8(x_MK, w_GNK, group_sizes_G):
    """FP8 grouped GEMM of the expert FFN: `jax_ds.ops.grouped_fp8_linear` (x per 1x128, each
    expert's w per 128x128 block, FP8 dgrad, wgrad by XLA: `grouped_wgrad`). It runs the op's
    reference until the grouped kernel is registered, and the kernel automatically after."""
    return grouped_fp8_linear(x_MK, w_GNK, group_sizes_G.astype(jnp.int32))


def grouped_fp8_weight_gemm(xq, w_fp8_GNK, scale_G, group_sizes_G, out_dtype):
    """`grouped_gemm` for expert weights held in FP8 (e4m3 [G, N, K] + float32 block scales
    [G, ceil(N/128), ceil(K/128)]) and rows already quantized: xq = `_quantize_rows(x)`; then
    `jax_ds.ops.grouped_fp8_gemm`. K is zero-padded to a multiple of 128. Inference only."""
    y = grouped_fp8_gemm(*xq, pad_to(w_fp8_GNK, 2, FP8_BLOCK), scale_G,
                         group_sizes_G.astype(jnp.int32), out_dtype=gemm_out_dtype(out_dtype))
    return y.astype(out_dtype)


def _quantize_rows(x_MK):
    """x per (1, 128), K zero-padded to whole blocks: the FP8 GEMMs' activation operand."""
    return quantize_fp8(pad_to(x_MK, 1, FP8_BLOCK), block=(1, FP8_BLOCK))


def expert_ffn(x_MD, group_sizes_G, w_gate_GFD, w_up_GFD, w_down_GDF, *, fp8: bool = False):
    """SwiGLU of every expert over its contiguous rows: down(silu(gate x) * up x).

    Args:
      x_MD: [M, D] rows sorted by expert (`moe_permute` / `ep_dispatch` order).
      group_sizes_G: [G] int32 rows per expert (sum <= M; the rest are zero rows).
      w_gate_GFD, w_up_GFD: [G, F, D]; w_down_GDF: [G, D, F] ("NT" layout).
      fp8: FP8 grouped GEMMs (`grouped_gemm_fp8`).

    Returns:
      [M, D] in x's dtype, zero past sum(group_sizes).
    """
    gemm = grouped_gemm_fp8 if fp8 else grouped_gemm
    h_MF = jax.nn.silu(gemm(x_MD, w_gate_GFD, group_sizes_G)) * gemm(x_MD, w_up_GFD, group_sizes_G)
    return gemm(h_MF, w_down_GDF, group_sizes_G)


def expert_ffn_fp8_weights(x_MD, group_sizes_G, w_gate_GFD, s_gate, w_up_GFD, s_up, w_down_GDF,
                           s_down):
    """`expert_ffn` with FP8-held weights, each followed by its block scales (e4m3 weights as
    `DeepSeekMoE` holds them under cfg.fp8_weights)."""
    def gemm(xq, w, s):
        return grouped_fp8_weight_gemm(xq, w, s, group_sizes_G, x_MD.dtype)

    xq = _quantize_rows(x_MD)  # once for both the gate and the up projection
    h_MF = jax.nn.silu(gemm(xq, w_gate_GFD, s_gate)) * gemm(xq, w_up_GFD, s_up)
    return gemm(_quantize_rows(h_MF), w_down_GDF, s_down)


# ----------------------------------------------------------------------------- the layer


def run_experts(layer, x_BTD, slot_BTK, topk_weights_BTK, weights, num_slots: int):
    """Token copies -> their expert slots' SwiGLU FFNs -> the top-k weighted sum.

    Locally (`layer.mesh` None) or expert-parallel through `ep_moe` over `layer.mesh`; `layer`
    supplies fp8, fp8_weights, mesh, capacity_factor, exchange and dedup. Returns (y [B, T, D],
    per-slot counts [num_slots], dropped assignments).
    """
    b, t, d = x_BTD.shape
    ffn = expert_ffn_fp8_weights if layer.fp8_weights else \
        functools.partial(expert_ffn, fp8=layer.fp8)
    if layer.mesh is None:
        x_sorted, sizes, perm = moe_permute(x_BTD.reshape(b * t, d), slot_BTK.reshape(b * t, -1),
                                            num_slots)
        y = moe_unpermute(ffn(x_sorted, sizes, *weights), perm,
                          topk_weights_BTK.reshape(b * t, -1)).reshape(b, t, d)
        return y, sizes, jnp.zeros((), jnp.int32)
    return ep_moe(x_BTD, slot_BTK, topk_weights_BTK, weights, ffn, mesh=layer.mesh,
                  num_experts=num_slots, capacity_factor=layer.capacity_factor,
                  exchange=layer.exchange, dedup=layer.dedup)


class DeepSeekMoE(nnx.Module):
    """y = sum_shared FFN(x) + sum_{i in top-k} g_i FFN_i(x)."""

    def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_hidden
        if mesh is not None:
            check_ep(e, mesh)  # fail at construction, not deep inside a jit
        self.router = Router(cfg, rngs=rngs)
        self.shared = MLP(d, cfg.num_shared_experts * f, cfg, rngs=rngs) \
            if cfg.num_shared_experts else None
        split = (EXPERT, None, None)  # routed experts live on their EP rank
        if cfg.fp8_weights:  # e4m3 weights, each with its WeightScale (same split)
            self.w_gate, self.w_gate_scale = init_fp8_weight(rngs, (e, f, d), cfg, split)
            self.w_up, self.w_up_scale = init_fp8_weight(rngs, (e, f, d), cfg, split)
            self.w_down, self.w_down_scale = init_fp8_weight(rngs, (e, d, f), cfg, split)
        else:
            self.w_gate = init_weight(rngs, (e, f, d), cfg, sharding=split)
            self.w_up = init_weight(rngs, (e, f, d), cfg, sharding=split)
            self.w_down = init_weight(rngs, (e, d, f), cfg, sharding=split)
        self.mesh = mesh
        self.num_experts, self.top_k = e, cfg.top_k
        self.fp8, self.fp8_weights = cfg.fp8, cfg.fp8_weights
        self.capacity_factor, self.exchange = cfg.capacity_factor, cfg.ep_exchange
        self.dedup = cfg.ep_dedup

    def __call__(self, x_BTD):
        """x [B, T, D] -> (y [B, T, D], MoEStats)."""
        topk_idx, topk_weights, scores = self.router(x_BTD)
        if self.fp8_weights:
            weights = tuple(v[...] for v in (self.w_gate, self.w_gate_scale, self.w_up,
                                             self.w_up_scale, self.w_down, self.w_down_scale))
        else:
            weights = tuple(w[...].astype(x_BTD.dtype)
                            for w in (self.w_gate, self.w_up, self.w_down))
        y, counts, dropped = run_experts(self, x_BTD, topk_idx, topk_weights, weights,
                                         self.num_experts)
        if self.shared is not None:
            y = y + self.shared(x_BTD)
        return y, MoEStats(counts, dropped, balance_loss(scores, topk_idx, self.num_experts))
