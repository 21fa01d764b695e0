"""Expert parallelism: the routing ops and the token exchange of an MoE layer inside `shard_map`.

One MoE layer, per rank of the `expert` axis (each rank holds its own tokens and E / ep experts):

  moe_permute     local tokens -> rows sorted by global expert; experts are rank-contiguous, so
                  this is also destination-rank order (DeepEP's "layout").
  ep_dispatch     exchange rows so every rank holds the rows for its own experts, sorted by local
                  expert (a second, local permute), plus per-expert group sizes.
  (grouped GEMM)  the expert FFN, `jax_ds.models.moe.expert_ffn`.
  ep_combine      the exact reverse exchange, then `moe_unpermute`: the top-k weighted sum.

The exchange comes in two forms, chosen by backend (`exchange="auto"`):
  "ragged"  `jax.lax.ragged_all_to_all` (GPU): only real rows travel.
  "padded"  `jax.lax.all_to_all` of a [ep, C, D] buffer (everywhere; XLA:CPU has no ragged
            all-to-all). C is a static per-(source, destination) budget, `ep_capacity`.
Budgets (static shapes need them): with `capacity_factor=None` the budget is the worst case, so no
row is ever dropped. With a capacity factor the budget is `capacity_factor` x the even share;
rows past it are dropped (they contribute zero, the residual carries the token) and *counted*:
`ep_moe` returns the number dropped, for the caller to report. The ragged form uses the same total
receive budget, ep x C rows per rank, clamped in source-rank order.

Sends are per (token, expert) assignment; DeepEP's de-duplication (one copy per destination rank)
belongs to the kernel issue. `moe_permute` / `moe_unpermute` follow the contract of the coming
routing ops of `jax_ds.ops.moe` (DESIGN.md); their kernels are the GPU 2 issue.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_ds.ops.moe import moe_permute, moe_unpermute
from jax_ds.ops.quant import quantize_fp8
from jax_ds.parallel.mesh import BATCH_AXES, EXPERT

log = logging.getLogger(__name__)
EXCHANGES = ("auto", "ragged", "padded", "emulated")


# ----------------------------------------------------------------------------- routing ops


def expert_of_rows(group_sizes, num_rows: int):
    """[num_rows] int32: the group each sorted row belongs to; len(group_sizes) past the end."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


# ----------------------------------------------------------------------------- budgets


