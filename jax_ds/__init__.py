"""jax-ds: DeepSeek's open infrastructure, native to JAX.

FP8 GEMM, MLA decode and MoE kernels as XLA FFI custom calls (CUDA, built when nvcc is found at
install time) beside pure-JAX references that run everywhere. `python -m jax_ds.info` tells which
path each op takes on this machine.

Every op of `jax_ds.ops` is here too. The model, parallelism and storage packages
(`jax_ds.models`, `jax_ds.parallel`, `jax_ds.storage`) load on first use, so that
`import jax_ds` does not import Flax or Orbax.
"""

import importlib

__version__ = "0.1.0"

from jax_ds import ops
from jax_ds.ops import (GemmConfig, dequantize_fp8, dequantize_kv_fp8, fp8_gemm,
                        fp8_gemm_reference, fp8_linear, gemm_config, grouped_fp8_gemm,
                        grouped_fp8_gemm_reference, grouped_fp8_linear, grouped_linear,
                        masked_grouped_fp8_gemm, masked_grouped_fp8_gemm_reference, mla_decode,
                        mla_decode_reference, moe_dispatch_layout, moe_permute, moe_unpermute,
                        quantize_fp8, quantize_fp8_reference, quantize_kv_fp8)

_LAZY = ("models", "parallel", "storage")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jax_ds.{name}")
    raise AttributeError(f"module 'jax_ds' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(["__version__", "ops", *_LAZY, *ops.__all__])
