"""Expert load statistics: a moving average of tokens per expert, per MoE layer, for EPLB.

EPLB plans from *estimated* loads; DeepSeek's README suggests a moving average of history. The
model already counts assignments per expert in every forward pass (`ModelAux.expert_counts`, the
`expert_counts` metric of `train_step`); this keeps their exponential moving average as a small
pytree in the train state, updated inside or outside jit:

    load = init_expert_load(cfg.num_moe_layers + cfg.mtp_depth, cfg.num_experts)
    metrics = step(model, optimizer, batch)
    load = update_expert_load(load, metrics["expert_counts"])
    plan = rebalance_experts(load.average, num_replicas, num_groups, num_nodes, num_gpus)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertLoad(NamedTuple):
    """Moving-average load per (MoE layer, expert); a pytree, so it can live in a train state."""
    average: jax.Array  # [L, E] float32: assignments per step, exponentially averaged
    steps: jax.Array    # [] int32: updates so far (0: `average` holds no data yet)


def init_expert_load(num_layers: int, num_experts: int) -> ExpertLoad:
    """Empty statistics for num_layers MoE layers of num_experts experts."""
    return ExpertLoad(jnp.zeros((num_layers, num_experts), jnp.float32), jnp.zeros((), jnp.int32))


def update_expert_load(load: ExpertLoad, counts_LE, decay: float = 0.9) -> ExpertLoad:
    """average <- decay * average + (1 - decay) * counts; the first update takes counts as is.

    Starting from the first observation instead of zero keeps early averages unbiased (no warm-up
    correction needed). decay in [0, 1): 0 keeps only the latest step, 0.9 about the last ten.

    Args:
      load: the statistics so far.
      counts_LE: [L, E] assignments per expert in this step (any real dtype).
      decay: weight of the history, a Python float.

    Returns:
      The updated ExpertLoad.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"update_expert_load: decay={decay} must be in [0, 1)")
    counts = jnp.asarray(counts_LE, jnp.float32)
    if counts.shape != load.average.shape:
        raise ValueError(f"update_expert_load: counts have shape {counts.shape}, the statistics "
                         f"{load.average.shape} ([MoE layers, experts])")
    average = jnp.where(load.steps == 0, counts, decay * load.average + (1.0 - decay) * counts)
    return ExpertLoad(average, load.steps + 1)