def ep_capacity(num_tokens: int, top_k: int, num_experts: int, ep_size: int,
                capacity_factor: float | None = None) -> int:
    """Static rows one rank may send to one peer (C of the padded [ep, C, D] buffer).

    capacity_factor None: the worst case, num_tokens x min(top_k, E / ep) (a token's top-k experts
    are distinct, so at most that many of its copies go to one rank) -- nothing is ever dropped.
    Otherwise capacity_factor x the even share num_tokens x top_k / ep, rounded up.
    """
    if capacity_factor is None:
        return num_tokens * min(top_k, num_experts // ep_size)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (lossless), got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / ep_size))


def resolve_exchange(exchange: str, mesh: Mesh) -> str:
    """'auto' -> 'ragged' on GPU, else 'padded' (XLA:CPU does not implement ragged-all-to-all)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange != "auto":
        return exchange
    platform = mesh.devices.flat[0].platform
    chosen = "ragged" if platform == "gpu" else "padded"
    if chosen == "padded" and not getattr(resolve_exchange, "_told", False):
        resolve_exchange._told = True  # say it once, not per layer
        log.info("EP exchange: padded all_to_all on %s (ragged_all_to_all needs a GPU)", platform)
    return chosen


# ----------------------------------------------------------------------------- exchange


class EPState(NamedTuple):
    """What `ep_combine` needs to reverse `ep_dispatch` (all arrays are per rank)."""
    perm: jax.Array        # [N, K] int32, moe_permute's
    dest: jax.Array        # [M] int32 destination rank of each sorted row (ep: padding or dropped)
    slot: jax.Array        # [M] int32 row index inside the destination's chunk
    order: jax.Array       # [R] int32 received row -> local-expert-sorted position
    sent: jax.Array | None     # ragged only: [ep, ep] int32 rows sent [source, destination]
    offered: jax.Array | None  # ragged only: [ep, ep] int32 rows offered, before the budget
    dropped: jax.Array     # [] int32 rows of this rank that the budget dropped
    exchange: str
    capacity: int


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per peer) built from `all_gather`; any backend.

    Equivalent result, O(ep) memory: it exists so CPU tests check the ragged bookkeeping.
    """
    del recv_sizes  # implied by the peers' send_sizes, as the real collective requires
    me = jax.lax.axis_index(axis_name)
    all_x = jax.lax.all_gather(operand, axis_name)                       # [ep, Mi, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]         # [src]
    size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    j = jnp.arange(output.shape[0])
    hit = (j >= out_off[:, None]) & (j < (out_off + size)[:, None])      # [src, Mo]
    src = jnp.argmax(hit, axis=0)
    row = jnp.clip(in_off[src] + j - out_off[src], 0, operand.shape[0] - 1)
    got = all_x[src, row]
    mask = hit.any(0).reshape(-1, *([1] * (output.ndim - 1)))
    return jnp.where(mask, got, output)


def _ragged(exchange, *args, axis_name):
    fn = jax.lax.ragged_all_to_all if exchange == "ragged" else ragged_all_to_all_reference
    return fn(*args, axis_name=axis_name)


def _excl_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def pack_fp8_rows(x):
    """[N, D] -> uint8 [N, D + 4 * ceil(D / 128)]: each row quantized per 1 x 128 group
    (`quantize_fp8`), its e4m3 bytes followed by the bytes of its float32 scales, so that the
    scales travel with their token through any row exchange (DeepEP's FP8 dispatch)."""
    x_fp8, scales = quantize_fp8(x, block=(1, 128))
    n = x.shape[0]
    return jnp.concatenate([jax.lax.bitcast_convert_type(x_fp8, jnp.uint8),
                            jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(n, -1)], 1)


def unpack_fp8_rows(rows, d: int):
    """`pack_fp8_rows`'s inverse: uint8 [M, D + 4S] -> (e4m3 [M, D], float32 scales [M, S])."""
    m = rows.shape[0]
    x_fp8 = jax.lax.bitcast_convert_type(rows[:, :d], jnp.float8_e4m3fn)
    scales = jax.lax.bitcast_convert_type(rows[:, d:].reshape(m, -1, 4), jnp.float32)
    return x_fp8, scales


def ep_dispatch(x, topk_idx, *, num_experts: int, axis_name: str, capacity: int,
                exchange: str = "padded", fp8: bool = False):
    """Sends each (token, expert) row to the rank owning the expert; call inside `shard_map`.

    Args:
      x: [N, D] this rank's tokens.
      topk_idx: [N, K] int32 global expert ids (-1: dropped slot).
      num_experts: E (a multiple of the axis size; rank r owns experts [r E/ep, (r+1) E/ep)).
      axis_name: the expert-parallel mesh axis.
      capacity: C from `ep_capacity`: rows per (source, destination) pair; receive budget ep x C.
      exchange: "padded", "ragged" or "emulated" (ragged bookkeeping over all_gather).
      fp8: quantize the tokens per 1 x 128 group before they travel (DeepEP's FP8 dispatch:
        D + 4 D / 128 bytes a row instead of 2 D for bf16); the rows arrive ready for
        `grouped_fp8_gemm`. Bit-identical to quantizing the bf16 dispatch's rows. Not
        differentiable (the combine stays in y's dtype).

    Returns:
      (x_recv [ep*C, D] rows for this rank's experts, sorted by local expert, zero past the end
       (with fp8: the pair (e4m3 [ep*C, D], float32 scales [ep*C, ceil(D/128)]), zero bits past
       the end); group_sizes [E/ep] int32; counts [E] int32 of this rank's assignments per
       global expert; state for `ep_combine`).
    """
    if fp8:
        d_model = x.shape[1]
        x = pack_fp8_rows(x)
    ep = jax.lax.axis_size(axis_name)
    local = num_experts // ep
    me = jax.lax.axis_index(axis_name)
    x_sorted, group_sizes, perm = moe_permute(x, topk_idx, num_experts)
    m, d = x_sorted.shape
    expert = expert_of_rows(group_sizes, m)            # E for the zero rows past the end
    dest = expert // local                             # ep for those rows
    local_expert = expert - jnp.minimum(dest, ep - 1) * local
    offered_me = group_sizes.reshape(ep, local).sum(1)  # rows to each destination
    start = _excl_cumsum(offered_me, 0)
    slot = jnp.arange(m, dtype=jnp.int32) - start[jnp.minimum(dest, ep - 1)]
    r = ep * capacity
    if exchange == "padded":  # each (source, destination) pair has its own C rows
        offered = sent = None
        sent_me = jnp.minimum(offered_me, capacity)
    else:  # one receive budget of ep x C rows per destination, filled in source-rank order
        offered = jax.lax.all_gather(offered_me, axis_name)  # [src, dst]: every rank sees all
        sent = jnp.clip(r - _excl_cumsum(offered, 0), 0, offered)
        sent_me = sent[me]
    keep = (dest < ep) & (slot < sent_me[jnp.minimum(dest, ep - 1)])
    dest = jnp.where(keep, dest, ep)                   # out of range: scatters drop, gathers fill
    dropped = ((expert < num_experts) & ~keep).sum().astype(jnp.int32)

    if exchange == "padded":
        send_x = jnp.zeros((ep, capacity, d), x.dtype).at[dest, slot].set(x_sorted, mode="drop")
        send_e = jnp.full((ep, capacity), -1, jnp.int32).at[dest, slot].set(local_expert,
                                                                            mode="drop")
        recv_x = jax.lax.all_to_all(send_x, axis_name, 0, 0).reshape(r, d)
        recv_e = jax.lax.all_to_all(send_e, axis_name, 0, 0).reshape(r)
    else:
        args = (start, sent_me, _excl_cumsum(sent, 0)[me], sent[:, me])
        recv_x = _ragged(exchange, x_sorted, jnp.zeros((r, d), x.dtype), *args,
                         axis_name=axis_name)
        recv_e = _ragged(exchange, local_expert, jnp.full((r,), -1, jnp.int32), *args,
                         axis_name=axis_name)

    # Rows arrive grouped by source, each source's rows sorted by expert: re-sort by local expert.
    key = jnp.where(recv_e < 0, local, recv_e)
    order = jnp.argsort(key, stable=True)
    local_sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
    state = EPState(perm, dest, slot, order, sent, offered, dropped, exchange, capacity)
    recv_x = recv_x[order]
    if fp8:
        recv_x = unpack_fp8_rows(recv_x, d_model)
    return recv_x, local_sizes, group_sizes, state


def ep_combine(y, topk_weights, state: EPState, *, axis_name: str):
    """Returns expert outputs to their tokens and sums the top-k; call inside `shard_map`.

    Args:
      y: [ep*C, D] expert outputs in `ep_dispatch`'s x_recv order.
      topk_weights: [N, K] gate weights of this rank's tokens.
      state: `ep_dispatch`'s.

    Returns:
      [N, D] in y.dtype; dropped rows contribute zero.
    """
    ep = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    m, d = state.dest.shape[0], y.shape[1]
    y_recv = jnp.zeros_like(y).at[state.order].set(y)  # back to arrival order
    if state.exchange == "padded":
        back = jax.lax.all_to_all(y_recv.reshape(ep, state.capacity, d), axis_name, 0, 0)
        y_sorted = back.at[state.dest, state.slot].get(mode="fill", fill_value=0)
    else:  # the dispatch's slices, with the roles of source and destination swapped
        sent = state.sent
        args = (_excl_cumsum(sent, 0)[:, me], sent[:, me],
                _excl_cumsum(state.offered, 1)[:, me], sent[me])
        y_sorted = _ragged(state.exchange, y_recv, jnp.zeros((m, d), y.dtype), *args,
                           axis_name=axis_name)
    return moe_unpermute(y_sorted, state.perm, topk_weights)


# ----------------------------------------------------------------------------- the layer


ExpertFFN = Callable[..., jax.Array]  # (x_sorted [M, D], group_sizes [G], *weights) -> [M, D]


def check_ep(num_experts: int, mesh: Mesh) -> int:
    """Returns the expert axis size; rejects an expert count it does not divide."""
    ep = mesh.shape.get(EXPERT, 1)
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's "
                         f"'{EXPERT}' axis size {ep}: each EP rank must own E / ep experts")
    return ep


