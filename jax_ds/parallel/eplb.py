"""Expert-parallel load balancer (EPLB): DeepSeek's replication and placement plan, under jit.

Given estimated loads [L, E] of E logical experts in L MoE layers, choose R >= E physical expert
slots per layer (heavy experts get extra replicas) and place them on GPUs, R / num_gpus per GPU,
so that per-GPU loads are balanced. Same contract and same greedy choices as DeepSeek's
`eplb.rebalance_experts` (github.com/deepseek-ai/EPLB):

  hierarchical  (num_groups % num_nodes == 0) pack the expert groups onto nodes, replicate experts
                within each node, pack each node's replicas onto its GPUs. Group-limited routing
                then keeps a token's traffic inside few nodes.
  global        (otherwise) replicate over all experts, pack the replicas onto all GPUs.

Both are built from two greedy steps:
  balanced_packing   n items into m packs of exactly n / m items: items by load, heaviest first,
                     each into the lightest pack that is not full (lowest index on ties).
  replicate_experts  add one replica at a time to the expert with the largest load / replicas.

How it runs: all L layers (L x nodes rows) at once, item-major ([items, rows]) so that every
sequential step is elementwise over the rows. Replication is a `lax.scan` of R - E argmax steps,
packing a `lax.scan` over the items in sorted order; the sort, for up to 16 items a count of the
items that go before each one (XLA:CPU's comparator sort is several times slower at these
lengths), for more the reference's std::sort step for step (Ties, below). Loads
become float32, as the reference's `weight.float()` (integer loads are exact below 2^24); -0.0
and nan count as 0. Loads are meant to be >= 0; negative or infinite ones still give a valid plan.

Ties. The reference sorts with `torch.sort(descending=True)` on the CPU: libstdc++'s std::sort,
an insertion sort (stable) for rows of <= 16 items, an introsort (not stable) for longer ones.
Ties are everywhere in its last step (the replicas of one expert carry equal loads), so the
order matters for log2phy (which replica rank of an expert lands in which slot), and with tied
loads of different experts (integer counts, zeros) for phy2log too. `_std_sort_order` follows
std::sort's partitions exactly (each in closed form, vectorised; the heapsort fallback too), so
all three outputs equal the reference's. Checked against DeepSeek's eplb.py under torch 2.13:
`tests/data/eplb_reference.json` (8 cases; hierarchical and global, tie-heavy integer, constant,
zero and float loads, DeepSeek-V3 scale) in the tests, and `python -m jax_ds.bench eplb
--reference` (5 V3 placements, all equal). The sort itself is checked against g++'s std::sort in
the tests. (One-off comparisons during development, whose scripts are not kept: 764 further
random cases, all three outputs equal; 7 x 400 V3-scale layers of large integer and float loads,
phy2log and logcnt equal but in one layer.) The one difference left: group loads are summed
left to right in float32, torch's sum vectorised, so two groups whose loads agree to a few ulps
(sums near 2^24) may go to nodes in the other order (that one layer, float loads below 1e6).

Differences in contract: log2phy's last dimension is static, the most replicas an expert can get
(`max_replicas`), not the data-dependent maximum of logcnt; unused entries are -1 in both. Sizes
the reference asserts on raise ValueError here, before tracing.

Speed, `python -m jax_ds.bench eplb --reference ...` (benchmarks/results/eplb-cpu-2026-12-05.json:
2-core CPU, jax 0.12, DeepSeek's eplb.py on torch 2.13.0 with the same loads in the same run):
58 layers x 256 experts in 8 groups, the five V3-scale placements take 3.0-6.0 ms per call
hierarchical (44-71x the reference's 181-263 ms), 17.5 ms global (55x its 958 ms), steady state
under jit; the first call, with compilation, about 1.7 s. (Before the sort emulation, with
stable sorts, 0.56-0.90 ms and 4.0 ms: eplb-cpu-2026-11-24.json.)
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds.ops._checks import is_int


class Plan(NamedTuple):
    """A placement: what `rebalance_experts` returns (a tuple: it unpacks as the reference's)."""
    phy2log: jax.Array  # [L, R] int32: the logical expert in each physical slot
    log2phy: jax.Array  # [L, E, max_replicas] int32: slots of each expert by replica rank, -1 pad
    logcnt: jax.Array   # [L, E] int32: replicas of each expert (>= 1, sums to R)


def max_replicas(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int) -> int:
    """The most replicas one expert can get: log2phy's static last dimension."""
    if num_groups % num_nodes == 0:  # hierarchical: replicated within a node
        return (num_replicas - num_experts) // num_nodes + 1
    return num_replicas - num_experts + 1


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> Plan:
    """Replication and placement of experts that balances the loads of GPUs.

    Args:
      weight: [L, E] loads per logical expert (token counts or their moving average), any real
        dtype, >= 0. Traced: works under jit and vmap (then it is [..., L, E] per call).
      num_replicas: R, physical expert slots per layer; a multiple of num_gpus, >= E.
      num_groups: expert groups of group-limited routing; E must divide by it (hierarchical).
      num_nodes: server nodes; with num_groups % num_nodes == 0 the hierarchical policy is used,
        else the global one (which, like the reference's, ignores groups and nodes).
      num_gpus: GPUs in all; a multiple of num_nodes (hierarchical). GPU g holds slots
        [g R/G, (g+1) R/G); in the hierarchical policy node n holds GPUs [n G/N, (n+1) G/N).

    Returns:
      Plan(phy2log [L, R] int32, log2phy [L, E, max_replicas] int32 (-1 padded),
           logcnt [L, E] int32).
    """
    sizes = dict(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes,
                 num_gpus=num_gpus)
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"rebalance_experts: {name}={value!r} must be a positive int "
                             "(a static size, not a traced value)")
    num_replicas, num_groups, num_nodes, num_gpus = map(operator.index, sizes.values())
    if not hasattr(weight, "shape"):  # a nested list, say
        weight = np.asarray(weight)
    shape = getattr(weight, "shape", None)
    dtype = getattr(weight, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"rebalance_experts: weight must be [layers, experts], got shape {shape}")
    if dtype is None or not (jnp.issubdtype(dtype, jnp.integer) or
                             jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"rebalance_experts: weight must hold integer or float loads, got {dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"rebalance_experts: weight must be [layers, experts] with at least one "
                         f"of each, got shape {shape}")
    num_experts = shape[1]
    # As in the reference, groups and nodes constrain only the hierarchical policy: the global
    # one packs all replicas straight onto the GPUs.
    if num_groups % num_nodes == 0 and num_experts % num_groups:
        raise ValueError(f"rebalance_experts: {num_experts} experts (weight shape {shape}) do not "
                         f"divide into num_groups={num_groups} groups")
    if num_groups % num_nodes == 0 and num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} is not a multiple of "
                         f"num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} is not a multiple of "
                         f"num_gpus={num_gpus} (every GPU holds the same number of slots)")
    if num_replicas < num_experts:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} is less than the "
                         f"{num_experts} experts (weight shape {shape}): every expert needs a slot")
    if not isinstance(weight, jax.Array):
        # Host loads become float32 here, as the reference's weight.float(): handed to jit,
        # int64 / uint64 counts would first be narrowed to int32 (x64 off) and wrap.
        weight = np.asarray(weight, np.float32)
    return _rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus) -> Plan:
    num_layers, num_experts = weight.shape
    w = weight.astype(jnp.float32)
    w = jnp.where((w == 0) | jnp.isnan(w), 0.0, w)  # -0.0 and nan count as 0.0
    if num_groups % num_nodes:  # global policy: one node holding a single group
        num_groups = num_nodes = 1
    phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    width = max_replicas(num_experts, num_replicas, num_groups, num_nodes)
    log2phy = jnp.full((num_layers, num_experts * width), -1, jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(num_replicas, dtype=jnp.int32), phy2log.shape)
    log2phy = _scatter_rows(log2phy, phy2log * width + rank, slots)
    return Plan(phy2log, log2phy.reshape(num_layers, num_experts, width), logcnt)


