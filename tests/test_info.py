"""jax_ds.info and the library status in _ffi, on a machine without the CUDA kernels."""

import importlib.machinery
import json
import subprocess
import sys
import types

import jax
import pytest

import jax_ds
from jax_ds import _ffi, info


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "jax_ds.info"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert f"jax-ds {jax_ds.__version__}" in out and f"jax {jax.__version__}" in out
    assert "XLA FFI API" in out
    for op in ("quantize_fp8", "fp8_gemm", "fp8_linear"):
        assert op in out
    report = json.loads(subprocess.run([sys.executable, "-m", "jax_ds.info", "--json"],
                                       capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert report["jax"] == jax.__version__ and "fp8_gemm" in report["ops"]


def test_collect_reports_every_op():
    report = info.collect()
    assert report["backend"] == jax.default_backend()
    assert set(report["ops"]) >= {"quantize_fp8", "fp8_gemm", "fp8_linear"}
    if jax.default_backend() != "gpu":
        assert all(path.startswith("reference") for path in report["ops"].values())


def test_jaxlib_api_version_is_parsed():
    major, minor = _ffi.jaxlib_ffi_api_version()
    assert major >= 0 and minor >= 1


@pytest.mark.parametrize("library, jaxlib, ok", [
    ((0, 4), (0, 4), True),
    ((0, 3), (0, 4), True),
    ((0, 5), (0, 4), False),
    ((1, 0), (0, 4), False),
    ((0, 4), None, True),
])
def test_api_mismatch(library, jaxlib, ok):
    reason = _ffi.api_mismatch(library, jaxlib)
    assert (reason is None) == ok
    if not ok:
        assert f"built against XLA FFI API {library[0]}.{library[1]}" in reason
        assert "rebuild with `pip install -e .`" in reason


def test_no_kernel_without_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU behaviour")
    assert not _ffi.kernel_available("jax_ds_fp8_gemm")
    assert _ffi.unavailable_reason("jax_ds_fp8_gemm")
    assert isinstance(_ffi.STATUS.error, str) or _ffi.STATUS.loaded


def test_env_switch_in_info(monkeypatch):
    monkeypatch.setenv("JAX_DS_IMPL", "xla")
    assert all(p == "reference (JAX_DS_IMPL=xla)" for p in info.op_paths().values())


def _fake_library(monkeypatch, api_version, fail=False):
    """Puts a stand-in jax_ds._C in sys.modules and records what would be registered."""
    lib = types.ModuleType("jax_ds._C")
    lib.__spec__ = importlib.machinery.ModuleSpec("jax_ds._C", None)
    lib.ffi_api_version = lambda: api_version
    capsule = object()  # never called: registration is recorded, not performed

    def registrations():
        if fail:
            raise RuntimeError("no CUDA driver")
        return {"jax_ds_fp8_gemm": capsule, "jax_ds_quantize_fp8": capsule}

    lib.registrations = registrations
    registered = []
    monkeypatch.setitem(sys.modules, "jax_ds._C", lib)
    monkeypatch.setattr(jax.ffi, "register_ffi_target",
                        lambda name, fn, platform: registered.append((name, platform)))
    return registered


def test_load_registers_every_target(monkeypatch):
    registered = _fake_library(monkeypatch, _ffi.jaxlib_ffi_api_version())
    status = _ffi._load()
    assert status.built and status.loaded and status.error is None
    assert status.targets == ("jax_ds_fp8_gemm", "jax_ds_quantize_fp8")
    assert sorted(registered) == [("jax_ds_fp8_gemm", "CUDA"), ("jax_ds_quantize_fp8", "CUDA")]


def test_load_refuses_newer_ffi_api(monkeypatch):
    major, minor = _ffi.jaxlib_ffi_api_version()
    registered = _fake_library(monkeypatch, (major, minor + 1))
    status = _ffi._load()
    assert status.built and not status.loaded and not registered
    assert f"built against XLA FFI API {major}.{minor + 1}" in status.error


def test_load_failure_is_recorded(monkeypatch):
    _fake_library(monkeypatch, _ffi.jaxlib_ffi_api_version(), fail=True)
    status = _ffi._load()
    assert status.built and not status.loaded
    assert "RuntimeError: no CUDA driver" in status.error


def test_package_surface():
    """`import jax_ds` alone reaches every name DESIGN.md lists: the ops at the top, the model,
    parallel and storage packages (and parallel's eplb / pipeline modules) on first use, without
    importing Flax or Orbax before then (checked in a fresh interpreter)."""
    import subprocess
    import sys
    code = ("import sys, jax_ds\n"
            "assert 'flax' not in sys.modules and 'orbax' not in sys.modules\n"
            "assert all(getattr(jax_ds, n) is getattr(jax_ds.ops, n) for n in jax_ds.ops.__all__)\n"
            "for name in jax_ds.__all__: getattr(jax_ds, name)\n"
            "jax_ds.parallel.eplb.rebalance_experts, jax_ds.parallel.pipeline.run\n"
            "jax_ds.parallel.pipeline.dualpipe, jax_ds.storage.CheckpointManager\n"
            "jax_ds.models.load_hf_checkpoint, jax_ds.parallel.expert.ep_dispatch\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    import jax_ds
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jax_ds.nope
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jax_ds.parallel.nope
