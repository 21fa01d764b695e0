"""Argument validation shared by every op, run in Python before anything is lowered.

Each error names the op, the argument, what was seen and what was expected, e.g.
`fp8_gemm: a_scale has shape (64, 3), expected (64, 2) = [M, K/128]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK_K = 128  # DeepSeek-V3 FP8 scaling granularity along K (and N for weights)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (bool is an int subclass): a static size or count."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def concrete(x):
    """x's values as a numpy array, or None when x is traced (its values only exist at run time):
    value checks run on the concrete ones, the kernels clamp the traced ones."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_array(op: str, name: str, x) -> None:
    """An array (jax, numpy, or a tracer), not a list or a scalar of Python's."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise TypeError(f"{op}: {name} must be an array (jax.Array or numpy), got "
                        f"{type(x).__name__}")


def check_ndim(op: str, name: str, x, ndim: int | Sequence[int], what: str = "") -> None:
    check_array(op, name, x)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed) + (f" {what}" if what else "")
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(x.shape)}")


def check_min_ndim(op: str, name: str, x, ndim: int, what: str = "") -> None:
    check_array(op, name, x)
    if x.ndim < ndim:
        raise ValueError(
            f"{op}: {name} must have at least {ndim} dims{f' {what}' if what else ''}, "
            f"got shape {tuple(x.shape)}")


def check_dtype(op: str, name: str, x, allowed: Sequence) -> None:
    check_array(op, name, x)
    allowed_dt = [np.dtype(d) for d in allowed]
    if np.dtype(x.dtype) not in allowed_dt:
        names = ", ".join(_dtype_name(d) for d in allowed_dt)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {_dtype_name(x.dtype)} "
                        f"(shape {tuple(x.shape)})")


def check_shape(op: str, name: str, x, expected: tuple[int, ...], what: str = "") -> None:
    check_array(op, name, x)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, expected {tuple(expected)}"
                         f"{f' = {what}' if what else ''}")


def check_block(op: str, block) -> tuple[int, int]:
    choices = ((1, BLOCK_K), (BLOCK_K, BLOCK_K))
    try:
        block = tuple(block)
    except TypeError:  # an int, None, ...: not a pair
        raise ValueError(f"{op}: block must be one of {choices}, got {block!r}") from None
    check_choice(op, "block", block, choices)
    return block


def check_out_dtype(op: str, out_dtype) -> np.dtype:
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {out_dtype!r}") from None
    if dt not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float32)):
        raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {_dtype_name(dt)}")
    return dt


def check_floating(op: str, name: str, x) -> None:
    """x (an array or a dtype) holds floating-point values."""
    is_array = hasattr(x, "shape")
    try:
        dt = np.dtype(x.dtype if is_array else x)
        ok = jnp.issubdtype(dt, jnp.floating)
    except TypeError:
        dt, ok = x, False
    if not ok:
        raise TypeError(f"{op}: {name} must be a floating-point {'array' if is_array else 'dtype'}"
                        f", got {dt.name if isinstance(dt, np.dtype) else repr(dt)}")


def check_quantize_input(op: str, x, block: tuple[int, int]) -> None:
    """x is [..., K] for (1, 128) blocks and [..., M, K] for (128, 128) blocks; K >= 1."""
    check_dtype(op, "x", x, (jnp.bfloat16, jnp.float16, jnp.float32))
    if block[0] == 1:
        check_min_ndim(op, "x", x, 1, "[..., K]")
    else:
        check_min_ndim(op, "x", x, 2, "[..., M, K] for block (128, 128)")
    if x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have K = x.shape[-1] >= 1, got shape {tuple(x.shape)}")


def check_fp8_gemm(op: str, a, a_scale, b, b_scale, out_dtype) -> tuple[int, int, int]:
    """Validates an "NT" FP8 GEMM and returns (m, n, k).

    a [M, K] e4m3fn, a_scale [M, ceil(K/128)] f32, b [N, K] e4m3fn, b_scale [ceil(N/128),
    ceil(K/128)] f32; any K >= 1 (the kernel paths zero-pad K to a multiple of 128: exact).
    """
    check_ndim(op, "a", a, 2, "[M, K]")
    check_ndim(op, "b", b, 2, "[N, K]")
    check_dtype(op, "a", a, (FP8,))
    check_dtype(op, "b", b, (FP8,))
    check_dtype(op, "a_scale", a_scale, (jnp.float32,))
    check_dtype(op, "b_scale", b_scale, (jnp.float32,))
    check_out_dtype(op, out_dtype)
    (m, k), (n, kb) = a.shape, b.shape
    if kb != k:
        raise ValueError(f"{op}: b has shape {tuple(b.shape)}, expected (N, {k}): its K must match "
                         f"a's (a has shape {tuple(a.shape)})")
    if m < 1 or n < 1:
        raise ValueError(f"{op}: M and N must be >= 1, got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if k < 1:
        raise ValueError(f"{op}: K must be >= 1, got a {tuple(a.shape)}, b {tuple(b.shape)}")
    check_shape(op, "a_scale", a_scale, (m, cdiv(k, BLOCK_K)), "[M, ceil(K/128)]")
    check_shape(op, "b_scale", b_scale, (cdiv(n, BLOCK_K), cdiv(k, BLOCK_K)),
                "[ceil(N/128), ceil(K/128)]")
    return m, n, k


def prod(shape) -> int:
    return math.prod(int(d) for d in shape)


def pad_to(x, axis: int, multiple: int):
    """Zero-pads `axis` of x up to a multiple of `multiple` (exact for a GEMM's reduction axis)."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def gemm_out_dtype(dtype):
    """The FP8 GEMM output dtype for activations of `dtype`: bf16 stays bf16, the rest f32."""
    return jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
