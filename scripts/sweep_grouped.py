"""Times the 64- and 128-wide compiled tiles x cluster sizes on the `bench moe` grouped / masked shapes (kernel
time, jax.profiler); prints the best per shape beside grouped_config's pick, writes JSON."""
import json, os
import jax, jax.numpy as jnp
from jax_ds.bench._profile import device_time_jax
from jax_ds.bench.moe import CONTIGUOUS, MASKED, NK, _operands
from jax_ds.ops import gemm, grouped_gemm as gg

sms = jax.devices()[0].core_count
rows = []
for kind, groups in (("contiguous", CONTIGUOUS), ("masked", MASKED)):
    for g, r in groups:
        for n, k in NK:
            a_shape = (g, r) if kind == "masked" else (g * r,)
            sets = [_operands(jax.random.key(i), a_shape, g, n, k) for i in range(2)]
            sizes = jnp.full((g,), r, jnp.int32)
            target = gg.MASKED_TARGET if kind == "masked" else gg.GROUPED_TARGET
            out_shape = (g, r, n) if kind == "masked" else (g * r, n)
            res = {}
            for bm, bn in [(bm, bn) for bm, bn in gemm.TILES if bn >= 64]:
                for cn in gemm.CLUSTERS:
                    cfg = gemm.GemmConfig(bm, bn, sms, cn)
                    f = jax.jit(lambda *o, cfg=cfg: gg.ffi_grouped_fp8_gemm(
                        target, *o, sizes, out_shape, jnp.bfloat16, cfg))
                    t = device_time_jax(f, sets, 6)
                    res[f"{bm}x{bn}c{cn}"] = 2 * g * r * n * k / t / 1e12
            pick = gg.grouped_config(r, g, n, k, sms)
            pk = f"{pick.block_m}x{pick.block_n}c{pick.cluster_n}"
            best = max(res, key=res.get)
            print(f"{kind:10s} {g}x{r} n{n} k{k}: best {best} {res[best]:.0f}  pick {pk} "
                  f"{res[pk]:.0f}", flush=True)
            rows.append(dict(kind=kind, groups=g, rows=r, n=n, k=k, tflops=res, best=best,
                             pick=pk))
            json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "sweep_grouped.json"),
                                 "w"), indent=1)
