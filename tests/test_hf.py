"""Hugging Face checkpoints: logits parity with the public reference, FP8 kept or dequantized,
sharded indexes, MTP layers, save -> load round trips, and clear errors for bad checkpoints.

The checkpoints under tests/data/hf_tiny/ were made once by scripts/make_hf_tiny.py with
transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (float32, CPU); each folder holds the
reference's logits for its input_ids (reference.npz). See that script for what each variant
exercises (bf16: sharded, YaRN, correction bias, MTP layer; fp8: DeepSeek's FP8 release format;
v2: no query compression, softmax group-limited router).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jax_ds.models import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from jax_ds.models import _safetensors as st
from jax_ds.parallel.mesh import make_mesh
from jax_ds.testing import calc_diff, tolerance

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_tiny")

# Bounds on our logits vs the reference's (float32 logits of magnitude up to ~4):
F32_MAX_ABS = 1e-5      # float32 activations: the same math, rounding only (seen: <= 7e-6)
BF16_CALC_DIFF = 5e-4   # bf16 activations through 2-3 layers (seen: <= 1.1e-4)
BF16_MAX_ABS = 0.15     # (seen: <= 0.06)
# FP8 kept: activations quantized to e4m3 per 1x128 before every GEMM (as DeepSeek-V3 serves),
# while the reference multiplies the dequantized weights by unquantized activations. Each GEMM is
# within DeepGEMM's bound (`tolerance("fp8")`, checked below); through two layers the noise moves
# a few near-tied router choices, so logits differ by calc_diff 0.038 (relative RMS error 27%;
# 0.013 and 16% with float32 activations), while a wrong weight or scale layout gives ~1.
FP8_KEPT_CALC_DIFF = 0.08


def reference(variant):
    ref = np.load(os.path.join(DATA, variant, "reference.npz"))
    return jnp.asarray(ref["input_ids"]), ref["logits"]


def logits(model, ids):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, ids))


def bits(x):
    """The array's bit patterns (bf16 and float8 compared exactly, as unsigned integers)."""
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def flat_state(model):
    return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("variant,fp8", [("bf16", "keep"), ("v2", "keep"), ("fp8", "dequant")])
def test_float32_logits_match_the_reference(variant, fp8):
    ids, ref = reference(variant)
    model = load_hf_checkpoint(os.path.join(DATA, variant), dtype=jnp.float32, fp8=fp8)
    out = logits(model, ids)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=F32_MAX_ABS)


@pytest.mark.parametrize("variant,fp8", [("bf16", "keep"), ("fp8", "dequant")])
def test_bf16_logits_match_the_reference(variant, fp8):
    ids, ref = reference(variant)
    model = load_hf_checkpoint(os.path.join(DATA, variant), fp8=fp8)  # dtype bf16 by default
    assert model.embed[...].dtype == jnp.bfloat16 and model.cfg.dtype == "bfloat16"
    out = logits(model, ids)
    assert calc_diff(out, ref) < BF16_CALC_DIFF
    assert np.abs(out - ref).max() < BF16_MAX_ABS


def test_fp8_kept_runs_the_fp8_gemms_close_to_the_reference():
    ids, ref = reference("fp8")
    path = os.path.join(DATA, "fp8")
    kept = load_hf_checkpoint(path, fp8="keep")
    assert kept.cfg.fp8_weights
    attn, moe = kept.blocks[0].attn, kept.blocks[1].ffn
    assert attn.wq_a.kernel[...].dtype == jnp.float8_e4m3fn
    assert attn.wkv_a.kernel_scale[...].shape == (2, 1)  # 144 rows: a partial 128-row block
    assert moe.w_gate[...].dtype == jnp.float8_e4m3fn and moe.w_down_scale[...].shape == (4, 1, 1)
    assert kept.head.kernel[...].dtype == jnp.bfloat16 and moe.router.weight[...].dtype == \
        jnp.float32
    assert calc_diff(logits(kept, ids), ref) < FP8_KEPT_CALC_DIFF
    # Every kept GEMM alone: within DeepGEMM's FP8 bound of the dequantized weight's product.
    dequant = load_hf_checkpoint(path, dtype=jnp.float32, fp8="dequant")
    x = jax.random.normal(jax.random.key(0), (2, 16, 128), jnp.float32)
    for name in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
        ours, theirs = getattr(kept.blocks[0].attn, name), getattr(dequant.blocks[0].attn, name)
        xi = x[..., :ours.kernel.shape[1]].astype(jnp.bfloat16)
        assert calc_diff(ours(xi), theirs(xi.astype(jnp.float32))) < tolerance("fp8"), name
    x = x.astype(jnp.bfloat16)
    y_kept, y_ref = moe(x)[0], dequant.blocks[1].ffn(x.astype(jnp.float32))[0]
    assert calc_diff(y_kept, y_ref) < 2 * tolerance("fp8")  # two GEMMs deep


