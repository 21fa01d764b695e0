"""Splitting a stage's backward into B (input gradient) and W (weight gradient), exactly.

Zero-bubble schedules defer the weight-gradient work of a backward. PyTorch does it by queueing
closures inside each linear layer's backward; here it is done once, on the jaxpr of

    fb(p, x, dy) = (y, dp, dx)   where   y, vjp = jax.vjp(stage_fn, p, x);  dp, dx = vjp(dy)

Nested `jit`s are inlined, then every equation is assigned to the first phase that needs it:
  F  the ancestors of y;
  B  the other ancestors of dx (the input-cotangent chain through the stage);
  W  the other ancestors of dp (the weight-cotangent products).
Values crossing a phase boundary are saved: `res` (made by F, or x itself, read by B and W) and
`wres` (made by B, or dy itself, read by W: the cotangents at each weight's use). No equation runs
twice and B runs no equation that only weight gradients need, so F + B + W is exactly the work of
one jax.vjp; the compiled B has no weight-shaped matmuls (see the tests' HLO cost check).

Limitation: an equation that is not a plain `jit` is split no further. Control flow (scan, while,
cond), `jax.checkpoint` and nested `shard_map`s (expert parallelism's dispatch/combine) transpose
into one equation making input and weight cotangents together: such a piece's weight gradients
are computed in B and carried to W in `wres` (still exact; not deferred, and weight-sized).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import DropVar, Literal

_INLINE = ("jit", "pjit", "closed_call", "core_call")


class _Graph(NamedTuple):
    nodes: list          # (eqn, input refs); refs: ("in", k) | ("node", n, i) | ("lit", v)
    out_refs: list       # refs of the flat outputs (y..., dp..., dx...)
    out_avals: list


def _flatten(jaxpr, consts, in_refs, nodes):
    """Appends jaxpr's equations to `nodes` with nested jit calls inlined; returns output refs."""
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = ("lit", c)
    for v, r in zip(jaxpr.invars, in_refs):
        env[v] = r

    def read(a):
        return ("lit", a.val) if isinstance(a, Literal) else env[a]

    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if eqn.primitive.name in _INLINE and inner is not None:
            closed_consts = getattr(inner, "consts", ())
            outs = _flatten(getattr(inner, "jaxpr", inner), closed_consts, ins, nodes)
        else:
            nodes.append((eqn, ins))
            outs = [("node", len(nodes) - 1, i) for i in range(len(eqn.outvars))]
        for v, r in zip(eqn.outvars, outs):
            if not isinstance(v, DropVar):
                env[v] = r
    return [read(a) for a in jaxpr.outvars]


def _ancestors(nodes, refs, stop=frozenset()) -> set[int]:
    seen: set[int] = set()
    todo = [r[1] for r in refs if r[0] == "node"]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo += [r[1] for r in nodes[n][1] if r[0] == "node"]
    return seen


def _evaluate(nodes, order, values: dict):
    """Runs nodes[order] (ascending = topological) with `values` holding every outside input."""
    def read(r):
        return r[1] if r[0] == "lit" else values[r]

    for n in order:
        eqn, ins = nodes[n]
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.8
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*subfuns, *map(read, ins), **params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for i, o in enumerate(outs):
            values[("node", n, i)] = o
    return read


