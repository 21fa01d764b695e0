"""Redundant experts (DeepSeek-V3 sec. 3.4): an MoE layer whose experts live in R >= E slots.

EPLB (`jax_ds.parallel.eplb`) plans which logical expert each of R physical slots holds; slots
are split over the mesh's `expert` axis, R / ep per rank, so a hot expert can have replicas on
several ranks. This module applies such a plan to the model:

  RedundantMoE            DeepSeekMoE's function over R physical slots. The router picks logical
                          experts as before; each (token, expert) then goes to one replica of the
                          expert, chosen by a hash of (token index, expert) so that an expert's
                          tokens spread evenly over its replicas, deterministically, with no
                          communication. Expert counts stay per *logical* expert.
  with_redundant_experts  turns every MoE layer of a `Transformer` into a RedundantMoE.
  rebalance               moves expert weights into a new plan's slots: one jitted gather per
                          layer, kept sharded over `expert` (XLA moves rows between ranks).

The function of the model never depends on the placement: slot s holds expert phy2log[s]'s
weights, and every replica gives the same output. Training keeps replicas identical: the
gradient of each slot is the sum over all replicas of its expert (`tie_replicas`), i.e. the
gradient a one-slot-per-expert model would get, so elementwise optimizers (SGD, Adam) update the
replicas alike. (Global-norm clipping counts each replica, so it sees a slightly larger norm.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.models.moe import DeepSeekMoE, MoEStats, balance_loss, run_experts
from jax_ds.ops._checks import is_int
from jax_ds.parallel.expert import check_ep
from jax_ds.parallel.mesh import EXPERT, shard_model

SLOT_WEIGHTS = ("w_gate", "w_up", "w_down")


class ExpertPlacement(nnx.Variable):
    """Where the replicas of each expert live. Not an `nnx.Param`: no gradient, no optimizer."""


def round_robin_plan(num_experts: int, num_replicas: int):
    """The placement before any load is known: slot s holds expert s mod E.

    Returns numpy (phy2log [R], log2phy [E, R - E + 1] (-1 padded), logcnt [E]), int32.
    """
    phy2log = np.arange(num_replicas, dtype=np.int32) % num_experts
    logcnt = np.bincount(phy2log, minlength=num_experts).astype(np.int32)
    width = num_replicas - num_experts + 1
    rank = np.arange(width)
    log2phy = np.where(rank < logcnt[:, None],
                       np.arange(num_experts)[:, None] + num_experts * rank, -1).astype(np.int32)
    return phy2log, log2phy, logcnt


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tie_replicas(w_R, phy2log_R, num_experts: int):
    """Identity on slot weights w [R, ...]; the gradient of each slot becomes its expert's total.

    Backward: g_expert = sum of g over the slots holding the expert; every slot gets g_expert.
    """
    del phy2log_R, num_experts
    return w_R


def _tie_fwd(w_R, phy2log_R, num_experts):
    return w_R, phy2log_R


def _tie_bwd(num_experts, phy2log_R, g_R):
    g_E = jnp.zeros((num_experts,) + g_R.shape[1:], g_R.dtype).at[phy2log_R].add(g_R)
    return g_E[phy2log_R], None


tie_replicas.defvjp(_tie_fwd, _tie_bwd)


def _mix32(h):
    """murmur3's 32-bit finaliser: every input bit moves about half the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


