"""Checkpoint storage: Orbax checkpoints of the sharded train state, on local disk or 3FS."""

from jax_ds.storage import threefs
from jax_ds.storage.checkpoint import CheckpointManager, Restored, abstract_state
from jax_ds.storage.shards import CorruptCheckpointError, ShardHandler, ShardOptions

__all__ = ["CheckpointManager", "CorruptCheckpointError", "Restored", "ShardHandler",
           "ShardOptions", "abstract_state", "threefs"]