def _hierarchical(w_LE, num_phy, num_groups, num_nodes, num_gpus):
    """Groups -> nodes, replicas within nodes, replicas -> GPUs. Returns (phy2log, rank, logcnt)."""
    num_layers, num_log = w_LE.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    log_per_node, phy_per_node = num_log // num_nodes, num_phy // num_nodes

    # 1. Groups to nodes. "mlog" numbers experts node by node: node n holds [n E/N, (n+1) E/N).
    group_load = _sum_in_order(w_LE.reshape(num_layers, num_groups, group_size))
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    first = (group_node * groups_per_node + group_rank) * group_size            # [L, G]
    log2mlog = (first[:, :, None] + jnp.arange(group_size, dtype=jnp.int32)).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)

    # 2. Replicas within each node: rows are (layer, node) pairs.
    w_mlog = jnp.take_along_axis(w_LE, mlog2log, -1).reshape(-1, log_per_node)
    phy2mlog, phy_rank, mlog_cnt = replicate_experts(w_mlog, phy_per_node)

    # 3. Each node's replicas to its GPUs; a replica carries its expert's load / replicas.
    w_phy = jnp.take_along_axis(w_mlog / mlog_cnt, phy2mlog, -1)
    gpu, rank_in_gpu = balanced_packing(w_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * per_gpu + rank_in_gpu)  # slot on the node -> replica

    node_base = jnp.arange(num_nodes, dtype=jnp.int32)[:, None] * log_per_node
    pphy2mlog = (jnp.take_along_axis(phy2mlog, pphy2phy, -1).reshape(num_layers, num_nodes, -1)
                 + node_base).reshape(num_layers, num_phy)
    phy2log = jnp.take_along_axis(mlog2log, pphy2mlog, -1)
    rank = jnp.take_along_axis(phy_rank, pphy2phy, -1).reshape(num_layers, num_phy)
    logcnt = jnp.take_along_axis(mlog_cnt.reshape(num_layers, num_log), log2mlog, -1)
    return phy2log, rank, logcnt


