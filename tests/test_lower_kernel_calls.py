"""scripts/lower_kernel_calls.py: every kernel call site lowers for CUDA on this CPU machine,
and every kernel target appears."""
import contextlib
import io
import runpy
from pathlib import Path

import pytest

from jax_ds import _ffi
from jax_ds.ops import moe


def test_every_kernel_call_site_lowers_for_cuda(monkeypatch):
    monkeypatch.setattr(_ffi, "resolve_impl", _ffi.resolve_impl)  # the script replaces them:
    monkeypatch.setattr(moe, "_use_kernel", moe._use_kernel)      # restored after the test
    script = Path(__file__).parents[1] / "scripts" / "lower_kernel_calls.py"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(script), run_name="__main__")
    text = out.getvalue()
    targets = {"quantize_fp8", "fp8_gemm", "grouped_fp8_gemm", "masked_grouped_fp8_gemm",
               "moe_layout", "moe_permute", "moe_permute_fp8", "moe_unpermute", "mla_decode",
               "grouped_bf16_gemm"}
    for t in targets:
        assert f"custom_call @jax_ds_{t}(" in text, t
    assert text.count("=====") == 11 and "loc(" not in text


if __name__ == "__main__":
    pytest.main([__file__])
