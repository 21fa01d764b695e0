"""Runs the FP8 quantize and GEMM kernels (dense, grouped, masked) once per case and checks them,
for compute-sanitizer.

  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
    compute-sanitizer --tool memcheck --target-processes all python3 scripts/sanitize_gemm.py

The platform allocator gives every buffer its own cudaMalloc, so an access past the end of one is
an error memcheck can see (XLA's default pool would hide it inside a neighbouring buffer).
Exit status: 0 all checks passed, 1 a check failed, 2 the kernels are not available.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops import fp8_gemm, fp8_gemm_reference, quantize_fp8
from jax_ds.ops.gemm import GemmConfig, ffi_fp8_gemm, work_units
from jax_ds.testing import calc_diff, tolerance

SHAPES = ((7, 129, 256), (4095, 2112, 7168))  # ragged tiles; a large GEMM (128x192, overlap)


def check(m, n, k, seed):
    ka, kb = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (n, k), jnp.bfloat16)
    failures = []
    ops = []
    for x, block in ((a, (1, 128)), (b, (128, 128))):
        q, s = quantize_fp8(x, block=block, impl="ffi")
        rq, rs = quantize_fp8(x, block=block, impl="xla")
        if not (np.array_equal(np.asarray(q).view(np.uint8), np.asarray(rq).view(np.uint8))
                and np.array_equal(np.asarray(s), np.asarray(rs))):
            failures.append(f"quantize {x.shape} {block} differs from the reference")
        ops += [q, s]
    # The float32 reference runs on the host: under memcheck every GPU kernel is slow.
    cpu_ops = jax.device_put(ops, jax.devices("cpu")[0])
    ref = np.asarray(fp8_gemm_reference(*cpu_ops, out_dtype=jnp.float32))

    def compare(label, out, out_dtype):
        out = np.asarray(out, np.float32)
        diff, limit = calc_diff(out, ref), tolerance(out_dtype, k)
        if not np.isfinite(out).all() or not diff < limit:
            failures.append(f"fp8_gemm {label}: calc_diff {diff:.2e} (limit {limit:.1e}), "
                            f"{np.size(out) - np.isfinite(out).sum()} non-finite")
        print(f"  fp8_gemm {m}x{n}x{k} {label}: calc_diff {diff:.2e}", flush=True)

    for out_dtype in (jnp.bfloat16, jnp.float32):
        compare(f"-> {np.dtype(out_dtype).name}", fp8_gemm(*ops, out_dtype=out_dtype, impl="ffi"),
                out_dtype)
    sms = _ffi.num_sms()
    # Every tile split along K (one slice per k block), clusters of 2: the split-K workspace.
    units = work_units(m, n, 128, 128, 2)
    cfg = GemmConfig(128, 128, sms, 2, units, k // 128)
    compare(f"split into {units} x {k // 128}", ffi_fp8_gemm(*ops, cfg, jnp.float32), jnp.float32)
    # 128x192 pairs with the epilogue overlap, the last few units split in 2.
    units = min(work_units(m, n, 128, 192, 2), 7)
    cfg = GemmConfig(128, 192, sms, 2, units, 2, overlap=True)
    compare(f"128x192 pairs, overlap, split {units} x 2", ffi_fp8_gemm(*ops, cfg, jnp.float32),
            jnp.float32)
    # 192x128 (three consumer warpgroups) pairs with the overlap, the last few units split in 3;
    # its last row tile leaves whole consumer slices past M.
    units = min(work_units(m, n, 192, 128, 2), 5)
    cfg = GemmConfig(192, 128, sms, 2, units, min(3, k // 128), overlap=True)
    compare(f"192x128 pairs, overlap, split {units} x {cfg.splits}",
            ffi_fp8_gemm(*ops, cfg, jnp.bfloat16), jnp.bfloat16)
    return failures


def check_grouped(seed):
    """Contiguous (ragged sizes, a tail, a negative size) and masked (0 / partial / Mmax rows)."""
    from jax_ds.ops.grouped_gemm import grouped_fp8_gemm, grouped_fp8_gemm_reference
    from jax_ds.ops.grouped_gemm import masked_grouped_fp8_gemm, masked_grouped_fp8_gemm_reference

    failures = []
    cpu = jax.devices("cpu")[0]
    for name, fn, ref_fn, a_shape, sizes in (
            ("grouped", grouped_fp8_gemm, grouped_fp8_gemm_reference, (700,), [300, -2, 1, 333]),
            ("masked", masked_grouped_fp8_gemm, masked_grouped_fp8_gemm_reference, (4, 200),
             [0, 200, 77, 500])):
        ka, kb = jax.random.split(jax.random.key(seed))
        a8, sa = quantize_fp8(jax.random.normal(ka, (*a_shape, 384)), block=(1, 128), impl="xla")
        b8, sb = quantize_fp8(jax.random.normal(kb, (4, 300, 384)), block=(128, 128), impl="xla")
        ops = [a8, sa, b8, sb, jnp.asarray(sizes, jnp.int32)]
        # Under jit the sizes are traced: the out-of-range ones reach the kernel (concrete ones
        # would raise a ValueError first), and reference and kernel both clamp them.
        ref = np.asarray(jax.jit(lambda *o: ref_fn(*o, out_dtype=jnp.float32))(
            *jax.device_put(ops, cpu)))
        out = np.asarray(jax.jit(lambda *o: fn(*o, out_dtype=jnp.float32, impl="ffi"))(*ops))
        diff = calc_diff(out, ref)
        print(f"  {name} {a_shape}: calc_diff {diff:.2e}", flush=True)
        if not np.isfinite(out).all() or not diff < tolerance(jnp.float32, 384):
            failures.append(f"{name}: calc_diff {diff:.2e}")
    return failures


def main():
    for target in ("jax_ds_quantize_fp8", "jax_ds_fp8_gemm", "jax_ds_grouped_fp8_gemm",
                   "jax_ds_masked_grouped_fp8_gemm"):
        why = _ffi.unavailable_reason(target)
        if why:
            print(f"{target} unavailable: {why}")
            return 2
    failures = []
    for i, (m, n, k) in enumerate(SHAPES):
        print(f"{m}x{n}x{k}:", flush=True)
        failures += check(m, n, k, seed=i)
    failures += check_grouped(seed=len(SHAPES))
    for f in failures:
        print("FAILED:", f)
    print("sanitize_gemm:", "FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
