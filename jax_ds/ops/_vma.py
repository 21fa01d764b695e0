"""Inside `shard_map`, jax types every array with the manual mesh axes it varies over (its
"vma"). A custom_vjp's backward rule must return cotangents typed like its inputs, and a weight
held the same on every `data` shard gets a cotangent that varies over `data` (it is computed
from that shard's tokens). `match_vma` casts the operands to vary over the union of their axes
before they enter such a rule, so its cotangents match. Autodiff then transposes the cast into
the sum over those axes that the weight's gradient needs."""

from __future__ import annotations

import jax


def match_vma(*arrays):
    """`arrays`, each cast to vary over every manual axis any of them varies over (unchanged
    outside shard_map, where no array varies over any)."""
    vmas = [frozenset(jax.typeof(a).manual_axis_type.varying) for a in arrays]
    union = frozenset().union(*vmas)
    return tuple(a if v == union else jax.lax.pcast(a, tuple(sorted(union - v)), to="varying")
                 for a, v in zip(arrays, vmas))


def vary_like(outputs, *inputs):
    """`outputs` (a pytree), cast to vary over every manual axis any of `inputs` varies over.

    For `jax.ffi.ffi_call` results: inside shard_map jax types them as varying over no axis
    (seen in jax 0.11.2 and 0.12), as if every shard held the same value. A custom_vjp around
    such a call then gets cotangents typed unlike its inputs and fails (the model's training step
    on one GPU: moe_unpermute's backward), and jax could treat per-shard results as replicated.
    """
    union = frozenset().union(*(frozenset(jax.typeof(a).manual_axis_type.varying)
                                for a in jax.tree.leaves(inputs)))

    def cast(o):
        missing = union - frozenset(jax.typeof(o).manual_axis_type.varying)
        return jax.lax.pcast(o, tuple(sorted(missing)), to="varying") if missing else o

    return jax.tree.map(cast, outputs)
