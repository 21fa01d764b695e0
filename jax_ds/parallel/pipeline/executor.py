"""Runs a pipeline `Schedule` as one jitted SPMD program over the `pipe` mesh axis.

    loss, grads = run(schedule, stage_fn, params, batch, loss_fn, mesh)
    out = execute(..., loss_params=head, input_grads=True)   # + head / input gradients, stats

Inside `shard_map` (manual over `pipe` only; other mesh axes stay automatic), every rank loops
over the schedule's ticks with `lax.scan`. At each tick it reads its row of the static table
(`tables.compile_tables`) at `axis_index(pipe)`, runs its op through `lax.switch` (idle, F, B, W,
BW or a fused F&B pair; the row names which of the rank's stage copies), sends its forward output
and its input gradient to both neighbours with `ppermute`, and files whatever it received into
fixed-capacity buffers at the slots the row names. F saves its residuals in a chunk slot; B reads
them and adds its `wres`; W reads both (`split.StageSplit`). Program size does not depend on the
number of micro-batches: only the scan length does.

SPMD runs in lockstep: a tick lasts as long as its slowest rank's op, so the program's time is
the sum over ticks of the longest op, not the simulator's event-driven makespan.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.parallel.mesh import PIPE
from jax_ds.parallel.pipeline.schedules import Schedule
from jax_ds.parallel.pipeline.split import StageSplit
from jax_ds.parallel.pipeline.tables import COL, Tables, compile_tables


class PipelineOutput(NamedTuple):
    """What `execute` returns.

    loss: [] the mean over micro-batches of loss_fn.
    grads: like params ([num_stages, ...] leaves); DualPipe's two copies of a stage are summed.
    loss_grads: like loss_params (None without them).
    input_grads: like inputs, d loss / d inputs (None unless asked for).
    peak_chunks: [pp] int32: the most chunk slots (F residuals + B's wres) holding a live chunk
      at once on each rank, in micro-batch x stage units; fixed by the schedule's tables (the
      buffers are sized by it) and equal to `simulate`'s peak_activations.
    capacity: slots per buffer ({"act", "grad", "chunk"}), the same on every rank.
    num_ticks: scan length.
    """
    loss: jax.Array
    grads: Any
    loss_grads: Any
    input_grads: Any
    peak_chunks: jax.Array
    capacity: dict
    num_ticks: int


def _take(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _put(tree, i, value):
    return jax.tree.map(lambda a, v: a.at[i].set(v.astype(a.dtype)), tree, value)


def _zeros(avals):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), avals)


def _pool(avals, slots):
    return jax.tree.map(lambda a: jnp.zeros((slots + 1, *a.shape), a.dtype), avals)


def stage_placement(schedule: Schedule) -> np.ndarray:
    """[pp, num_local] int: the stage each rank's local copy holds."""
    idx = np.zeros((schedule.num_ranks, schedule.num_local), np.int32)
    for (stage, _), (rank, local) in schedule.placement.items():
        idx[rank, local] = stage
    return idx


def _real_cotangents(grads, like):
    """`grads` with the float0 cotangents autodiff gives integer leaves (RedundantMoE's placement
    tables, a loss's index table) replaced by zeros of the leaf's own dtype: the phases' switch
    branches and the sums over ticks and ranks need real arrays of one type. Integer parameters
    are thus held fixed."""
    return jax.tree.map(
        lambda g, x: jnp.zeros(jnp.shape(x), x.dtype) if g.dtype == jax.dtypes.float0 else g,
        grads, like)


