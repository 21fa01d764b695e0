"""Parallelism: mesh axes and construction (`mesh`), expert parallelism (`expert`)."""

from jax_ds.parallel.expert import (ep_capacity, ep_combine, ep_dispatch, ep_moe, moe_permute,
                                    moe_unpermute)
from jax_ds.parallel.mesh import (AXES, DATA, EXPERT, PIPE, TENSOR, make_mesh, shard_batch,
                                  shard_model)

__all__ = [
    "AXES", "DATA", "EXPERT", "PIPE", "TENSOR", "ep_capacity", "ep_combine", "ep_dispatch",
    "ep_moe", "make_mesh", "moe_permute", "moe_unpermute", "shard_batch", "shard_model",
]
