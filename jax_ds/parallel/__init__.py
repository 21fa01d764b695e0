"""Parallelism: mesh axes and construction (`mesh`), expert parallelism (`expert`); the EPLB
planner (`eplb`), expert load statistics (`load_stats`) and pipeline schedules and executor
(`pipeline`) load on first use."""

import importlib

from jax_ds.parallel.expert import (ep_capacity, ep_combine, ep_dispatch, ep_moe, moe_permute,
                                    moe_unpermute)
from jax_ds.parallel.mesh import (AXES, DATA, EXPERT, PIPE, TENSOR, make_mesh, shard_batch,
                                  shard_model)

__all__ = [
    "AXES", "DATA", "EXPERT", "PIPE", "TENSOR", "ep_capacity", "ep_combine", "ep_dispatch",
    "ep_moe", "make_mesh", "moe_permute", "moe_unpermute", "shard_batch", "shard_model",
]


_LAZY = ("eplb", "load_stats", "pipeline")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jax_ds.parallel.{name}")
    raise AttributeError(f"module 'jax_ds.parallel' has no attribute {name!r}")