def _body(tables: Tables, stage_fn, loss_fn, num_mb: int, axis: str, input_grads: bool):
    """The per-rank program: (local params [1, L, ...], loss params, inputs [m, ...],
    targets [m, ...]) -> (loss, grads [1, L, ...], loss grads, input grads)."""
    cap, pp = tables.capacity, tables.table.shape[1]
    right = [(i, i + 1) for i in range(pp - 1)]  # ppermute pairs: send to the right neighbour
    left = [(i + 1, i) for i in range(pp - 1)]

    def body(params_1L, loss_params, inputs, targets):
        params_L = _take(params_1L, 0)
        num_local = jax.tree.leaves(params_L)[0].shape[0]
        x_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
        split = StageSplit(stage_fn, _take(params_L, 0), x_avals)
        zero_x, zero_p = _zeros(x_avals), jax.tree.map(lambda a: jnp.zeros_like(a[0]), params_L)
        zero_res, zero_wres = _zeros(split.res_avals), _zeros(split.wres_avals)
        zero_loss = jnp.zeros((), jax.eval_shape(loss_fn, loss_params, x_avals,
                                                  _take(targets, 0)).dtype)
        zero_lp = jax.tree.map(jnp.zeros_like, loss_params)

        def stage_params(row, col):
            # One traced copy of each phase serves both stage copies (half the compile time of
            # specialising per copy), at the price of slicing the copy's weights per tick.
            return _take(params_L, 0 if num_local == 1 else row[COL[col]])

        def loss_and_cotangent(y, mb):
            loss, (dlp, dy) = jax.value_and_grad(loss_fn, argnums=(0, 1), allow_int=True)(
                loss_params, y, _take(targets, mb))
            scaled = jax.tree.map(lambda g: g if g.dtype == jax.dtypes.float0 else g / num_mb,
                                  (dlp, dy))
            return loss / num_mb, _real_cotangents(scaled, (loss_params, y))

        def forward(pools, row):
            x = jax.tree.map(lambda a, b: jnp.where(row[COL["f_first"]] == 1, a, b),
                             _take(inputs, row[COL["f_mb"]]), _take(pools["act"], row[COL["f_in"]]))
            y, res = split.forward(stage_params(row, "f_local"), x)
            loss, (dlp, dy) = jax.lax.cond(row[COL["f_last"]] == 1, loss_and_cotangent,
                                           lambda y, mb: (zero_loss, (zero_lp, zero_x)),
                                           y, row[COL["f_mb"]])
            return y, res, (loss, dlp), dy

        def backward_input(pools, row):
            return split.backward_input(stage_params(row, "b_local"),
                                        _take(pools["res"], row[COL["b_slot"]]),
                                        _take(pools["grad"], row[COL["b_dy"]]))

        def backward_weight(pools, row, wres=None):
            if wres is None:  # a deferred W: B saved its wres in the chunk's slot
                wres = _take(pools["wres"], row[COL["w_slot"]])
            return _real_cotangents(split.backward_weight(
                stage_params(row, "w_local"), _take(pools["res"], row[COL["w_slot"]]), wres),
                zero_p)

        def branch(kind):
            def op(pools, row):  # -> (y, res, (loss, dloss_params), dy_loss, dx, wres, dp)
                y, res, loss, dy_loss = zero_x, zero_res, (zero_loss, zero_lp), zero_x
                dx, wres, dp = zero_x, zero_wres, zero_p
                if kind in ("F", "FB"):
                    y, res, loss, dy_loss = forward(pools, row)
                if kind in ("B", "BW", "FB"):
                    dx, wres = backward_input(pools, row)
                if kind in ("BW", "FB"):
                    dp = backward_weight(pools, row, wres)
                if kind == "W":
                    dp = backward_weight(pools, row)
                return y, res, loss, dy_loss, dx, wres, dp
            return op

        branches = [branch(kind) for kind in tables.branches]

        def tick(carry, rows):
            pools, grads, (loss, lp_grads), dxs = carry
            row = rows[jax.lax.axis_index(axis)]
            y, res, (loss_inc, dlp), dy_loss, dx, wres, dp = jax.lax.switch(
                row[COL["branch"]], branches, pools, row)
            # Every rank sends its forward output and input gradient both ways; the receiver's
            # row says where to keep what it wants (the trash slot takes the rest).
            arrivals = {"act_local": y, "grad_local": dx, "grad_loss": dy_loss}
            for name, value, perm in (("act_l", y, right), ("act_r", y, left),
                                      ("grad_l", dx, right), ("grad_r", dx, left)):
                if name in tables.channels:
                    arrivals[name] = jax.lax.ppermute(value, axis, perm)
            act, grad = pools["act"], pools["grad"]
            for name, value in arrivals.items():
                if name.startswith("act"):
                    act = _put(act, row[COL[name]], value)
                else:
                    grad = _put(grad, row[COL[name]], value)
            pools = dict(act=act, grad=grad, res=_put(pools["res"], row[COL["f_res"]], res),
                         wres=_put(pools["wres"], row[COL["wres_write"]], wres))
            grads = jax.tree.map(lambda g, d: g.at[row[COL["w_local"]]].add(d), grads, dp)
            lp_grads = jax.tree.map(jnp.add, lp_grads, dlp)
            if input_grads:  # stage 0's dx, kept by micro-batch (index num_mb is the trash)
                at = jnp.where(row[COL["b_first"]] == 1, row[COL["b_mb"]], num_mb)
                dxs = _put(dxs, at, dx)
            return (pools, grads, (loss + loss_inc, lp_grads), dxs), None

        pools = dict(act=_pool(x_avals, cap["act"]), grad=_pool(x_avals, cap["grad"]),
                     res=_pool(split.res_avals, cap["chunk"]),
                     wres=_pool(split.wres_avals, cap["chunk"]))
        dxs = _pool(x_avals, num_mb) if input_grads else None
        carry = (pools, jax.tree.map(jnp.zeros_like, params_L), (zero_loss, zero_lp), dxs)
        (_, grads, (loss, lp_grads), dxs), _ = jax.lax.scan(
            tick, carry, jnp.asarray(tables.table))
        # The loss (and its parameters' and inputs' gradients) live on the ranks holding the
        # last (first) stage, zeros elsewhere: a sum over the pipe axis gathers them.
        if input_grads:
            dxs = _psum(jax.tree.map(lambda a: a[:num_mb], dxs), axis)
        return (_psum(loss, axis), jax.tree.map(lambda g: g[None], grads),
                _psum(lp_grads, axis), dxs)

    return body