def test_sharded_checkpoint_onto_an_expert_mesh():
    """The bf16 variant is sharded (index + 3 files); with a mesh each device gets its experts."""
    path = os.path.join(DATA, "bf16")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ids, ref = reference("bf16")
    mesh = make_mesh(data=2, expert=4, devices=jax.devices("cpu")[:8])
    model = load_hf_checkpoint(path, dtype=jnp.float32, mesh=mesh)
    w = model.blocks[1].ffn.w_gate[...]
    assert w.sharding.spec[0] == "expert" and len(w.addressable_shards) == 8
    assert w.addressable_shards[0].data.shape == (3, 32, 64)  # 12 experts over expert=4
    out = logits(model, jnp.tile(ids, (4, 1)))[:2]  # batch split over data x expert = 8
    np.testing.assert_allclose(out, ref, rtol=0, atol=F32_MAX_ABS)


@pytest.mark.parametrize("variant", ["bf16", "fp8"])
def test_mesh_load_reads_each_tensor_once(variant, monkeypatch):
    """Devices ask for their slices in any order (data=2 x expert=4: experts 0..3, 0..3): every
    tensor (and FP8 scale) is still read from the files once."""
    from collections import Counter

    from jax_ds.models import hf

    reads = Counter()
    get = hf.Checkpoint.get
    monkeypatch.setattr(hf.Checkpoint, "get", lambda self, name: reads.update([name]) or
                        get(self, name))
    mesh = make_mesh(data=2, expert=4, devices=jax.devices("cpu")[:8])
    load_hf_checkpoint(os.path.join(DATA, variant), fp8="keep", mesh=mesh)
    assert reads and max(reads.values()) == 1, reads.most_common(3)


def test_mtp_layer_is_skipped_unless_asked_for():
    path = os.path.join(DATA, "bf16")
    assert len(load_hf_checkpoint(path).mtp) == 0
    model = load_hf_checkpoint(path, mtp=True)
    assert model.cfg.mtp_depth == 1 and model.mtp[0].block.is_moe
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    for name, ours in [("model.layers.3.eh_proj.weight", model.mtp[0].proj.kernel),
                       ("model.layers.3.enorm.weight", model.mtp[0].emb_norm.scale)]:
        tensor = st.SafetensorsFile(os.path.join(path, index[name])).get(name)
        np.testing.assert_array_equal(bits(ours[...]), bits(tensor))


@pytest.mark.parametrize("variant,fp8,dtype", [("bf16", "keep", jnp.bfloat16),
                                               ("fp8", "keep", jnp.bfloat16),
                                               ("v2", "keep", jnp.float32)])
def test_save_then_load_is_exact(tmp_path, variant, fp8, dtype):
    model = load_hf_checkpoint(os.path.join(DATA, variant), dtype=dtype, fp8=fp8,
                               mtp=variant == "bf16")
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=200_000 if variant == "bf16" else None)
    sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
    assert sharded == (variant == "bf16")
    again = load_hf_checkpoint(tmp_path, dtype=dtype, fp8=fp8, mtp=variant == "bf16")
    assert again.cfg == model.cfg
    before, after = flat_state(model), flat_state(again)
    assert before.keys() == after.keys()
    for path, value in before.items():
        assert value.dtype == after[path].dtype, path
        np.testing.assert_array_equal(bits(value), bits(after[path]), err_msg=str(path))
    if fp8 == "keep" and variant == "fp8":
        cfg = json.load(open(tmp_path / "config.json"))
        assert cfg["quantization_config"]["weight_block_size"] == [128, 128]


def test_save_from_an_expert_mesh_is_bit_exact(tmp_path):
    """Saving experts sharded over a mesh keeps -0.0 (and FP8's 0x80): indexing a sharded array
    runs a gather that sums the shards' pieces, which gave +0.0 there."""
    mesh = make_mesh(data=2, expert=4, devices=jax.devices("cpu")[:8])
    model = load_hf_checkpoint(os.path.join(DATA, "bf16"), dtype=jnp.float32, mesh=mesh)
    w = model.blocks[1].ffn.w_gate
    w[...] = w[...].at[5, 0, 0].set(-0.0).at[6, 1, 2].set(-0.0)
    assert w[...].sharding.spec[0] == "expert"
    save_hf_checkpoint(model, tmp_path)
    again = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    np.testing.assert_array_equal(bits(again.blocks[1].ffn.w_gate[...]), bits(w[...]))
    assert bits(again.blocks[1].ffn.w_gate[...])[5, 0, 0] == 0x80000000


