"""Checkpoint storage: Orbax checkpoints of the sharded train state, on local disk or 3FS."""

from jax_ds.storage import threefs
from jax_ds.storage.checkpoint import (CheckpointManager, CorruptCheckpointError, Restored,
                                       ShardHandler, abstract_state)

__all__ = ["CheckpointManager", "CorruptCheckpointError", "Restored", "ShardHandler",
           "abstract_state", "threefs"]