def _psum(tree, axis):
    """psum over `axis`, with 16-bit floats summed in float32 and cast back (one rank holds each
    value, zeros the others: the same result). XLA:CPU (jax 0.12) aborts the process compiling
    a bf16 all-reduce inside a shard_map manual over some mesh axes only."""
    def one(a):
        if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4:
            return jax.lax.psum(a.astype(jnp.float32), axis).astype(a.dtype)
        return jax.lax.psum(a, axis)
    return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=64)
def _program(schedule: Schedule, stage_fn: Callable, loss_fn: Callable, mesh: Mesh, axis: str,
             input_grads: bool):
    """(jitted program(params, loss_params, inputs, targets), tables) for one configuration."""
    tables = compile_tables(schedule)
    idx = stage_placement(schedule)
    pp, num_local = idx.shape
    body = _body(tables, stage_fn, loss_fn, schedule.num_microbatches, axis, input_grads)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(), P(), P()),
                           out_specs=(P(), P(axis), P(), P()),
                           axis_names=frozenset({axis}), check_vma=False)
    flat = idx.reshape(-1)

    def program(params, loss_params, inputs, targets):
        # Stage copies by rank: [S, ...] -> [pp, L, ...] split over `axis`; the other dimensions
        # keep whatever split they had (routed experts over `expert`, say).
        def by_rank(a):
            spec = P(axis, *[P.UNCONSTRAINED] * a.ndim)
            return jax.lax.with_sharding_constraint(a[flat].reshape(pp, num_local, *a.shape[1:]),
                                                    NamedSharding(mesh, spec))

        local = jax.tree.map(by_rank, params)
        loss, grads_local, lp_grads, dxs = mapped(local, loss_params, inputs, targets)
        # Copies of one stage (DualPipe) add their gradients.
        grads = jax.tree.map(lambda p, g: jnp.zeros_like(p).at[flat].add(
            g.reshape(pp * num_local, *p.shape[1:])), params, grads_local)
        return loss, grads, lp_grads, dxs

    return jax.jit(program), tables