class RedundantMoE(nnx.Module):
    """DeepSeekMoE with its routed experts in R physical slots: y is the same, placement is a plan.

    Holds router and shared experts as the layer it was made from, slot weights [R, ...] split
    over `expert`, and the placement (phy2log [R], log2phy [E, R - E + 1], logcnt [E]) as
    `ExpertPlacement` variables, initially `round_robin_plan`.
    """

    def __init__(self, moe: DeepSeekMoE, num_replicas: int):
        e = moe.num_experts
        if not is_int(num_replicas) or num_replicas < e:
            raise ValueError(f"RedundantMoE: num_replicas={num_replicas!r} must be an int >= "
                             f"num_experts={e}")
        if moe.fp8_weights:
            raise ValueError("RedundantMoE: experts held in FP8 (cfg.fp8_weights) are not "
                             "supported yet; load the checkpoint with fp8='dequant'")
        if moe.mesh is not None:
            check_ep(num_replicas, moe.mesh)  # R slots split evenly over the expert axis
        phy2log, log2phy, logcnt = round_robin_plan(e, num_replicas)
        self.router, self.shared = moe.router, moe.shared
        for name in SLOT_WEIGHTS:
            w = getattr(moe, name)[...]
            setattr(self, name, nnx.Param(w[phy2log], out_sharding=(EXPERT, None, None),
                                          eager_sharding=False))
        self.phy2log = ExpertPlacement(jnp.asarray(phy2log))
        self.log2phy = ExpertPlacement(jnp.asarray(log2phy))
        self.logcnt = ExpertPlacement(jnp.asarray(logcnt))
        self.mesh = moe.mesh
        self.num_experts, self.num_replicas, self.top_k = e, num_replicas, moe.top_k
        self.fp8, self.fp8_weights = moe.fp8, False
        self.capacity_factor, self.exchange = moe.capacity_factor, moe.exchange
        self.dedup = moe.dedup

    def slots(self, topk_idx_BTK):
        """Logical expert ids [B, T, K] -> slots [B, T, K]: replica hash(token, e) % replicas."""
        b, t, _ = topk_idx_BTK.shape
        token = jnp.arange(b * t, dtype=jnp.uint32).reshape(b, t, 1)
        e = topk_idx_BTK.astype(jnp.uint32)
        h = _mix32(token * jnp.uint32(0x9E3779B1) + e * jnp.uint32(0x632BE5AB))
        cnt = self.logcnt[...][topk_idx_BTK].astype(jnp.uint32)
        replica = (h % cnt).astype(jnp.int32)
        return self.log2phy[...][topk_idx_BTK, replica]

    def __call__(self, x_BTD):
        """x [B, T, D] -> (y [B, T, D], MoEStats with counts per logical expert)."""
        topk_idx, topk_weights, scores = self.router(x_BTD)
        slot = self.slots(topk_idx)
        phy2log = self.phy2log[...]
        weights = tuple(tie_replicas(getattr(self, n)[...], phy2log, self.num_experts)
                        .astype(x_BTD.dtype) for n in SLOT_WEIGHTS)
        y, slot_counts, dropped = run_experts(self, x_BTD, slot, topk_weights, weights,
                                              self.num_replicas)
        if self.shared is not None:
            y = y + self.shared(x_BTD)
        counts = jnp.zeros((self.num_experts,), jnp.int32).at[phy2log].add(slot_counts)
        return y, MoEStats(counts, dropped, balance_loss(scores, topk_idx, self.num_experts))


def with_redundant_experts(model, num_replicas: int):
    """Replaces every MoE layer of a `Transformer` (MTP modules included) by a RedundantMoE.

    In place; returns the model. Under a mesh the new slot weights are placed over `expert`.
    Build the optimizer afterwards (the slot parameters are new arrays of a new shape).
    """
    blocks = list(model.blocks) + [m.block for m in model.mtp]
    mesh = None
    for block in blocks:
        if block.is_moe and not isinstance(block.ffn, RedundantMoE):
            block.ffn = RedundantMoE(block.ffn, num_replicas)
            mesh = block.ffn.mesh or mesh
    if mesh is not None:
        shard_model(model, mesh)
    return model


@functools.partial(jax.jit, static_argnums=(2,))
def _gather_slots(arrays, src_R, mesh: Mesh | None):
    """Every array [R, ...] -> array[src]: one gather, kept split over `expert` under a mesh."""
    out = tuple(a[src_R] for a in arrays)
    if mesh is not None:
        out = tuple(jax.lax.with_sharding_constraint(o, NamedSharding(mesh, P(EXPERT)))
                    for o in out)
    return out