def gpu_loads(weight, plan, num_gpus: int):
    """Load of each GPU under a plan, each replica carrying its expert's load / replicas.

    Args:
      weight: [L, E] loads.
      plan: (phy2log [L, R], log2phy, logcnt [L, E]), e.g. a `Plan`.
      num_gpus: G; GPU g holds slots [g R/G, (g+1) R/G).

    Returns:
      [L, G] float32.
    """
    phy2log, _, logcnt = plan
    per_replica = jnp.asarray(weight, jnp.float32) / jnp.asarray(logcnt)
    slot_load = jnp.take_along_axis(per_replica, jnp.asarray(phy2log), -1)
    return slot_load.reshape(slot_load.shape[0], num_gpus, -1).sum(-1)


def balanced_packing(weight_XN, num_packs: int):
    """Greedy packing of N items into num_packs packs of exactly N / num_packs items per row.

    Items go heaviest first (equal loads in the order of the reference's sort: index order up to
    16 items, std::sort's beyond), each into the lightest pack that is not yet full, the
    lowest-numbered one on ties. Pack loads add up in float32 in that order,
    as the reference's do, so comparisons between them agree bit for bit.

    Args:
      weight_XN: [X, N] float32 loads.
      num_packs: M, dividing N.

    Returns:
      (pack [X, N] int32 in [0, M), rank [X, N] int32: the item's position in its pack).
    """
    pack_NX, rank_NX = _pack(weight_XN.T, num_packs)
    return pack_NX.T, rank_NX.T


def replicate_experts(weight_XE, num_phy: int):
    """Adds num_phy - E replicas, each to the expert with the largest load / replicas so far.

    Args:
      weight_XE: [X, E] float32 loads.
      num_phy: P >= E physical slots.

    Returns:
      (phy2log [X, P] int32: slot p < E holds expert p, slot E + t the t-th replica added;
       rank [X, P] int32: the replica's number within its expert (0 for the first);
       logcnt [X, E] int32 replicas per expert).
    """
    phy2log, rank, logcnt = _replicate(weight_XE.T, num_phy)
    return phy2log.T, rank.T, logcnt.T


# The steps work item-major, [items, rows]: every sequential step is then elementwise over the
# rows (layers x nodes), which XLA:CPU vectorises; reductions over items run across vectors.


