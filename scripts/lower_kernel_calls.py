"""Print the CUDA lowering (StableHLO, locations stripped) of every kernel call site, on any
machine: no GPU and no built library are needed.

Two trees whose output is equal hand the same custom calls (targets, operand and result types,
attributes) to the same library, so GPU results of one hold for the other. Usage:

    PYTHONPATH=<tree A> python scripts/lower_kernel_calls.py > a.txt
    PYTHONPATH=<tree B> python scripts/lower_kernel_calls.py > b.txt
    diff a.txt b.txt

Run it with a Python in which jax_ds is not installed in editable mode: an editable install's
import hook wins over PYTHONPATH, and both runs would then read the installed tree (check with
`python -c "import jax_ds; print(jax_ds.__file__)"`).
"""

import re

import jax
import jax.numpy as jnp

from jax_ds import _ffi, ops
from jax_ds.ops import mla, moe


def lower(fn, *args) -> str:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return "\n".join(re.sub(r" ?loc\([^)]*\)", "", line) for line in text.splitlines()
                     if not line.startswith("#loc"))


def cases():
    x, w = jnp.ones((300, 256), jnp.bfloat16), jnp.ones((130, 256), jnp.bfloat16)

    def dense(x, w):
        q, s = ops.quantize_fp8(x)
        wq, ws = ops.quantize_fp8(w, block=(128, 128), scale_format="ue8m0")
        return ops.fp8_gemm(q, s, wq, ws)

    yield "fp8_gemm", dense, (x, w)
    yield "fp8_linear grad", jax.grad(lambda x, w: jnp.sum(ops.fp8_linear(x, w) ** 2), (0, 1)), (
        x.astype(jnp.float32), w.astype(jnp.float32))
    wg, gs = jnp.ones((4, 256, 256), jnp.bfloat16), jnp.array([100, 0, 150, 50], jnp.int32)
    yield "grouped_fp8_linear grad", jax.grad(
        lambda x, w: jnp.sum(ops.grouped_fp8_linear(x, w, gs).astype(jnp.float32)), (0, 1)), (
        x, wg)
    yield "grouped_linear grad", jax.grad(
        lambda x, w, g: jnp.sum(ops.grouped_linear(x, w, g).astype(jnp.float32)), (0, 1)), (
        x, wg, gs)
    masked = (jnp.ones((4, 64, 256), jnp.float8_e4m3fn), jnp.ones((4, 64, 2), jnp.float32),
              jnp.ones((4, 256, 256), jnp.float8_e4m3fn), jnp.ones((4, 2, 2), jnp.float32),
              jnp.array([3, 64, 0, 10], jnp.int32))
    yield "masked_grouped_fp8_gemm", ops.masked_grouped_fp8_gemm, masked
    xt = jnp.ones((64, 256), jnp.bfloat16)
    idx = (jnp.arange(64 * 4).reshape(64, 4) % 8).astype(jnp.int32)
    wts = jnp.ones((64, 4), jnp.float32)

    def route(x, wts):
        y, _, perm = ops.moe_permute(x, idx, 8)
        return jnp.sum(ops.moe_unpermute(y * 2, perm, wts).astype(jnp.float32))

    yield "moe_permute + moe_unpermute", route, (xt, wts)
    yield "moe_permute + moe_unpermute grad", jax.grad(route, (0, 1)), (xt, wts)
    yield "moe_permute fp8", lambda x: ops.moe_permute(x, idx, 8, fp8=True), (xt,)
    yield "moe_dispatch_layout", lambda i: ops.moe_dispatch_layout(i, 8, 2), (idx,)
    q, kv = jnp.ones((2, 1, 16, 576), jnp.bfloat16), jnp.ones((8, 64, 1, 576), jnp.bfloat16)
    table, lens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4), jnp.array([100, 200], jnp.int32)
    yield "mla_decode", ops.mla_decode, (q, kv, table, lens)
    yield "ffi_mla_decode 8 parts", lambda *t: mla.ffi_mla_decode(*t, 0.1, True, 8, 2), (
        q, kv, table, lens)


def main():
    _ffi.resolve_impl = lambda op, target, impl, unsupported=None: "ffi"
    moe._use_kernel = lambda *args, **kwargs: True
    for name, fn, args in cases():
        print(f"===== {name}\n{lower(fn, *args)}")


if __name__ == "__main__":
    main()
