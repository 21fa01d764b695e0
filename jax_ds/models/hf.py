"""Hugging Face DeepSeek-V2/V3 checkpoints: `load_hf_checkpoint` into a `Transformer`, and
`save_hf_checkpoint` back, so that models move between this stack and the others.

A checkpoint is a folder: config.json, and model.safetensors or model.safetensors.index.json
({"weight_map": {tensor: shard file}}) with its shards. Tensor names (N a layer, E an expert) and
the `Transformer` variable each fills:

  model.embed_tokens.weight / model.norm.weight / lm_head.weight    embed / norm / head
  model.layers.N.input_layernorm, .post_attention_layernorm         blocks[N].attn_norm, ffn_norm
  model.layers.N.self_attn.q_a_proj, q_a_layernorm, q_b_proj        attn.wq_a, q_norm, wq_b
    (q_proj when q_lora_rank is null: V2-Lite)                      attn.wq
  model.layers.N.self_attn.kv_a_proj_with_mqa, kv_a_layernorm       attn.wkv_a, kv_norm
  model.layers.N.self_attn.kv_b_proj, o_proj                        attn.wkv_b, wo
  model.layers.N.mlp.{gate,up,down}_proj (N < first_k_dense_replace) ffn.gate, up, down
  model.layers.N.mlp.gate.weight, .gate.e_score_correction_bias     ffn.router.weight, bias
  model.layers.N.mlp.shared_experts.{gate,up,down}_proj             ffn.shared.gate, up, down
  model.layers.N.mlp.experts.E.{gate,up,down}_proj                  ffn.w_gate, w_up, w_down
                                                                    (E stacked on axis 0)
MTP modules (V3 ships one as layer L = num_hidden_layers): enorm, hnorm, eh_proj and
shared_head.norm beside a full decoder layer; its embed_tokens and shared_head.head are copies of
the main model's (our MTP modules share those), skipped on load and written on save.

FP8 checkpoints (DeepSeek-V3's release): every linear weight of the layers is float8_e4m3fn with
`<name>_scale_inv`, float32 [ceil(N/128), ceil(K/128)] (w ~= w_fp8 * scale_inv per 128x128
block), and config.json has quantization_config {quant_method: fp8, fmt: e4m3,
weight_block_size: [128, 128]}. fp8="keep" holds them so (cfg.fp8_weights: `fp8_gemm` and
`grouped_fp8_gemm` with activations quantized per 1x128); "dequant" multiplies out into `dtype`.

The math follows Hugging Face's DeepseekV3ForCausalLM (the public reference): rotary on
interleaved pairs (rope_interleave), YaRN with its attention factor and softmax-scale correction,
sigmoid router with e_score_correction_bias and top-2-sum group limiting, norm_topk_prob,
routed_scaling_factor. DeepseekV2ForCausalLM: softmax router, greedy or group_limited_greedy
(norm_topk_prob honoured as DeepSeek's V2 code does; transformers ignores it, and the V2
releases set it false).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, make_single_device_sharding

from jax_ds.models import _safetensors as st
from jax_ds.models.config import DeepSeekConfig, YarnConfig
from jax_ds.models.layers import FP8_BLOCK, yarn_mscale
from jax_ds.models.transformer import Transformer

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
FP8_FORMAT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "intermediate_size", "n_routed_experts", "moe_intermediate_size",
            "num_experts_per_tok")
log = logging.getLogger(__name__)

# transformers' DeepseekV3Config / DeepseekV2Config defaults of the optional fields read here:
# a config.json that leaves one out means that value (for V3: 2.5x routed scaling, normalized
# top-k, 8 groups, one shared expert, 3 dense layers), not V2's.
HF_DEFAULTS = {
    "deepseek_v3": dict(q_lora_rank=1536, first_k_dense_replace=3, n_shared_experts=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        max_position_embeddings=4096, rms_norm_eps=1e-6),
    "deepseek_v2": dict(q_lora_rank=1536, first_k_dense_replace=0, n_shared_experts=2,
                        norm_topk_prob=False, routed_scaling_factor=1.0, n_group=None,
                        topk_group=None, max_position_embeddings=2048, rms_norm_eps=1e-6),
}
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
# what a weight may be stored as (and e4m3, with `_scale_inv` block scales, for a linear one)
_FLOATS = tuple(np.dtype(d) for d in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64))
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SHOWN = 8  # problems listed per error
# Tensors some checkpoints carry that the model does not read: RoPE's inverse frequencies (a
# buffer, recomputed from config.json), as Hugging Face's loader ignores them.
_IGNORED = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into (or a model that cannot be saved as) the Hugging
    Face DeepSeek layout; the message names the tensor or config field and what was expected."""


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict, *, dtype=jnp.bfloat16, fp8_weights: bool = False,
                   mtp: bool = False) -> DeepSeekConfig:
    """A `DeepSeekConfig` from a Hugging Face config.json dict (deepseek_v2 / deepseek_v3)."""
    model_type = hf.get("model_type")
    arch = (hf.get("architectures") or [ARCHITECTURES.get(model_type)])[0]
    if model_type not in ARCHITECTURES or arch != ARCHITECTURES[model_type]:
        raise CheckpointError(
            f"unsupported architecture {arch!r} (model_type {model_type!r}); supported: "
            + ", ".join(f"{a} ({t})" for t, a in ARCHITECTURES.items()))

    def need(ok: bool, field: str, found, expected: str):
        if not ok:
            raise CheckpointError(f"config.json: unsupported {field}={found!r} (expected "
                                  f"{expected})")

    need(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "'silu'")
    need(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"),
         "false")
    need(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq", hf.get("moe_layer_freq"), "1")
    need(hf.get("rope_interleave", True), "rope_interleave", hf.get("rope_interleave"),
         "true: DeepSeek's interleaved rotary pairs")
    v3 = model_type == "deepseek_v3"
    hf = {**HF_DEFAULTS[model_type], **hf}  # an explicit null stays null (q_lora_rank: none)
    score = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
    need(score == ("sigmoid" if v3 else "softmax"), "scoring_func", score,
         "'sigmoid'" if v3 else "'softmax'")
    groups, topk_groups = hf["n_group"] or 1, hf["topk_group"] or 1
    if not v3:  # V2: greedy top-k, or group-limited by each group's best score
        method = hf.get("topk_method", "greedy")
        need(method in ("greedy", "group_limited_greedy"), "topk_method", method,
             "'greedy' or 'group_limited_greedy'")
        if method == "greedy":
            groups = topk_groups = 1
    for field in REQUIRED:
        if field not in hf:
            raise CheckpointError(f"config.json: missing field {field!r}")
    layers = hf["num_hidden_layers"]
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=layers,
        num_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"] or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_dim=hf["qk_nope_head_dim"],
        qk_rope_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        dense_hidden=hf["intermediate_size"],
        num_dense_layers=min(hf["first_k_dense_replace"] or 0, layers),
        num_experts=hf["n_routed_experts"], num_shared_experts=hf["n_shared_experts"] or 0,
        expert_hidden=hf["moe_intermediate_size"], top_k=hf["num_experts_per_tok"],
        num_groups=groups, topk_groups=topk_groups, score_func=score,
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        routed_scaling=float(hf["routed_scaling_factor"] or 1.0),
        router_bias=v3, bias_update_rate=1e-3 if v3 else 0.0, balance_loss_weight=0.0,
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=float(_rope_params(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
        yarn=_yarn_from_hf(hf), norm_eps=hf["rms_norm_eps"],
        mtp_depth=hf.get("num_nextn_predict_layers", 0) if mtp else 0,
        dtype=np.dtype(dtype).name, param_dtype=np.dtype(dtype).name, init_std=0.02,
        fp8_weights=fp8_weights)
    try:
        return DeepSeekConfig(**fields)
    except ValueError as err:  # DeepSeekConfig's own checks, said in config.json's terms
        raise CheckpointError(f"config.json: {err}") from None


def _rope_params(hf: dict) -> dict:
    return hf.get("rope_scaling") or hf.get("rope_parameters") or {}


def _yarn_from_hf(hf: dict) -> YarnConfig | None:
    """YaRN from rope_scaling (Hugging Face's defaults included), or None for plain RoPE.

    The scaling factor is rope_scaling's `factor`, as DeepSeek's own inference code reads it;
    transformers' DeepseekV3 instead takes max_position_embeddings /
    original_max_position_embeddings when the latter is given. The released checkpoints agree
    (163840 / 4096 = 40); a config where they differ is loaded with `factor`, with a warning."""
    rope = _rope_params(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise CheckpointError(f"config.json: unsupported rope_scaling type {kind!r} (expected "
                              "'yarn' or none)")
    original = rope.get("original_max_position_embeddings", hf["max_position_embeddings"])
    ratio = hf["max_position_embeddings"] / original
    factor = rope.get("factor") or ratio
    if "original_max_position_embeddings" in rope and not math.isclose(factor, ratio):
        log.warning("config.json: rope_scaling factor %g differs from max_position_embeddings / "
                    "original_max_position_embeddings = %g; using factor (DeepSeek's code does; "
                    "transformers' DeepseekV3 uses the ratio)", factor, ratio)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    amplitude = rope.get("attention_factor")
    if amplitude is None:  # on cos/sin; the softmax scale gets mscale_all_dim's share only
        amplitude = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else yarn_mscale(factor, 1.0))
    return YarnConfig(factor=float(factor), original_max_len=int(original),
                      beta_fast=float(rope.get("beta_fast") or 32),
                      beta_slow=float(rope.get("beta_slow") or 1),
                      mscale=float(mscale or 0.0), mscale_all_dim=float(mscale_all_dim or 0.0),
                      truncate=bool(rope.get("truncate", True)),
                      attention_factor=float(amplitude))


def config_to_hf(cfg: DeepSeekConfig) -> dict:
    """The config.json of `cfg` (deepseek_v3 for a sigmoid router, deepseek_v2 for softmax)."""
    v3 = cfg.score_func == "sigmoid"
    if v3 and not cfg.router_bias and cfg.num_groups > 1:
        raise CheckpointError("cannot save: a sigmoid router without a bias limits groups by "
                              "their best score, which DeepseekV3 (top-2 sum) does not")
    if not v3 and cfg.router_bias:
        raise CheckpointError("cannot save: DeepseekV2 has no router bias for a softmax router")
    model_type = "deepseek_v3" if v3 else "deepseek_v2"
    hf = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_dim, qk_rope_head_dim=cfg.qk_rope_dim,
        v_head_dim=cfg.v_head_dim, intermediate_size=cfg.dense_hidden,
        first_k_dense_replace=cfg.num_dense_layers, n_routed_experts=cfg.num_experts,
        n_shared_experts=cfg.num_shared_experts, moe_intermediate_size=cfg.expert_hidden,
        num_experts_per_tok=cfg.top_k, n_group=cfg.num_groups, topk_group=cfg.topk_groups,
        scoring_func=cfg.score_func, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling, moe_layer_freq=1, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, attention_bias=False, tie_word_embeddings=False,
        num_nextn_predict_layers=cfg.mtp_depth, torch_dtype=cfg.param_dtype)
    hf["topk_method"] = "noaux_tc" if v3 else (
        "greedy" if cfg.num_groups == 1 else "group_limited_greedy")
    if cfg.yarn is not None:
        y = cfg.yarn
        hf["rope_scaling"] = dict(
            type="yarn", rope_type="yarn", factor=y.factor, original_max_position_embeddings=
            y.original_max_len, beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
            mscale_all_dim=y.mscale_all_dim, truncate=y.truncate,
            attention_factor=y.attention_factor)
        if y.attention_factor is None:
            del hf["rope_scaling"]["attention_factor"]
    if cfg.fp8_weights:
        hf["quantization_config"] = dict(FP8_FORMAT)
    return hf


def _is_fp8_checkpoint(hf: dict) -> bool:
    q = hf.get("quantization_config")
    if not q:
        return False
    found = {k: q.get(k) for k in ("quant_method", "fmt", "weight_block_size")}
    if found != {k: FP8_FORMAT[k] for k in found}:
        raise CheckpointError(f"config.json: unsupported quantization_config {found} (expected "
                              f"{ {k: FP8_FORMAT[k] for k in found} })")
    return True


# ----------------------------------------------------------------------------- tensor names


class Spec(NamedTuple):
    names: tuple[str, ...]  # one tensor, or one per routed expert
    linear: bool            # an nn.Linear weight: may be FP8 with a `<name>_scale_inv`
    stacked: bool = False   # the names are stacked on a new axis 0 (routed experts)


def tensor_specs(cfg: DeepSeekConfig, *, tied: bool = False):
    """{variable path in `Transformer`'s state: Spec}, and the names of the MTP copies of the
    embedding and head (skipped on load, written on save)."""
    specs, copies = {}, []

    def put(path, name, linear=False):
        specs[path] = Spec((name,), linear)

    put(("embed",), "model.embed_tokens.weight")
    put(("norm", "scale"), "model.norm.weight")
    put(("head", "kernel"), "model.embed_tokens.weight" if tied else "lm_head.weight")

    def block(path, p, moe):
        put(path + ("attn_norm", "scale"), f"{p}.input_layernorm.weight")
        put(path + ("ffn_norm", "scale"), f"{p}.post_attention_layernorm.weight")
        a = path + ("attn",)
        if cfg.q_lora_rank:
            put(a + ("wq_a", "kernel"), f"{p}.self_attn.q_a_proj.weight", True)
            put(a + ("q_norm", "scale"), f"{p}.self_attn.q_a_layernorm.weight")
            put(a + ("wq_b", "kernel"), f"{p}.self_attn.q_b_proj.weight", True)
        else:
            put(a + ("wq", "kernel"), f"{p}.self_attn.q_proj.weight", True)
        put(a + ("wkv_a", "kernel"), f"{p}.self_attn.kv_a_proj_with_mqa.weight", True)
        put(a + ("kv_norm", "scale"), f"{p}.self_attn.kv_a_layernorm.weight")
        put(a + ("wkv_b", "kernel"), f"{p}.self_attn.kv_b_proj.weight", True)
        put(a + ("wo", "kernel"), f"{p}.self_attn.o_proj.weight", True)
        f = path + ("ffn",)
        if not moe:
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                put(f + (ours, "kernel"), f"{p}.mlp.{theirs}.weight", True)
            return
        put(f + ("router", "weight"), f"{p}.mlp.gate.weight")
        if cfg.router_bias:
            put(f + ("router", "bias"), f"{p}.mlp.gate.e_score_correction_bias")
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            if cfg.num_shared_experts:
                put(f + ("shared", ours, "kernel"), f"{p}.mlp.shared_experts.{theirs}.weight", True)
            specs[f + (f"w_{ours}",)] = Spec(tuple(
                f"{p}.mlp.experts.{e}.{theirs}.weight" for e in range(cfg.num_experts)), True,
                stacked=True)

    for i in range(cfg.num_layers):
        block(("blocks", i), f"model.layers.{i}", i >= cfg.num_dense_layers)
    for k in range(cfg.mtp_depth):
        p, path = f"model.layers.{cfg.num_layers + k}", ("mtp", k)
        put(path + ("emb_norm", "scale"), f"{p}.enorm.weight")
        put(path + ("hidden_norm", "scale"), f"{p}.hnorm.weight")
        put(path + ("proj", "kernel"), f"{p}.eh_proj.weight", True)
        put(path + ("norm", "scale"), f"{p}.shared_head.norm.weight")
        block(path + ("block",), p, cfg.num_layers + k >= cfg.num_dense_layers)
        copies += [f"{p}.embed_tokens.weight", f"{p}.shared_head.head.weight"]
    return specs, copies


def _scale_path(path):
    """kernel -> kernel_scale, w_gate -> w_gate_scale: where an FP8 weight keeps its scales."""
    return path[:-1] + (f"{path[-1]}_scale",)


# ----------------------------------------------------------------------------- files


class Checkpoint:
    """The tensors of a checkpoint folder, by name, over one file or an index of shards."""

    def __init__(self, path):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        self.files: dict[str, st.SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index}: not valid JSON ({err})") from None
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not (isinstance(weight_map, dict) and all(
                    isinstance(v, str) for v in weight_map.values())):
                raise CheckpointError(f"{index}: expected an object with a \"weight_map\" of "
                                      "tensor name -> shard file name")
            for name, shard in weight_map.items():
                if shard not in self.files:
                    file = os.path.join(self.path, shard)
                    if not os.path.exists(file):
                        raise CheckpointError(f"{INDEX_FILE}: shard {shard!r} (holding tensor "
                                              f"{name!r}) is missing from {self.path}")
                    self.files[shard] = st.SafetensorsFile(file)
                if name not in self.files[shard].keys():
                    raise CheckpointError(f"{INDEX_FILE} places tensor {name!r} in {shard!r}, "
                                          "which does not hold it")
                self.where[name] = shard
        elif os.path.exists(single):
            self.files[SINGLE_FILE] = st.SafetensorsFile(single)
            self.where = {name: SINGLE_FILE for name in self.files[SINGLE_FILE].keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def __contains__(self, name):
        return name in self.where

    def info(self, name) -> st.TensorInfo:
        return self.files[self.where[name]].info(name)

    def get(self, name) -> np.ndarray:
        return self.files[self.where[name]].get(name)


def _dequantize(w_fp8, scale, dtype):
    """w_fp8 * scale, each scale over its 128x128 block, in float32, then cast to dtype."""
    n, k = w_fp8.shape
    s = np.repeat(np.repeat(scale, FP8_BLOCK, axis=0)[:n], FP8_BLOCK, axis=1)[:, :k]
    return (w_fp8.astype(np.float32) * s).astype(dtype)


def _quantize(w):
    """A float weight wanted in FP8 (a partly quantized checkpoint): DeepSeek's 128x128 recipe."""
    from jax_ds.ops import quantize_fp8

    with jax.default_device(jax.devices("cpu")[0]):
        q, s = quantize_fp8(jnp.asarray(w, jnp.float32), block=(FP8_BLOCK, FP8_BLOCK))
        return np.asarray(q), np.asarray(s)


# ----------------------------------------------------------------------------- load


def load_hf_checkpoint(path, *, dtype=jnp.bfloat16, fp8: str = "keep", mesh: Mesh | None = None,
                       mtp: bool = False) -> Transformer:
    """Loads a Hugging Face DeepSeek-V2/V3 checkpoint folder into a `Transformer` (`.cfg` holds
    the `DeepSeekConfig` built from its config.json).

    Tensors are read one at a time from memory-mapped safetensors (single file or sharded) and
    placed straight onto their devices: with `mesh`, routed experts split over `expert` (each
    device reads only its experts) and the rest replicated; without, on the default device.

    Args:
      path: the checkpoint folder.
      dtype: parameter and activation dtype (router weights and biases stay float32).
      fp8: for an FP8 checkpoint, "keep" (weights stay e4m3 + block scales, run through the FP8
        GEMMs; inference only) or "dequant" (w * scale_inv in dtype). Ignored otherwise.
      mesh: a `jax_ds.parallel.mesh.make_mesh` mesh, or None.
      mtp: load the multi-token-prediction layers too (skipped by default).

    Raises:
      CheckpointError: unsupported architecture or config, missing, unexpected or misshapen
        tensors (named, with expected and found shapes).
    """
    if fp8 not in ("keep", "dequant"):
        raise ValueError(f"load_hf_checkpoint: fp8={fp8!r} not in ('keep', 'dequant')")
    try:
        np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"load_hf_checkpoint: dtype={dtype!r}: {err}") from None
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder (config.json + safetensors)")
    if not os.path.exists(config_file):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    try:
        quantized = _is_fp8_checkpoint(hf)
        cfg = config_from_hf(hf, dtype=dtype, fp8_weights=quantized and fp8 == "keep", mtp=mtp)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a missing field, or one
        # of the wrong type ("2" for an int, a string for rope_scaling's object)
        raise CheckpointError(f"{config_file}: {type(err).__name__}: {err}") from None
    ckpt = Checkpoint(path)
    tied = bool(hf.get("tie_word_embeddings"))
    specs, copies = tensor_specs(cfg, tied=tied)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh)))
    flat = dict(nnx.to_flat_state(state))
    # Tied: the head is the embedding; an lm_head.weight beside it is not read (as in HF).
    _check(ckpt, specs, copies + ["lm_head.weight"] * tied, flat, cfg,
           hf.get("num_nextn_predict_layers") or 0)
    part = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))

    def sharding(vpath):
        if mesh is None:
            return make_single_device_sharding(jax.devices()[0])
        return NamedSharding(mesh, part[vpath].get_value())

    for vpath, spec in specs.items():
        scale_path = _scale_path(vpath)
        targets = [vpath] + ([scale_path] if scale_path in flat else [])
        reader = _Reader(ckpt, spec, flat[vpath].dtype,
                         [sharding(t).devices_indices_map(flat[t].shape) for t in targets])
        for which, target in enumerate(targets):
            var = flat[target]
            var.set_value(jax.make_array_from_callback(
                var.shape, sharding(target),
                lambda index, which=which: reader.read(index, which)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class _Reader:
    """Makes one variable (and its scales, for an FP8-held weight) from its checkpoint tensors,
    per device slice: stacked experts are read only for the experts in the slice, and each slice
    is read once. A slice stays cached until every device (of the weight and of its scales) that
    needs it has taken it, whatever order the devices ask in."""

    def __init__(self, ckpt: Checkpoint, spec: Spec, dtype, device_indices):
        self.ckpt, self.spec, self.dtype = ckpt, spec, np.dtype(dtype)
        self.cache: dict = {}
        self.uses = collections.Counter(self._key(index) for indices in device_indices
                                        for index in indices.values())

    def _key(self, index):
        experts = index[0] if self.spec.stacked else slice(None)
        return experts.start, experts.stop, experts.step

    def _one(self, name):
        w = self.ckpt.get(name)
        if self.dtype == E4M3:  # keep FP8: the raw weight and its scales, copied out of the map
            if w.dtype == E4M3:
                return np.array(w), np.array(self.ckpt.get(f"{name}_scale_inv"), np.float32)
            return _quantize(w)
        if w.dtype == E4M3:
            return _dequantize(w, self.ckpt.get(f"{name}_scale_inv"), self.dtype), None
        return np.asarray(w).astype(self.dtype), None

    def read(self, index, which: int):
        """A device's slice `index` of the weight (which=0) or of its scales (which=1)."""
        key = self._key(index)
        if key not in self.cache:
            if self.spec.stacked:
                pieces = [self._one(n) for n in self.spec.names[slice(*key)]]
                value = tuple(None if pieces[0][j] is None else np.stack([p[j] for p in pieces])
                              for j in (0, 1))
            else:
                value = self._one(self.spec.names[0])
            self.cache[key] = value
        value = self.cache[key]
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            del self.cache[key]
        rest = (slice(None),) + tuple(index[1:]) if self.spec.stacked else tuple(index)
        return value[which][rest]


def _check(ckpt: Checkpoint, specs, copies, flat, cfg: DeepSeekConfig, num_mtp_layers: int):
    """Every tensor the model needs is there with its shape; nothing else is (but the MTP layers
    config.json declares when they are not loaded, and the MTP copies). Raises one
    CheckpointError listing the problems."""
    missing, shapes, dtypes, used = [], [], [], set(copies)
    for vpath, spec in specs.items():
        shape = tuple(flat[vpath].shape)
        want = shape[1:] if spec.stacked else shape
        where = ".".join(str(p) for p in vpath)
        for name in spec.names:
            used.add(name)
            if name not in ckpt:
                missing.append(f"{name!r} (shape {want}, for {where})")
                continue
            info = ckpt.info(name)
            if info.shape != want:
                shapes.append(f"{name!r}: expected shape {want}, found {info.shape}")
            if info.dtype not in _FLOATS + ((E4M3,) if spec.linear else ()):
                dtypes.append(f"{name!r} is {info.dtype.name}: expected "
                              + ("a float type or e4m3 with block scales" if spec.linear else
                                 "a float type (e4m3 is for the linear weights)"))
                continue
            if not spec.linear or info.dtype != E4M3:
                continue
            scale_name = f"{name}_scale_inv"
            used.add(scale_name)
            blocks = tuple(math.ceil(d / FP8_BLOCK) for d in want)
            if scale_name not in ckpt:
                missing.append(f"{scale_name!r} (shape {blocks}, the block scales of FP8 "
                               f"{name!r})")
            elif ckpt.info(scale_name).shape != blocks:
                shapes.append(f"{scale_name!r}: expected shape {blocks}, found "
                              f"{ckpt.info(scale_name).shape}")
            elif ckpt.info(scale_name).dtype not in _FLOATS:  # an int would pass as a scale
                dtypes.append(f"{scale_name!r} is {ckpt.info(scale_name).dtype.name}: expected "
                              "a float type (float32 block scales)")
    layer = re.compile(r"model\.layers\.(\d+)\.")
    skipped = range(cfg.num_layers + cfg.mtp_depth, cfg.num_layers + num_mtp_layers)
    unexpected = []
    for name in ckpt.where:
        m = layer.match(name)
        if name in used or (m and int(m.group(1)) in skipped) or name.endswith(_IGNORED):
            continue
        unexpected.append(repr(name))
    problems = [("missing tensor", missing), ("shape mismatch", shapes), ("dtype", dtypes),
                ("unexpected tensor", unexpected)]
    lines = []
    for what, items in problems:
        lines += [f"  {what} {item}" for item in items[:_SHOWN]]
        if len(items) > _SHOWN:
            lines.append(f"  ... and {len(items) - _SHOWN} more {what}s")
    if lines:
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match its config.json:\n"
                              + "\n".join(lines))


# ----------------------------------------------------------------------------- save


def _host_row(array, index: int) -> np.ndarray:
    """array[index] on the host, bit for bit. Indexing a sharded jax.Array runs a gather that
    sums the shards' masked pieces (-0.0 + 0.0 gives +0.0, an FP8 0x80 byte comes back 0x00), so
    the row is copied out of the addressable shards that hold it instead."""
    if not isinstance(array, jax.Array) or len(array.sharding.device_set) == 1 \
            or not array.is_fully_addressable:
        return np.asarray(array[index])
    out = np.empty(array.shape[1:], array.dtype)
    for shard in array.addressable_shards:
        rows = range(*shard.index[0].indices(array.shape[0]))
        if index in rows:  # replicas write the same bytes
            out[shard.index[1:]] = np.asarray(shard.data)[rows.index(index)]
    return out


def save_hf_checkpoint(model: Transformer, path, *, max_shard_bytes: int | None = 5 << 30):
    """Writes `model` as a Hugging Face DeepSeek checkpoint folder (config.json + safetensors).

    Tensors keep their dtypes (FP8-held weights as e4m3 + `weight_scale_inv`, with the
    quantization_config), so `load_hf_checkpoint(path, dtype=<the model's>)` gives the model
    back exactly. Above max_shard_bytes of data the tensors go into numbered shards with a
    model.safetensors.index.json. One tensor is in host memory at a time.
    """
    cfg: DeepSeekConfig = model.cfg
    hf = config_to_hf(cfg)
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    specs, copies = tensor_specs(cfg)
    entries = []

    def add(name, array, index=None):
        shape = tuple(array.shape[1:] if index is not None else array.shape)
        make = (lambda: _host_row(array, index)) if index is not None else \
            (lambda: np.asarray(array))
        entries.append(st.Entry(name, np.dtype(array.dtype), shape, make))

    for vpath, spec in specs.items():
        w = flat[vpath][...]
        scale = flat[_scale_path(vpath)][...] if _scale_path(vpath) in flat else None
        # A RedundantMoE layer holds expert e in slots log2phy[e] (any order after a
        # rebalance): expert e's tensor is its first replica's.
        log2phy = flat.get(vpath[:-1] + ("log2phy",))
        slot = None if log2phy is None else np.asarray(log2phy[...])[:, 0]  # read once
        for e, name in enumerate(spec.names):
            index = None if not spec.stacked else e if slot is None else int(slot[e])
            add(name, w, index)
            if scale is not None:
                add(f"{name}_scale_inv", scale, index)
    for name in copies:  # the release's own copies of embedding and head in each MTP layer
        add(name, flat[("embed",) if name.endswith("embed_tokens.weight")
                       else ("head", "kernel")][...])
    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    # Remove what a previous save left (new files are new inodes: a model loaded from the old
    # ones through memory maps keeps its bytes).
    for stale in os.listdir(path):
        if stale in (SINGLE_FILE, INDEX_FILE) or SHARD_FILE.fullmatch(stale):
            os.remove(os.path.join(path, stale))
    metadata = {"format": "pt"}  # what transformers expects of a PyTorch-layout file
    if len(shards) == 1:
        st.write(os.path.join(path, SINGLE_FILE), shards[0], metadata)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += st.write(os.path.join(path, file), shard, metadata)
            weight_map.update({e.name: file for e in shard})
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
