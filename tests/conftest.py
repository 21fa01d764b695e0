"""Shared pytest setup: 8 host devices for mesh tests, and the `gpu` marker's skip rule.

Tests marked `@pytest.mark.gpu` run only when jax's default backend is a CUDA GPU and the kernel
library jax_ds._C loaded; elsewhere they are skipped with the reason, so CPU-only installs pass.
"""

import os

# Before jax initialises its backends: mesh tests want 8 CPU devices (harmless on a GPU host).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    from jax_ds import _ffi

    if jax.default_backend() != "gpu":
        return f"needs a CUDA GPU (jax backend is {jax.default_backend()!r})"
    if not _ffi.STATUS.loaded:
        return f"needs the kernel library: {_ffi.status_line()}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = gpu_skip_reason()
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def no_kernels(monkeypatch):
    """Every FFI kernel reads as unavailable, on any host: the tests of what impl="ffi" does
    without a kernel (and of the fallback logging) hold on GPU machines too."""
    from jax_ds import _ffi

    monkeypatch.setattr(_ffi, "unavailable_reason", lambda target: "kernels disabled by the test")
