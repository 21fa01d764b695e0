"""Loads the compiled kernel library `jax_ds._C` (when it was built) and registers its FFI targets.

`jax_ds._C` is a nanobind module built by CMake when nvcc was found at install time. It exposes
`registrations() -> {target name: PyCapsule}` and `ffi_api_version() -> (major, minor)`, the XLA FFI
API its handlers were compiled against. Every target is registered for the CUDA platform at import.

What happened is kept in `STATUS` (printed by `python -m jax_ds.info`), and each op asks
`resolve_impl` which path to take: the kernel, or its pure-JAX reference. The choice is made in
Python at trace time and logged once per op on the "jax_ds" logger, so no fallback is silent.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import re

import jax

log = logging.getLogger("jax_ds")

IMPLS = ("auto", "ffi", "xla")
ENV_IMPL = "JAX_DS_IMPL"  # "xla" routes every op to its reference (debugging, bisecting)


@dataclasses.dataclass
class LibraryStatus:
    built: bool = False  # jax_ds._C exists in the installed package
    loaded: bool = False  # imported, API version compatible, targets registered
    error: str | None = None  # why not loaded
    api_version: tuple[int, int] | None = None  # XLA FFI API the library was compiled against
    jaxlib_api_version: tuple[int, int] | None = None  # XLA FFI API of the installed jaxlib
    targets: tuple[str, ...] = ()  # registered FFI target names


def jaxlib_ffi_api_version() -> tuple[int, int] | None:
    """(major, minor) from the `#define XLA_FFI_API_MAJOR/MINOR` lines of the installed jaxlib."""
    try:
        path = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
        with open(path) as f:
            text = f.read()
    except (OSError, AttributeError):
        return None
    found = [re.search(rf"#define\s+XLA_FFI_API_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR")]
    if not all(found):
        return None
    return int(found[0].group(1)), int(found[1].group(1))


def api_mismatch(library: tuple[int, int], jaxlib: tuple[int, int] | None) -> str | None:
    """Why a library built against FFI API `library` cannot run on this jaxlib, or None if it can.

    XLA accepts handlers of an older or equal minor version of its major; a newer minor means the
    library was compiled against newer headers than the running jaxlib understands.
    """
    if jaxlib is None:
        return None
    if library[0] != jaxlib[0] or library[1] > jaxlib[1]:
        return (f"built against XLA FFI API {library[0]}.{library[1]}, this jaxlib speaks "
                f"{jaxlib[0]}.{jaxlib[1]}: rebuild with `pip install -e .`")
    return None


def _load() -> LibraryStatus:
    status = LibraryStatus(jaxlib_api_version=jaxlib_ffi_api_version())
    if importlib.util.find_spec("jax_ds._C") is None:
        status.error = "jax_ds._C not built (no nvcc at install, or JAX_DS_CUDA=OFF): pure JAX"
        return status
    status.built = True
    try:
        lib = importlib.import_module("jax_ds._C")
        status.api_version = tuple(int(v) for v in lib.ffi_api_version())
        mismatch = api_mismatch(status.api_version, status.jaxlib_api_version)
        if mismatch:
            status.error = f"jax_ds._C {mismatch}"
            return status
        registrations = dict(lib.registrations())
        for name, capsule in registrations.items():
            # On a CPU-only jaxlib this only queues the handler; it never runs there.
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    except Exception as e:  # ImportError (e.g. missing libcudart), bad capsule, XLA refusal
        status.error = f"jax_ds._C failed to load: {type(e).__name__}: {e}"
        return status
    status.loaded = True
    status.targets = tuple(sorted(registrations))
    return status


STATUS = _load()

# op name -> FFI target; each op module declares its ops at import (read by jax_ds.info).
OPS: dict[str, str] = {}


def declare_op(op: str, target: str) -> None:
    OPS[op] = target


def status_line() -> str:
    s = STATUS
    if s.loaded:
        return f"jax_ds._C loaded ({len(s.targets)} targets, XLA FFI API {s.api_version})"
    return s.error or "jax_ds._C not loaded"


def kernel_available(target: str) -> bool:
    """True when `target` is registered from jax_ds._C and the default backend is a CUDA GPU."""
    return STATUS.loaded and target in STATUS.targets and jax.default_backend() == "gpu"


def unavailable_reason(target: str) -> str | None:
    """Why `kernel_available(target)` is False (None when it is True)."""
    if not STATUS.loaded:
        return status_line()
    if target not in STATUS.targets:
        return f"jax_ds._C has no FFI target {target!r} (has: {', '.join(STATUS.targets)})"
    if jax.default_backend() != "gpu":
        return f"the default jax backend is {jax.default_backend()!r}, the kernels need a CUDA GPU"
    return None


_logged: set[tuple[str, str]] = set()


def _log_once(op: str, path: str, why: str) -> None:
    if (op, path) not in _logged:
        _logged.add((op, path))
        log.info("jax_ds.%s: %s (%s)", op, path, why)


def resolve_impl(op: str, target: str, impl: str, unsupported: str | None = None) -> str:
    """Returns "ffi" or "xla" for one call of `op`, given the caller's `impl` and JAX_DS_IMPL.

    JAX_DS_IMPL=xla wins over everything, `impl="ffi"` included, so a whole program can be moved to
    the references without editing it. `unsupported` is the op's reason why the kernel cannot take
    this call's inputs (a dtype, a size past a kernel limit), or None: like a missing kernel, it
    sends "auto" to the reference (logged once); "ffi" raises RuntimeError for a missing kernel
    and ValueError for unsupported inputs.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    env = os.environ.get(ENV_IMPL, "").strip().lower()
    if env not in ("", "auto", "xla"):
        raise ValueError(f"{ENV_IMPL} must be 'xla', 'auto' or unset, got {env!r}")
    if env == "xla":
        _log_once(op, "reference", f"{ENV_IMPL}=xla")
        return "xla"
    if impl == "xla":
        _log_once(op, "reference", 'impl="xla"')
        return "xla"
    missing = unavailable_reason(target)
    why = missing or unsupported
    if why is None:
        _log_once(op, f"kernel {target}", f'impl="{impl}"')
        return "ffi"
    if impl == "ffi":
        if missing:
            raise RuntimeError(f'{op}(impl="ffi"): the FFI kernel {target!r} is unavailable: {why}')
        raise ValueError(f'{op}(impl="ffi"): {why}')
    _log_once(op, "reference", why)
    return "xla"


@functools.cache
def _device_num_sms(device) -> int:
    return int(getattr(device, "core_count", None) or 132)


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132, an H100/H800 SXM, when unknown)."""
    return _device_num_sms(jax.devices()[0])


def kernel_call(target: str, result_types, *operands, **attrs):
    """`jax.ffi.ffi_call(target, result_types)(*operands, **attrs)` (vmapped sequentially), with
    its results typed inside shard_map as varying like the operands (`_vma.vary_like`: jax types
    an ffi_call's results there as varying over no axis). Every kernel goes through here."""
    from jax_ds.ops._vma import vary_like  # ops import this module

    call = jax.ffi.ffi_call(target, result_types, vmap_method="sequential")
    return vary_like(call(*operands, **attrs), *operands)
