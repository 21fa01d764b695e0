"""`python -m jax_ds.bench train`: the trace's overlap arithmetic, and a CPU smoke run."""
import glob
import json

import pytest

from jax_ds.bench import _profile
from jax_ds.bench import train as bench_train
from jax_ds.bench.__main__ import main


@pytest.mark.parametrize("name, kind", [
    ("ncclDevKernel_SendRecv", "all_to_all"),
    ("ncclKernel_AllToAll_RING", "all_to_all"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all_reduce"),
    ("ncclDevKernel_AllGather_RING_LL", "all_gather"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "reduce_scatter"),
    ("ncclDevKernel_Broadcast_RING_LL", "other_collective"),
    ("MemcpyD2D", "copy"), ("Memset", "copy"),
    ("loop_broadcast_fusion", None), ("input_reduce_fusion_1", None),
    ("ragged_dot_fusion", None), ("jax_ds_fp8_gemm_kernel", None)])
def test_kernels_are_classified_by_name(name, kind):
    assert _profile.collective_kind(name) == kind


def test_overlap_counts_time_under_any_compute_stream():
    events = [
        ("fusion_a", 0, 10), ("fusion_b", 5, 15),          # two streams: compute [0, 15)
        ("fusion_c", 20, 30),
        ("ncclDevKernel_SendRecv", 10, 25),               # 5 of its 15 under compute... + 5
        ("ncclDevKernel_SendRecv", 12, 22),               # inside the first: merged
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 40, 50),
        ("MemcpyD2D", 30, 40),
    ]
    out = _profile.collective_overlap(events)
    assert out["span_ms"] == pytest.approx(50e-6)
    assert out["compute_ms"] == pytest.approx(25e-6) and out["copy_ms"] == pytest.approx(10e-6)
    a2a = out["collectives"]["all_to_all"]
    assert a2a["ms"] == pytest.approx(15e-6) and a2a["overlapped_ms"] == pytest.approx(10e-6)
    assert a2a["overlap"] == pytest.approx(10 / 15)
    assert out["collectives"]["all_reduce"]["overlap"] == 0
    assert _profile.collective_overlap([]) == {"span_ms": 0.0, "compute_ms": 0.0,
                                               "copy_ms": 0.0, "collectives": {}}


def test_summary_is_per_gpu_and_step():
    dev = lambda ms, under: {"span_ms": 10.0, "collectives": {  # noqa: E731
        "all_to_all": {"ms": ms, "overlapped_ms": under, "overlap": under / ms}}}
    out = bench_train.summarize({"/device:GPU:0": dev(4.0, 1.0), "/device:GPU:1": dev(2.0, 2.0)},
                                steps=2)
    assert out["all_to_all"]["ms_per_step"] == pytest.approx(1.5)
    assert out["all_to_all"]["overlap"] == pytest.approx(0.5)
    assert out["span_ms_per_step"] == pytest.approx(5.0)


def test_bench_train_runs(tmp_path):
    assert main(["train", "--tiny", "--out", str(tmp_path),
                 "--trace-dir", str(tmp_path / "trace")]) == 0
    (path,) = tmp_path.glob("train-*.json")
    result = json.loads(path.read_text())
    assert result["mesh"]["data"] * result["mesh"]["expert"] == 8
    assert [(r["gemm"], r["microbatches"]) for r in result["rows"]] == [("bf16", 1), ("bf16", 2)]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["model_tflops"] > 0
        assert glob.glob(f"{row['trace_dir']}/**/*.xplane.pb", recursive=True)
        assert row["devices"] == {} and row["collectives"] == {}   # no GPU in a CPU trace


