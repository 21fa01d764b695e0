"""Pipeline schedules and their simulator: constraints, DualPipe's phase counts, the README table.

The table is DeepSeek's (github.com/deepseek-ai/DualPipe, README, "based on the same number of PP
stages"): bubble, parameters and activations per device, devices. Its bubble formulas hold when a
forward chunk takes as long as an input-gradient backward (F = B - W, the zero-bubble paper's
setting), W <= F, and max(F, B) <= F&B <= F + B; the simulator's largest per-rank bubble must then
equal them exactly, for every micro-batch count.
"""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from jax_ds.parallel.pipeline import (Chunk, Costs, Op, compile_tables, dualpipe, dualpipev,
                                      make_schedule, one_f_one_b, readme_bubble, simulate,
                                      timeline, zb1p)

# (F, B, W, F&B) with F = B - W and W <= F; F&B from full overlap, max(F, B), to none, F + B.
COSTS = [Costs(F=1, B=2, W=1), Costs(F=1, B=2, W=1, FB=2.5), Costs(F=2, B=3, W=1, FB=3),
         Costs(F=1, B=1, W=0, FB=1.5), Costs(F=2, B=3.5, W=1.5, FB=4.5)]

# Name -> (ranks for PP stages, activations per device, parameter copies per device).
TABLE = {
    "1f1b": (lambda pp: pp, lambda pp: pp, 1),
    "zb1p": (lambda pp: pp, lambda pp: pp, 1),
    "dualpipe": (lambda pp: pp, lambda pp: pp + 1, 2),
    "dualpipev": (lambda pp: pp // 2, lambda pp: pp + 1, 2),
}


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("pp", [4, 8, 16])
def test_readme_table(name, pp):
    devices, activations, copies = TABLE[name]
    for m in (2 * pp, 2 * pp + 2, 3 * pp):
        schedule = make_schedule(name, devices(pp), m)
        assert schedule.num_stages == pp and schedule.num_ranks == devices(pp)
        for costs in COSTS:
            sim = simulate(schedule, costs)
            assert max(sim.bubble) == pytest.approx(readme_bubble(name, pp, costs)), (m, costs)
            # The makespan is the work of one rank plus the bubble.
            assert sim.makespan == pytest.approx(min(sim.busy) + max(sim.bubble))
        assert max(sim.peak_activations) == activations(pp)
        assert sim.param_copies == [copies] * devices(pp)


def test_bubble_ordering():
    """At equal stages: DualPipe(V) < ZB1P < 1F1B, with DualPipeV on half the devices."""
    costs = Costs(F=1, B=2, W=1, FB=2.5)
    pp, m = 8, 24
    bubble = {name: max(simulate(make_schedule(name, TABLE[name][0](pp), m), costs).bubble)
              for name in TABLE}
    assert bubble["dualpipe"] == bubble["dualpipev"] < bubble["zb1p"] < bubble["1f1b"]


def _half_rank(pp, r):
    return min(r, pp - 1 - r)


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
def test_dualpipe_phase_counts(pp):
    """The reference's per-rank step counts, and what they imply for the op lists."""
    for m in (2 * pp, 2 * pp + 2, 4 * pp):
        schedule = dualpipe(pp, m)
        for r, ops in enumerate(schedule.ops):
            hr, half = _half_rank(pp, r), pp // 2
            middle = r in (half - 1, half)
            steps = Counter(op.step for op in ops)
            main = m // 2 - pp + hr + 1
            assert steps["nF0"] == (half - hr - 1) * 2                  # warm-up forwards
            assert steps["nF0F1"] == 2 * (hr + 1)                       # paired forwards
            assert steps["nB1W1F1"] == 3 * (half - hr - 1)              # zero-bubble B, W, F
            assert steps["nF0B1F1B0"] == 2 * main + middle              # main F&B steps
            assert steps["nB1F1B0"] == 2 * (half - hr - 1)
            assert steps["nB1B0"] == 2 * (hr + 1)
            assert steps["nWB0"] == 2 * (half - hr - 1)
            assert steps["nW"] == hr + 1
            # Structure: the rank starts with warm-up + 1 forwards of its near copy, runs the
            # main phase's overlapped pairs, and does every chunk's F, B and W exactly once.
            near = ops[0].chunk
            lead = next(i for i, op in enumerate(ops)
                        if op.kind != "F" or op.chunk.direction != near.direction)
            assert lead == (half - hr - 1) * 2 + 1
            kinds = Counter(op.kind for op in ops)
            assert kinds["FB"] == 2 * main - middle + (half - hr - 1)
            assert kinds["F"] + kinds["FB"] == m                 # m/2 chunks per copy, 2 copies
            assert kinds["B"] == kinds["W"]
            assert kinds["B"] + kinds["BW"] + kinds["FB"] == m


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
def test_dualpipev_phase_counts(pp):
    for m in (2 * pp, 2 * pp + 1, 3 * pp):
        schedule = dualpipev(pp, m)
        for r, ops in enumerate(schedule.ops):
            steps = Counter(op.step for op in ops)
            main = m - 2 * pp + r + 1
            assert steps["nF0"] == (pp - r - 1) * 2
            assert steps["nF0F1"] == 2 * (r + 1)
            assert steps["nB1W1F1"] == 3 * (pp - r - 1)
            assert steps["nF0B1F1B0"] == 2 * main + (r == pp - 1)
            assert steps["nW"] == r + 1
            assert {schedule.rank_of(op.chunk) for op in ops} == {r}
        # Rank 0 holds the first and the last stage: it feeds inputs and computes the loss.
        assert schedule.placement[(0, 0)][0] == schedule.placement[(2 * pp - 1, 0)][0] == 0


def test_placement():
    s = dualpipe(8, 16)
    for stage in range(8):
        assert s.placement[(stage, 0)][0] == stage
        assert s.placement[(stage, 1)][0] == 7 - stage
    assert s.num_local == 2 and one_f_one_b(4, 4).num_local == 1
    v = dualpipev(4, 8)
    assert [v.placement[(s, 0)][0] for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("fn, pp, m, match", [
    (dualpipe, 3, 12, "num_ranks=3 must be even"),
    (dualpipe, 4, 7, "must be even and >= 2 x num_ranks = 8"),
    (dualpipe, 4, 6, "must be even and >= 2 x num_ranks = 8"),
    (dualpipev, 4, 7, "must be >= 2 x num_ranks = 8"),
    (zb1p, 4, 3, "must be >= num_ranks=4"),
    (one_f_one_b, 0, 4, "num_ranks=0 must be an int >= 1"),
    (one_f_one_b, 2, 0, "num_microbatches=0 must be an int >= 1"),
    (one_f_one_b, 2.0, 4, "num_ranks=2.0"),
])
def test_constraints(fn, pp, m, match):
    with pytest.raises(ValueError, match=match):
        fn(pp, m)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'gpipe'"):
        make_schedule("gpipe", 4, 8)


def test_validate_catches_a_missing_backward():
    s = one_f_one_b(2, 2)
    broken = dataclasses.replace(s, ops=(s.ops[0][:-1], s.ops[1]))
    with pytest.raises(ValueError, match="B missing"):
        broken.validate()


def test_deadlock_detected():
    """Rank 0 waits on rank 1's backward of micro-batch 0 while rank 1 waits on micro-batch 1."""
    s = one_f_one_b(2, 2)
    c = lambda stage, mb: Chunk(stage, 0, mb)  # noqa: E731
    ops = ((Op("F", c(0, 0)), Op("BW", c(0, 0)), Op("F", c(0, 1)), Op("BW", c(0, 1))),
           (Op("F", c(1, 1)), Op("F", c(1, 0)), Op("BW", c(1, 0)), Op("BW", c(1, 1))))
    with pytest.raises(RuntimeError, match=r"deadlock(.|\n)*rank 0: op #1 BW0 waits for B"):
        simulate(dataclasses.replace(s, ops=ops))


def test_comm_latency_and_timeline():
    s = one_f_one_b(4, 8)
    base, slow = simulate(s, Costs()), simulate(s, Costs(comm=0.5))
    # Latency adds to every cross-rank wait, never to the work.
    assert slow.makespan > base.makespan and slow.busy == base.busy
    text = timeline(dualpipe(4, 8))
    assert text.count("\n") == 3 and "F3&B5'" in text


@pytest.mark.parametrize("name, pp, m", [("1f1b", 4, 6), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                         ("dualpipe", 8, 20), ("dualpipev", 4, 10)])
def test_tables(name, pp, m):
    """The executor's chunk buffers are sized exactly to the simulated peak activations."""
    schedule = make_schedule(name, pp, m)
    tables = compile_tables(schedule)
    sim = simulate(schedule)
    assert list(tables.peak_chunks) == sim.peak_activations
    assert tables.capacity["chunk"] == max(sim.peak_activations)
    assert tables.table.shape[:2] == (tables.num_ticks, pp)
    one_link = {"1f1b", "zb1p"}
    assert set(tables.channels) == ({"act_l", "grad_r"} if name in one_link else
                                     {"act_l", "act_r", "grad_l", "grad_r"})


@pytest.mark.parametrize("name,pp,m", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                       ("dualpipev", 4, 8), ("1f1b", 3, 5)])
def test_lockstep_is_the_tick_clock_and_never_beats_the_simulator(name, pp, m):
    schedule = make_schedule(name, pp, m)
    tables = compile_tables(schedule)
    # Equal op costs: every tick costs one op, so the lockstep clock is the tick count.
    if name == "1f1b":   # its ops are F and full backwards only
        assert tables.lockstep_makespan(Costs(F=1, B=1, W=0)) == tables.num_ticks
    # Any costs: the lockstep run is one feasible execution of the same per-rank order, and the
    # event-driven simulation starts every op as early as possible.
    for costs in (Costs(F=1, B=2, W=1), Costs(F=1.3, B=2.9, W=0.7), Costs(F=2, B=2, W=0.1)):
        lock = tables.lockstep_makespan(costs)
        assert lock >= simulate(schedule, costs).makespan - 1e-9


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(F=-1.0), ValueError, "F=-1.0 must be finite and >= 0"),
    (dict(F=float("nan")), ValueError, "F=nan must be finite"),
    (dict(FB=-5.0), ValueError, "FB=-5.0 must be finite and >= 0"),
    (dict(B="2"), TypeError, "B must be a number"),
])
def test_bad_costs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Costs(**kwargs)


