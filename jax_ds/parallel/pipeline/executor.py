"""Runs a pipeline `Schedule` as one jitted SPMD program over the `pipe` mesh axis.

    loss, grads = run(schedule, stage_fn, params, batch, loss_fn, mesh)

Inside `shard_map` (manual over `pipe` only; other mesh axes stay automatic), every rank loops
over the schedule's ticks with `lax.scan`. At each tick it reads its row of the static table
(`tables.compile_tables`) at `axis_index(pipe)`, runs its op through `lax.switch` (idle, F, B, W,
BW or an F&B pair, specialised per local stage copy), sends its forward output and its input
gradient to both neighbours with `ppermute`, and files whatever it received into fixed-capacity
buffers at the slots the table names. F saves its residuals in a chunk slot; B reads them and adds
its `wres`; W reads both (`split.StageSplit`). Program size does not depend on the number of
micro-batches: only the scan length does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.parallel.mesh import PIPE
from jax_ds.parallel.pipeline.schedules import Schedule
from jax_ds.parallel.pipeline.split import StageSplit
from jax_ds.parallel.pipeline.tables import COL, Tables, compile_tables


class RunStats(NamedTuple):
    """Measured by the program. peak_chunks [pp] int32: most chunk slots holding a live chunk at
    once, per rank (compare `simulate(...).peak_activations`); capacity: slots per buffer."""
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


def _body(tables: Tables, stage_fn, loss_fn, num_mb: int, axis: str):
    """The per-rank program: (local params [L, ...], inputs [m, ...], targets [m, ...]) ->
    (loss [1], grads [1, L, ...], peak [1])."""
    table = jnp.asarray(tables.table)
    cap = tables.capacity

    def body(params_1L, inputs, targets):
        params_L = _take(params_1L, 0)
        x_aval = _take(inputs, 0)
        split = StageSplit(stage_fn, _take(params_L, 0), x_aval)
        x_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x_aval)
        p_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params_L)
        zero_x, zero_p = _zeros(x_avals), _zeros(p_avals)
        zero_res, zero_wres = _zeros(split.res_avals), _zeros(split.wres_avals)
        loss_dtype = jax.eval_shape(loss_fn, x_avals, _take(targets, 0)).dtype
        zero_loss = jnp.zeros((), loss_dtype)

        def loss_and_cotangent(y, mb):
            loss, dy = jax.value_and_grad(loss_fn)(y, _take(targets, mb))
            return loss / num_mb, jax.tree.map(lambda g: g / num_mb, dy)

        def stage_params(j, row, col):
            if j >= 0:
                return _take(params_L, j)
            return _take(params_L, row[COL[col]])

        def forward(j, pools, row):
            act = _take(pools["act"], row[COL["f_in"]])
            x = jax.tree.map(lambda a, b: jnp.where(row[COL["f_first"]] == 1, a, b),
                             _take(inputs, row[COL["f_mb"]]), act)
            y, res = split.forward(stage_params(j, row, "f_local"), x)
            loss, dy = jax.lax.cond(row[COL["f_last"]] == 1, loss_and_cotangent,
                                    lambda y, mb: (zero_loss, zero_x),
                                    y, row[COL["f_mb"]])
            return y, res, loss, dy

        def backward_input(j, pools, row):
            res = _take(pools["res"], row[COL["b_slot"]])
            return split.backward_input(stage_params(j, row, "b_local"), res, _take(pools["grad"],
                                                                       row[COL["b_dy"]]))

        def backward_weight(j, pools, row, wres=None):
            res = _take(pools["res"], row[COL["w_slot"]])
            wres = _take(pools["wres"], row[COL["w_slot"]]) if wres is None else wres
            return split.backward_weight(stage_params(j, row, "w_local"), res, wres)

        def branch(kind, jf, jb):
            # -> (f_out, res, loss, dy_loss, b_out, wres, dp)
            def run(pools, row):
                y, res, loss, dy = zero_x, zero_res, zero_loss, zero_x
                dx, wres, dp = zero_x, zero_wres, zero_p
                if kind in ("F", "FB"):
                    y, res, loss, dy = forward(jf, pools, row)
                if kind in ("B", "BW", "FB"):
                    dx, wres = backward_input(jb, pools, row)
                if kind in ("BW", "FB"):
                    dp = backward_weight(jb, pools, row, wres)
                if kind == "W":
                    dp = backward_weight(jb, pools, row)
                return y, res, loss, dy, dx, wres, dp
            return run

        branches = [branch(*key) for key in tables.branches]
        pp = tables.table.shape[1]
        right = [(i, i + 1) for i in range(pp - 1)]
        left = [(i + 1, i) for i in range(pp - 1)]

        def tick(carry, rows):
            pools, grads, loss, occupied, peak = carry
            row = rows[jax.lax.axis_index(axis)]
            y, res, loss_inc, dy_loss, dx, wres, dp = jax.lax.switch(row[COL["branch"]], branches,
                                                                     pools, row)
            received = {}
            for name, value, perm in (("act_l", y, right), ("act_r", y, left),
                                      ("grad_l", dx, right), ("grad_r", dx, left)):
                if name in tables.channels:
                    received[name] = jax.lax.ppermute(value, axis, perm)
            act, grad = pools["act"], pools["grad"]
            for name, value in (("act_l", received.get("act_l")), ("act_r", received.get("act_r")),
                                ("act_local", y)):
                if value is not None:
                    act = _put(act, row[COL[name]], value)
            for name, value in (("grad_l", received.get("grad_l")),
                                ("grad_r", received.get("grad_r")), ("grad_local", dx),
                                ("grad_loss", dy_loss)):
                if value is not None:
                    grad = _put(grad, row[COL[name]], value)
            pools = dict(act=act, grad=grad, res=_put(pools["res"], row[COL["f_res"]], res),
                         wres=_put(pools["wres"], row[COL["wres_write"]], wres))
            grads = jax.tree.map(lambda g, d: g.at[row[COL["w_local"]]].add(d), grads, dp)
            occupied = occupied.at[row[COL["f_res"]]].set(1)
            peak = jnp.maximum(peak, occupied[:cap["chunk"]].sum(dtype=jnp.int32))
            occupied = occupied.at[row[COL["free"]]].set(0)
            return (pools, grads, loss + loss_inc, occupied, peak), None

        pools = dict(act=_pool(x_avals, cap["act"]), grad=_pool(x_avals, cap["grad"]),
                     res=_pool(split.res_avals, cap["chunk"]),
                     wres=_pool(split.wres_avals, cap["chunk"]))
        grads = jax.tree.map(jnp.zeros_like, params_L)
        carry = (pools, grads, zero_loss, jnp.zeros(cap["chunk"] + 1, jnp.int32),
                 jnp.zeros((), jnp.int32))
        (_, grads, loss, _, peak), _ = jax.lax.scan(tick, carry, table)
        loss = jax.lax.psum(loss, axis)
        return loss, jax.tree.map(lambda g: g[None], grads), peak[None]

    return body


@functools.lru_cache(maxsize=64)
def _program(schedule: Schedule, stage_fn: Callable, loss_fn: Callable, mesh: Mesh, axis: str):
    tables = compile_tables(schedule)
    idx = stage_placement(schedule)
    pp, num_local = idx.shape
    body = _body(tables, stage_fn, loss_fn, schedule.num_microbatches, axis)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(), P()),
                           out_specs=(P(), P(axis), P(axis)), axis_names=frozenset({axis}),
                           check_vma=False)

    def program(params, batch):
        inputs, targets = batch
        # Stage copies by rank: [S, ...] -> [pp, L, ...] split over `axis`.
        flat = idx.reshape(-1)
        local = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
            a[flat].reshape(pp, num_local, *a.shape[1:]), NamedSharding(mesh, P(axis))), params)
        loss, grads_local, peak = mapped(local, inputs, targets)
        # Copies of one stage (DualPipe) add their gradients.
        grads = jax.tree.map(lambda p, g: jnp.zeros_like(p).at[flat].add(
            g.reshape(pp * num_local, *p.shape[1:])), params, grads_local)
        return loss, grads, peak

    return jax.jit(program), tables


def _check_inputs(schedule: Schedule, params, batch, mesh: Mesh, axis: str):
    if axis not in mesh.axis_names:
        raise ValueError(f"run: mesh has no axis {axis!r} (axes {mesh.axis_names})")
    if mesh.shape[axis] != schedule.num_ranks:
        raise ValueError(f"run: schedule {schedule.name!r} has {schedule.num_ranks} ranks but the "
                         f"mesh's {axis!r} axis has size {mesh.shape[axis]}")
    for leaf in jax.tree.leaves(params):
        if leaf.ndim < 1 or leaf.shape[0] != schedule.num_stages:
            raise ValueError(f"run: every params leaf must be stacked over the "
                             f"{schedule.num_stages} stages on axis 0, got shape {leaf.shape}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("run: batch must be (inputs, targets), leaves [m, micro-batch, ...]")
    for leaf in jax.tree.leaves(batch):
        if leaf.ndim < 1 or leaf.shape[0] != schedule.num_microbatches:
            raise ValueError(f"run: batch leaves must have the {schedule.num_microbatches} "
                             f"micro-batches on axis 0, got shape {leaf.shape}")


def run_with_stats(schedule: Schedule, stage_fn: Callable, params: Any, batch: Any,
                   loss_fn: Callable, mesh: Mesh, axis: str = PIPE):
    """`run`, also returning `RunStats` measured from the program's buffers."""
    _check_inputs(schedule, params, batch, mesh, axis)
    program, tables = _program(schedule, stage_fn, loss_fn, mesh, axis)
    loss, grads, peak = program(params, batch)
    return loss, grads, RunStats(peak, dict(tables.capacity), tables.num_ticks)


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
      stage_fn: (stage_params, x) -> y, y with x's structure, shapes and dtypes. Hashable (the
        compiled program is cached on it): define it once, not as a fresh lambda per call.
      params: pytree, every leaf [num_stages, ...] (stage s's parameters at index s).
      batch: (inputs, targets), pytrees with leaves [m, micro-batch, ...]; inputs feed stage 0,
        targets go to loss_fn. Placed on all `axis` ranks; other mesh axes may split them.
      loss_fn: (y, target) -> scalar, on the last stage's output of one micro-batch.
      mesh: a mesh with `axis` of size schedule.num_ranks (e.g. `make_mesh(pipe=4, data=2)`).
      axis: the pipeline axis name.

    Returns:
      (loss [] float32, grads like params). DualPipe holds each stage twice; the copies'
      gradients are summed.
    """
    loss, grads, _ = run_with_stats(schedule, stage_fn, params, batch, loss_fn, mesh, axis)
    return loss, grads
