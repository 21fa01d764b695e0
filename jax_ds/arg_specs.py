"""Real shapes, named once and shared by tests and benchmarks (tokamax's arg_specs idea).

Each entry is (m, n, k) for an "NT" GEMM: a [m, k] @ b[n, k]^T.
"""

# DeepSeek-V3 dense projections (n, k), from the model's published shapes.
DEEPSEEK_V3_NK = (
    (2112, 7168),   # fused q_a + kv_a projection
    (24576, 1536),  # q_b projection (128 heads x 192)
    (32768, 512),   # kv_b projection (128 heads x (128 + 128))
    (7168, 16384),  # attention output projection
    (4096, 7168),   # shared expert / dense up (split)
    (7168, 2048),   # expert down projection
)
GEMM_M = (64, 128, 4096)

# DeepGEMM's published dense FP8 figures (H800, TFLOP/s, Feb 2025 release).
DEEPGEMM_H800_TFLOPS = {
    (64, 2112, 7168): 206,
    (64, 7168, 16384): 336,
    (128, 2112, 7168): 352,
    (128, 7168, 16384): 645,
    (128, 4096, 7168): 533,
    (4096, 2112, 7168): 1058,
    (4096, 24576, 1536): 990,
    (4096, 7168, 16384): 1358,
    (4096, 4096, 7168): 1304,
}


def gemm_bench_shapes():
    """The shapes `python -m jax_ds.bench gemm` measures: V3's GEMMs at each m, then 8192^3."""
    shapes = [(m, n, k) for m in GEMM_M for (n, k) in DEEPSEEK_V3_NK]
    shapes.append((8192, 8192, 8192))
    return shapes


# Shapes the GPU tests sweep: ragged M and N (no 128-alignment), K multiple of 128.
GEMM_TEST_M = (1, 7, 128, 4095, 4096)
GEMM_TEST_N = (1, 129, 2112, 7168)
GEMM_TEST_K = (128, 384, 1536, 7168)
