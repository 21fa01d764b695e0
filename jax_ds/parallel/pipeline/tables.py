"""A `Schedule` compiled into static per-tick tables for the SPMD executor.

Every rank runs one op per tick (an FB pair is one op). Ticks come from simulating the schedule
with every op taking one unit: an op runs as soon as its rank is free and its inputs have arrived,
and data sent at the end of tick t can be used from tick t+1.

Storage is fixed-capacity and allocated here, so the program never grows with the schedule:
  act    activations received (or handed over locally) until their F reads them;
  grad   output cotangents received (or made by the loss) until their B reads them;
  chunk  what a chunk saves between its F and its W: F's residuals and B's `wres`.
Each pool has one extra "trash" slot (index = capacity) that takes writes nobody wants, so every
rank can run the same unconditional update each tick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jax_ds.parallel.pipeline.schedules import Chunk, Schedule
from jax_ds.parallel.pipeline.simulator import Costs, simulate, unit_cost

# Columns of the per-tick table, [num_ticks, num_ranks, len(FIELDS)] int32.
FIELDS = (
    "branch",      # index into Tables.branches (0: idle)
    "f_local", "f_mb", "f_in", "f_first", "f_last", "f_res",  # forward: stage copy, micro-batch,
                                                    # act slot, first/last stage, chunk slot
    "b_local", "b_mb", "b_slot", "b_dy", "b_first",  # input gradient: stage copy, micro-batch,
                                                     # chunk slot, grad slot, first stage
    "wres_write",                                   # B alone: chunk slot for its wres
    "w_slot", "w_local",                            # weight gradient: chunk slot, local stage
    "act_l", "act_r", "act_local",                  # act slots for what arrives this tick
    "grad_l", "grad_r", "grad_local", "grad_loss",  # grad slots for what arrives this tick
)
COL = {name: i for i, name in enumerate(FIELDS)}
CHANNELS = ("act_l", "act_r", "grad_l", "grad_r")  # from the left / right neighbour


@dataclass(frozen=True)
class Tables:
    """Static program of a schedule. `table[t, r]` is rank r's row at tick t (see FIELDS).

    branches: the op kind of each branch index ("idle" first, then the kinds the schedule uses).
    capacity: slots per pool (act, grad, chunk), the same on every rank (the largest need).
    peak_chunks: per rank, the most chunk slots in use at once (= simulated peak activations).
    channels: which of CHANNELS some rank ever receives on (the others are not sent).
    """
    table: np.ndarray
    branches: tuple
    capacity: dict
    peak_chunks: tuple
    channels: tuple

    @property
    def num_ticks(self) -> int:
        return self.table.shape[0]

    def lockstep_makespan(self, costs: Costs) -> float:
        """The executor's clock for these costs: SPMD ranks advance tick by tick, so a tick
        lasts as long as its slowest rank's op. Never below `simulate`'s makespan (with no
        communication cost): that one starts every op as early as its inputs allow."""
        per_branch = np.array([costs.of_kind(kind) for kind in self.branches])
        return float(per_branch[self.table[:, :, COL["branch"]]].max(axis=1).sum())


def _allocate(intervals: list[tuple[int, int, object]]) -> tuple[dict, int]:
    """Slots for [first, last] tick intervals (inclusive): greedy by start, lowest free slot."""
    slot_free_after: list[int] = []
    slots = {}
    for first, last, key in sorted(intervals, key=lambda iv: (iv[0], iv[1])):
        for s, busy_until in enumerate(slot_free_after):
            if busy_until < first:
                break
        else:
            s = len(slot_free_after)
            slot_free_after.append(-1)
        slot_free_after[s] = last
        slots[key] = s
    return slots, len(slot_free_after)


def compile_tables(schedule: Schedule) -> Tables:
    """Turns `schedule` into per-tick tables; raises ValueError if data must skip a rank."""
    pp, S = schedule.num_ranks, schedule.num_stages
    sim = simulate(schedule, unit_cost)
    tick = {}      # (event kind, chunk) -> (tick, rank); kinds "F", "B", "W"
    ops_at = {}    # (tick, rank) -> op
    for r, ops in enumerate(schedule.ops):
        for op, t in zip(ops, sim.start[r]):
            t = int(t)
            ops_at[(t, r)] = op
            for kind, chunk in (("F", op.forward), ("B", op.backward), ("W", op.weight)):
                if chunk is not None:
                    tick[(kind, chunk)] = (t, r)
    num_ticks = int(sim.makespan)
    moves = []  # (pool, chunk, producer tick, producer rank or None for the loss, consumer tick,
    #             consumer rank)
    chunks = [c for (kind, c) in tick if kind == "F"]
    for c in chunks:
        tf, r = tick[("F", c)]
        if c.stage > 0:
            tp, rp = tick[("F", Chunk(c.stage - 1, c.direction, c.mb))]
            moves.append(("act", c, tp, rp, tf, r))
        tb, _ = tick[("B", c)]
        if c.stage < S - 1:
            tp, rp = tick[("B", Chunk(c.stage + 1, c.direction, c.mb))]
            moves.append(("grad", c, tp, rp, tb, r))
        else:
            moves.append(("grad", c, tf, None, tb, r))  # the loss's cotangent, made by F

    def source(pool, rp, r):
        if rp is None:
            return "grad_loss"
        if rp == r:
            return f"{pool}_local"
        if abs(rp - r) != 1:
            raise ValueError(f"{schedule.name}: data moves from rank {rp} to rank {r}; only "
                             f"neighbouring ranks exchange activations and gradients")
        return f"{pool}_l" if rp == r - 1 else f"{pool}_r"

    slots, capacity = {}, {"act": 1, "grad": 1, "chunk": 1}
    peaks = []
    for r in range(pp):
        for pool in ("act", "grad"):
            ivs = [(tp + 1, tc, c) for (pl, c, tp, _, tc, rc) in moves if pl == pool and rc == r]
            s, n = _allocate(ivs)
            slots.update({(pool, c): v for c, v in s.items()})
            capacity[pool] = max(capacity[pool], n)
        ivs = [(tick[("F", c)][0], tick[("W", c)][0], c) for c in chunks if tick[("F", c)][1] == r]
        s, n = _allocate(ivs)
        slots.update({("chunk", c): v for c, v in s.items()})
        capacity["chunk"] = max(capacity["chunk"], n)
        peaks.append(n)

    table = np.zeros((num_ticks, pp, len(FIELDS)), np.int32)
    for name in ("f_res", "wres_write", "act_l", "act_r", "act_local", "grad_l", "grad_r",
                 "grad_local", "grad_loss"):
        pool = "act" if name.startswith("act") else "grad" if name.startswith("grad") else "chunk"
        table[:, :, COL[name]] = capacity[pool]  # the trash slot
    branches = ["idle"]
    channels = set()
    for (t, r), op in ops_at.items():
        row = table[t, r]
        f, b, w = op.forward, op.backward, op.weight
        if op.kind not in branches:
            branches.append(op.kind)
        row[COL["branch"]] = branches.index(op.kind)
        if f is not None:
            row[COL["f_local"]] = schedule.local_of(f)
            row[COL["f_mb"]] = f.mb
            row[COL["f_in"]] = slots[("act", f)] if f.stage > 0 else 0
            row[COL["f_first"]] = f.stage == 0
            row[COL["f_last"]] = f.stage == S - 1
            row[COL["f_res"]] = slots[("chunk", f)]
        if b is not None:
            row[COL["b_local"]] = schedule.local_of(b)
            row[COL["b_mb"]] = b.mb
            row[COL["b_slot"]] = slots[("chunk", b)]
            row[COL["b_dy"]] = slots[("grad", b)]
            row[COL["b_first"]] = b.stage == 0
        if op.kind == "B":
            row[COL["wres_write"]] = slots[("chunk", b)]
        if w is not None:
            row[COL["w_slot"]] = slots[("chunk", w)]
            row[COL["w_local"]] = schedule.local_of(w)
    for pool, c, tp, rp, _, r in moves:
        name = source(pool, rp, r)
        table[tp, r, COL[name]] = slots[(pool, c)]
        if name in CHANNELS:
            channels.add(name)
    return Tables(table=table, branches=tuple(branches), capacity=capacity,
                  peak_chunks=tuple(peaks), channels=tuple(c for c in CHANNELS if c in channels))
