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

`ep_dispatch` sends one row per (token, expert) assignment. `ep_dispatch_tokens` /
`ep_combine_tokens` (`ep_moe(dedup=True)`) send one row per (token, destination rank), as DeepEP
does, with the token's local expert ids and gate weights; the expert side applies the weights and
returns one summed row per (token, rank). With top-8 of 256 uniformly routed experts on EP = 8
that is 5.3 rows a token instead of 8. `moe_permute` / `moe_unpermute` are `jax_ds.ops.moe`'s
routing ops (kernels on GPU).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_ds.ops._checks import check_ndim, check_shape, is_int
from jax_ds.ops.moe import moe_permute, moe_unpermute
from jax_ds.ops.quant import quantize_fp8
from jax_ds.parallel.mesh import BATCH_AXES, EXPERT

log = logging.getLogger(__name__)
# A message said once per distinct text and arguments (the layers of a model repeat them).
_info_once = functools.cache(log.info)
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
    if num_experts < ep_size or num_experts % ep_size:
        raise ValueError(f"ep_capacity: num_experts={num_experts} must be a positive multiple of "
                         f"ep_size={ep_size}")
    if capacity_factor is None:
        return num_tokens * min(top_k, num_experts // ep_size)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (lossless), got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / ep_size))


def _check_dispatch(op: str, num_experts, capacity, exchange: str, ep: int) -> None:
    """Static arguments of the dispatches (inside shard_map: `exchange` already resolved)."""
    for name, value in (("num_experts", num_experts), ("capacity", capacity)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    if num_experts % ep:
        raise ValueError(f"{op}: num_experts={num_experts} must be a multiple of the expert "
                         f"axis size {ep} (each rank owns num_experts / ep experts)")
    if exchange not in EXCHANGES or exchange == "auto":
        raise ValueError(f"{op}: exchange must be one of {EXCHANGES[1:]} inside shard_map "
                         f"(resolve 'auto' with resolve_exchange first), got {exchange!r}")


def resolve_exchange(exchange: str, mesh: Mesh) -> str:
    """'auto' -> 'ragged' on GPU, else 'padded' (XLA:CPU does not implement ragged-all-to-all)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    platform = mesh.devices.flat[0].platform
    if exchange == "ragged" and platform != "gpu":  # else XLA fails when it compiles the step
        raise ValueError(f"exchange='ragged' needs GPUs (XLA:{platform.upper()} does not implement "
                         "ragged-all-to-all): use 'padded', 'emulated' or 'auto'")
    if exchange != "auto":
        return exchange
    chosen = "ragged" if platform == "gpu" else "padded"
    if chosen == "padded":
        _info_once("EP exchange: padded all_to_all on %s (ragged_all_to_all needs a GPU)",
                   platform)
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


def _padded(a, axis_name):
    """The padded exchange: a [ep * C, ...] send buffer, C rows per destination, becomes the
    [ep * C, ...] receive buffer, C rows per source (one `all_to_all`)."""
    ep = jax.lax.axis_size(axis_name)
    split = a.reshape(ep, a.shape[0] // ep, *a.shape[1:])
    return jax.lax.all_to_all(split, axis_name, 0, 0).reshape(a.shape)


def _excl_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def _send_budget(offered_me, capacity: int, exchange: str, axis_name: str):
    """(offered [src, dst], sent [src, dst], sent_me [dst]): the rows this rank may send to each
    destination, of `offered_me`. padded: each (source, destination) pair has its own C rows
    (offered and sent are None). ragged: one receive budget of ep x C rows per destination,
    filled in source-rank order (every rank sees the whole [src, dst] table)."""
    if exchange == "padded":
        return None, None, jnp.minimum(offered_me, capacity)
    r = jax.lax.axis_size(axis_name) * capacity
    offered = jax.lax.all_gather(offered_me, axis_name)
    sent = jnp.clip(r - _excl_cumsum(offered, 0), 0, offered)
    return offered, sent, sent[jax.lax.axis_index(axis_name)]


def _dispatch_slices(sent, start, axis_name: str):
    """`ragged_all_to_all`'s (input_offsets, send_sizes, output_offsets, recv_sizes) for a
    dispatch under the budget `sent` [src, dst] whose rows for destination j start at start[j]
    of the operand: each destination receives its sources' rows in source-rank order."""
    me = jax.lax.axis_index(axis_name)
    return start, sent[me], _excl_cumsum(sent, 0)[me], sent[:, me]


def _combine_slices(sent, starts, axis_name: str):
    """The reverse of `_dispatch_slices`: each rank returns the rows it received from source j
    (at excl_cumsum(sent, 0)[j, me] of its receive buffer) to where j sent them from,
    starts[j, me] of j's operand ([src, dst]: the dispatch's `start` of every rank)."""
    me = jax.lax.axis_index(axis_name)
    return _excl_cumsum(sent, 0)[:, me], sent[:, me], starts[:, me], sent[me]


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
    ep = jax.lax.axis_size(axis_name)
    _check_dispatch("ep_dispatch", num_experts, capacity, exchange, ep)
    if fp8:
        d_model = x.shape[1]
        x = pack_fp8_rows(x)
    local = num_experts // ep
    x_sorted, group_sizes, perm = moe_permute(x, topk_idx, num_experts)
    m, d = x_sorted.shape
    expert = expert_of_rows(group_sizes, m)            # E for the zero rows past the end
    dest = expert // local                             # ep for those rows
    local_expert = expert - jnp.minimum(dest, ep - 1) * local
    offered_me = group_sizes.reshape(ep, local).sum(1)  # rows to each destination
    start = _excl_cumsum(offered_me, 0)
    slot = jnp.arange(m, dtype=jnp.int32) - start[jnp.minimum(dest, ep - 1)]
    r = ep * capacity
    offered, sent, sent_me = _send_budget(offered_me, capacity, exchange, axis_name)
    keep = (dest < ep) & (slot < sent_me[jnp.minimum(dest, ep - 1)])
    dest = jnp.where(keep, dest, ep)                   # out of range: scatters drop, gathers fill
    dropped = ((expert < num_experts) & ~keep).sum().astype(jnp.int32)

    if exchange == "padded":
        send_x = jnp.zeros((ep, capacity, d), x.dtype).at[dest, slot].set(x_sorted, mode="drop")
        send_e = jnp.full((ep, capacity), -1, jnp.int32).at[dest, slot].set(local_expert,
                                                                            mode="drop")
        recv_x = _padded(send_x.reshape(r, d), axis_name)
        recv_e = _padded(send_e.reshape(r), axis_name)
    else:
        args = _dispatch_slices(sent, start, axis_name)
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
    if y.ndim != 2 or y.shape[0] != state.order.shape[0]:
        raise ValueError(f"ep_combine: y must be [ep*C, D] = [{state.order.shape[0]}, D] rows in "
                         f"ep_dispatch's x_recv order, got shape {tuple(y.shape)}")
    m, d = state.dest.shape[0], y.shape[1]
    y_recv = jnp.zeros_like(y).at[state.order].set(y)  # back to arrival order
    if state.exchange == "padded":
        back = _padded(y_recv, axis_name).reshape(ep, state.capacity, d)
        y_sorted = back.at[state.dest, state.slot].get(mode="fill", fill_value=0)
    else:  # the dispatch's slices, with the roles of source and destination swapped
        args = _combine_slices(state.sent, _excl_cumsum(state.offered, 1), axis_name)
        y_sorted = _ragged(state.exchange, y_recv, jnp.zeros((m, d), y.dtype), *args,
                           axis_name=axis_name)
    return moe_unpermute(y_sorted, state.perm, topk_weights)


# ----------------------------------------------------------------------------- token exchange
# DeepEP's way: a token travels once to each rank that owns any of its experts (not once per
# expert), with its local expert ids and gate weights; the expert side sums the weighted outputs
# of its experts for the token and sends one row back. Uniform top-8 of 256 experts on EP = 8
# gives 5.3 ranks per token on average: 1.5x fewer rows each way than one row per assignment.


def ep_token_capacity(num_tokens: int, top_k: int, ep_size: int,
                      capacity_factor: float | None = None) -> int:
    """Static token rows one rank may send to one peer in `ep_dispatch_tokens`.

    capacity_factor None: num_tokens (a token goes to a rank at most once: nothing is dropped).
    Otherwise capacity_factor x num_tokens x min(top_k, ep) / ep, rounded up (at most
    num_tokens): min(top_k, ep) / ep bounds the mean share of tokens a rank receives.
    """
    if capacity_factor is None:
        return num_tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (lossless), got {capacity_factor}")
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * min(top_k, ep_size)
                                            / ep_size)))