@pytest.mark.parametrize("fp8", [False, True])
def test_v3_slice_has_deepseek_v3_layer_widths(fp8):
    """--model v3-slice: V3's layer with 32 routed experts (shapes only: nothing is allocated)."""
    from jax_ds.models import DeepSeekConfig, param_counts
    cfg = bench_train.model_config("v3-slice", 2, fp8)
    v3 = DeepSeekConfig.v3()
    same = ("d_model", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim",
            "v_head_dim", "expert_hidden", "top_k", "num_groups", "topk_groups", "score_func",
            "num_shared_experts", "routed_scaling")
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(v3, k) for k in same}
    assert (cfg.num_experts, cfg.num_layers, cfg.num_dense_layers, cfg.mtp_depth, cfg.fp8) == (
        32, 2, 0, 0, fp8)
    per_layer = param_counts(cfg)["total"] / 2
    assert 1.6e9 < per_layer < 1.7e9, per_layer


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_v3_slice_train_step_traces(fp8, kernels, monkeypatch):
    """One v3-slice layer's training step (model, AdamW, loss and gradients) traced abstractly:
    nothing is allocated (26 GB of state a layer). kernels: every op on its kernel path (the
    ffi calls only traced), as on a GPU."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jax_ds import _ffi
    from jax_ds.models import Transformer, train_step
    from jax_ds.ops import moe
    from jax_ds.parallel.mesh import mesh_from_spec
    if kernels:
        monkeypatch.setattr(_ffi, "resolve_impl", lambda op, target, impl, *a, **k: "ffi")
        monkeypatch.setattr(moe, "_use_kernel", lambda *args, **kwargs: True)
    cfg = bench_train.model_config("v3-slice", 1, fp8)
    mesh = mesh_from_spec("expert=1")

    def step(batch):
        model = Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
        return train_step(model, optimizer, batch, microbatches=1)

    out = jax.eval_shape(step, jax.ShapeDtypeStruct((2, 257), jnp.int32))
    assert out["loss"].shape == () and out["expert_counts"].shape == (1, 32)


@pytest.mark.parametrize("name, kind", [
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 192, 2, __nv_bfloat16, "
     "jax_ds::gemm::GroupedScheduler<128, 192, 2, false, true> >(CUtensorMap)",
     "ours grouped FP8 GEMM"),
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 192, 2, __nv_bfloat16, "
     "jax_ds::gemm::GroupedScheduler<128, 192, 2, false>, false>(CUtensorMap)",
     "ours grouped FP8 GEMM"),
    # as the profiler named them on the H200 (2026-12-05): kBf16 and kBTrans after the scheduler
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 128, 2, __nv_bfloat16, "
     "jax_ds::gemm::GroupedScheduler<128, 128, 2, false>, true, false>(CUtensorMap)",
     "ours grouped bf16 GEMM"),
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 128, 1, float, "
     "jax_ds::gemm::GroupedScheduler<128, 128, 1, false>, true, true>(CUtensorMap)",
     "ours grouped bf16 GEMM"),
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 128, 2, __nv_bfloat16, "
     "jax_ds::gemm::GroupedScheduler<128, 128, 2, false>, false, false>(CUtensorMap)",
     "ours grouped FP8 GEMM"),
    ("void jax_ds::gemm::sm90_fp8_gemm_kernel<128, 192, 2, __nv_bfloat16, "
     "jax_ds::gemm::DenseScheduler<128, 192, 2, true> >(CUtensorMap)", "ours FP8 GEMM"),
    ("void jax_ds::gemm::(anonymous namespace)::quantize_rows_kernel<__nv_bfloat16>(...)",
     "ours quantize"),
    ("void jax_ds::moe::(anonymous namespace)::permute_fp8_kernel(...)", "ours MoE routing"),
    ("void jax_ds::mla::(anonymous namespace)::CombineKernel(...)", "ours MLA decode"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "XLA GEMM (cuBLAS, Triton)"),
    ("loop_multiply_fusion_3", "XLA fusion"), ("input_reduce_fusion", "XLA fusion"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all_reduce"), ("Memset", "copy"),
    ("some_kernel_nobody_knows", "other")])
def test_kernel_kinds(name, kind):
    assert _profile.kernel_kind(name) == kind


def test_kernel_breakdown_sums_per_step():
    events = [("quantize_rows_kernel<float>", 0, 2_000_000),
              ("quantize_rows_kernel<float>", 5, 1_000_005),
              ("loop_add_fusion", 0, 4_000_000), ("nvjet_gemm", 10, 6_000_010)]
    got = _profile.kernel_breakdown(events, steps=2, top=2)
    assert got["kinds"] == {"XLA GEMM (cuBLAS, Triton)": 3.0, "XLA fusion": 2.0,
                            "ours quantize": 1.5}
    assert list(got["kinds"]) == ["XLA GEMM (cuBLAS, Triton)", "XLA fusion", "ours quantize"]
    assert got["top"] == [("nvjet_gemm", 3.0), ("loop_add_fusion", 2.0)]