def test_simulate_rejects_costs_it_cannot_call():
    with pytest.raises(TypeError, match="costs must be a Costs, a dict of its fields or a "
                                        "function"):
        simulate(one_f_one_b(2, 2), 3.0)


def test_simulate_takes_a_dict_of_costs():
    schedule = dualpipe(4, 8)
    fields = dict(F=1.0, B=2.5, W=0.5, FB=3.0, comm=0.25)
    assert simulate(schedule, fields) == simulate(schedule, Costs(**fields))
    assert simulate(schedule, {"B": 3}) == simulate(schedule, Costs(B=3))
    with pytest.raises(TypeError, match=r"unknown keys \['f', 'bw'\]; Costs fields are "
                                        r"\['F', 'B', 'W', 'FB', 'comm'\]"):
        simulate(schedule, {"f": 1.0, "B": 2.0, "bw": 1.0})
    with pytest.raises(ValueError, match="W=3 .* exceeds the full backward B=2"):
        simulate(schedule, {"B": 2, "W": 3})


def test_simulate_unpacks_and_takes_the_readme_names():
    """`makespan, bubble, peak = simulate(...)` (the contract's three results); "F&B", the
    README's name of the overlapped pair, is FB; a cost function's times are checked."""
    schedule = dualpipev(4, 8)
    sim = simulate(schedule, {"F": 1, "B": 2, "W": 1, "F&B": 2.5})
    makespan, bubble, peak = sim
    assert (makespan, bubble, peak) == (sim.makespan, sim.bubble, sim.peak_activations)
    assert sim == simulate(schedule, Costs(FB=2.5))
    with pytest.raises(TypeError, match="both FB and F&B"):
        simulate(schedule, {"FB": 2.0, "F&B": 2.5})
    with pytest.raises(ValueError, match=r"cost function's time for .*=-1.0 must be finite and >= 0"):
        simulate(schedule, lambda op: -1.0)
    with pytest.raises(TypeError, match=r"cost function's time for .* must be a number, got 'x'"):
        simulate(schedule, lambda op: "x")
    assert simulate(schedule, lambda op: 1.0).makespan == simulate(
        schedule, lambda op: np.float32(1.0)).makespan