def _pack(w_NX, num_packs):
    n, rows = w_NX.shape
    per_pack = n // num_packs
    if per_pack == 1:  # one item per pack: item i alone in pack i, as in the reference
        ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, rows))
        return ids, jnp.zeros((n, rows), jnp.int32)
    order_NX = _descending_rank(w_NX)  # item i is placed order[i]-th
    cols = jnp.arange(rows, dtype=jnp.int32)
    w_sorted = jnp.zeros_like(w_NX).at[order_NX, cols].set(w_NX, unique_indices=True)
    packs = jnp.arange(num_packs, dtype=jnp.int32)[:, None]

    def place(carry, w_X):
        load_MX, count_MX = carry
        is_open = count_MX < per_pack
        masked = jnp.where(is_open, load_MX, jnp.inf)
        lightest = masked.min(0)
        choice = jnp.where(is_open & (masked == lightest), packs, num_packs).min(0)
        # No open pack compared equal (inf - inf loads): take the first open one.
        choice = jnp.where(choice < num_packs, choice,
                           jnp.where(is_open, packs, num_packs).min(0))
        hit = packs == choice
        rank = jnp.where(hit, count_MX, 0).sum(0)
        return (jnp.where(hit, load_MX + w_X, load_MX), count_MX + hit), (choice, rank)

    init = (jnp.zeros((num_packs, rows), jnp.float32), jnp.zeros((num_packs, rows), jnp.int32))
    _, (pack_sorted, rank_sorted) = jax.lax.scan(place, init, w_sorted)
    return (jnp.take_along_axis(pack_sorted, order_NX, 0),
            jnp.take_along_axis(rank_sorted, order_NX, 0))


def _descending_rank(w_NX):
    """Position of each item in the reference's descending sort, per column: [N, X] int32.

    Up to 16 items that sort is stable (an insertion sort): counting the items that go before
    each one (N^2 compares, all vectorised) is several times faster than XLA:CPU's comparator
    sort. Longer columns follow std::sort's partitions (`_std_sort_order`)."""
    n = w_NX.shape[0]
    w_NX = jnp.where(jnp.isnan(w_NX), -jnp.inf, w_NX)  # (inf - inf): a total order all the same
    if n > _STD_SORT_THRESHOLD:
        order_XN = jax.vmap(_std_sort_order)(w_NX.T)
        return _inverse(order_XN).T
    ids = jnp.arange(n, dtype=jnp.int32)[:, None]

    def count(j, rank_NX):
        w_j = w_NX[j]
        goes_before = (w_j > w_NX) | ((w_j == w_NX) & (j < ids))
        return rank_NX + goes_before.astype(jnp.int32)

    return jax.lax.fori_loop(0, n, count, jnp.zeros(w_NX.shape, jnp.int32))


# ------------------------------------------------------------- the reference's sort, emulated
# DeepSeek's planner sorts with torch.sort(descending=True) on the CPU, which is libstdc++'s
# std::sort (introsort) of (key, index) pairs under key_a > key_b: an insertion sort for rows of
# at most 16 items (stable), otherwise median-of-3 partitions down to segments of 16 (heapsort for
# a segment still longer after 2 floor(log2 n) levels), then one insertion sort over the row.
# Ties come out in the order the partitions leave them. Below, that order is computed exactly:
# each partition in closed form (vectorised), the final insertion sort as the stable sort it is.

_STD_SORT_THRESHOLD = 16  # libstdc++'s _S_threshold


def _std_sort_order(keys, depth_limit=None):
    """Item ids in the order std::sort under `key_a > key_b` leaves them: [n] int32 (n static).

    keys: [n] float32 without NaN. depth_limit: the introsort depth (default 2 floor(log2 n), as
    std::sort; tests lower it to reach the heapsort)."""
    n = keys.shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)
    keys = jnp.where(keys == 0, 0.0, keys)  # -0.0 ties with 0.0 (the argsort orders them apart)
    depth = 2 * (n.bit_length() - 1) if depth_limit is None else depth_limit
    stack = jnp.zeros((n + 2, 3), jnp.int32).at[0].set(jnp.array([0, n, depth], jnp.int32))
    heaps = jnp.zeros((n + 2, 2), jnp.int32)

    # The stack holds segments of more than 16 items only (the rest wait for the insertion
    # sort); the order segments are taken in does not matter: they are disjoint.
    def body(state):
        keys, ids, stack, sp, heaps, nheap = state
        sp = sp - 1
        first, last, depth = stack[sp, 0], stack[sp, 1], stack[sp, 2]
        part, heap = depth > 0, depth == 0
        k2, i2, cut = _std_partition(keys, ids, first, last)
        keys, ids = jnp.where(part, k2, keys), jnp.where(part, i2, ids)
        for lo, hi in ((cut, last), (first, cut)):
            push = part & (hi - lo > _STD_SORT_THRESHOLD)
            stack = jnp.where(push, stack.at[sp].set(jnp.stack([lo, hi, depth - 1])), stack)
            sp = sp + push
        heaps = jnp.where(heap, heaps.at[nheap].set(jnp.stack([first, last])), heaps)
        return keys, ids, stack, sp, heaps, nheap + heap

    # up to 16 items nothing is partitioned: the insertion sort alone (stable)
    init = (keys, ids, stack, jnp.int32(n > _STD_SORT_THRESHOLD), heaps, jnp.int32(0))
    keys, ids, _, _, heaps, nheap = jax.lax.while_loop(lambda s: s[3] > 0, body, init)

    def heap_one(state):
        j, keys, ids = state
        keys, ids = _std_heap_sort(keys, ids, heaps[j, 0], heaps[j, 1])
        return j + 1, keys, ids

    _, keys, ids = jax.lax.while_loop(lambda s: s[0] < nheap, heap_one, (jnp.int32(0), keys, ids))
    # the final insertion sort: a stable sort of the arrangement the partitions left
    return ids[jnp.argsort(-keys, stable=True)]


