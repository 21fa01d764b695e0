"""EPLB planner: DeepSeek's README example and outputs, the plain-loop reference, the emulated
torch sort, invariants, jit/vmap, errors.

`rebalance_experts_reference` (numpy loops) is the oracle: the jitted planner must agree with it
bit for bit, ties included. tests/data/eplb_reference.json holds outputs of DeepSeek's torch
`eplb.py` itself (torch is not a dependency here), the README example below its published one.
"""

import json
import pathlib
import shutil
import subprocess
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds.parallel import eplb
from jax_ds.parallel.eplb import (balanced_packing, gpu_loads, max_replicas, rebalance_experts,
                                  rebalance_experts_reference, replicate_experts)

# DeepSeek EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
# The reference's other two outputs for the example (printed by its eplb.py, torch 2.13).
README_LOGCNT = np.array([[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                          [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
README_LOG2PHY = np.array([
    [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1],
     [8, 10], [14, -1]],
    [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1],
     [1, -1], [5, -1]]])

# (layers, experts, replicas, groups, nodes, gpus): hierarchical and global, one item per pack
# or many, rows of more and fewer than 16 items.
CONFIGS = [
    (2, 12, 16, 4, 2, 8),
    (3, 24, 32, 4, 2, 8),    # hierarchical
    (3, 24, 36, 6, 4, 4),    # global: 6 groups on 4 nodes
    (2, 16, 16, 4, 4, 8),    # no redundant experts
    (2, 16, 24, 4, 1, 4),    # one node: its groups ordered by load
    (4, 32, 48, 8, 8, 8),    # one group per node, one GPU per node
    (2, 64, 96, 8, 2, 4),    # 48 replicas per node onto 2 GPUs
    (2, 400, 400, 1, 1, 2),  # 400 slots per node
]


def check_plan(plan, weight, num_replicas):
    """The structural invariants of any plan."""
    phy2log, log2phy, logcnt = (np.asarray(x) for x in plan)
    layers, num_log = np.shape(weight)
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, num_log)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int32
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_replicas).all()
    for layer in range(layers):
        assert (np.bincount(phy2log[layer], minlength=num_log) == logcnt[layer]).all()
        listed = log2phy[layer][log2phy[layer] >= 0]
        assert np.array_equal(np.sort(listed), np.arange(num_replicas))  # each slot once
        for e in range(num_log):
            slots = log2phy[layer, e]
            assert (slots[:logcnt[layer, e]] >= 0).all() and (slots[logcnt[layer, e]:] == -1).all()
            assert (phy2log[layer, slots[:logcnt[layer, e]]] == e).all()


