"""jax-ds ops: each public function sits beside its pure-JAX `<op>_reference`.

Every op takes `impl="auto" | "ffi" | "xla"`; JAX_DS_IMPL=xla routes all of them to the references.
"""

from jax_ds.ops.gemm import GemmConfig, fp8_gemm, fp8_gemm_reference, fp8_linear, gemm_config
from jax_ds.ops.grouped_gemm import (grouped_fp8_gemm, grouped_fp8_gemm_reference,
                                     grouped_fp8_linear, grouped_linear,
                                     masked_grouped_fp8_gemm,
                                     masked_grouped_fp8_gemm_reference)
from jax_ds.ops.mla import dequantize_kv_fp8, mla_decode, mla_decode_reference, quantize_kv_fp8
from jax_ds.ops.moe import moe_dispatch_layout, moe_permute, moe_unpermute
from jax_ds.ops.quant import dequantize_fp8, quantize_fp8, quantize_fp8_reference

__all__ = [
    "GemmConfig",
    "dequantize_fp8",
    "dequantize_kv_fp8",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_linear",
    "gemm_config",
    "grouped_fp8_gemm",
    "grouped_fp8_gemm_reference",
    "grouped_fp8_linear",
    "grouped_linear",
    "masked_grouped_fp8_gemm",
    "masked_grouped_fp8_gemm_reference",
    "mla_decode",
    "mla_decode_reference",
    "moe_dispatch_layout",
    "moe_permute",
    "moe_unpermute",
    "quantize_fp8",
    "quantize_kv_fp8",
    "quantize_fp8_reference",
]
