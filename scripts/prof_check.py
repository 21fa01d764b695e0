import glob, os, tempfile
import jax, jax.numpy as jnp
from jax_ds.ops import quantize_fp8, fp8_gemm
from jax_ds.bench._profile import device_time_jax
from jax.profiler import ProfileData
for (m, n, k) in [(64, 2112, 7168), (128, 4096, 7168), (4096, 7168, 16384)]:
    sets = []
    for i in range(3):
        a8, sa = quantize_fp8(jax.random.normal(jax.random.PRNGKey(i), (m, k), jnp.bfloat16))
        b8, sb = quantize_fp8(jax.random.normal(jax.random.PRNGKey(10 + i), (n, k), jnp.bfloat16), block=(128, 128))
        sets.append((a8, sa, b8, sb))
    f = jax.jit(lambda *o: fp8_gemm(*o, impl="ffi"))
    t = device_time_jax(f, sets, 30)
    g = jax.jit(lambda a, sa, b, sb: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16).T))
    t2 = device_time_jax(g, sets, 30)
    print(f"{m}x{n}x{k}: ours {t*1e6:.1f} us {2*m*n*k/t/1e12:.0f} TF | xla bf16 dot {t2*1e6:.1f} us")
d = tempfile.mkdtemp(); jax.profiler.start_trace(d); f(*sets[0]).block_until_ready(); jax.profiler.stop_trace()
pd = ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
for p in pd.planes:
    if "GPU" in p.name: print(p.name, [(l.name, len(list(l.events))) for l in p.lines])
