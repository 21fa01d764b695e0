"""Makes the tiny Hugging Face DeepSeek checkpoints of tests/data/hf_tiny/ and their reference
logits with the public reference implementation (transformers' DeepseekV3ForCausalLM and
DeepseekV2ForCausalLM, float32 on CPU). Not run by CI: its outputs are committed.

    pip install torch transformers safetensors        # CPU builds are enough
    python scripts/make_hf_tiny.py                    # writes tests/data/hf_tiny/{bf16,fp8,v2}

Variants (random weights, every norm scale and the router bias non-trivial):
  bf16  DeepSeek-V3 layout, bf16 weights in 3 shards + model.safetensors.index.json; YaRN with
        mscale != mscale_all_dim and a small rope_theta (the ramp ends past the last pair);
        rms_norm_eps 1e-5 (the latent norms keep 1e-6); 1 dense + 2 MoE layers, 3 of 4 groups;
        plus the tensors of one MTP layer (random), which a loader must skip unless asked.
  fp8   DeepSeek-V3's FP8 release format: every linear weight of the layers float8_e4m3fn with a
        float32 weight_scale_inv per 128x128 block, quantization_config as released; all dims
        multiples of 128 (but kv_a_proj_with_mqa's 144 rows: a partial block). The reference runs
        on the dequantized weights (transformers' FP8 path needs a GPU).
  v2    DeepSeek-V2 layout: no query compression (q_proj), softmax router, group-limited
        greedy top-k, YaRN as V2-Lite has it.
Each folder also holds reference.npz: input_ids [2, 16] int32 and the reference's float32
logits [2, 16, vocab]. The script checks that transformers' own loader reads each folder back
(the dequantized copy, for fp8) to the same logits, so the tensor names are the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

SEQ, BATCH, BLOCK = 16, 2, 128
STD = 0.08

# What the two DeepSeek-V3 variants share.
V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
          routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
          hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16")

VARIANTS = {
    "bf16": dict(
        **V3,
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=12, n_shared_experts=1,
        num_experts_per_tok=3, n_group=4, topk_group=3, norm_topk_prob=True,
        rms_norm_eps=1e-5, rope_theta=100.0, max_position_embeddings=16384,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.9, mscale_all_dim=0.7),
        num_nextn_predict_layers=1),
    "fp8": dict(
        **V3,
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=64, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=0,
        quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                 weight_block_size=[BLOCK, BLOCK])),
    "v2": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        vocab_size=192, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax",
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=1024,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16"),
}
SHARDS = {"bf16": 3}


def build(folder: str, seed: int):
    """The reference model of folder/config.json with random weights, rounded to bf16 values."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # scales near 1, but not 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(STD * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change selections
                b.copy_(0.05 * torch.randn_like(b))
    return model


def quantize_block(w: torch.Tensor):
    """w [N, K] -> (e4m3 [N, K], scale_inv f32 [ceil(N/128), ceil(K/128)]), amax / 448 each."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK)
    padded[:n, :k] = w
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    scale = amax / 448.0
    q = (blocks / scale[:, None, :, None]).view(nb * BLOCK, kb * BLOCK)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()


def dequantize_block(q: torch.Tensor, scale: torch.Tensor):
    n, k = q.shape
    s = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return q.float() * s


def release_layout(model) -> dict[str, torch.Tensor]:
    """The state dict with one tensor per expert projection (the layout of DeepSeek's release and
    of transformers' files), whatever layout the installed transformers keeps in memory."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or name.endswith("original_inv_freq"):
            continue
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, D]: gate rows, then up rows
            base, f = name[:-len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :f].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, f:].clone()
        elif name.endswith("mlp.experts.down_proj"):   # [E, D, F]
            base = name[:-len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def is_linear(name: str) -> bool:
    """The weights DeepSeek's release stores in FP8: every linear layer of the decoder layers
    (attention projections, dense and expert MLPs), not the router, embedding or head."""
    return name.startswith("model.layers.") and (name.endswith("proj.weight")
                                                 or name.endswith("proj_with_mqa.weight"))


def mtp_tensors(cfg: dict, tensors: dict, gen: torch.Generator) -> dict:
    """Random tensors of one MTP layer (index num_hidden_layers), as DeepSeek-V3 ships it."""
    last = cfg["num_hidden_layers"] - 1
    layer = f"model.layers.{cfg['num_hidden_layers']}"
    out = {}
    for name, t in tensors.items():
        if name.startswith(f"model.layers.{last}."):
            new = name.replace(f"model.layers.{last}.", f"{layer}.")
            out[new] = (0.08 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    d = cfg["hidden_size"]
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{layer}.{norm}.weight"] = (1 + 0.2 * torch.randn(d, generator=gen)).bfloat16()
    out[f"{layer}.eh_proj.weight"] = (0.08 * torch.randn(d, 2 * d, generator=gen)).bfloat16()
    out[f"{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    out[f"{layer}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    return out


def write(folder: str, tensors: dict, shards: int):
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        chunk = {names[j]: tensors[names[j]] for j in part}
        save_file(chunk, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def stored(name: str, t: torch.Tensor) -> torch.Tensor:
    """Dtypes as released: FP8 weights, float32 scales and router bias, bf16 for the rest."""
    if t.dtype == torch.float8_e4m3fn or name.endswith(("_scale_inv", "e_score_correction_bias")):
        return t
    return t.bfloat16()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def make(variant: str, out: str, seed: int):
    cfg = VARIANTS[variant]
    folder = os.path.join(out, variant)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with tempfile.TemporaryDirectory() as tmp:  # the config without quantization_config
        plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plain, f, indent=2)
        model = build(tmp, seed)
        tensors = release_layout(model)
        if variant == "fp8":  # quantize, and give the reference the dequantized weights
            for name in [n for n in tensors if is_linear(n)]:
                q, s = quantize_block(tensors[name])
                tensors[name], tensors[f"{name}_scale_inv"] = q, s
            dequantized = {n: (dequantize_block(t, tensors[f"{n}_scale_inv"])
                               if t.dtype == torch.float8_e4m3fn else t)
                           for n, t in tensors.items() if not n.endswith("_scale_inv")}
        else:
            dequantized = tensors
        # Reload through transformers' own loader: the names are right if the logits agree.
        write(tmp, {n: t.float() for n, t in dequantized.items()}, 1)
        reference = AutoModelForCausalLM.from_pretrained(
            tmp, attn_implementation="eager", dtype=torch.float32).eval()
    ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (BATCH, SEQ)).astype(
        np.int32)
    logits = logits_of(reference, ids)
    if variant != "fp8":
        np.testing.assert_allclose(logits, logits_of(model, ids), rtol=1e-5, atol=1e-5)
    files = {n: stored(n, t) for n, t in tensors.items()}
    if cfg.get("num_nextn_predict_layers"):
        files.update(mtp_tensors(cfg, files, torch.Generator().manual_seed(seed + 1)))
    write(folder, {n: t.contiguous() for n, t in files.items()}, SHARDS.get(variant, 1))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    np.savez_compressed(os.path.join(folder, "reference.npz"), input_ids=ids, logits=logits)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{variant}: {len(files)} tensors, {size / 1e6:.2f} MB, logits |max| "
          f"{np.abs(logits).max():.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("tests", "data", "hf_tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    for variant in args.variants.split(","):
        make(variant, args.out, args.seed)


if __name__ == "__main__":
    main()
