"""jax-ds: DeepSeek's open infrastructure, native to JAX.

FP8 GEMM, MLA decode and MoE kernels as XLA FFI custom calls (CUDA, built when nvcc is found at
install time) beside pure-JAX references that run everywhere. `python -m jax_ds.info` tells which
path each op takes on this machine.
"""

__version__ = "0.1.0"

from jax_ds import ops
from jax_ds.ops import (GemmConfig, dequantize_fp8, fp8_gemm, fp8_gemm_reference, fp8_linear,
                        gemm_config, mla_decode, mla_decode_reference, quantize_fp8,
                        quantize_fp8_reference)

__all__ = [
    "GemmConfig",
    "__version__",
    "dequantize_fp8",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_linear",
    "gemm_config",
    "mla_decode",
    "mla_decode_reference",
    "ops",
    "quantize_fp8",
    "quantize_fp8_reference",
]