def _std_partition(keys, ids, first, last):
    """std::__unguarded_partition_pivot on [first, last): the median of a[first + 1], a[mid],
    a[last - 1] swapped to first, then Hoare's scans from both ends, swapping the k-th stop of
    the left scan (an item <= pivot) with the k-th of the right (>= pivot) while left < right.
    The stops come from the array as it was: the scans stop where the swaps left items, so the
    k-th swap pairs the k-th left and right candidates; the cut is where the left scan stops
    after the last swap. Returns (keys, ids, cut)."""
    n = keys.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    ka, kb, kc = keys[a], keys[b], keys[c]
    median = jnp.where(ka > kb, jnp.where(kb > kc, b, jnp.where(ka > kc, c, a)),
                       jnp.where(ka > kc, a, jnp.where(kb > kc, c, b)))
    swap = jnp.where(pos == first, median, jnp.where(pos == median, first, pos))
    keys, ids = keys[swap], ids[swap]
    pivot = keys[first]
    inside = (pos > first) & (pos < last)
    left = inside & ~(keys > pivot)    # where the left scan stops
    right = inside & ~(pivot > keys)   # where the right scan stops
    rank_l = jnp.cumsum(left) - 1                      # k-th stop from the left
    rank_r = jnp.cumsum(right[::-1])[::-1] - 1          # k-th stop from the right
    stops_l = jnp.full(n + 1, n, jnp.int32).at[jnp.where(left, rank_l, n)].set(pos).at[n].set(n)
    stops_r = jnp.full(n + 1, -1, jnp.int32).at[jnp.where(right, rank_r, n)].set(pos).at[n].set(-1)
    swaps = jnp.sum(stops_l[:n] < stops_r[:n]).astype(jnp.int32)   # a prefix of the pairs
    cut = jnp.minimum(stops_l[swaps], jnp.where(swaps > 0, stops_r[swaps - 1], n))
    partner = jnp.where(left & (rank_l < swaps), stops_r[jnp.maximum(rank_l, 0)],
                        jnp.where(right & (rank_r < swaps), stops_l[jnp.maximum(rank_r, 0)], pos))
    return keys[partner], ids[partner], cut