class EPTokenState(NamedTuple):
    """What `ep_combine_tokens` needs to reverse `ep_dispatch_tokens` (per rank)."""
    token: jax.Array       # [S] int32 token of each sent row (N: empty slot), send layout
    order: jax.Array       # [R*K] int32 expert-sorted position -> received (row, slot) index
    weight: jax.Array      # [R, K] float32 gate weights of the received rows' slots (0: none)
    sent: jax.Array | None     # ragged only: [ep, ep] int32 rows sent [source, destination]
    dropped: jax.Array     # [] int32 (token, expert) assignments of this rank dropped
    exchange: str
    capacity: int
    num_tokens: int


def ep_dispatch_tokens(x, topk_idx, topk_weights, *, num_experts: int, axis_name: str,
                       capacity: int, exchange: str = "padded", fp8: bool = False):
    """`ep_dispatch` with one row per (token, destination rank) instead of per (token, expert);
    call inside `shard_map`.

    Args:
      x: [N, D] this rank's tokens.
      topk_idx: [N, K] int32 global expert ids (-1: dropped slot).
      topk_weights: [N, K] gate weights; they travel with the tokens (the expert side applies
        them, so `ep_combine_tokens` returns one summed row per token and rank).
      num_experts: E, a multiple of the axis size.
      axis_name: the expert-parallel mesh axis.
      capacity: C from `ep_token_capacity`: token rows per (source, destination) pair; receive
        budget ep x C rows.
      exchange: "padded", "ragged" or "emulated".
      fp8: as in `ep_dispatch`.

    Returns:
      (x_recv [ep*C*K, D] the received tokens once per local expert they are routed to, sorted
       by local expert, zero past the end (fp8: (e4m3, scales) as in `ep_dispatch`);
       group_sizes [E/ep] int32; counts [E] int32 of this rank's assignments per global expert;
       state for `ep_combine_tokens`).
    """
    ep = jax.lax.axis_size(axis_name)
    _check_dispatch("ep_dispatch_tokens", num_experts, capacity, exchange, ep)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"ep_dispatch_tokens: topk_weights {tuple(topk_weights.shape)} must "
                         f"match topk_idx {tuple(topk_idx.shape)} = [N, K]")
    d_model = x.shape[1]
    if fp8:
        x = pack_fp8_rows(x)
    local = num_experts // ep
    n, k = topk_idx.shape
    ranks = jnp.arange(ep, dtype=jnp.int32)
    valid = (topk_idx >= 0) & (topk_idx < num_experts)  # other ids mark dropped slots
    owner = jnp.where(valid, topk_idx // local, ep)                         # [N, K]
    present = (owner[:, None, :] == ranks[None, :, None]).any(-1)          # [N, ep]
    offered_me = present.sum(0).astype(jnp.int32)                          # rows to each rank
    pos = jnp.cumsum(present, 0, dtype=jnp.int32) - 1                      # [N, ep] row in chunk
    r = ep * capacity
    _, sent, sent_me = _send_budget(offered_me, capacity, exchange, axis_name)
    if exchange == "padded":  # destination j's rows at [j C, j C + sent_me[j])
        start, slots = ranks * capacity, r
    else:  # packed; a token reaches at most min(K, ep) ranks
        start, slots = _excl_cumsum(sent_me, 0), n * min(k, ep)
    keep = present & (pos < sent_me[None, :])                              # [N, ep]
    dropped = (valid & ~jnp.take_along_axis(
        jnp.concatenate([keep, jnp.zeros((n, 1), bool)], 1), owner, 1)).sum().astype(jnp.int32)
    flat = jnp.where(keep, start[None, :] + pos, slots)                    # send-layout slot
    token = jnp.full((slots,), n, jnp.int32).at[flat].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, ep)), mode="drop")
    dest = jnp.searchsorted(start, jnp.arange(slots), side="right") - 1    # rank of each slot
    # Per sent row: the token, its expert ids local to the destination (-1 elsewhere), weights.
    send_x = x.at[token].get(mode="fill", fill_value=0)
    tok_idx = topk_idx.at[token].get(mode="fill", fill_value=-1)           # [S, K]
    mine = (tok_idx >= 0) & (tok_idx // local == dest[:, None])
    send_e = jnp.where(mine, tok_idx - dest[:, None] * local, -1)
    send_w = jnp.where(mine, topk_weights.astype(jnp.float32).at[token].get(
        mode="fill", fill_value=0), 0.0)

    def move(a, fill):   # empty receive rows hold `fill` (padded: the send buffer's fill)
        if exchange == "padded":
            return _padded(a, axis_name)
        return _ragged(exchange, a, jnp.full((r, *a.shape[1:]), fill, a.dtype),
                       *_dispatch_slices(sent, start, axis_name), axis_name=axis_name)

    recv_x, recv_e, recv_w = move(send_x, 0), move(send_e, -1), move(send_w, 0)
    # Every received (row, slot) with a local expert is one assignment: sort them by expert.
    key = jnp.where(recv_e < 0, local, recv_e).reshape(-1)                 # [R*K]
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    local_sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
    real = (jnp.arange(r * k) < local_sizes.sum())[:, None]
    x_assign = jnp.where(real, recv_x[order // k], jnp.zeros((), recv_x.dtype))
    counts = jnp.bincount(jnp.where(valid, topk_idx, num_experts).reshape(-1),
                          length=num_experts + 1)[:num_experts].astype(jnp.int32)
    state = EPTokenState(token, order, recv_w, sent, dropped, exchange, capacity, n)
    if fp8:
        x_assign = unpack_fp8_rows(x_assign, d_model)
    return x_assign, local_sizes, counts, state


def ep_combine_tokens(y, state: EPTokenState, *, axis_name: str):
    """Sums each received token's expert outputs with its gate weights (on the experts' rank),
    sends one row back per (token, rank), and adds those up per token; call inside `shard_map`.

    Args:
      y: [ep*C*K, D] expert outputs in `ep_dispatch_tokens`'s x_recv order.
      state: `ep_dispatch_tokens`'s.

    Returns:
      [N, D] in y.dtype; dropped assignments contribute zero.
    """
    r, k = state.weight.shape
    if y.ndim != 2 or y.shape[0] != r * k:
        raise ValueError(f"ep_combine_tokens: y must be [ep*C*K, D] = [{r * k}, D] rows in "
                         f"ep_dispatch_tokens' x_recv order, got shape {tuple(y.shape)}")
    d = y.shape[1]
    by_slot = jnp.zeros((r * k, d), y.dtype).at[state.order].set(y).reshape(r, k, d)
    rows = jnp.einsum("rkd,rk->rd", by_slot, state.weight,
                      preferred_element_type=jnp.float32).astype(y.dtype)
    if state.exchange == "padded":
        back = _padded(rows, axis_name)
    else:  # the dispatch's slices, with the roles of source and destination swapped
        args = _combine_slices(state.sent, _excl_cumsum(state.sent, 1), axis_name)
        back = _ragged(state.exchange, rows, jnp.zeros((state.token.shape[0], d), y.dtype),
                       *args, axis_name=axis_name)
    return jnp.zeros((state.num_tokens, d), y.dtype).at[state.token].add(back, mode="drop")


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
           capacity_factor: float | None = None, exchange: str = "auto", dedup: bool = False):
    """The routed-expert part of an MoE layer, tokens split over (data, expert), experts over expert.

    Args:
      x: [B, T, D], any B and T: the B x T tokens are cut into equal parts over the batch axes
        (data x expert), in order; when their count does not divide, padding tokens routed
        nowhere (ids -1) fill the last parts, so one sequence decodes on any mesh.
      topk_idx, topk_weights: [B, T, K] from the router.
      weights: tuple of expert weight arrays, each [E, ...] (split over `expert`).
      ffn: the grouped expert FFN, ffn(x_sorted, group_sizes, *local_weights).
      mesh: a mesh from `make_mesh`.
      num_experts: E.
      capacity_factor: None (lossless budget) or the factor of `ep_capacity`.
      exchange: "auto" (ragged on GPU, padded elsewhere), "ragged", "padded" or "emulated".
      dedup: send each token once per destination rank (`ep_dispatch_tokens`, DeepEP's way)
        instead of once per routed expert (`ep_dispatch`); capacity_factor then budgets token
        rows (`ep_token_capacity`).

    Returns:
      (y [B, T, D], counts [E] int32 assignments per expert over the whole batch,
       dropped [] int32 rows dropped by the budget over the whole batch).
    """
    check_ndim("ep_moe", "x", x, 3, "[B, T, D]")
    check_ndim("ep_moe", "topk_idx", topk_idx, 3, "[B, T, K]")
    b, t, d = x.shape
    k = topk_idx.shape[-1]
    check_shape("ep_moe", "topk_idx", topk_idx, (b, t, k), "[B, T, K], B and T as x's")
    check_shape("ep_moe", "topk_weights", topk_weights, (b, t, k), "[B, T, K] as topk_idx")
    ep = check_ep(num_experts, mesh)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    n = b * t
    per_shard = -(-n // shards)
    pad = per_shard * shards - n
    x_ND, idx_NK, w_NK = x.reshape(n, d), topk_idx.reshape(n, k), topk_weights.reshape(n, k)
    if pad:  # tokens routed nowhere: no expert row, no count, no drop; cut off again below
        _info_once("ep_moe: %d tokens over %d shards (data x expert): %d padding tokens added",
                   n, shards, pad)
        x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
        idx_NK = jnp.pad(idx_NK, ((0, pad), (0, 0)), constant_values=-1)
        w_NK = jnp.pad(w_NK, ((0, pad), (0, 0)))
    capacity = (ep_token_capacity(per_shard, k, ep, capacity_factor) if dedup else
                ep_capacity(per_shard, k, num_experts, ep, capacity_factor))
    exchange = resolve_exchange(exchange, mesh)

    def body(x_ND, idx, w, *local_weights):
        if ep == 1:  # experts all local: no exchange, nothing to drop
            x_sorted, sizes, perm = moe_permute(x_ND, idx, num_experts)
            y = moe_unpermute(ffn(x_sorted, sizes, *local_weights), perm, w)
            counts, dropped = sizes, jnp.zeros((), jnp.int32)
        elif dedup:
            x_recv, sizes, counts, state = ep_dispatch_tokens(
                x_ND, idx, w, num_experts=num_experts, axis_name=EXPERT, capacity=capacity,
                exchange=exchange)
            y = ep_combine_tokens(ffn(x_recv, sizes, *local_weights), state, axis_name=EXPERT)
            dropped = state.dropped
        else:
            x_recv, sizes, counts, state = ep_dispatch(
                x_ND, idx, num_experts=num_experts, axis_name=EXPERT, capacity=capacity,
                exchange=exchange)
            y = ep_combine(ffn(x_recv, sizes, *local_weights), w, state, axis_name=EXPERT)
            dropped = state.dropped
        return y, jax.lax.psum(counts, batch_axes), jax.lax.psum(dropped, batch_axes)

    tokens = P(batch_axes)
    in_specs = (tokens, tokens, tokens) + (P(EXPERT),) * len(weights)
    # Inside an outer shard_map (a pipeline stage, manual over `pipe`) the inner one must be given
    # the context's abstract mesh, which knows which axes are already manual.
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.manual_axes:
        mesh = context
    y_ND, counts, dropped = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, P(), P()))(
        x_ND, idx_NK, w_NK, *weights)
    return y_ND[:n].reshape(b, t, d), counts, dropped
