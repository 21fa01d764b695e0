"""Pipeline schedules as data: per rank, the ordered ops that rank runs.

Four schedules, each a function (num_ranks, num_microbatches) -> `Schedule`:

  one_f_one_b  1F1B (PipeDream-Flush): warm-up forwards, then one forward / one full backward.
  zb1p         ZB-H1 of "Zero Bubble Pipeline Parallelism" (Qi et al., 2023): 1F1B with the backward
               split into B (input gradient) and W (weight gradient); rank r defers up to r Ws, so
               the late ranks fill their drain bubble with weight work at 1F1B's peak memory.
  dualpipe     DeepSeek-V3's DualPipe (tech report sec. 3.2.1, github.com/deepseek-ai/DualPipe):
               micro-batches enter from both ends; rank r holds stage r of the forward direction
               and stage PP-1-r of the reverse one, and pairs the forward of one direction with the
               backward of the other (F&B) in the steady phase.
  dualpipev    DualPipeV, the "cut-in-half" DualPipe (Sea AI Lab): 2 x ranks stages in a V, rank r
               holds stages r and 2R-1-r; rank 0 feeds inputs and computes the loss.

Ops (`Op.kind`):
  F   forward of a chunk (one micro-batch through one stage), residuals kept for the backward.
  B   input-gradient backward only; the weight-gradient work is deferred to a later W.
  W   weight-gradient backward of a chunk whose B ran earlier (DualPipe: first in, first out).
  BW  full backward (B then W at once).
  FB  an overlapped pair: the forward of `chunk` with the full backward of `other`.

A `Chunk` names (stage, direction, micro-batch). Stages are numbered in model order 0..S-1; the
direction says which copy of a stage runs it (DualPipe: 0 = stage s on rank s, 1 = stage s on rank
PP-1-s, micro-batches m/2.. go that way). `Schedule.placement[(stage, direction)] = (rank, local)`
says where a stage copy lives (local: its index among the rank's stage copies).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from jax_ds.ops._checks import is_int

KINDS = ("F", "B", "W", "BW", "FB")


class Chunk(NamedTuple):
    """One micro-batch through one stage copy."""
    stage: int
    direction: int
    mb: int


@dataclass(frozen=True, slots=True)
class Op:
    """One unit of work on one rank; FB: the forward of `chunk` with the full backward of
    `other`, overlapped."""
    kind: str
    chunk: Chunk
    other: Chunk | None = None
    step: str = ""  # which phase of the schedule emitted it (DualPipe's step names), for display

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Op.kind={self.kind!r} not in {KINDS}")
        if (self.kind == "FB") != (self.other is not None):
            raise ValueError(f"Op: `other` is required for FB and only for FB, got {self}")

    @property
    def forward(self) -> Chunk | None:
        """The chunk whose forward this op runs (F, FB), else None."""
        return self.chunk if self.kind in ("F", "FB") else None

    @property
    def backward(self) -> Chunk | None:
        """The chunk whose input gradient this op computes (B, BW, FB), else None."""
        return {"B": self.chunk, "BW": self.chunk, "FB": self.other}.get(self.kind)

    @property
    def weight(self) -> Chunk | None:
        """The chunk whose weight gradient this op computes (W, BW, FB), else None."""
        return {"W": self.chunk, "BW": self.chunk, "FB": self.other}.get(self.kind)

    def label(self, mark=lambda chunk: "") -> str:
        """Short text for timelines: F3, B3, W3, BW3, F3&B1; `mark(chunk)` is appended to each
        micro-batch number (see `Schedule.label`)."""
        if self.kind == "FB":
            return f"F{self.chunk.mb}{mark(self.chunk)}&B{self.other.mb}{mark(self.other)}"
        return f"{self.kind}{self.chunk.mb}{mark(self.chunk)}"


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: `ops[r]` is rank r's ordered op list.

    Attributes:
      name: "1f1b", "zb1p", "dualpipe" or "dualpipev".
      num_ranks: PP ranks (devices on the pipe axis).
      num_microbatches: m.
      num_stages: S, the model's stages (PP, or 2 PP for DualPipeV).
      placement: (stage, direction) -> (rank, local index of the copy on that rank).
      ops: per rank, a tuple of `Op`.
    """
    name: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    placement: dict = field(repr=False, compare=False)  # follows from ops; keeps it hashable
    ops: tuple = field(repr=False)

    @property
    def num_local(self) -> int:
        """Stage copies per rank (1 for 1F1B / ZB1P, 2 for DualPipe / DualPipeV)."""
        return 1 + max(local for _, local in self.placement.values())

    def rank_of(self, chunk: Chunk) -> int:
        return self.placement[(chunk.stage, chunk.direction)][0]

    def local_of(self, chunk: Chunk) -> int:
        return self.placement[(chunk.stage, chunk.direction)][1]

    def direction_of(self, mb: int) -> int:
        """The direction micro-batch mb travels (DualPipe: the second half goes in reverse)."""
        if self.name == "dualpipe":
            return int(mb >= self.num_microbatches // 2)
        return 0

    def label(self, op: Op) -> str:
        """`op.label()` with a ' on chunks of the second copy: DualPipe's reverse direction,
        DualPipeV's way back (stages pp..2pp-1)."""
        if self.name == "dualpipe":
            return op.label(lambda c: "'" if c.direction else "")
        if self.name == "dualpipev":
            return op.label(lambda c: "'" if c.stage >= self.num_ranks else "")
        return op.label()

    def validate(self) -> "Schedule":
        """Checks every chunk is run forward once, backward once and weight-updated once, on its
        stage copy's rank, with F before B before W on that rank. Returns self."""
        seen = {kind: {} for kind in ("F", "B", "W")}
        for rank, ops in enumerate(self.ops):
            for pos, op in enumerate(ops):
                for kind, chunk in (("F", op.forward), ("B", op.backward), ("W", op.weight)):
                    if chunk is None:
                        continue
                    if self.rank_of(chunk) != rank:
                        raise ValueError(f"{self.name}: {op.kind} of {chunk} runs on rank "
                                         f"{rank}, but that stage copy lives on rank "
                                         f"{self.rank_of(chunk)}")
                    if chunk in seen[kind]:
                        raise ValueError(f"{self.name}: {kind} of {chunk} appears twice")
                    seen[kind][chunk] = pos
        expected = {Chunk(s, self.direction_of(mb), mb) for mb in range(self.num_microbatches)
                    for s in range(self.num_stages)}
        for kind in ("F", "B", "W"):
            if set(seen[kind]) != expected:
                missing = sorted(expected - set(seen[kind]))[:3]
                raise ValueError(f"{self.name}: {kind} missing for chunks {missing}...")
        for chunk in expected:
            if not seen["F"][chunk] <= seen["B"][chunk] <= seen["W"][chunk]:
                raise ValueError(f"{self.name}: {chunk} is not ordered F <= B <= W on its rank")
        return self


def _check(name: str, ok: bool, message: str):
    if not ok:
        raise ValueError(f"{name}: {message}")


def _check_sizes(name: str, pp, m):
    _check(name, is_int(pp) and pp >= 1, f"num_ranks={pp!r} must be an int >= 1")
    _check(name, is_int(m) and m >= 1, f"num_microbatches={m!r} must be an int >= 1")


# ----------------------------------------------------------------------------- 1F1B and ZB1P


def one_f_one_b(pp: int, m: int) -> Schedule:
    """1F1B over `pp` ranks (stage r on rank r) and `m` micro-batches (any m >= 1).

    Rank r runs min(pp-1-r, m) warm-up forwards, then alternates F and a full backward (BW),
    then drains the remaining backwards. At most pp chunks are live on rank 0.
    """
    _check_sizes("one_f_one_b", pp, m)
    ops = []
    for r in range(pp):
        warmup = min(pp - 1 - r, m)
        rank_ops = [Op("F", Chunk(r, 0, i), step="warmup") for i in range(warmup)]
        for i in range(m - warmup):
            rank_ops += [Op("F", Chunk(r, 0, warmup + i), step="steady"),
                         Op("BW", Chunk(r, 0, i), step="steady")]
        rank_ops += [Op("BW", Chunk(r, 0, i), step="drain") for i in range(m - warmup, m)]
        ops.append(tuple(rank_ops))
    placement = {(s, 0): (s, 0) for s in range(pp)}
    return Schedule("1f1b", pp, m, pp, placement, tuple(ops)).validate()


def zb1p(pp: int, m: int) -> Schedule:
    """ZB-H1 over `pp` ranks and `m >= pp` micro-batches.

    1F1B's order with every backward split into B and W. Rank r keeps up to r weight-gradient
    steps pending (so it holds at most pp live chunks, as in 1F1B) and runs the rest after its
    last B, where 1F1B would sit idle waiting for the drain.
    """
    _check_sizes("zb1p", pp, m)
    _check("zb1p", m >= pp, f"num_microbatches={m} must be >= num_ranks={pp} (each rank's W "
           "deferral needs a full warm-up)")
    ops = []
    for r in range(pp):
        warmup = pp - 1 - r
        pending: deque[Chunk] = deque()
        rank_ops = [Op("F", Chunk(r, 0, i), step="warmup") for i in range(warmup)]

        def backward(i, step):
            rank_ops.append(Op("B", Chunk(r, 0, i), step=step))
            pending.append(Chunk(r, 0, i))
            if len(pending) > r:
                rank_ops.append(Op("W", pending.popleft(), step=step))

        for i in range(m - warmup):
            rank_ops.append(Op("F", Chunk(r, 0, warmup + i), step="steady"))
            backward(i, "steady")
        for i in range(m - warmup, m):
            backward(i, "drain")
        rank_ops += [Op("W", c, step="drain") for c in pending]
        ops.append(tuple(rank_ops))
    placement = {(s, 0): (s, 0) for s in range(pp)}
    return Schedule("zb1p", pp, m, pp, placement, tuple(ops)).validate()


# ----------------------------------------------------------------------------- DualPipe(V)


class _Phases:
    """Builds one rank's op list from DualPipe's two phases, as the reference's step() does.

    Phase 0 is the stage copy nearer its pipeline's start, phase 1 the one nearer the end. F and B
    of a phase take micro-batches in order; zero-bubble backwards queue their W, and W pops the
    oldest (the reference's WeightGradStore is a FIFO).
    """

    def __init__(self, chunks: tuple[list[Chunk], list[Chunk]]):
        self.chunks = chunks
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.pending: deque[Chunk] = deque()
        self.ops: list[Op] = []
        self.step = ""

    def _take(self, counter, phase) -> Chunk:
        chunk = self.chunks[phase][counter[phase]]
        counter[phase] += 1
        return chunk

    def f(self, phase: int):
        self.ops.append(Op("F", self._take(self.next_f, phase), step=self.step))

    def b(self, phase: int, zero_bubble: bool = False):
        chunk = self._take(self.next_b, phase)
        if zero_bubble:
            self.pending.append(chunk)
        self.ops.append(Op("B" if zero_bubble else "BW", chunk, step=self.step))

    def w(self):
        self.ops.append(Op("W", self.pending.popleft(), step=self.step))

    def fb(self, f_phase: int, b_phase: int):
        f_chunk = self._take(self.next_f, f_phase)
        self.ops.append(Op("FB", f_chunk, self._take(self.next_b, b_phase), step=self.step))


def _dual_steps(ph: _Phases, *, half: int, pos: int, main: int, turn: bool):
    """DualPipe's eight steps for a rank at position `pos` of `half` (half_rank in DualPipe, rank
    in DualPipeV) with `main` steady iterations; `turn`: the rank where the two phases meet (the
    middle ranks of DualPipe, the last rank of DualPipeV) runs its first steady F and B unpaired.
    """
    ph.step = "nF0"                         # warm-up: forwards of the near phase only
    for _ in range((half - pos - 1) * 2):
        ph.f(0)
    ph.step = "nF0F1"                       # forwards of both phases
    for _ in range(pos + 1):
        ph.f(0)
        ph.f(1)
    ph.step = "nB1W1F1"                     # zero bubble: B, W of the far phase, next forward
    for _ in range(half - pos - 1):
        ph.b(1, zero_bubble=True)
        ph.w()
        ph.f(1)
    ph.step = "nF0B1F1B0"                   # main: overlapped forward & backward pairs
    for i in range(main):
        if i == 0 and turn:                 # the reference runs these two apart to cut the bubble
            ph.f(0)
            ph.b(1)
        else:
            ph.fb(0, 1)
        ph.fb(1, 0)
    ph.step = "nB1F1B0"
    for _ in range(half - pos - 1):
        ph.b(1)
        ph.fb(1, 0)
    ph.step = "nB1B0"                       # the second half of these backwards defer their W
    zero_bubble = False
    for i in range(pos + 1):
        if i == (pos + 1) // 2 and pos % 2 == 1:
            zero_bubble = True
        ph.b(1, zero_bubble)
        if i == (pos + 1) // 2 and pos % 2 == 0:
            zero_bubble = True
        ph.b(0, zero_bubble)
    ph.step = "nWB0"
    for _ in range(half - pos - 1):
        ph.w()
        ph.b(0, zero_bubble=True)
    ph.step = "nW"
    for _ in range(pos + 1):
        ph.w()
    assert not ph.pending and ph.next_f == ph.next_b == [len(c) for c in ph.chunks]


def dualpipe(pp: int, m: int) -> Schedule:
    """DualPipe over `pp` ranks (pp even) and `m` micro-batches (m even, m >= 2 pp).

    The model has pp stages, each held twice: stage s runs micro-batches 0..m/2-1 on rank s
    (direction 0) and micro-batches m/2..m-1 on rank pp-1-s (direction 1). Both end ranks feed
    inputs and compute losses. Rank r's phase counts, with half_rank = min(r, pp-1-r):
    (pp/2-half_rank-1)*2 warm-up forwards, half_rank+1 forward pairs, pp/2-half_rank-1 zero-bubble
    B/W/F steps, m/2-pp+half_rank+1 main F&B steps, then the drain.
    """
    _check_sizes("dualpipe", pp, m)
    _check("dualpipe", pp % 2 == 0, f"num_ranks={pp} must be even (ranks pair up as r, pp-1-r)")
    _check("dualpipe", m % 2 == 0 and m >= 2 * pp,
           f"num_microbatches={m} must be even and >= 2 x num_ranks = {2 * pp}")
    half, hm = pp // 2, m // 2
    ops = []
    for r in range(pp):
        pos = min(r, pp - 1 - r)
        near = 0 if r < half else 1           # the direction in which this rank holds stage pos
        mbs = (list(range(hm)), list(range(hm, m)))
        chunks = ([Chunk(pos, near, mb) for mb in mbs[near]],
                  [Chunk(pp - 1 - pos, 1 - near, mb) for mb in mbs[1 - near]])
        ph = _Phases(chunks)
        _dual_steps(ph, half=half, pos=pos, main=hm - pp + pos + 1,
                    turn=r in (half - 1, half))
        ops.append(tuple(ph.ops))
    placement = {}
    for s in range(pp):
        placement[(s, 0)] = (s, 0 if s < half else 1)
        placement[(s, 1)] = (pp - 1 - s, 0 if s < half else 1)
    return Schedule("dualpipe", pp, m, pp, placement, tuple(ops)).validate()


def dualpipev(pp: int, m: int) -> Schedule:
    """DualPipeV over `pp` ranks and `m >= 2 pp` micro-batches; the model has 2 pp stages.

    Rank r holds stages r (phase 0, activations flow to r+1) and 2pp-1-r (phase 1, flowing back to
    r-1); the last rank hands stage pp-1's output to its own stage pp. Rank 0 feeds the inputs and
    computes the loss. Phase counts follow DualPipe's with half_rank = r and pp/2 -> pp.
    """
    _check_sizes("dualpipev", pp, m)
    _check("dualpipev", m >= 2 * pp, f"num_microbatches={m} must be >= 2 x num_ranks = {2 * pp}")
    ops = []
    for r in range(pp):
        chunks = ([Chunk(r, 0, mb) for mb in range(m)],
                  [Chunk(2 * pp - 1 - r, 0, mb) for mb in range(m)])
        ph = _Phases(chunks)
        _dual_steps(ph, half=pp, pos=r, main=m - 2 * pp + r + 1, turn=r == pp - 1)
        ops.append(tuple(ph.ops))
    placement = {(s, 0): (s, 0) if s < pp else (2 * pp - 1 - s, 1) for s in range(2 * pp)}
    return Schedule("dualpipev", pp, m, 2 * pp, placement, tuple(ops)).validate()


SCHEDULES = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(name: str, pp: int, m: int) -> Schedule:
    """`make_schedule("dualpipe", 4, 8)`: a schedule by name."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name](pp, m)


# DESIGN.md lists `simulate` beside the schedules; it lives in `simulator` (which imports this
# module), so it is re-exported here at the end, once every name it needs exists.
from jax_ds.parallel.pipeline.simulator import simulate  # noqa: E402,F401