def rebalance(model, plan, optimizer: nnx.Optimizer | None = None):
    """Moves every RedundantMoE layer's slot weights into `plan`'s places; in place.

    New slot s takes the weights of the first replica, in the old placement, of expert
    plan.phy2log[layer, s]. With an optimizer, its per-slot state (Adam's moments, say) moves
    alike, so training continues as if nothing happened.

    Args:
      model: a `Transformer` after `with_redundant_experts`, or one RedundantMoE layer.
      plan: `rebalance_experts`' result (phy2log [L, R], log2phy [L, E, M], logcnt [L, E]) for
        the L layers of `model.moe_layers()` (L = 1 for a single layer; a leading 1 is optional).
      optimizer: an `nnx.Optimizer` over the model's parameters, or None.
    """
    layers = [model] if isinstance(model, RedundantMoE) else list(model.moe_layers())
    phy2log, log2phy, logcnt = (jnp.asarray(x) for x in plan)
    if phy2log.ndim == 1:
        phy2log, log2phy, logcnt = phy2log[None], log2phy[None], logcnt[None]
    for layer in layers:
        if not isinstance(layer, RedundantMoE):
            raise ValueError("rebalance: the model's MoE layers are DeepSeekMoE; convert them "
                             "with with_redundant_experts(model, num_replicas) first")
    first = layers[0]
    width = first.num_replicas - first.num_experts + 1
    want = (len(layers), first.num_replicas, first.num_experts)
    if (phy2log.shape != want[:2] or logcnt.shape != (want[0], want[2])
            or log2phy.shape[:2] != (want[0], want[2]) or log2phy.shape[2] > width):
        raise ValueError(f"rebalance: plan shapes phy2log {phy2log.shape}, log2phy "
                         f"{log2phy.shape}, logcnt {logcnt.shape} do not fit the model: expected "
                         f"[{want[0]}, {want[1]}], [{want[0]}, {want[2]}, <= {width}], "
                         f"[{want[0]}, {want[2]}] (MoE layers, slots, experts)")
    log2phy = jnp.pad(log2phy, ((0, 0), (0, 0), (0, width - log2phy.shape[2])),
                      constant_values=-1)
    moved = _optimizer_slot_state(model, optimizer, layers)
    for i, layer in enumerate(layers):
        src = layer.log2phy[...][phy2log[i], 0]  # old slot of each new slot's expert
        variables = [getattr(layer, n) for n in SLOT_WEIGHTS] + moved.get(i, [])
        for var, value in zip(variables, _gather_slots(tuple(v[...] for v in variables), src,
                                                       layer.mesh)):
            var[...] = value
        layer.phy2log[...] = phy2log[i].astype(jnp.int32)
        layer.log2phy[...] = log2phy[i].astype(jnp.int32)
        layer.logcnt[...] = logcnt[i].astype(jnp.int32)


def _optimizer_slot_state(model, optimizer, layers):
    """{layer index: the optimizer-state variables of its slot weights}, matched by path suffix.

    An `nnx.Optimizer` keeps per-parameter state (mu, nu, ...) under the parameter's own path,
    after a prefix of its own ('opt_state', 0, 'mu', ...).
    """
    if optimizer is None:
        return {}
    owner = {id(getattr(layer, n)): i for i, layer in enumerate(layers) for n in SLOT_WEIGHTS}
    where = {tuple(path): owner[id(node)] for path, node in nnx.iter_graph(model)
             if id(node) in owner}
    found: dict[int, list] = {}
    for path, node in nnx.iter_graph(optimizer):
        if not isinstance(node, nnx.Variable) or id(node) in owner:  # the weights themselves
            continue
        path = tuple(path)
        for start in range(1, len(path)):
            i = where.get(path[start:])
            if i is not None and np.ndim(node[...]) and node[...].shape[0] == \
                    layers[i].num_replicas:
                found.setdefault(i, []).append(node)
                break
    return found