def _std_heap_sort(keys, ids, first, last):
    """std::__partial_sort(first, last, last): make_heap, then sort_heap, as libstdc++."""
    length = last - first

    # Under vmap a loop body also runs for the columns whose loop is over, on their idle state:
    # indices stay in range there (a negative hole would never leave the sift-down loop).
    def make(j, kv):
        parent = jnp.maximum((length - 2) // 2 - j, 0)
        return _std_adjust_heap(*kv, first, parent, length, kv[0][first + parent],
                                kv[1][first + parent])

    keys, ids = jax.lax.fori_loop(0, jnp.maximum((length - 2) // 2 + 1, 0), make, (keys, ids))

    def pop(j, kv):
        keys, ids = kv
        end = last - 1 - j
        vk, vi = keys[end], ids[end]
        keys, ids = keys.at[end].set(keys[first]), ids.at[end].set(ids[first])
        return _std_adjust_heap(keys, ids, first, 0, end - first, vk, vi)

    return jax.lax.fori_loop(0, jnp.maximum(length - 1, 0), pop, (keys, ids))


def _std_adjust_heap(keys, ids, first, hole, length, vk, vi):
    """std::__adjust_heap (then __push_heap) of value (vk, vi) into the hole, a max-heap of
    `key_a > key_b` over [first, first + length)."""
    top = hole

    def down(state):
        hole, child, keys, ids = state
        child = 2 * (child + 1)
        child = jnp.where(keys[first + child] > keys[first + child - 1], child - 1, child)
        return child, child, keys.at[first + hole].set(keys[first + child]), \
            ids.at[first + hole].set(ids[first + child])

    hole, child, keys, ids = jax.lax.while_loop(
        lambda s: (s[1] >= 0) & (s[1] < (length - 1) // 2), down, (hole, hole, keys, ids))
    tail = ((length & 1) == 0) & (child == (length - 2) // 2)
    src = first + 2 * (child + 1) - 1
    keys = jnp.where(tail, keys.at[first + hole].set(keys[src]), keys)
    ids = jnp.where(tail, ids.at[first + hole].set(ids[src]), ids)
    hole = jnp.where(tail, 2 * (child + 1) - 1, hole)

    def up_cond(state):
        hole, keys, _ = state
        return (hole > top) & (keys[first + (hole - 1) // 2] > vk)

    def up(state):
        hole, keys, ids = state
        parent = (hole - 1) // 2
        return parent, keys.at[first + hole].set(keys[first + parent]), \
            ids.at[first + hole].set(ids[first + parent])

    hole, keys, ids = jax.lax.while_loop(up_cond, up, (hole, keys, ids))
    return keys.at[first + hole].set(vk), ids.at[first + hole].set(vi)


def _replicate(w_EX, num_phy):
    num_log, rows = w_EX.shape
    ids = jnp.broadcast_to(jnp.arange(num_log, dtype=jnp.int32)[:, None], (num_log, rows))
    if num_phy == num_log:
        return ids, jnp.zeros_like(ids), jnp.ones_like(ids)

    def add(cnt_EX, _):
        per_replica = w_EX / cnt_EX.astype(jnp.float32)
        best = per_replica.max(0)
        # The first expert at the maximum, as torch's max(dim).indices and numpy's argmax.
        pick = jnp.minimum(jnp.where(per_replica == best, ids, num_log).min(0), num_log - 1)
        hit = ids == pick
        rank = jnp.where(hit, cnt_EX, 0).sum(0)
        return cnt_EX + hit, (pick, rank)

    cnt, (picks, ranks) = jax.lax.scan(add, jnp.ones_like(ids), None, length=num_phy - num_log)
    return (jnp.concatenate([ids, picks]), jnp.concatenate([jnp.zeros_like(ids), ranks]), cnt)


def _sum_in_order(x):
    """Sum over the last axis, left to right: the same float32 rounding as the numpy reference."""
    total = x[..., 0]
    for j in range(1, x.shape[-1]):
        total = total + x[..., j]
    return total


def _scatter_rows(out_XN, index_XN, values_XN):
    """out[x, index[x, n]] = values[x, n]."""
    rows = jnp.arange(out_XN.shape[0], dtype=jnp.int32)[:, None]
    return out_XN.at[rows, index_XN].set(values_XN, unique_indices=True)


def _inverse(perm_XN):
    """Row-wise inverse of permutations: inv[x, perm[x, n]] = n."""
    n = perm_XN.shape[-1]
    return _scatter_rows(jnp.zeros_like(perm_XN), perm_XN,
                         jnp.broadcast_to(jnp.arange(n, dtype=perm_XN.dtype), perm_XN.shape))


# ----------------------------------------------------------------------------- reference


def rebalance_experts_reference(weight, num_replicas: int, num_groups: int, num_nodes: int,
                                num_gpus: int) -> Plan:
    """The same plan by the plain greedy loops, in numpy float32: the oracle and the baseline.

    Equivalent to DeepSeek's `eplb.rebalance_experts` (its sorts as std::sort runs them, step by
    step: `_std_sort_order_np`), and to `rebalance_experts` (which must agree with it bit for
    bit, ties included). Returns numpy arrays in a Plan; log2phy as wide as
    `rebalance_experts`'.
    """
    w = np.asarray(weight).astype(np.float32)
    w = np.where((w == 0) | np.isnan(w), np.float32(0), w)
    layers, num_log = w.shape
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    group_size, per_gpu = num_log // num_groups, num_replicas // num_gpus
    log_per_node, phy_per_node = num_log // num_nodes, num_replicas // num_nodes
    phy2log = np.zeros((layers, num_replicas), np.int32)
    rank = np.zeros((layers, num_replicas), np.int32)
    logcnt = np.zeros((layers, num_log), np.int32)
    for layer in range(layers):
        group_load = w[layer].reshape(num_groups, group_size)[:, 0].copy()
        for j in range(1, group_size):
            group_load += w[layer].reshape(num_groups, group_size)[:, j]
        group_node, group_rank = _greedy_pack(group_load, num_nodes)
        mlog2log = np.zeros(num_log, np.int64)  # experts numbered node by node
        for g in range(num_groups):
            first = (group_node[g] * (num_groups // num_nodes) + group_rank[g]) * group_size
            mlog2log[first:first + group_size] = np.arange(g * group_size, (g + 1) * group_size)
        for node in range(num_nodes):
            experts = mlog2log[node * log_per_node:(node + 1) * log_per_node]
            load = w[layer, experts]
            cnt = np.ones(log_per_node, np.int64)
            replicas = [(i, 0) for i in range(log_per_node)]  # (expert on the node, rank)
            for _ in range(phy_per_node - log_per_node):
                i = int(np.argmax(load / cnt.astype(np.float32)))
                replicas.append((i, int(cnt[i])))
                cnt[i] += 1
            replica_load = np.array([load[i] / np.float32(cnt[i]) for i, _ in replicas],
                                    np.float32)
            gpu, slot = _greedy_pack(replica_load, num_gpus // num_nodes)
            for (i, r), g, s in zip(replicas, gpu, slot):
                p = node * phy_per_node + g * per_gpu + s
                phy2log[layer, p], rank[layer, p] = experts[i], r
            logcnt[layer, experts] = cnt
    width = max_replicas(num_log, num_replicas, num_groups, num_nodes)
    log2phy = np.full((layers, num_log, width), -1, np.int32)
    for layer in range(layers):
        log2phy[layer, phy2log[layer], rank[layer]] = np.arange(num_replicas)
    return Plan(phy2log, log2phy, logcnt)


def _greedy_pack(load, num_packs):
    """One row of `balanced_packing`, item by item: -> (pack, rank) lists."""
    n = len(load)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack, rank = [0] * n, [0] * n
    totals, counts = [np.float32(0)] * num_packs, [0] * num_packs
    for i in _std_sort_order_np(np.asarray(load, np.float32)):
        p = min((j for j in range(num_packs) if counts[j] < per_pack), key=totals.__getitem__)
        pack[i], rank[i] = p, counts[p]
        totals[p] = np.float32(totals[p] + load[i])
        counts[p] += 1
    return pack, rank


def _std_sort_order_np(keys, depth_limit=None):
    """`_std_sort_order` step by step, as libstdc++'s std::sort runs (the oracle of the tests):
    introsort of (key, index) pairs under key_a > key_b, heapsort past the depth limit, then
    the insertion sort."""
    a = [(float(k), i) for i, k in enumerate(keys)]
    n = len(a)
    gt = lambda x, y: x[0] > y[0]

    def swap(i, j):
        a[i], a[j] = a[j], a[i]

    def partition(first, last):
        mid = first + (last - first) // 2
        i, j, k = first + 1, mid, last - 1
        if gt(a[i], a[j]):
            swap(first, j if gt(a[j], a[k]) else k if gt(a[i], a[k]) else i)
        else:
            swap(first, i if gt(a[i], a[k]) else k if gt(a[j], a[k]) else j)
        lo, hi = first + 1, last
        while True:
            while gt(a[lo], a[first]):
                lo += 1
            hi -= 1
            while gt(a[first], a[hi]):
                hi -= 1
            if lo >= hi:
                return lo
            swap(lo, hi)
            lo += 1

    def adjust_heap(first, hole, length, value):
        top = child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if gt(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        while hole > top and gt(a[first + (hole - 1) // 2], value):
            a[first + hole] = a[first + (hole - 1) // 2]
            hole = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first, last):
        for parent in range((last - first - 2) // 2, -1, -1):
            adjust_heap(first, parent, last - first, a[first + parent])
        for end in range(last - 1, first, -1):
            value, a[end] = a[end], a[first]
            adjust_heap(first, 0, end - first, value)

    def introsort(first, last, depth):
        while last - first > _STD_SORT_THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            cut = partition(first, last)
            introsort(cut, last, depth)
            last = cut

    if n > _STD_SORT_THRESHOLD:
        introsort(0, n, 2 * (n.bit_length() - 1) if depth_limit is None else depth_limit)
    # the insertion sort (stable): what is left to do, whatever the stretch it runs over
    return np.array([i for _, i in sorted(a, key=lambda x: -x[0])], np.int64)
