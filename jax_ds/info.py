"""What jax-ds sees on this machine: `python -m jax_ds.info`.

Prints the jax / jaxlib versions, the backend and its devices, whether the kernel library
`jax_ds._C` was built and loaded (and why not), its XLA FFI API version against jaxlib's, and the
path every op takes under impl="auto".
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jaxlib

import jax_ds
from jax_ds import _ffi


def _version(v) -> str:
    return "unknown" if v is None else ".".join(str(p) for p in v)


def op_paths() -> dict[str, str]:
    """op name -> its path under impl="auto" here: "kernel <target>" or "reference (why)"."""
    forced = os.environ.get(_ffi.ENV_IMPL, "").strip().lower() == "xla"
    paths = {}
    for op, target in sorted(_ffi.OPS.items()):
        if forced:
            why = f"{_ffi.ENV_IMPL}=xla"
        elif not _ffi.STATUS.loaded:
            why = "jax_ds._C not loaded"
        else:
            why = _ffi.unavailable_reason(target)
        paths[op] = f"kernel {target}" if why is None else f"reference ({why})"
    return paths


def collect() -> dict:
    """Everything `main` prints, as a dict (used by tests and benchmark headers)."""
    s = _ffi.STATUS
    devices = jax.devices()
    return {
        "jax_ds": jax_ds.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id}" + (f" {d.device_kind}" if d.device_kind != d.platform
                                               else "") for d in devices],
        "num_sms": _ffi.num_sms() if jax.default_backend() == "gpu" else None,
        "library_built": s.built,
        "library_loaded": s.loaded,
        "library_error": s.error,
        "library_ffi_api": _version(s.api_version) if s.built else None,
        "jaxlib_ffi_api": _version(s.jaxlib_api_version),
        "targets": list(s.targets),
        "env_impl": os.environ.get(_ffi.ENV_IMPL) or None,
        "ops": op_paths(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jax_ds.info",
        description="jax/jaxlib versions, backend and devices, whether jax_ds's CUDA library "
                    "loaded (and its FFI API against jaxlib's), and which path each op takes "
                    'under impl="auto".')
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    devices = info["devices"]
    shown = ", ".join(devices[:4]) + (", ..." if len(devices) > 4 else "")
    print(f"jax-ds {info['jax_ds']}   jax {info['jax']}   jaxlib {info['jaxlib']}")
    print(f"backend: {info['backend']}, {len(devices)} device(s): {shown}")
    if info["num_sms"]:
        print(f"SMs per device: {info['num_sms']}")
    print(f"library: {'jax_ds._C loaded' if info['library_loaded'] else info['library_error']}")
    print(f"XLA FFI API: library {info['library_ffi_api'] or '-'}, "
          f"jaxlib {info['jaxlib_ffi_api']}")
    if info["targets"]:
        print(f"FFI targets: {', '.join(info['targets'])}")
    if info["env_impl"]:
        print(f"{_ffi.ENV_IMPL}={info['env_impl']}")
    print('ops under impl="auto":')
    width = max(len(op) for op in info["ops"])
    for op, path in info["ops"].items():
        print(f"  {op:<{width}}  {path}")
    n_kernel = sum(p.startswith("kernel") for p in info["ops"].values())
    print(f"{n_kernel}/{len(info['ops'])} ops run CUDA kernels here")


if __name__ == "__main__":
    main()
