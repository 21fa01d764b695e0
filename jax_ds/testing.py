"""Test helpers shared by the CPU and GPU tests: one similarity metric, one tolerance table, and
a reader of the dots in a jaxpr.

`calc_diff` is DeepGEMM's metric, 1 - 2<x,y> / (|x|^2 + |y|^2) = |x - y|^2 / (|x|^2 + |y|^2),
computed in float64: 0 for identical tensors, about e^2 / 2 for a relative error e per element.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

# Largest calc_diff allowed, by what limits the accuracy of the result being checked. For results
# of a reduction over k, `tolerance` scales these by sqrt(k / 128) (random-walk rounding growth).
TOLERANCE = {
    # Rounding the output to bf16 (8 significant bits): diff ~ 2^-18 / 3 ~ 1.3e-6.
    "bfloat16": 1e-5,
    # float32 output; allows Hopper wgmma's reduced-precision FP8 accumulation inside a 128 block.
    "float32": 1e-6,
    # FP8 e4m3 quantization of both operands vs exact math (DeepGEMM's bound): ~3% relative error.
    "fp8": 1e-3,
}


def calc_diff(x, y) -> float:
    """1 - 2 sum(x y) / sum(x^2 + y^2), in float64. Both inputs are converted to numpy."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    denominator = float(np.sum(x * x + y * y))
    if denominator == 0.0:
        return 0.0
    return 1.0 - 2.0 * float(np.sum(x * y)) / denominator


def tolerance(kind, k: int = 128) -> float:
    """TOLERANCE[kind] (kind: "bfloat16", "float32", "fp8" or a dtype) scaled by sqrt(k / 128)."""
    name = kind if isinstance(kind, str) else np.dtype(kind).name
    return TOLERANCE[name] * max(1.0, math.sqrt(k / 128))


def dot_equations(jaxpr, primitive):
    """(operand dtypes, precision, output dtype, output shape) of every `primitive` equation in
    a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            out = eqn.outvars[0].aval
            found.append((tuple(str(v.aval.dtype) for v in eqn.invars[:2]),
                          eqn.params.get("precision"), str(out.dtype), tuple(out.shape)))
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += dot_equations(inner, primitive)
    return found


def xla_flags_parse(flags: str) -> tuple[bool, str]:
    """Whether this jaxlib's XLA knows every flag in `flags` (an XLA_FLAGS string): a fresh CPU
    process runs one computation under them (an unknown flag aborts it). Returns (ok, the tail
    of its stderr)."""
    code = "import jax.numpy as jnp; print(float(jnp.ones(2).sum()))"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    return done.returncode == 0 and done.stdout.strip() == "2.0", done.stderr[-500:]


def load_script(path):
    """A script file (the repository's scripts/*.py) imported as a module, for its tests;
    registered in sys.modules under its file name first (dataclasses look their module up)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