# ----------------------------------------------------------------------------- bad checkpoints


def rewrite(src, dst, change):
    """Copies checkpoint folder src to dst with its tensors passed through change(dict)."""
    shutil.copytree(src, dst)
    file = st.SafetensorsFile(os.path.join(dst, "model.safetensors"))
    tensors = change({n: np.array(file.get(n)) for n in file.keys()})
    os.remove(os.path.join(dst, "model.safetensors"))
    st.write(os.path.join(dst, "model.safetensors"),
             [st.Entry(n, t.dtype, t.shape, lambda t=t: t) for n, t in tensors.items()])
    return dst


@pytest.mark.parametrize("variant,name,shape", [
    ("v2", "model.layers.1.self_attn.kv_b_proj.weight", r"\(128, 32\)"),
    ("fp8", "model.layers.0.mlp.up_proj.weight_scale_inv", r"\(2, 1\)"),  # an FP8 scale
])
def test_missing_tensor_is_named(tmp_path, variant, name, shape):
    path = rewrite(os.path.join(DATA, variant), tmp_path / "c",
                   lambda t: {n: v for n, v in t.items() if n != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}' \(shape {shape}"):
        load_hf_checkpoint(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = rewrite(os.path.join(DATA, "v2"), tmp_path / "c",
                   lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra"):
        load_hf_checkpoint(path)


def test_shape_mismatch_names_expected_and_found(tmp_path):
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    path = rewrite(os.path.join(DATA, "v2"), tmp_path / "c",
                   lambda t: {**t, name: np.zeros((64, 31), ml_dtypes.bfloat16)})
    with pytest.raises(CheckpointError,
                       match=rf"'{name}': expected shape \(64, 32\), found \(64, 31\)"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("name,dtype,match", [
    ("model.norm.weight", ml_dtypes.float8_e4m3fn, "is float8_e4m3fn: expected a float type "
                                                   r"\(e4m3 is for the linear weights\)"),
    ("model.norm.weight", np.int32, "is int32: expected a float type"),
    ("model.layers.0.mlp.up_proj.weight", np.int8, "is int8: expected a float type or e4m3"),
])
def test_weight_dtype_is_checked(tmp_path, name, dtype, match):
    path = rewrite(os.path.join(DATA, "v2"), tmp_path / "c",
                   lambda t: {**t, name: t[name].astype(np.float32).astype(dtype)})
    with pytest.raises(CheckpointError, match=rf"dtype '{name}' {match}"):
        load_hf_checkpoint(path)


def test_unsupported_architecture_and_config(tmp_path):
    path = shutil.copytree(os.path.join(DATA, "v2"), tmp_path / "c")
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
              open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="unsupported architecture 'LlamaForCausalLM'"):
        load_hf_checkpoint(path)
    json.dump({**cfg, "hidden_act": "gelu"}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="unsupported hidden_act='gelu'"):
        load_hf_checkpoint(path)
    json.dump({**cfg, "rope_scaling": {"type": "linear", "factor": 2.0}},
              open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="rope_scaling type 'linear'"):
        load_hf_checkpoint(path)
    with pytest.raises(ValueError, match="fp8='fp4'"):
        load_hf_checkpoint(path, fp8="fp4")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path)


def test_broken_files_are_named(tmp_path):
    path = shutil.copytree(os.path.join(DATA, "v2"), tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_hf_checkpoint(path / "config.json")
    good = (path / "config.json").read_text()
    (path / "config.json").write_text("{'not': json}")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_hf_checkpoint(path)
    (path / "config.json").write_text(good)
    shard = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    n = 16
    shard.write_bytes(n.to_bytes(8, "little") + b"{garbage header}" + bytes(64))
    with pytest.raises(ValueError, match=rf"{shard.name}: not a safetensors file .* not JSON"):
        load_hf_checkpoint(path)


def _header_file(path, header: dict, data: bytes = bytes(64)):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("entry, match", [
    ({"shape": [4]}, "malformed header entry"),                       # no dtype / offsets
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "malformed header entry"),
    (5, "malformed header entry"),
    ({"dtype": "F32", "shape": "ab", "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}, "malformed header entry"),
    ({"dtype": "U16", "shape": [4], "data_offsets": [0, 8]}, "has dtype 'U16', not one of"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "has 8 bytes"),
])
def test_malformed_safetensors_headers_are_named(tmp_path, entry, match):
    _header_file(tmp_path / "x.safetensors", {"t": entry})
    with pytest.raises(ValueError, match=rf"x.safetensors: tensor 't' .*{match}"):
        st.SafetensorsFile(tmp_path / "x.safetensors")


def test_malformed_index_and_config_are_checkpoint_errors(tmp_path):
    path = shutil.copytree(os.path.join(DATA, "v2"), tmp_path / "c")
    index = path / "model.safetensors.index.json"
    for text in ("{bad", "[]", '{"weight_map": [1]}'):
        index.write_text(text)
        with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
            load_hf_checkpoint(path)
    index.unlink()
    cfg = json.load(open(path / "config.json"))
    for bad in ({"num_hidden_layers": "2"}, {"rope_scaling": "yarn"},
                {"quantization_config": "fp8"}, {"vocab_size": None}):
        json.dump({**cfg, **bad}, open(path / "config.json", "w"))
        with pytest.raises(CheckpointError, match="config.json"):
            load_hf_checkpoint(path)
    json.dump(cfg, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="load_hf_checkpoint: dtype='bf17'"):
        load_hf_checkpoint(path, dtype="bf17")


def test_rope_buffers_and_a_tied_head_copy_are_not_read(tmp_path):
    """Tensors Hugging Face's loader ignores: RoPE's inv_freq buffers, and with
    tie_word_embeddings an lm_head.weight beside the embedding (the embedding is the head)."""
    ref = load_hf_checkpoint(os.path.join(DATA, "v2"), dtype=jnp.float32)
    path = rewrite(os.path.join(DATA, "v2"), tmp_path / "c", lambda t: {
        **t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    tokens = jnp.arange(6, dtype=jnp.int32).reshape(1, 6) % ref.cfg.vocab_size
    np.testing.assert_array_equal(
        np.asarray(load_hf_checkpoint(path, dtype=jnp.float32)(tokens)), np.asarray(ref(tokens)))
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, "tie_word_embeddings": True}, open(path / "config.json", "w"))
    tied = load_hf_checkpoint(path, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(tied.head.kernel[...]),
                                  np.asarray(tied.embed[...]))


def test_missing_optional_fields_take_the_hf_defaults(caplog):
    """A config.json that leaves an optional field out means transformers' default for its
    model type (V3: 2.5x routed scaling, normalized top-k, 8/4 groups, one shared expert, 3
    dense layers, q_lora 1536), where V2's values were taken for both."""
    from jax_ds.models.hf import config_from_hf

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                intermediate_size=64, n_routed_experts=16, moe_intermediate_size=16,
                num_experts_per_tok=2)
    v3 = config_from_hf(dict(base, model_type="deepseek_v3"))
    assert (v3.routed_scaling, v3.norm_topk_prob, v3.num_groups, v3.topk_groups,
            v3.num_shared_experts, v3.num_dense_layers, v3.q_lora_rank, v3.max_seq_len) == (
        2.5, True, 8, 4, 1, 3, 1536, 4096)
    v2 = config_from_hf(dict(base, model_type="deepseek_v2"))
    assert (v2.routed_scaling, v2.norm_topk_prob, v2.num_groups, v2.num_shared_experts,
            v2.num_dense_layers, v2.q_lora_rank, v2.max_seq_len) == (1.0, False, 1, 2, 0, 1536,
                                                                      2048)
    # an explicit null is kept: no query compression
    assert config_from_hf(dict(base, model_type="deepseek_v3", q_lora_rank=None)).q_lora_rank == 0
    # YaRN: rope_scaling's factor, with a warning where max_position_embeddings disagrees
    yarn = dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
    with caplog.at_level("WARNING", logger="jax_ds.models.hf"):
        cfg = config_from_hf(dict(base, model_type="deepseek_v3", rope_scaling=yarn,
                                  max_position_embeddings=32))
    assert cfg.yarn.factor == 4.0 and "differs from max_position_embeddings" in caplog.text


def test_fp8_scale_dtype_is_checked(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    path = rewrite(os.path.join(DATA, "fp8"), tmp_path / "c",
                   lambda t: {**t, name: t[name].astype(np.int32)})
    with pytest.raises(CheckpointError, match=rf"dtype '{name}' is int32: expected a float type"):
        load_hf_checkpoint(path)
