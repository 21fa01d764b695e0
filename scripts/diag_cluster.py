"""One GEMM per (shape, tile, cluster) for ncu: which grid the launch got and where the time goes."""
import jax, jax.numpy as jnp
from jax_ds.ops import gemm, quantize_fp8

CASES = [((4096, 4096, 7168), (128, 128)), ((64, 2112, 7168), (64, 16))]
for (m, n, k), (bm, bn) in CASES:
    ka, kb = jax.random.split(jax.random.key(0))
    a8, sa = quantize_fp8(jax.random.normal(ka, (m, k), jnp.bfloat16), block=(1, 128))
    b8, sb = quantize_fp8(jax.random.normal(kb, (n, k), jnp.bfloat16), block=(128, 128))
    for cn in (1, 2):
        f = jax.ffi.ffi_call(gemm.TARGET, jax.ShapeDtypeStruct((m, n), jnp.bfloat16))
        out = f(a8, sa, b8, sb, **gemm.GemmConfig(bm, bn, 132, cn).attrs())
        jax.block_until_ready(out)
        print(m, n, k, bm, bn, cn, "ok", flush=True)