class StageSplit:
    """F / B / W functions of one stage, traced for one stage's parameter and activation shapes.

    forward(p, x) -> (y, res)                 y like x; res: tuple of arrays
    backward_input(p, res, dy) -> (dx, wres)  dx like x; wres: tuple of arrays
    backward_weight(p, res, wres) -> dp       dp like p
    backward(p, res, dy) -> (dx, dp)          B then W (a full backward)
    res_avals, wres_avals: ShapeDtypeStructs of what is saved between phases.
    """

    def __init__(self, stage_fn, params, x):
        p_leaves, self._p_tree = jax.tree.flatten(params)
        x_leaves, self._x_tree = jax.tree.flatten(x)
        x_avals = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in x_leaves]
        y_shape = jax.eval_shape(stage_fn, params, x)
        if jax.tree.structure(y_shape) != self._x_tree or any(
                (a.shape, a.dtype) != (b.shape, b.dtype)
                for a, b in zip(jax.tree.leaves(y_shape), x_avals)):
            raise ValueError(f"stage_fn must map an activation to one of the same structure, "
                             f"shapes and dtypes (stages chain); got x {x_avals} -> y {y_shape}")

        def fb(p, x, dy):
            y, vjp = jax.vjp(stage_fn, p, x)
            dp, dx = vjp(dy)
            return y, dp, dx

        closed = jax.make_jaxpr(fb)(params, x, jax.tree.unflatten(self._x_tree, x_avals))
        n_p, n_x = len(p_leaves), len(x_leaves)
        self._n_p, self._n_x, self._x_avals = n_p, n_x, x_avals
        nodes: list = []
        ins = [("in", k) for k in range(n_p + 2 * n_x)]
        out_refs = _flatten(closed.jaxpr, closed.consts, ins, nodes)
        self._out_avals = [v.aval for v in closed.jaxpr.outvars]
        self._nodes = nodes
        y_refs, dp_refs, dx_refs = (out_refs[:n_x], out_refs[n_x:n_x + n_p],
                                    out_refs[n_x + n_p:])
        self._y_refs, self._dp_refs, self._dx_refs = y_refs, dp_refs, dx_refs
        f = _ancestors(nodes, y_refs)
        b = _ancestors(nodes, dx_refs, stop=f)
        w = _ancestors(nodes, dp_refs, stop=f | b)
        self._f, self._b, self._w = sorted(f), sorted(b), sorted(w)
        x_in = {("in", n_p + k) for k in range(n_x)}
        dy_in = {("in", n_p + n_x + k) for k in range(n_x)}

        def uses(order, outs):
            refs = [r for n in order for r in nodes[n][1]] + list(outs)
            return list(dict.fromkeys(r for r in refs if r[0] != "lit"))

        def made_by(ref, phase, extra):
            return ref in extra or (ref[0] == "node" and ref[1] in phase)

        self._res = [r for r in uses(self._b + self._w, dx_refs + dp_refs) if made_by(r, f, x_in)]
        self._wres = [r for r in uses(self._w, dp_refs) if made_by(r, b, dy_in)]
        self.res_avals = tuple(self._aval(r) for r in self._res)
        self.wres_avals = tuple(self._aval(r) for r in self._wres)

    def _aval(self, ref):
        if ref[0] == "in":  # x or dy (parameters are never saved): both have x's avals
            aval = self._x_avals[(ref[1] - self._n_p) % self._n_x]
        else:
            aval = self._nodes[ref[1]][0].outvars[ref[2]].aval
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)

    def _inputs(self, p, x=None, dy=None) -> dict:
        values = {("in", k): v for k, v in enumerate(jax.tree.leaves(p))}
        for offset, tree in ((self._n_p, x), (self._n_p + self._n_x, dy)):
            if tree is not None:
                values.update({("in", offset + k): v for k, v in enumerate(jax.tree.leaves(tree))})
        return values

    def _out(self, read, refs, avals):
        return [jnp.broadcast_to(jnp.asarray(read(r), a.dtype), a.shape) if r[0] == "lit"
                else read(r) for r, a in zip(refs, avals)]

    def forward(self, p, x):
        read = _evaluate(self._nodes, self._f, self._inputs(p, x=x))
        y = self._out(read, self._y_refs, self._out_avals[:self._n_x])
        return jax.tree.unflatten(self._x_tree, y), tuple(read(r) for r in self._res)

    def backward_input(self, p, res, dy):
        values = self._inputs(p, dy=dy)
        values.update(zip(self._res, res))
        read = _evaluate(self._nodes, self._b, values)
        dx = self._out(read, self._dx_refs, self._out_avals[self._n_x + self._n_p:])
        return jax.tree.unflatten(self._x_tree, dx), tuple(read(r) for r in self._wres)

    def backward_weight(self, p, res, wres):
        values = self._inputs(p)
        values.update(zip(self._res, res))
        values.update(zip(self._wres, wres))
        read = _evaluate(self._nodes, self._w, values)
        dp = self._out(read, self._dp_refs, self._out_avals[self._n_x:self._n_x + self._n_p])
        return jax.tree.unflatten(self._p_tree, dp)

    def backward(self, p, res, dy) -> tuple[Any, Any]:
        dx, wres = self.backward_input(p, res, dy)
        return dx, self.backward_weight(p, res, wres)