def ep_moe(x, topk_idx, topk_weights, weights, ffn: ExpertFFN, *, mesh: Mesh, num_experts: int,
           capacity_factor: float | None = None, exchange: str = "auto"):
    """The routed-expert part of an MoE layer, tokens split over (data, expert), experts over expert.

    Args:
      x: [B, T, D]; B must divide by the product of the batch axes (data x expert).
      topk_idx, topk_weights: [B, T, K] from the router.
      weights: tuple of expert weight arrays, each [E, ...] (split over `expert`).
      ffn: the grouped expert FFN, ffn(x_sorted, group_sizes, *local_weights).
      mesh: a mesh from `make_mesh`.
      num_experts: E.
      capacity_factor: None (lossless budget) or the factor of `ep_capacity`.
      exchange: "auto" (ragged on GPU, padded elsewhere), "ragged", "padded" or "emulated".

    Returns:
      (y [B, T, D], counts [E] int32 assignments per expert over the whole batch,
       dropped [] int32 rows dropped by the budget over the whole batch).
    """
    ep = check_ep(num_experts, mesh)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    b, t, _ = x.shape
    if b % shards:
        raise ValueError(f"batch size {b} is not divisible by data x expert = {shards}")
    k = topk_idx.shape[-1]
    capacity = ep_capacity(b // shards * t, k, num_experts, ep, capacity_factor)
    exchange = resolve_exchange(exchange, mesh)

    def body(x_BTD, idx_BTK, w_BTK, *local_weights):
        bl, tl, d = x_BTD.shape
        x_ND, idx, w = x_BTD.reshape(bl * tl, d), idx_BTK.reshape(bl * tl, k), w_BTK.reshape(-1, k)
        if ep == 1:  # experts all local: no exchange, nothing to drop
            x_sorted, sizes, perm = moe_permute(x_ND, idx, num_experts)
            y = moe_unpermute(ffn(x_sorted, sizes, *local_weights), perm, w)
            counts, dropped = sizes, jnp.zeros((), jnp.int32)
        else:
            x_recv, sizes, counts, state = ep_dispatch(
                x_ND, idx, num_experts=num_experts, axis_name=EXPERT, capacity=capacity,
                exchange=exchange)
            y = ep_combine(ffn(x_recv, sizes, *local_weights), w, state, axis_name=EXPERT)
            dropped = state.dropped
        return (y.reshape(bl, tl, d), jax.lax.psum(counts, batch_axes),
                jax.lax.psum(dropped, batch_axes))

    tokens = P(batch_axes)
    in_specs = (tokens, tokens, tokens) + (P(EXPERT),) * len(weights)
    # Inside an outer shard_map (a pipeline stage, manual over `pipe`) the inner one must be given
    # the context's abstract mesh, which knows which axes are already manual.
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.manual_axes:
        mesh = context
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, P(), P()))(
        x, topk_idx, topk_weights, *weights)
