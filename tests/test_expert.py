"""Expert parallelism: routing ops, EP = 1/2/4/8 equivalence, capacity budgets, bad layouts.

Runs on 8 virtual CPU devices (tests/conftest.py). XLA:CPU has no ragged-all-to-all, so the
"ragged" exchange is checked through its all_gather emulation ("emulated"), which shares every
offset and budget computation with it; the real collective runs in the GPU test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_ds.models import DeepSeekConfig, DeepSeekMoE, expert_ffn
from jax_ds.ops import quantize_fp8
from jax_ds.parallel import expert as ep_lib
from jax_ds.parallel.mesh import (EXPERT, make_mesh, mesh_from_spec, parse_mesh, shard_batch,
                                  shard_model)
from jax_ds.testing import calc_diff, tolerance

# Mesh tests use the 8 virtual CPU devices even on a GPU host (conftest asks for them).
CPU = jax.devices("cpu")


@pytest.fixture(autouse=True)
def on_cpu(request):
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(CPU[0]):
        yield


def cpu_mesh(**sizes):
    return make_mesh(**sizes, devices=CPU[:int(np.prod(list(sizes.values())))])


SMALL = dict(d_model=32, expert_hidden=16, num_experts=8, top_k=2, num_groups=4,
             topk_groups=2, num_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, dense_hidden=64)


def small_cfg(**changes):
    return DeepSeekConfig.tiny(**{**SMALL, **changes})


def dense_moe_reference(x_ND, idx_NK, w_NK, w_gate, w_up, w_down):
    """Every expert on every token, then pick: sum_k w[n,k] FFN_{idx[n,k]}(x[n]); -1 skipped."""
    h = jax.nn.silu(jnp.einsum("ND,EFD->NEF", x_ND, w_gate)) * jnp.einsum("ND,EFD->NEF", x_ND, w_up)
    y_NED = jnp.einsum("NEF,EDF->NED", h, w_down)
    picked = jnp.take_along_axis(y_NED, jnp.maximum(idx_NK, 0)[..., None], axis=1)
    return jnp.einsum("NKD,NK->ND", picked, jnp.where(idx_NK >= 0, w_NK, 0.0))


def random_routing(key, n, k, e):
    """Distinct experts per token (as top-k gives), plus gate weights."""
    k1, k2 = jax.random.split(key)
    idx = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(k1, n))
    return idx.astype(jnp.int32), jax.random.uniform(k2, (n, k))


def test_moe_permute_unpermute_roundtrip():
    n, k, e, d = 13, 3, 5, 4
    x = jax.random.normal(jax.random.key(0), (n, d))
    idx, w = random_routing(jax.random.key(1), n, k, e)
    idx = idx.at[2, 1].set(-1).at[7, 0].set(-1)  # dropped slots
    x_sorted, sizes, perm = ep_lib.moe_permute(x, idx, e)
    assert x_sorted.shape == (n * k, d) and sizes.shape == (e,) and perm.shape == (n, k)
    np.testing.assert_array_equal(sizes, np.bincount(np.asarray(idx).ravel()[idx.ravel() >= 0],
                                                     minlength=e))
    assert int(perm[2, 1]) == -1 and int(perm[7, 0]) == -1
    rows = np.asarray(perm)[np.asarray(idx) >= 0]
    np.testing.assert_array_equal(x_sorted[rows], np.repeat(x, k, 0)[np.asarray(idx).ravel() >= 0])
    np.testing.assert_array_equal(x_sorted[int(sizes.sum()):], 0)  # rows past the end
    # Experts appear in increasing order.
    np.testing.assert_array_equal(ep_lib.expert_of_rows(sizes, n * k)[:int(sizes.sum())],
                                  np.repeat(np.arange(e), sizes))
    # Identity expert: unpermute(permute(x)) = x * sum of the live weights.
    out = ep_lib.moe_unpermute(x_sorted, perm, w)
    np.testing.assert_allclose(out, x * jnp.where(idx >= 0, w, 0).sum(1, keepdims=True),
                               rtol=1e-6)


def test_expert_ffn_matches_dense_reference():
    n, k, e, d, f = 24, 2, 4, 16, 8
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (n, d))
    idx, w = random_routing(keys[1], n, k, e)
    wg, wu = (jax.random.normal(kk, (e, f, d)) / 4 for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (e, d, f)) / 3
    x_sorted, sizes, perm = ep_lib.moe_permute(x, idx, e)
    out = ep_lib.moe_unpermute(expert_ffn(x_sorted, sizes, wg, wu, wd), perm, w)
    assert calc_diff(out, dense_moe_reference(x, idx, w, wg, wu, wd)) < tolerance("float32")


def test_ragged_reference_matches_documented_example():
    """jax.lax.ragged_all_to_all's docstring example, through the all_gather emulation."""
    mesh = cpu_mesh(expert=2)
    args = dict(operand=[[1, 2, 2, 0], [3, 4, 0, 0]], output=[[0] * 4, [0] * 4],
                input_offsets=[[0, 1], [0, 1]], send_sizes=[[1, 2], [1, 1]],
                output_offsets=[[0, 0], [1, 2]], recv_sizes=[[1, 1], [2, 1]])
    arrays = [jnp.asarray(v, jnp.int32).reshape(-1) for v in args.values()]

    def body(*a):
        return ep_lib.ragged_all_to_all_reference(*a, axis_name=EXPERT)

    out = jax.shard_map(body, mesh=mesh, in_specs=(P(EXPERT),) * 6, out_specs=P(EXPERT))(*arrays)
    np.testing.assert_array_equal(np.asarray(out).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("exchange", ["padded", "emulated"])
def test_fp8_dispatch_is_the_quantized_bf16_dispatch(exchange):
    """FP8 dispatch (scales travelling with their rows) gives, bit for bit, quantize_fp8 of the
    bf16 dispatch's received rows; group sizes and the combine's state are the same."""
    ep, n, k, e, d = 4, 24, 3, 8, 320   # d not a multiple of 128: a partial last group
    mesh = cpu_mesh(expert=ep)
    x = jax.random.normal(jax.random.key(0), (ep * n, d), jnp.bfloat16) * 3
    idx, _ = random_routing(jax.random.key(1), ep * n, k, e)
    idx = idx.at[5, 1].set(-1)   # a dropped slot
    cap = ep_lib.ep_capacity(n, k, e, ep)

    def body(x, idx):
        (q, s), sizes, _, st = ep_lib.ep_dispatch(x, idx, num_experts=e, axis_name=EXPERT,
                                                  capacity=cap, exchange=exchange, fp8=True)
        xr, sizes_b, _, st_b = ep_lib.ep_dispatch(x, idx, num_experts=e, axis_name=EXPERT,
                                                  capacity=cap, exchange=exchange)
        rq, rs = quantize_fp8(xr, block=(1, 128))
        real = (jnp.arange(xr.shape[0]) < sizes.sum())[:, None]
        same = (jnp.all(jnp.where(real, q.view(jnp.uint8) == rq.view(jnp.uint8), True)) &
                jnp.all(jnp.where(real, s == rs, True)) & jnp.all(sizes == sizes_b) &
                jnp.all(st.order == st_b.order))
        zero_tail = jnp.all(jnp.where(real, True, (q.view(jnp.uint8) == 0)))
        return same[None], zero_tail[None], sizes.sum()[None]

    same, zero_tail, rows = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(EXPERT),) * 2,
                                                  out_specs=P(EXPERT)))(x, idx)
    assert bool(same.all()) and bool(zero_tail.all())
    assert int(rows.sum()) == int((idx >= 0).sum())


