"""Inside `shard_map`, jax types every array with the manual mesh axes it varies over (its
"vma"). A custom_vjp's backward rule must return cotangents typed like its inputs, and a weight
held the same on every `data` shard gets a cotangent that varies over `data` (it is computed
from that shard's tokens). `match_vma` casts the operands to vary over the union of their axes
before they enter such a rule, so its cotangents match. Autodiff then transposes the cast into
the sum over those axes that the weight's gradient needs."""

from __future__ import annotations

import jax


def _vma(x) -> frozenset:
    """The manual axes x varies over: `aval.vma` up to jax 0.8-0.11, `aval.manual_axis_type
    .varying` in jax 0.12; empty outside shard_map."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def _to_varying(x, axes: tuple):
    if hasattr(jax.lax, "pcast"):  # jax >= 0.8
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def match_vma(*arrays):
    """`arrays`, each cast to vary over every manual axis any of them varies over (unchanged
    outside shard_map)."""
    vmas = [_vma(a) for a in arrays]
    union = frozenset().union(*vmas)
    return tuple(a if v == union else _to_varying(a, tuple(sorted(union - v)))
                 for a, v in zip(arrays, vmas))
