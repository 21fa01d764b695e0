"""Quick device smoke test: kernel vs reference on a few shapes, then rough timings."""
import sys, time
import numpy as np
import jax, jax.numpy as jnp
from jax_ds import _ffi
from jax_ds.ops import quantize_fp8, fp8_gemm
from jax_ds.ops.gemm import gemm_config
from jax_ds.testing import calc_diff

print(_ffi.status_line(), jax.devices())
key = jax.random.PRNGKey(0)
shapes = [(7, 129, 256), (128, 128, 128), (4095, 2112, 7168), (64, 2112, 7168), (1, 1, 128)]
bad = 0
for (m, n, k) in shapes:
    ka, kb, key = jax.random.split(key, 3)
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (n, k), jnp.float32)
    aq, sa = quantize_fp8(a, block=(1, 128), impl="xla")
    bq, sb = quantize_fp8(b, block=(128, 128), impl="xla")
    ref = fp8_gemm(aq, sa, bq, sb, out_dtype=jnp.float32, impl="xla")
    for od in (jnp.float32, jnp.bfloat16):
        out = fp8_gemm(aq, sa, bq, sb, out_dtype=od, impl="ffi")
        d = calc_diff(np.asarray(out, np.float64), np.asarray(ref, np.float64))
        nan = bool(jnp.isnan(out.astype(jnp.float32)).any())
        print(f"{m}x{n}x{k} {np.dtype(od).name} cfg={gemm_config(m, n, k, 132)} diff={d:.2e} nan={nan}")
        bad += (d > 1e-3) or nan
    aq2, sa2 = quantize_fp8(a, block=(1, 128), impl="ffi")
    bq2, sb2 = quantize_fp8(b, block=(128, 128), impl="ffi")
    pairs = dict(a_q=(aq, aq2), a_s=(sa, sa2), b_q=(bq, bq2), b_s=(sb, sb2))
    same = True
    for name, (x, y) in pairs.items():
        xv = np.asarray(x.astype(jnp.float32)); yv = np.asarray(y.astype(jnp.float32))
        eq = np.array_equal(xv, yv, equal_nan=True)
        same &= eq
        if not eq:
            idx = np.argwhere(~((xv == yv) | (np.isnan(xv) & np.isnan(yv))))
            i = tuple(idx[0])
            print(f"  {name}: {len(idx)} differ, first {i}: ref {xv[i]!r} kernel {yv[i]!r}")
    print("  quantize kernel == reference:", same)
    bad += not same

def bench(m, n, k, reps=20):
    a = jax.random.normal(key, (m, k), jnp.float32)
    b = jax.random.normal(key, (n, k), jnp.float32)
    aq, sa = quantize_fp8(a, block=(1, 128)); bq, sb = quantize_fp8(b, block=(128, 128))
    f = jax.jit(lambda *x: fp8_gemm(*x, impl="ffi"))
    f(aq, sa, bq, sb).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps): out = f(aq, sa, bq, sb)
    out.block_until_ready()
    t = (time.perf_counter() - t0) / reps
    print(f"bench {m}x{n}x{k}: {t*1e6:.1f} us  {2*m*n*k/t/1e12:.0f} TFLOP/s  cfg={gemm_config(m, n, k, 132)}")

for s in [(4096, 7168, 16384), (8192, 8192, 8192), (4096, 2112, 7168), (128, 4096, 7168), (64, 2112, 7168), (4096, 32768, 512)]:
    bench(*s)
sys.exit(1 if bad else 0)