def test_readme_example():
    plan = rebalance_experts(jnp.asarray(README_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(plan.phy2log, README_PHY2LOG)
    np.testing.assert_array_equal(plan.logcnt, README_LOGCNT)
    # Ours is as wide as the most replicas an expert could get (3), the reference as many as one
    # got (2): the extra column is padding.
    assert plan.log2phy.shape == (2, 12, 3) == (2, 12, max_replicas(12, 16, 4, 2))
    np.testing.assert_array_equal(plan.log2phy[..., :2], README_LOG2PHY)
    assert (plan.log2phy[..., 2] == -1).all()
    phy2log, log2phy, logcnt = rebalance_experts_reference(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", ["float", "int_ties"])
def test_matches_reference_and_invariants(config, kind):
    layers, e, r, groups, nodes, gpus = config
    rng = np.random.default_rng(zlib.crc32(repr((config, kind)).encode()))
    if kind == "float":
        w = rng.lognormal(0, 1.5, (layers, e)).astype(np.float32)
    else:  # few distinct values: ties everywhere (float32: one compilation per config)
        w = rng.integers(0, 4, (layers, e)).astype(np.float32)
    plan = rebalance_experts(jnp.asarray(w), r, groups, nodes, gpus)
    check_plan(plan, w, r)
    for ours, ref in zip(plan, rebalance_experts_reference(w, r, groups, nodes, gpus)):
        np.testing.assert_array_equal(ours, ref)


def test_replication_balances_gpus():
    """Skewed loads: the busiest GPU carries less than with the contiguous layout (expert e on
    GPU e // (E / gpus)) in every layer, and on average over layers less than with EPLB without
    redundant slots (a greedy is not monotone: a single layer may come out slightly worse)."""
    rng = np.random.default_rng(0)
    e, gpus = 64, 8
    w = (rng.zipf(1.3, (20, e)).clip(max=10_000) * 10).astype(np.float32)
    contiguous = w.reshape(20, gpus, -1).sum(-1).max(-1)
    plain = rebalance_experts(jnp.asarray(w), e, 8, 2, gpus)
    plain_max = np.asarray(gpu_loads(w, plain, gpus)).max(-1)
    for groups, nodes in ((8, 2), (8, 3)):
        plan = rebalance_experts(jnp.asarray(w), 2 * e, groups, nodes, gpus)
        loads = np.asarray(gpu_loads(w, plan, gpus))
        np.testing.assert_allclose(loads.sum(-1), w.sum(-1), rtol=1e-5)
        assert (loads.max(-1) < contiguous).all()
        assert loads.max(-1).mean() < 0.8 * plain_max.mean()
        if nodes == 3:  # global policy; hierarchical is bounded by whole groups per node
            assert (loads.max(-1) <= 1.1 * loads.mean(-1)).all()


def test_jit_vmap_and_dtypes():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 1000, (5, 3, 24)).astype(np.float32)  # a batch of 5 [3, 24] tables
    one = [rebalance_experts(jnp.asarray(x), 32, 4, 2, 8) for x in w]
    plan_fn = jax.jit(jax.vmap(lambda x: rebalance_experts(x, 32, 4, 2, 8)))
    batched = plan_fn(jnp.asarray(w))
    for i, plan in enumerate(one):
        for a, b in zip(plan, batched):
            np.testing.assert_array_equal(a, b[i])
    for dtype in (jnp.int32, jnp.float16):  # integers <= 1000: exact in both
        for a, b in zip(one[0], rebalance_experts(jnp.asarray(w[0], dtype), 32, 4, 2, 8)):
            np.testing.assert_array_equal(a, b)


def test_host_counts_past_int32():
    """numpy int64 / uint64 / Python-int loads of 2**31 and more plan as their float32 values
    (as the reference's weight.float()); they were narrowed to int32 on the way into jit and
    wrapped negative, which gave the hottest expert no extra replica."""
    loads = [[3_000_000_000, 1, 1, 1]]
    want = rebalance_experts(np.asarray(loads, np.float32), 6, 1, 1, 2)
    assert want.logcnt.tolist() == [[3, 1, 1, 1]]
    for weight in (np.asarray(loads, np.int64), np.asarray(loads, np.uint64), loads):
        for a, b in zip(want, rebalance_experts(weight, 6, 1, 1, 2)):
            np.testing.assert_array_equal(a, b)


def _padded(log2phy, width):
    out = np.full((*log2phy.shape[:2], width), -1, np.int64)
    out[..., :log2phy.shape[2]] = log2phy
    return out


def test_outputs_of_deepseek_eplb():
    """DeepSeek's eplb.py under torch (CPU): its sort is not stable past 16 items, and the plans
    follow its tie order exactly: phy2log, logcnt and log2phy (which replica rank of an expert
    lands in which slot) equal, on tie-heavy integer loads, constant and zero loads, float loads
    at DeepSeek-V3 scale, hierarchical and global."""
    data = json.loads((pathlib.Path(__file__).parent / "data" / "eplb_reference.json").read_text())
    for case in data["cases"]:
        w = np.asarray(case["weight"], np.float32)
        sizes = (case["num_replicas"], case["num_groups"], case["num_nodes"], case["num_gpus"])
        want = (np.asarray(case["phy2log"]), np.asarray(case["log2phy"]),
                np.asarray(case["logcnt"]))
        for plan in (rebalance_experts(w, *sizes), rebalance_experts_reference(w, *sizes)):
            phy2log, log2phy, logcnt = (np.asarray(x) for x in plan)
            np.testing.assert_array_equal(phy2log, want[0], err_msg=str(sizes))
            np.testing.assert_array_equal(logcnt, want[2], err_msg=str(sizes))
            assert log2phy.shape[2] >= want[1].shape[2]
            np.testing.assert_array_equal(log2phy, _padded(want[1], log2phy.shape[2]))


def _tie_heavy_rows(seed, count, max_n=300):
    rng = np.random.default_rng(seed)
    for t in range(count):
        n = int(rng.integers(1, max_n))
        yield [rng.integers(0, 3, n), np.ones(n), rng.random(n),
               np.sort(rng.integers(0, 9, n))[::-1]][t % 4].astype(np.float32)


@pytest.mark.parametrize("n,depth", [(9, None), (17, None), (72, None), (288, None), (40, 0),
                                     (90, 1), (200, 2)])
def test_sort_emulation_matches_its_step_by_step_oracle(n, depth):
    """The vectorised partitions (and the heapsort past the depth limit, forced with small
    limits) leave ties in the order the step-by-step std::sort does."""
    rng = np.random.default_rng(n)
    rows = np.stack([rng.integers(0, 3, n), np.ones(n), rng.random(n), rng.integers(0, 40, n),
                     np.sort(rng.integers(0, 9, n))[::-1], np.arange(n) % 5]).astype(np.float32)
    got = jax.jit(jax.vmap(lambda k: eplb._std_sort_order(k, depth)))(jnp.asarray(rows))
    for keys, order in zip(rows, np.asarray(got)):
        np.testing.assert_array_equal(order, eplb._std_sort_order_np(keys, depth))


STD_SORT_CPP = r"""
#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>
int main() {
  int rows, heap, n;
  if (std::scanf("%d", &rows) != 1) return 1;
  while (rows--) {
    std::scanf("%d %d", &heap, &n);
    std::vector<std::pair<float, int>> a(n);
    for (int i = 0; i < n; ++i) { std::scanf("%f", &a[i].first); a[i].second = i; }
    auto gt = [](const std::pair<float, int>& x, const std::pair<float, int>& y) {
      return x.first > y.first; };
    if (heap) { std::make_heap(a.begin(), a.end(), gt); std::sort_heap(a.begin(), a.end(), gt); }
    else std::sort(a.begin(), a.end(), gt);
    for (int i = 0; i < n; ++i) std::printf("%d ", a[i].second);
    std::printf("\n");
  }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (libstdc++'s std::sort)")
def test_sort_oracle_is_libstdcxx_std_sort(tmp_path):
    """The oracle against std::sort itself (what torch.sort(descending=True) runs on the CPU)
    and std::make_heap + std::sort_heap (the introsort's fallback, depth limit 0)."""
    (tmp_path / "s.cpp").write_text(STD_SORT_CPP)
    subprocess.run(["g++", "-O1", "-o", str(tmp_path / "s"), str(tmp_path / "s.cpp")], check=True)
    rows = [(i % 2, keys) for i, keys in enumerate(_tie_heavy_rows(1, 400))]
    text = f"{len(rows)}\n" + "".join(
        f"{heap} {len(k)} " + " ".join(repr(float(x)) for x in k) + "\n" for heap, k in rows)
    lines = subprocess.run([str(tmp_path / "s")], input=text, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for (heap, keys), line in zip(rows, lines):
        if heap and len(keys) <= 16:
            continue  # std::sort never heapsorts an insertion-sort row
        want = np.array(line.split(), np.int64)
        np.testing.assert_array_equal(eplb._std_sort_order_np(keys, 0 if heap else None), want)


def test_odd_loads_still_give_valid_plans():
    """inf, nan, negative or all-zero loads: no meaningful balance, but never a broken plan."""
    base = np.random.default_rng(2).random((3, 24)).astype(np.float32)
    base[0, 3], base[0, 7], base[0, :2] = np.inf, -np.inf, np.nan
    base[1] = -base[1]
    base[2] = 0.0
    for config in ((32, 4, 2, 8), (36, 6, 4, 4)):
        check_plan(rebalance_experts(jnp.asarray(base), *config), base, config[0])
    # All zero, global policy: every tie goes to the lowest expert, which gets all 12 extras.
    assert int(rebalance_experts(jnp.asarray(base), 36, 6, 4, 4).logcnt[2, 0]) == 13


def test_greedy_steps():
    # Heaviest first into the lightest open pack; two items per pack.
    pack, rank = balanced_packing(jnp.array([[5.0, 1.0, 4.0, 2.0]]), 2)
    np.testing.assert_array_equal(pack, [[0, 0, 1, 1]])   # 5->0, 4->1, 2->1, 1->0
    np.testing.assert_array_equal(rank, [[0, 1, 0, 1]])
    # Replicas to the largest load / count: 9 -> 9/2 = 4.5 < 6, so 6 next.
    phy2log, rank, cnt = replicate_experts(jnp.array([[9.0, 6.0, 1.0]]), 5)
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(rank, [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(cnt, [[2, 2, 1]])


@pytest.mark.parametrize("args,match", [
    ((np.ones((2, 12)), 16, 5, 1, 8), "do not divide into num_groups=5"),
    ((np.ones((2, 12)), 16, 6, 3, 8), "num_gpus=8 is not a multiple of num_nodes=3"),
    ((np.ones((2, 12)), 18, 4, 2, 8), "num_replicas=18 is not a multiple of num_gpus=8"),
    ((np.ones((2, 12)), 8, 4, 2, 8), "num_replicas=8 is less than the 12 experts"),
    ((np.ones(12), 16, 4, 2, 8), r"weight must be \[layers, experts\], got shape \(12,\)"),
    ((np.ones((2, 12), bool), 16, 4, 2, 8), "integer or float loads, got bool"),
    ((np.ones((2, 12)), 16.0, 4, 2, 8), "num_replicas=16.0 must be a positive int"),
    ((np.ones((2, 12)), 16, 0, 2, 8), "num_groups=0 must be a positive int"),
    ((np.ones((0, 8)), 12, 4, 2, 4), r"at least one of each, got shape \(0, 8\)"),
    ((np.ones((2, 0)), 4, 1, 1, 4), r"at least one of each, got shape \(2, 0\)"),
])
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)