def _check_inputs(schedule: Schedule, params, batch, mesh: Mesh, axis: str):
    if axis not in mesh.axis_names:
        raise ValueError(f"run: mesh has no axis {axis!r} (axes {mesh.axis_names})")
    if mesh.shape[axis] != schedule.num_ranks:
        raise ValueError(f"run: schedule {schedule.name!r} has {schedule.num_ranks} ranks but the "
                         f"mesh's {axis!r} axis has size {mesh.shape[axis]}")
    for leaf in jax.tree.leaves(params):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != schedule.num_stages:
            raise ValueError(f"run: every params leaf must be stacked over the "
                             f"{schedule.num_stages} stages on axis 0, got shape "
                             f"{jnp.shape(leaf)}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("run: batch must be (inputs, targets), leaves [m, micro-batch, ...]")
    for leaf in jax.tree.leaves(batch):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != schedule.num_microbatches:
            raise ValueError(f"run: batch leaves must have the {schedule.num_microbatches} "
                             f"micro-batches on axis 0, got shape {jnp.shape(leaf)}")


class _WithoutParams:
    """loss_fn(y, target) as loss_fn(loss_params, y, target); equal wrappers hash equal, so the
    program cache hits on repeated calls."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, loss_params, y, target):
        return self.fn(y, target)

    def __eq__(self, other):
        return isinstance(other, _WithoutParams) and other.fn == self.fn

    def __hash__(self):
        return hash((_WithoutParams, self.fn))


def _relabel(tree, source: Mesh, mesh: Mesh):
    """Arrays of `tree` placed on `source` put on `mesh` (the same devices and axis names, other
    axis types) with the same spec: no copy. Everything else as it is."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == source:
            return jax.device_put(x, NamedSharding(mesh, sharding.spec))
        return x
    return jax.tree.map(one, tree)


def execute(schedule: Schedule, stage_fn: Callable, params: Any, batch: Any, loss_fn: Callable,
            mesh: Mesh, axis: str = PIPE, *, loss_params: Any = None,
            input_grads: bool = False) -> PipelineOutput:
    """`run` with more: parameters of the loss (an output head), gradients w.r.t. the inputs
    (for an embedding outside the pipeline), and the buffers' sizes.

    With `loss_params`, loss_fn is called as loss_fn(loss_params, y, target) and
    `PipelineOutput.loss_grads` holds their gradients (integer leaves, a token table say, are
    held fixed: zeros of their dtype). With `input_grads=True`,
    `PipelineOutput.input_grads` is d loss / d inputs. See `run` for the rest.
    """
    _check_inputs(schedule, params, batch, mesh, axis)
    # The program places arrays by sharding constraints, which JAX takes on Auto axes only:
    # a mesh of Explicit axes (jax.make_mesh's default) runs as the same devices and names, Auto;
    # arrays placed on it are relabelled onto that mesh and the results back (no copies). Under
    # jit the inputs' types carry the Explicit mesh: there it takes an Auto mesh.
    caller = mesh
    explicit = any(t != AxisType.Auto for t in mesh.axis_types)
    if explicit:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, batch,
                                                                        loss_params))):
            raise ValueError("pipeline: inside jax.jit the mesh must have Auto axes (e.g. "
                             "jax_ds.parallel.mesh.make_mesh, or jax.make_mesh(..., axis_types="
                             "(AxisType.Auto,) * n)); a mesh of Explicit axes works outside jit")
        mesh = Mesh(mesh.devices, mesh.axis_names,
                    axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        params, batch, loss_params = _relabel((params, batch, loss_params), caller, mesh)
    has_loss_params = loss_params is not None
    if not has_loss_params:
        loss_fn, loss_params = _WithoutParams(loss_fn), ()
    program, tables = _program(schedule, stage_fn, loss_fn, mesh, axis, bool(input_grads))
    if explicit:
        with jax.set_mesh(mesh):  # a context mesh (jax.set_mesh(caller)) must match the program's
            outs = program(params, loss_params, *batch)
        loss, grads, lp_grads, dxs = _relabel(outs, mesh, caller)
    else:
        loss, grads, lp_grads, dxs = program(params, loss_params, *batch)
    return PipelineOutput(loss, grads, lp_grads if has_loss_params else None, dxs,
                          jnp.asarray(tables.peak_chunks, jnp.int32),
                          dict(tables.capacity), tables.num_ticks)


def run(schedule: Schedule, stage_fn: Callable, params: Any, batch: Any, loss_fn: Callable,
        mesh: Mesh, axis: str = PIPE):
    """Loss and parameter gradients of a pipelined model, as one jitted SPMD program.

    The model is `num_stages` applications of `stage_fn` followed by `loss_fn`; the loss is the
    mean over micro-batches, equal to this sequential loop:

        for i in range(m):
            x = inputs[i]
            for s in range(num_stages):
                x = stage_fn(params[s], x)
            loss += loss_fn(x, targets[i]) / m

    Args:
      schedule: from `one_f_one_b`, `zb1p`, `dualpipe` or `dualpipev`.
      stage_fn: (stage_params, x) -> y, y with x's structure, shapes and dtypes. The compiled
        program is cached on (schedule, stage_fn, loss_fn, mesh): define the functions once, not
        as fresh lambdas per call.
      params: pytree, every leaf [num_stages, ...] (stage s's parameters at index s).
      batch: (inputs, targets), pytrees with leaves [m, micro-batch, ...]; inputs feed stage 0,
        targets go to loss_fn. Every `axis` rank gets them; other mesh axes (data, expert) may
        split the micro-batch dimension.
      loss_fn: (y, target) -> scalar, on the last stage's output of one micro-batch.
      mesh: a mesh with `axis` of size schedule.num_ranks (e.g. `make_mesh(pipe=4, data=2)`).
      axis: the pipeline axis name.

    Returns:
      (loss [], grads like params). DualPipe holds each stage twice; the copies' gradients are
      summed.
    """
    out = execute(schedule, stage_fn, params, batch, loss_fn, mesh, axis)
    return out.loss, out.grads
