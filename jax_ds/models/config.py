"""`DeepSeekConfig`: one frozen dataclass for DeepSeek-V2/V3-style models, with presets.

Presets:
  tiny     byte-level, 3 layers, 8 experts: trains on 2 CPU cores in well under a second a step.
  v2_lite  DeepSeek-V2-Lite (15.7B total, 2.4B activated; softmax router, aux-loss balancing).
  v3       DeepSeek-V3 (671B total, 37B activated; sigmoid router, aux-loss-free bias, 1 MTP
           module), the published shapes (technical report, arXiv:2412.19437, and the released
           config.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from jax_ds.ops._checks import is_int

SCORE_FUNCS = ("sigmoid", "softmax")
DTYPES = ("float32", "bfloat16", "float16")
EP_EXCHANGES = ("auto", "ragged", "padded", "emulated")  # see jax_ds.parallel.expert


@dataclass(frozen=True, slots=True)
class YarnConfig:
    """YaRN context extension (Peng et al. 2023) as DeepSeek-V2/V3 use it for 128K context."""
    factor: float = 40.0               # s: target length / original length
    original_max_len: int = 4096       # L: the pre-training context
    beta_fast: float = 32.0            # rotations per L above which a frequency is kept as is
    beta_slow: float = 1.0             # ... below which it is fully interpolated (divided by s)
    mscale: float = 1.0                # attention temperature sqrt(1/t) = 0.1 mscale ln(s) + 1
    mscale_all_dim: float = 1.0        # its share on the softmax scale (0: none)
    truncate: bool = True              # round the ramp's ends to whole pair indices
    attention_factor: float | None = None  # amplitude of cos/sin; None: mscale / mscale_all_dim


@dataclass(frozen=True, slots=True)
class DeepSeekConfig:
    """Shapes and switches of a DeepSeek MoE transformer (MLA attention, DeepSeekMoE FFN)."""
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    # MLA (DeepSeek-V2 sec. 2.1): queries through a rank-q_lora_rank bottleneck (0: a plain
    # projection), keys/values through a kv_lora_rank latent; each head's q/k is a "nope" part plus
    # a decoupled rotary part shared by all heads on the key side.
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    # FFN: the first num_dense_layers layers are dense SwiGLU of width dense_hidden, the rest MoE.
    dense_hidden: int
    num_dense_layers: int
    num_experts: int
    num_shared_experts: int
    expert_hidden: int
    top_k: int
    # Router (V3 sec. 2.1.2): experts in num_groups groups (one per node in V3); a token may use
    # only its topk_groups best groups.
    num_groups: int = 1
    topk_groups: int = 1
    score_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling: float = 1.0
    router_bias: bool = True           # aux-loss-free balancing: a selection-only bias per expert
    bias_update_rate: float = 1e-3     # gamma: bias += gamma * sign(mean load - load) per step
    balance_loss_weight: float = 0.0   # alpha of the sequence-wise balance loss (V3: 1e-4)
    capacity_factor: float | None = None  # EP exchange budget; None = lossless (see ep_capacity)
    ep_exchange: str = "auto"          # "auto" (ragged on GPU, padded elsewhere), or one by name
    ep_dedup: bool = False             # EP sends a token once per rank, not per expert (DeepEP)
    # Position encoding.
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    yarn: YarnConfig | None = None
    norm_eps: float = 1e-6
    # Multi-token prediction (V3 sec. 2.2): mtp_depth extra sequential modules, loss weight lambda.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # Numerics: a name from DTYPES; a dtype (jnp.bfloat16, np.dtype("float32")) is stored by
    # its name, so that configs stay hashable, comparable and JSON-serialisable.
    dtype: str = "bfloat16"            # activations
    param_dtype: str = "float32"
    fp8: bool = False                  # FP8 (1x128 / 128x128 block-scaled) GEMMs, V3 sec. 3.3
    # Weights held as e4m3 with float32 128x128 block scales, as an FP8 checkpoint ships them
    # (inference: activations are quantized per 1x128 on the fly; no gradient reaches them).
    fp8_weights: bool = False
    init_std: float = 0.006            # V3's initialisation

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"DeepSeekConfig: {msg}")

        for name in ("dtype", "param_dtype"):   # a dtype -> its name (None is no dtype here)
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                try:   # frozen: set once, before anything reads it
                    object.__setattr__(self, name, jnp.dtype(value).name)
                except TypeError:
                    pass   # not a dtype: the check below names it
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "kv_lora_rank",
                     "qk_nope_dim", "qk_rope_dim", "v_head_dim", "num_experts", "top_k",
                     "num_groups", "topk_groups", "max_seq_len"):
            value = getattr(self, name)
            need(is_int(value), f"{name}={value!r} must be an int")
            need(value >= 1, f"{name}={value} must be >= 1")
        need(self.q_lora_rank >= 0, f"q_lora_rank={self.q_lora_rank} must be >= 0 (0: none)")
        need(self.qk_rope_dim % 2 == 0, f"qk_rope_dim={self.qk_rope_dim} must be even (rotary "
             "rotates pairs)")
        need(0 <= self.num_dense_layers <= self.num_layers,
             f"num_dense_layers={self.num_dense_layers} must be in [0, num_layers="
             f"{self.num_layers}]")
        need(self.num_dense_layers == 0 or self.dense_hidden >= 1,
             "dense_hidden must be >= 1 when there are dense layers")
        need(self.expert_hidden >= 1 and self.num_shared_experts >= 0,
             "expert_hidden must be >= 1 and num_shared_experts >= 0")
        need(self.num_experts % self.num_groups == 0,
             f"num_experts={self.num_experts} is not divisible by num_groups={self.num_groups}")
        need(self.topk_groups <= self.num_groups,
             f"topk_groups={self.topk_groups} exceeds num_groups={self.num_groups}")
        reachable = self.num_experts // self.num_groups * self.topk_groups
        need(self.top_k <= reachable,
             f"top_k={self.top_k} exceeds the {reachable} experts in the topk_groups="
             f"{self.topk_groups} groups a token may use")
        need(self.score_func in SCORE_FUNCS,
             f"score_func={self.score_func!r} not in {SCORE_FUNCS}")
        need(self.router_bias or self.bias_update_rate == 0,
             f"bias_update_rate={self.bias_update_rate} needs router_bias=True")
        need(self.capacity_factor is None or self.capacity_factor > 0,
             f"capacity_factor={self.capacity_factor} must be > 0 or None (lossless)")
        need(self.ep_exchange in EP_EXCHANGES,
             f"ep_exchange={self.ep_exchange!r} not in {EP_EXCHANGES}")
        need(self.mtp_depth >= 0, f"mtp_depth={self.mtp_depth} must be >= 0")
        need(self.dtype in DTYPES and self.param_dtype in DTYPES,
             f"dtype={self.dtype!r} / param_dtype={self.param_dtype!r} not in {DTYPES}")
        need(self.yarn is None or self.yarn.factor >= 1.0,
             "yarn.factor must be >= 1 (it stretches the context)")

    # Derived sizes, named as in the paper.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def activation_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "DeepSeekConfig":
        return dataclasses.replace(self, **changes)

    # Presets -------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **changes) -> "DeepSeekConfig":
        """Byte-level toy: every mechanism of V3 (MLA, groups, bias, shared expert), tiny sizes.

        d_model, expert_hidden and the attention output width are 128 so `--fp8` exercises the
        FP8 GEMMs (1x128 / 128x128 blocks); 8 experts split evenly for EP = 1, 2, 4 or 8.
        """
        cfg = cls(
            vocab_size=256, d_model=128, num_layers=3, num_heads=4,
            q_lora_rank=64, kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32,
            dense_hidden=384, num_dense_layers=1,
            num_experts=8, num_shared_experts=1, expert_hidden=128, top_k=2,
            num_groups=4, topk_groups=2, score_func="sigmoid", norm_topk_prob=True,
            routed_scaling=1.0, router_bias=True, bias_update_rate=1e-3,
            balance_loss_weight=1e-4, max_seq_len=512, dtype="float32", init_std=0.02)
        return cfg.replace(**changes)

    @classmethod
    def v2_lite(cls, **changes) -> "DeepSeekConfig":
        """DeepSeek-V2-Lite: 27 layers, no query compression, 64 experts + 2 shared, top-6."""
        cfg = cls(
            vocab_size=102400, d_model=2048, num_layers=27, num_heads=16,
            q_lora_rank=0, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
            dense_hidden=10944, num_dense_layers=1,
            num_experts=64, num_shared_experts=2, expert_hidden=1408, top_k=6,
            num_groups=1, topk_groups=1, score_func="softmax", norm_topk_prob=False,
            routed_scaling=1.0, router_bias=False, bias_update_rate=0.0,
            balance_loss_weight=1e-3, max_seq_len=163840, rope_theta=10000.0,
            yarn=YarnConfig(factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0,
                            mscale=0.707, mscale_all_dim=0.707))
        return cfg.replace(**changes)

    @classmethod
    def v3(cls, **changes) -> "DeepSeekConfig":
        """DeepSeek-V3: 61 layers (3 dense), 256 routed experts in 8 groups, top-8 of top-4 groups."""
        cfg = cls(
            vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
            q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
            dense_hidden=18432, num_dense_layers=3,
            num_experts=256, num_shared_experts=1, expert_hidden=2048, top_k=8,
            num_groups=8, topk_groups=4, score_func="sigmoid", norm_topk_prob=True,
            routed_scaling=2.5, router_bias=True, bias_update_rate=1e-3,
            balance_loss_weight=1e-4, max_seq_len=163840, rope_theta=10000.0,
            yarn=YarnConfig(factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0,
                            mscale=1.0, mscale_all_dim=1.0),
            mtp_depth=1, mtp_loss_weight=0.3, fp8=True)
        return cfg.replace(**changes)

    @classmethod
    def preset(cls, name: str, **changes) -> "DeepSeekConfig":
        """`DeepSeekConfig.preset("tiny")` etc.; the name as the command line gives it."""
        presets = {"tiny": cls.tiny, "v2_lite": cls.v2_lite, "v3": cls.v3}
        if name not in presets:
            raise ValueError(f"unknown config preset {name!r}; choose from {sorted(presets)}")
        return presets[name](**changes)
