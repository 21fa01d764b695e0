"""Kernel-time probe: R GEMMs on R distinct input sets inside one jitted program (no CSE, no
Python dispatch per call), against the per-call Python loop and a tiny GEMM (launch floor)."""
import time
import jax, jax.numpy as jnp, numpy as np
from jax_ds.ops import quantize_fp8, gemm

def call(ops, bm, bn, sms):
    f = jax.ffi.ffi_call(gemm.TARGET, jax.ShapeDtypeStruct((ops[0].shape[0], ops[2].shape[0]), jnp.bfloat16),
                         vmap_method="sequential")
    return f(*ops, block_m=np.int32(bm), block_n=np.int32(bn), num_sms=np.int32(sms))

def sets(m, n, k, s):
    out, key = [], jax.random.PRNGKey(0)
    for i in range(s):
        key, ka, kb = jax.random.split(key, 3)
        a8, sa = quantize_fp8(jax.random.normal(ka, (m, k), jnp.bfloat16), block=(1, 128))
        b8, sb = quantize_fp8(jax.random.normal(kb, (n, k), jnp.bfloat16), block=(128, 128))
        out.append((a8, sa, b8, sb))
    return out

def best(fn, args, reps=7):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t0)
    return min(ts)

R = 8
cases = [(1, 16, 128, 64, 16), (64, 2112, 7168, 64, 16), (64, 2112, 7168, 64, 32), (64, 2112, 7168, 64, 128),
         (128, 4096, 7168, 128, 16), (128, 4096, 7168, 64, 64), (128, 4096, 7168, 128, 128),
         (64, 7168, 16384, 64, 64), (128, 7168, 16384, 64, 128), (4096, 7168, 16384, 128, 128), (8192, 8192, 8192, 128, 128)]
for (m, n, k, bm, bn) in cases:
    ss = sets(m, n, k, R)
    sms = min(-(-m // bm) * -(-n // bn), 132)
    many = jax.jit(lambda ss: [call(s, bm, bn, sms) for s in ss])
    t_in = best(many, (ss,)) / R
    f = 2 * m * n * k
    print(f"{m:5d}x{n:5d}x{k:5d} tile {bm:3d}x{bn:3d}: {t_in*1e6:8.1f} us {f/t_in/1e12:6.0f} TFLOP/s", flush=True)

# Control: the quantize custom call (no tensor maps, no attributes), same harness.
from jax_ds.ops import quant
x = [jax.random.normal(jax.random.PRNGKey(i), (1, 128), jnp.bfloat16) for i in range(R)]
many = jax.jit(lambda xs: [quant.quantize_fp8(v, block=(1, 128), impl="ffi") for v in xs])
print(f"quantize 1x128: {best(many, (x,)) / R * 1e6:.1f} us per call", flush=True)
