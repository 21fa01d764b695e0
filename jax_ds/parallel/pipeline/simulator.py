"""Event simulation of a pipeline `Schedule`: makespan, bubbles, live activations, a timeline.

Each rank runs its ops in order; an op starts when the rank is free and every input it needs has
arrived: a forward needs the previous stage's forward of the same micro-batch, a backward needs
its own forward and the next stage's input gradient (the last stage's comes from the loss, computed
with its forward), a W needs its B. Data crossing ranks arrives `comm` after its producer ends.
A rank whose next op waits on something that never comes is a deadlock, reported with the cycle.

Costs follow DualPipe's README: F a forward chunk, B a *full* backward chunk (input and weight
gradients), W its weight-gradient part (so an input-gradient-only B costs B - W), FB the time of an
overlapped forward + full backward pair (default F + B: no overlap gain).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from jax_ds.parallel.pipeline.schedules import Chunk, Op, Schedule


def _check_cost(what: str, value) -> float:
    """A cost (a Costs field, a cost function's result) is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what}={value} must be finite and >= 0")
    return float(value)


@dataclass(frozen=True, slots=True)
class Costs:
    """Per-op times (any unit). FB=None means F + B."""
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    comm: float = 0.0

    def __post_init__(self):
        for name in ("F", "B", "W", "comm", "FB"):
            value = getattr(self, name)
            if not (name == "FB" and value is None):
                _check_cost(f"Costs: {name}", value)
        if self.W > self.B:
            raise ValueError(f"Costs: W={self.W} (weight-gradient part) exceeds the full "
                             f"backward B={self.B}")

    def of(self, op: Op) -> float:
        return self.of_kind(op.kind)

    def of_kind(self, kind: str) -> float:
        """The cost of an op of `kind` ("F", "B", "W", "BW", "FB"; "idle": 0)."""
        fb = self.F + self.B if self.FB is None else self.FB
        return {"idle": 0.0, "F": self.F, "B": self.B - self.W, "W": self.W, "BW": self.B,
                "FB": fb}[kind]


@dataclass(frozen=True)
class SimResult:
    """What `simulate` returns. Per-rank lists are indexed by rank.

    makespan: end of the last op.
    busy: per rank, the sum of its op costs.
    bubble: per rank, makespan - busy (idle time inside the step).
    peak_activations: per rank, the most chunks alive at once (forward done, weight gradient not
      yet), in units of one micro-batch through one stage; an FB pair counts its forward before
      freeing its backward's chunk.
    param_copies: per rank, how many stages it holds (in units of one stage).
    start, end: per rank, per op, the simulated times.
    """
    makespan: float
    busy: list
    bubble: list
    peak_activations: list
    param_copies: list
    start: list
    end: list

    def __iter__(self):
        """(makespan, bubble, peak_activations): `mk, bubble, peak = simulate(...)` unpacks."""
        return iter((self.makespan, self.bubble, self.peak_activations))

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: sum(bubble) / (ranks x makespan)."""
        return sum(self.bubble) / (len(self.bubble) * self.makespan) if self.makespan else 0.0


def _needs(schedule: Schedule, op: Op):
    """Yields (kind, chunk) events this op waits for; kinds: "F", "B" (input grad), "W"."""
    f, b = op.forward, op.backward
    if f is not None and f.stage > 0:
        yield "F", Chunk(f.stage - 1, f.direction, f.mb)
    if b is not None:
        yield "F", b
        if b.stage < schedule.num_stages - 1:
            yield "B", Chunk(b.stage + 1, b.direction, b.mb)
    if op.kind == "W":
        yield "B", op.chunk


def _produces(op: Op):
    if op.forward is not None:
        yield "F", op.forward
    if op.backward is not None:
        yield "B", op.backward
    if op.weight is not None:
        yield "W", op.weight


def peak_live(ops) -> int:
    """The most chunks alive at once on one rank running `ops` in order."""
    live = peak = 0
    for op in ops:
        if op.forward is not None:
            live += 1
            peak = max(peak, live)
        if op.weight is not None:
            live -= 1
    return peak


def unit_cost(op: Op) -> float:
    """Every op one tick: the executor's clock."""
    return 1.0


def simulate(schedule: Schedule,
             costs: Costs | Mapping[str, float] | Callable[[Op], float] = Costs()) -> SimResult:
    """Runs `schedule` with per-op `costs` (a Costs, a dict of its fields such as
    {"F": 1, "B": 2, "W": 1}; "F&B", the README's name of the overlapped pair, is FB there; or a
    function op -> time, which must return finite times >= 0); see `SimResult`, which also
    unpacks as (makespan, bubble per rank, peak activations per rank).

    Raises RuntimeError naming the stuck ranks if the schedule deadlocks.
    """
    if isinstance(costs, Mapping):
        if "F&B" in costs:
            if "FB" in costs:
                raise TypeError("simulate: costs gives both FB and F&B (the same cost)")
            costs = {("FB" if k == "F&B" else k): v for k, v in costs.items()}
        fields = [f.name for f in dataclasses.fields(Costs)]
        unknown = [k for k in costs if k not in fields]
        if unknown:
            raise TypeError(f"simulate: costs has unknown keys {unknown}; Costs fields are "
                            f"{fields}")
        costs = Costs(**costs)
    if not (isinstance(costs, Costs) or callable(costs)):
        raise TypeError(f"simulate: costs must be a Costs, a dict of its fields or a function "
                        f"op -> time, got {type(costs).__name__} {costs!r}")
    if isinstance(costs, Costs):
        cost_of, comm = costs.of, costs.comm
    else:
        cost_of, comm = _checked(costs), 0.0
    pp = schedule.num_ranks
    done: dict[tuple[str, Chunk], tuple[float, int]] = {}  # event -> (time, rank)
    pos = [0] * pp
    free = [0.0] * pp
    start = [[0.0] * len(ops) for ops in schedule.ops]
    end = [[0.0] * len(ops) for ops in schedule.ops]
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(schedule.ops[r]):
                op = schedule.ops[r][pos[r]]
                needs = list(_needs(schedule, op))
                if any(n not in done for n in needs):
                    break
                ready = free[r]
                for n in needs:
                    t, src = done[n]
                    ready = max(ready, t + (comm if src != r else 0.0))
                start[r][pos[r]] = ready
                free[r] = end[r][pos[r]] = ready + cost_of(op)
                for event in _produces(op):
                    done[event] = (free[r], r)
                pos[r] += 1
                progress = True
    if any(pos[r] < len(schedule.ops[r]) for r in range(pp)):
        raise RuntimeError(_deadlock_message(schedule, pos, done))
    makespan = max(free)
    busy = [sum(cost_of(op) for op in ops) for ops in schedule.ops]
    copies = [0] * pp
    for rank, _ in schedule.placement.values():
        copies[rank] += 1
    return SimResult(makespan=makespan, busy=busy, bubble=[makespan - b for b in busy],
                     peak_activations=[peak_live(ops) for ops in schedule.ops],
                     param_copies=copies, start=start, end=end)


def _checked(fn: Callable[[Op], float]) -> Callable[[Op], float]:
    """A cost function whose results are checked as Costs' fields are."""
    return lambda op: _check_cost(f"simulate: the cost function's time for {op}", fn(op))


def _deadlock_message(schedule: Schedule, pos, done) -> str:
    lines = [f"{schedule.name}: deadlock; stuck ranks and what their next op waits for:"]
    for r, ops in enumerate(schedule.ops):
        if pos[r] < len(ops):
            missing = [f"{k} of {c}" for k, c in _needs(schedule, ops[pos[r]])
                       if (k, c) not in done]
            lines.append(f"  rank {r}: op #{pos[r]} {schedule.label(ops[pos[r]])} waits for "
                         f"{', '.join(missing)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the README table


def readme_bubble(name: str, num_stages: int, costs: Costs) -> float:
    """The bubble DualPipe's README gives for `name` at `num_stages` PP stages (its table).

      1F1B       (PP-1)(F+B)
      ZB1P       (PP-1)(F+B-2W)
      DualPipe   (PP/2-1)(F&B+B-3W)
      DualPipeV  (PP/2-1)(F&B+B-3W)

    `simulate`'s largest per-rank bubble equals these exactly when F = B - W (a forward takes as
    long as an input-gradient backward, the zero-bubble paper's setting), W <= F and
    max(F, B) <= F&B <= F + B; elsewhere the formulas are approximations.
    """
    pp, fb = num_stages, costs.F + costs.B if costs.FB is None else costs.FB
    return {"1f1b": (pp - 1) * (costs.F + costs.B),
            "zb1p": (pp - 1) * (costs.F + costs.B - 2 * costs.W),
            "dualpipe": (pp / 2 - 1) * (fb + costs.B - 3 * costs.W),
            "dualpipev": (pp / 2 - 1) * (fb + costs.B - 3 * costs.W)}[name]


# ----------------------------------------------------------------------------- display


def timeline(schedule: Schedule, costs: Costs | Callable = unit_cost, width: int | None = None
             ) -> str:
    """The schedule as text, one row per rank, `width` characters per unit of time (default: the
    longest op label). A ' marks DualPipe's reverse direction / DualPipeV's way back."""
    sim = simulate(schedule, costs)
    labels = [[schedule.label(op) for op in ops] for ops in schedule.ops]
    if width is None:
        width = 1 + max(len(text) for row in labels for text in row)
    rows = []
    for r, ops in enumerate(schedule.ops):
        line = [" "] * int(round(sim.makespan * width))
        for text, t0, t1 in zip(labels[r], sim.start[r], sim.end[r]):
            a, b = int(round(t0 * width)), int(round(t1 * width))
            line[a:b] = list(text[:b - a - 1].ljust(b - a - 1) + "|")
        rows.append(f"rank {r:>2} |" + "".join(line))
    return "\n".join(rows)