def test_pack_fp8_rows_round_trip():
    x = jax.random.normal(jax.random.key(2), (5, 200), jnp.float32)
    rows = ep_lib.pack_fp8_rows(x)
    assert rows.dtype == jnp.uint8 and rows.shape == (5, 200 + 4 * 2)
    q, s = ep_lib.unpack_fp8_rows(rows, 200)
    rq, rs = quantize_fp8(x, block=(1, 128))
    np.testing.assert_array_equal(np.asarray(q.view(jnp.uint8)), np.asarray(rq.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))


def _layer_value_and_grads(layer, x_BTD, r_BTD):
    def loss_fn(layer, x):
        y, stats = layer(x)
        return jnp.sum(y * r_BTD), (y, stats)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True)
    (_, (y, stats)), (g_layer, g_x) = nnx.jit(grad_fn)(layer, x_BTD)
    return y, stats, g_x, jax.tree.leaves(g_layer)


def _make_layer(cfg, mesh):
    layer = DeepSeekMoE(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    # A non-zero selection bias, so EP must route exactly as the unsharded layer does.
    layer.router.bias[...] = 0.05 * jax.random.normal(jax.random.key(9), (cfg.num_experts,))
    return layer if mesh is None else shard_model(layer, mesh)


@pytest.fixture(scope="module")
def unsharded_result():
    cfg = small_cfg()
    x = jax.random.normal(jax.random.key(3), (8, 6, cfg.d_model))
    r = jax.random.normal(jax.random.key(4), x.shape)
    return cfg, x, r, _layer_value_and_grads(_make_layer(cfg, None), x, r)


@pytest.mark.parametrize("ep,exchange,dedup", [
    (1, "padded", False), (2, "padded", False), (4, "padded", False), (8, "padded", False),
    (2, "emulated", False), (8, "emulated", False),
    (2, "padded", True), (8, "padded", True), (4, "emulated", True), (8, "emulated", True)])
def test_ep_matches_unsharded_layer(unsharded_result, ep, exchange, dedup):
    """EP over `expert` (the other 8/ep devices on `data`) = the unsharded layer, fwd and grads;
    with dedup, tokens travel once per rank and the gate weights are applied there."""
    cfg, x, r, (y0, stats0, gx0, g0) = unsharded_result
    mesh = cpu_mesh(data=8 // ep, expert=ep)
    layer = _make_layer(cfg.replace(ep_exchange=exchange, ep_dedup=dedup), mesh)
    y, stats, gx, g = _layer_value_and_grads(layer, x, r)
    tol = tolerance("float32")
    assert calc_diff(y, y0) < tol
    assert calc_diff(gx, gx0) < tol
    assert len(g) == len(g0)
    for a, b in zip(g, g0):
        assert a.shape == b.shape and calc_diff(a, b) < tol
    np.testing.assert_array_equal(stats.counts, stats0.counts)
    assert int(stats.counts.sum()) == x.shape[0] * x.shape[1] * cfg.top_k
    assert int(stats.dropped) == 0  # the default budget is lossless
    # Experts really are split: each device holds E / ep of them.
    shard_shape = layer.w_gate[...].addressable_shards[0].data.shape
    assert shard_shape[0] == cfg.num_experts // ep


@pytest.mark.parametrize("b,t,dedup", [(1, 1, False), (1, 3, True), (3, 5, False), (4, 2, True)])
def test_ep_takes_any_batch(b, t, dedup):
    """Token counts that do not divide by data x expert = 8 (one decoding sequence, an odd batch)
    are padded with tokens routed nowhere: same outputs, grads and counts as the unsharded layer."""
    cfg = small_cfg(ep_dedup=dedup)
    x = jax.random.normal(jax.random.key(5), (b, t, cfg.d_model))
    r = jax.random.normal(jax.random.key(6), x.shape)
    y0, stats0, gx0, g0 = _layer_value_and_grads(_make_layer(cfg, None), x, r)
    y, stats, gx, g = _layer_value_and_grads(_make_layer(cfg, cpu_mesh(data=2, expert=4)), x, r)
    tol = tolerance("float32")
    assert y.shape == x.shape and calc_diff(y, y0) < tol and calc_diff(gx, gx0) < tol
    for a, b_ in zip(g, g0, strict=True):
        assert a.shape == b_.shape and calc_diff(a, b_) < tol
    np.testing.assert_array_equal(stats.counts, stats0.counts)
    assert int(stats.counts.sum()) == b * t * cfg.top_k and int(stats.dropped) == 0


def _expected_keep(idx_NK, shards, ep, e, capacity, exchange):
    """Numpy model of the budgets. Each source shard offers its rows in (expert, token, slot)
    order. padded: each (source, destination) pair keeps its first `capacity` rows. ragged: each
    destination keeps ep x capacity rows, filled from source ranks 0, 1, ... of its data replica.
    """
    keep = np.ones(idx_NK.shape, bool)
    per_shard, k = idx_NK.shape[0] // shards, idx_NK.shape[1]
    local = e // ep
    received = {}  # (data replica, destination) -> rows taken so far (ragged)
    for s in range(shards):
        flat = idx_NK[s * per_shard:(s + 1) * per_shard].ravel()
        sent = np.zeros(ep, int)
        for pos in np.argsort(flat, kind="stable"):
            dst = flat[pos] // local
            if exchange == "padded":
                ok = sent[dst] < capacity
            else:
                ok = received.get((s // ep, dst), 0) < ep * capacity
                received[(s // ep, dst)] = received.get((s // ep, dst), 0) + ok
            sent[dst] += 1
            keep[s * per_shard + pos // k, pos % k] = ok
    return keep


@pytest.mark.parametrize("exchange", ["padded", "emulated"])
def test_capacity_budget_counts_drops(exchange):
    """A budget below the load drops rows, reports how many, and the rest is still exact."""
    e, k, d, f, ep = 8, 2, 16, 8, 4
    mesh = cpu_mesh(data=2, expert=ep)
    b, t = 8, 4  # 4 tokens per shard x 2 slots = 8 rows per shard
    keys = jax.random.split(jax.random.key(5), 6)
    x = jax.random.normal(keys[0], (b, t, d))
    idx, w = random_routing(keys[1], b * t, k, e)
    idx = idx.at[: b * t // 2, 0].set(0)  # skew: many rows to expert 0 (rank 0)
    wg, wu = (jax.random.normal(kk, (e, f, d)) / 4 for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (e, d, f)) / 3
    factor = 0.5
    capacity = ep_lib.ep_capacity(t * (b // 8), k, e, ep, factor)
    y, counts, dropped = jax.jit(lambda *a: ep_lib.ep_moe(
        *a, expert_ffn, mesh=mesh, num_experts=e, capacity_factor=factor,
        exchange=exchange))(x, idx.reshape(b, t, k), w.reshape(b, t, k), (wg, wu, wd))
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(idx).ravel(), minlength=e))
    keep = _expected_keep(np.asarray(idx), 8, ep, e, capacity, exchange)
    assert int(dropped) == int((~keep).sum()) > 0
    ref = dense_moe_reference(x.reshape(-1, d), jnp.where(keep, idx, -1), w, wg, wu, wd)
    assert calc_diff(y.reshape(-1, d), ref) < tolerance("float32")


def _expected_keep_tokens(idx_NK, shards, ep, e, capacity, exchange):
    """Numpy model of the token budgets of `ep_dispatch_tokens`: each source shard offers a
    token to each rank owning one of its experts, in token order. padded: each (source,
    destination) pair keeps its first `capacity` tokens; ragged: each destination keeps ep x
    capacity token rows, filled from the source ranks 0, 1, ... of its data replica. An
    assignment is kept when its token reached the expert's rank."""
    per_shard, local = idx_NK.shape[0] // shards, e // ep
    owner = np.where(idx_NK >= 0, idx_NK // local, -1)
    keep = np.zeros(idx_NK.shape, bool)
    received = {}
    for s in range(shards):
        rows = range(s * per_shard, (s + 1) * per_shard)
        for dst in range(ep):
            tokens = [n for n in rows if (owner[n] == dst).any()]
            if exchange == "padded":
                budget = capacity
            else:
                budget = max(0, ep * capacity - received.get((s // ep, dst), 0))
                received[(s // ep, dst)] = received.get((s // ep, dst), 0) + len(tokens)
            for n in tokens[:budget]:
                keep[n] |= owner[n] == dst
    return keep


@pytest.mark.parametrize("exchange", ["padded", "emulated"])
def test_token_budget_counts_drops(exchange):
    """De-duplicated exchange with a budget below the load: drops whole (token, rank) rows,
    counts the assignments they carried, and the rest is still exact."""
    e, k, d, f, ep = 8, 3, 16, 8, 4
    mesh = cpu_mesh(data=2, expert=ep)
    b, t = 8, 4  # 4 tokens per shard
    keys = jax.random.split(jax.random.key(6), 6)
    x = jax.random.normal(keys[0], (b, t, d))
    idx, w = random_routing(keys[1], b * t, k, e)
    idx = idx.at[: b * t // 2, 0].set(0).at[3, 2].set(-1)  # skew toward rank 0; a dropped slot
    wg, wu = (jax.random.normal(kk, (e, f, d)) / 4 for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (e, d, f)) / 3
    factor = 0.4
    capacity = ep_lib.ep_token_capacity(t * (b // 8), k, ep, factor)
    y, counts, dropped = jax.jit(lambda *a: ep_lib.ep_moe(
        *a, expert_ffn, mesh=mesh, num_experts=e, capacity_factor=factor, exchange=exchange,
        dedup=True))(x, idx.reshape(b, t, k), w.reshape(b, t, k), (wg, wu, wd))
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(idx)[np.asarray(idx) >= 0],
                                                      minlength=e))
    keep = _expected_keep_tokens(np.asarray(idx), 8, ep, e, capacity, exchange)
    assert int(dropped) == int(((np.asarray(idx) >= 0) & ~keep).sum()) > 0
    ref = dense_moe_reference(x.reshape(-1, d), jnp.where(keep, idx, -1), w, wg, wu, wd)
    assert calc_diff(y.reshape(-1, d), ref) < tolerance("float32")


def test_token_dispatch_fp8_matches_bf16():
    """FP8 token dispatch: the received rows are quantize_fp8 of the bf16 dispatch's rows."""
    ep, n, k, e, d = 4, 16, 3, 8, 256
    mesh = cpu_mesh(expert=ep)
    x = jax.random.normal(jax.random.key(0), (ep * n, d), jnp.bfloat16)
    idx, w = random_routing(jax.random.key(1), ep * n, k, e)
    cap = ep_lib.ep_token_capacity(n, k, ep)

    def body(x, idx, w):
        kw = dict(num_experts=e, axis_name=EXPERT, capacity=cap, exchange="emulated")
        (q, s), sizes, _, _ = ep_lib.ep_dispatch_tokens(x, idx, w, fp8=True, **kw)
        xr, _, _, _ = ep_lib.ep_dispatch_tokens(x, idx, w, **kw)
        rq, rs = quantize_fp8(xr, block=(1, 128))
        real = (jnp.arange(xr.shape[0]) < sizes.sum())[:, None]
        return (jnp.all(jnp.where(real, q.view(jnp.uint8) == rq.view(jnp.uint8), True)) &
                jnp.all(jnp.where(real, s == rs, True)))[None]

    same = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(EXPERT),) * 3,
                                 out_specs=P(EXPERT)))(x, idx, w)
    assert bool(same.all())


def test_lossless_budget_and_factor_sizes():
    assert ep_lib.ep_capacity(64, 8, 256, 8) == 64 * 8
    assert ep_lib.ep_capacity(64, 8, 16, 8) == 64 * 2  # only 2 experts per rank
    assert ep_lib.ep_capacity(64, 8, 256, 8, 1.25) == 80
    assert ep_lib.ep_token_capacity(64, 8, 8) == 64   # a token reaches a rank at most once
    assert ep_lib.ep_token_capacity(64, 8, 8, 0.5) == 32
    assert ep_lib.ep_token_capacity(64, 2, 8, 1.25) == 20
    assert ep_lib.ep_token_capacity(64, 8, 8, 4.0) == 64
    with pytest.raises(ValueError, match="capacity_factor"):
        ep_lib.ep_capacity(64, 8, 256, 8, 0.0)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="not divisible by the mesh's 'expert' axis size 8"):
        DeepSeekMoE(small_cfg(num_experts=12, num_groups=4), rngs=nnx.Rngs(0),
                    mesh=cpu_mesh(expert=8))
    with pytest.raises(ValueError, match=r"needs 6 devices, have 8 \(cpu\); to use part of "
                                         r"them pass devices=jax.devices\(\)\[:6\]"):
        make_mesh(data=2, expert=3, devices=CPU)
    with pytest.raises(ValueError, match="needs 16 devices, have 8 .*device_count=N"):
        make_mesh(data=2, expert=8, devices=CPU)
    with pytest.raises(ValueError, match="must be a positive int"):
        make_mesh(expert=0, data=8, devices=CPU)
    with pytest.raises(ValueError, match="must be a positive int"):
        make_mesh(expert=True, data=8, devices=CPU)
    with pytest.raises(ValueError, match="devices is empty"):
        make_mesh(devices=[])
    assert make_mesh(expert=np.int64(8), devices=CPU).shape["expert"] == 8
    # data left out takes the devices the other axes leave
    assert dict(make_mesh(expert=4, devices=CPU).shape) == {"data": 2, "expert": 4, "pipe": 1,
                                                            "tensor": 1}
    assert make_mesh(devices=CPU).shape["data"] == 8
    assert dict(make_mesh(pipe=2, tensor=2, devices=CPU).shape)["data"] == 2
    with pytest.raises(ValueError, match=r"8 devices \(cpu\) do not divide by expert x pipe x "
                                         r"tensor = 3; give data too"):
        make_mesh(expert=3, devices=CPU)
    with pytest.raises(ValueError, match="needs 16 devices, have 8 .*device_count=N"):
        make_mesh(expert=16, devices=CPU)
    with pytest.raises(ValueError, match="expert=None must be a positive int"):
        make_mesh(data=None, expert=None, devices=CPU)
    with pytest.raises(ValueError, match="vocab_size=2.5 must be an int"):
        small_cfg(vocab_size=2.5)
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("data=2,experts=4", 8)
    assert parse_mesh("data=2,expert=-1", 8) == {"data": 2, "expert": 4}
    part = mesh_from_spec("expert=4", devices=CPU)  # the first 4 of the 8
    assert part.shape["expert"] == 4 and list(part.devices.flat) == CPU[:4]
    assert mesh_from_spec("data=2,expert=-1", devices=CPU).shape["expert"] == 4
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        mesh_from_spec("data=2,expert=8", devices=CPU)
    with pytest.raises(ValueError, match="not a multiple of data x expert = 8; pass the batch "
                                         "unplaced"):
        shard_batch(np.zeros((3, 4), np.int32), cpu_mesh(data=2, expert=4))
    with pytest.raises(ValueError, match="exchange"):
        ep_lib.resolve_exchange("nccl", cpu_mesh(expert=8))
    with pytest.raises(ValueError, match="exchange='ragged' needs GPUs"):
        ep_lib.resolve_exchange("ragged", cpu_mesh(expert=8))
    with pytest.raises(ValueError, match="ep_exchange"):
        small_cfg(ep_exchange="nccl")


@pytest.mark.parametrize("which, match", [
    ("x2d", "ep_moe: x must be 3-D"),
    ("idx_rows", r"ep_moe: topk_idx has shape \(1, 4, 2\), expected \(8, 4, 2\)"),
    ("w_k", r"ep_moe: topk_weights has shape \(8, 4, 3\), expected \(8, 4, 2\)"),
])
def test_ep_moe_names_a_mismatched_argument(which, match):
    e, k, d, f = 8, 2, 16, 8
    x = jnp.ones((8, 4, d))
    idx, w = random_routing(jax.random.key(1), 32, k, e)
    idx, w = idx.reshape(8, 4, k), w.reshape(8, 4, k)
    weights = (jnp.ones((e, f, d)), jnp.ones((e, f, d)), jnp.ones((e, d, f)))
    x, idx, w = {"x2d": (x[0], idx, w), "idx_rows": (x, idx[:1], w),
                 "w_k": (x, idx, jnp.ones((8, 4, 3)))}[which]
    with pytest.raises(ValueError, match=match):
        ep_lib.ep_moe(x, idx, w, weights, expert_ffn, mesh=cpu_mesh(data=2, expert=4),
                      num_experts=e, exchange="padded")


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=0), "capacity must be an int >= 1, got 0"),
    (dict(capacity=2.5), "capacity must be an int >= 1, got 2.5"),
    (dict(num_experts=12), "num_experts=12 must be a multiple of the expert axis size 8"),
    (dict(exchange="nccl"), "exchange must be one of"),
    (dict(exchange="auto"), "resolve 'auto' with resolve_exchange first"),
])
@pytest.mark.parametrize("dedup", [False, True])
def test_dispatch_arguments_are_checked(kwargs, match, dedup):
    mesh = cpu_mesh(expert=8)
    x = jnp.zeros((8 * 4, 16))
    idx = jnp.zeros((8 * 4, 2), jnp.int32)
    args = dict(num_experts=16, axis_name=EXPERT, capacity=4, exchange="padded") | kwargs

    def body(x, idx):
        if dedup:
            return ep_lib.ep_dispatch_tokens(x, idx, jnp.ones(idx.shape), **args)[0]
        return ep_lib.ep_dispatch(x, idx, **args)[0]

    with pytest.raises(ValueError, match=match):
        jax.shard_map(body, mesh=mesh, in_specs=(P(EXPERT),) * 2, out_specs=P(EXPERT))(x, idx)


def test_combine_and_weights_shapes_are_checked():
    mesh = cpu_mesh(expert=8)
    x = jnp.ones((8 * 4, 16))
    idx = jnp.tile(jnp.arange(2, dtype=jnp.int32), (8 * 4, 1))
    kw = dict(num_experts=16, axis_name=EXPERT, capacity=8, exchange="padded")

    def wrong_rows(x, idx):
        x_recv, _, _, state = ep_lib.ep_dispatch(x, idx, **kw)
        return ep_lib.ep_combine(x_recv[:-1], jnp.ones(idx.shape), state, axis_name=EXPERT)

    def wrong_weights(x, idx):
        return ep_lib.ep_dispatch_tokens(x, idx, jnp.ones((idx.shape[0], 1)), **kw)[0]

    for body, match in ((wrong_rows, r"ep_combine: y must be \[ep\*C, D\]"),
                        (wrong_weights, "topk_weights .* must match topk_idx")):
        with pytest.raises(ValueError, match=match):
            jax.shard_map(body, mesh=mesh, in_specs=(P(EXPERT),) * 2, out_specs=P(EXPERT))(x, idx)
    with pytest.raises(ValueError, match="num_experts=4 must be a positive multiple of ep_size=8"):
        ep_lib.ep_capacity(6, 4, 4, 8)


@pytest.mark.gpu
def test_ragged_exchange_matches_padded_on_gpu():
    """The real ragged_all_to_all (GPU only), per assignment and per (token, rank), against the
    padded path, forward and gradients."""
    ep = jax.device_count()
    if ep < 2 or 8 % ep:
        pytest.skip(f"needs 2, 4 or 8 GPUs, have {ep}")
    cfg = small_cfg()
    x = jax.random.normal(jax.random.key(3), (8, 6, cfg.d_model))
    r = jax.random.normal(jax.random.key(4), x.shape)
    results = [_layer_value_and_grads(
        _make_layer(cfg.replace(ep_exchange=ex, ep_dedup=dedup), make_mesh(expert=ep)), x, r)
        for ex, dedup in (("padded", False), ("ragged", False), ("ragged", True))]
    (y2, _, gx2, g2) = results[0]
    for y1, _, gx1, g1 in results[1:]:
        assert calc_diff(y1, y2) < tolerance("float32")
        assert calc_diff(gx1, gx2) < tolerance("float32")
        for a, b in zip(g1, g2):
            assert calc_diff(a, b) < tolerance("float32")


def _skewed_routing(rng, n, k, e, ep, how):
    """[n, k] int32 ids: "first" / "last" rank's experts only (the other ranks receive nothing),
    or uniform with ~40% of the slots dropped (-1)."""
    local = e // ep
    base = {"first": 0, "last": e - local}.get(how)
    if base is None:
        idx = np.stack([rng.permutation(e)[:k] for _ in range(n)])
        idx[rng.random(idx.shape) < 0.4] = -1
    else:
        idx = np.stack([base + rng.permutation(local)[:k] for _ in range(n)])
    return jnp.asarray(idx, jnp.int32)


@pytest.mark.parametrize("ep,lpr,k,how", [(2, 1, 1, "first"), (8, 2, 2, "last"),
                                          (4, 2, 2, "dropped"), (8, 1, 1, "dropped")])
@pytest.mark.parametrize("exchange", ["padded", "emulated"])
@pytest.mark.parametrize("dedup", [False, True])
def test_skewed_routing_matches_dense(ep, lpr, k, how, exchange, dedup):
    """All tokens to one rank, ranks receiving nothing, -1 slots, top-1: the lossless budget
    gives sum_k w[n,k] f_{idx[n,k]}(x[n]) with f_e(x) = (e + 1) x, nothing dropped."""
    e, n, d = ep * lpr, 5, 16
    rng = np.random.default_rng(ep * 10 + k)
    x = jnp.asarray(rng.standard_normal((n * ep, d)), jnp.float32)
    idx = _skewed_routing(rng, n * ep, k, e, ep, how)
    w = jnp.asarray(rng.random(idx.shape), jnp.float32)
    cap = ep_lib.ep_token_capacity(n, k, ep) if dedup else ep_lib.ep_capacity(n, k, e, ep)

    def body(x, idx, w):
        def ffn(xr, sizes):
            expert = ep_lib.expert_of_rows(sizes, xr.shape[0]) + jax.lax.axis_index(EXPERT) * lpr
            return xr * (expert + 1).astype(xr.dtype)[:, None]
        if dedup:
            xr, sizes, counts, st = ep_lib.ep_dispatch_tokens(
                x, idx, w, num_experts=e, axis_name=EXPERT, capacity=cap, exchange=exchange)
            y = ep_lib.ep_combine_tokens(ffn(xr, sizes), st, axis_name=EXPERT)
        else:
            xr, sizes, counts, st = ep_lib.ep_dispatch(
                x, idx, num_experts=e, axis_name=EXPERT, capacity=cap, exchange=exchange)
            y = ep_lib.ep_combine(ffn(xr, sizes), w, st, axis_name=EXPERT)
        return y, jax.lax.psum(counts, EXPERT), jax.lax.psum(st.dropped, EXPERT)

    spec = P(EXPERT)
    y, counts, dropped = jax.jit(jax.shard_map(body, mesh=cpu_mesh(expert=ep), in_specs=(spec,) * 3,
                                               out_specs=(spec, P(), P())))(x, idx, w)
    want = jnp.einsum("NK,ND->ND", jnp.where(idx >= 0, w * (idx + 1), 0.0), x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    live = np.asarray(idx)[np.asarray(idx) >= 0]
    np.testing.assert_array_equal(counts, np.bincount(live, minlength=e))
    assert int(dropped) == 0
