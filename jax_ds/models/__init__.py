"""DeepSeek-V2/V3 models in Flax NNX: config presets, MLA, DeepSeekMoE, the transformer."""

from jax_ds.models.config import DeepSeekConfig, YarnConfig
from jax_ds.models.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jax_ds.models.kv_cache import PagedKVCache
from jax_ds.models.layers import MLP, Dense, RMSNorm, apply_rope, rope_inv_freq
from jax_ds.models.mla import MLAttention, attend, attention_reference
from jax_ds.models.moe import (DeepSeekMoE, MoEStats, Router, RouterBias, balance_loss,
                               expert_ffn, grouped_gemm, grouped_gemm_fp8, update_router_bias)
from jax_ds.models.transformer import (Block, ModelAux, MTPModule, PipelineStages,
                                       Transformer, apply_router_bias_update, lm_loss,
                                       param_counts, train_step)

__all__ = [
    "Block", "CheckpointError", "DeepSeekConfig", "DeepSeekMoE", "Dense", "MLAttention", "MLP",
    "MTPModule", "MoEStats", "ModelAux", "PagedKVCache", "PipelineStages", "RMSNorm", "Router",
    "RouterBias", "Transformer", "YarnConfig", "apply_rope", "apply_router_bias_update", "attend",
    "attention_reference", "balance_loss", "expert_ffn", "grouped_gemm", "grouped_gemm_fp8",
    "lm_loss", "load_hf_checkpoint", "param_counts", "rope_inv_freq", "save_hf_checkpoint",
    "train_step", "update_router_bias",
]
