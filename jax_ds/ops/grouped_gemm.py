"""Grouped FP8 GEMMs for MoE experts (DeepGEMM's contiguous and masked layouts).

Contiguous: the rows of `a` are sorted by expert; group g owns rows
[sum(group_sizes[:g]), sum(group_sizes[:g+1])) and multiplies them by b[g]. Any group sizes,
zeros included, no alignment (DeepGEMM demands 128-row-aligned groups); rows past
sum(group_sizes) come out zero. Masked (decode): a [G, Mmax, K] with masked_m[g] valid rows.

The CUDA kernels are the dense FP8 GEMM's body with a grouped tile scheduler (every CTA derives
the row segments of the groups from `group_sizes` / `masked_m` on the device, so sizes may be
traced values; rows are cut into tiles from each group's first row, no alignment needed).
`grouped_fp8_linear` is the training op (custom_vjp, FP8 forward and dgrad).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops._checks import (BLOCK_K, FP8, cdiv, check_dtype, check_ndim, check_out_dtype,
                                check_shape, concrete, gemm_out_dtype, pad_to)
from jax_ds.ops._vma import match_vma, vary_like
from jax_ds.ops.gemm import (TILES, gemm_config, matmul_operands, matmul_precision,
                             wide_over_long_k)
from jax_ds.ops.quant import dequantize_fp8, quantize_fp8

GROUPED_TARGET = "jax_ds_grouped_fp8_gemm"
MASKED_TARGET = "jax_ds_masked_grouped_fp8_gemm"
BF16_TARGET = "jax_ds_grouped_bf16_gemm"  # grouped_linear's forward and dgrad (bf16 operands)
_ffi.declare_op("grouped_linear", BF16_TARGET)
_ffi.declare_op("grouped_fp8_gemm", GROUPED_TARGET)
_ffi.declare_op("masked_grouped_fp8_gemm", MASKED_TARGET)
_ffi.declare_op("grouped_fp8_linear", GROUPED_TARGET)
_HIGHEST = jax.lax.Precision.HIGHEST
MAX_GROUPS = 1024  # the kernels keep per-group tables in shared memory
GROUPED_TILES = tuple(t for t in TILES if t != (128, 192))  # the walk of grouped_config's base
WIDE_GAIN = 1.05  # 128x192 over 128x128 per tile-column, where both fill their waves (H200)
SHORT_K_BLOCKS = 16  # up to this many k blocks, grouped_config weighs tiles, not whole waves
# Short-K 128x192 grids of fewer waves than this run as single CTAs. The masked n7168 k2048
# shapes of 256-1024 rows a group (304 tiles, 2.3 waves on 132 SMs) ran 0.4-2.1% and 2.3-4.5%
# faster without pairs in the two later H200 sweeps (-short-k, 2026-12-04), 0.5-2.0% slower in
# the first; at 1216 tiles (masked 32x128) the two were within 0.3%, at 2432 (32x256) and more
# the pairs were ahead in 7 of 8 cases (-0.3% to +3.3%). A small, not settled gain.
SHORT_K_PAIR_WAVES = 4
# The dense rule's long-K limit (gemm.WIDE_MAX_KBLOCKS) for the grouped widening to 128x192: past
# this many k blocks, 128x192 only where its columns are as full as 128x128's. None: off. Where
# the dense kernel's 128x128 pairs ran 4-8% ahead of 128x192 at long K (H100, 2026-12-06), the
# grouped ones did not: 15 moved the eight `bench moe` shapes it changes by -2.2..+1.4%
# device-bound, 5 of 8 slower (benchmarks/results/lib-ab-h100-2026-12-06-grouped-long-k.json,
# NOTES-moe). Off; kept so the A/B reruns after a kernel change.
GROUPED_WIDE_MAX_KBLOCKS: int | None = None


def grouped_config(rows_per_group: int, g: int, n: int, k: int, num_sms: int):
    """The tile for a grouped GEMM: `gemm_config` of one group (its expected rows) with G times
    the column blocks, since the groups' tiles share the SMs (walking GROUPED_TILES); 128-row
    tiles from 128 rows per group on, then 128x192 instead of 128x128 where its waves take less
    time (waves x 192 / WIDE_GAIN against waves x 128: 128x192 leaves a worse last wave on the
    n4096 shapes of <= 1024 rows a group), and 2-CTA clusters for 128-row tiles whose column
    blocks pair up. Up to SHORT_K_BLOCKS k blocks the waves are counted as fractions: the masked
    n7168 k2048 shapes of 256-1024 rows a group ran 0.6-4.1% faster at 128x192 pairs than at
    128x128 pairs, although 128x192 leaves 3 whole waves there against 4; and there (fewer than
    SHORT_K_PAIR_WAVES waves of 128x192 tiles) single CTAs beat the pairs.
    From H200 tile sweeps of the `bench moe` shapes (benchmarks/results/
    gemm-grouped-tiles-sweep-h200-2026-12-03.json, its -short-k.json and the masked
    ...-2026-12-04-masked-tail-split.json; tests/test_grouped_gemm.py checks the pick is within 3%
    of each shape's fastest tile in each): 128x192 pairs were fastest on the
    6 contiguous shapes (+5-12% over the former 128x128 pick) and pairs gained 2-7% on most
    masked shapes; on the H100 (gemm-grouped-tiles-sweep-h100-2026-11-25.json) pairs had gained
    only from 2048 rows a group on."""
    cfg = gemm_config(max(rows_per_group, 1), n * g, k, num_sms, tiles=GROUPED_TILES)
    block_m, block_n = (128 if rows_per_group >= 128 else cfg.block_m), cfg.block_n
    tiles = lambda bn: g * cdiv(rows_per_group, 128) * cdiv(n, bn)
    short_k = k <= SHORT_K_BLOCKS * BLOCK_K
    if block_m == 128 and block_n == 128:
        # measured, not derived: with short tiles a partial last wave cost about its share
        # (presumably the persistent CTAs' tiles drift apart and the waves overlap)
        waves = lambda bn: tiles(bn) / num_sms if short_k else cdiv(tiles(bn), num_sms)
        if (waves(192) * 192 / WIDE_GAIN < waves(128) * 128
                and not wide_over_long_k(n, k // BLOCK_K, GROUPED_WIDE_MAX_KBLOCKS)):
            block_n = 192
    # partners sit in the same group; an odd column-block count would leave every pair's second
    # tile of the last column past N (computed, not stored), as for the dense rule
    cluster_n = 2 if block_m == 128 and cdiv(n, block_n) % 2 == 0 else 1
    if short_k and block_n == 192 and tiles(192) < SHORT_K_PAIR_WAVES * num_sms:
        cluster_n = 1  # short-K 128x192 grids of a few waves ran faster as single CTAs
    return type(cfg)(block_m, block_n, num_sms, cluster_n)


# Masked kernels of 128x128 / 128x192 tiles with shared-memory pointers typed as shared (the
# dense kernel's +2-5%; the contiguous kernels lost 3-5% with it). To be measured.
MASKED_SHARED_SPACE = True


def ffi_grouped_fp8_gemm(target, a, a_scale, b, b_scale, sizes, out_shape, out_dtype, cfg,
                         shared_space=None):
    """The grouped (GROUPED_TARGET) or masked (MASKED_TARGET) kernel's custom call with an
    explicit tile (tests, tile sweeps); no validation. shared_space (masked only; None:
    MASKED_SHARED_SPACE)."""
    attrs = cfg.attrs()
    if target == MASKED_TARGET:
        shared = MASKED_SHARED_SPACE if shared_space is None else shared_space
        attrs["shared_space"] = np.int32(bool(shared))
    return _ffi.kernel_call(target, jax.ShapeDtypeStruct(out_shape, out_dtype),
                            a, a_scale, b, b_scale, sizes, **attrs)


def _unsupported(g):
    """Why the kernels cannot take G groups (None when they can)."""
    return f"the kernel takes at most {MAX_GROUPS} groups, got {g}" if g > MAX_GROUPS else None


def _check_grouped_b(op, b, b_scale, k):
    check_ndim(op, "b", b, 3, "[G, N, K]")
    check_dtype(op, "b", b, (FP8,))
    check_dtype(op, "b_scale", b_scale, (jnp.float32,))
    g, n, kb = b.shape
    if kb != k:
        raise ValueError(f"{op}: b has shape {tuple(b.shape)}, expected (G, N, {k}): its K must "
                         f"match a's")
    if g < 1 or n < 1:
        raise ValueError(f"{op}: b must have G >= 1 and N >= 1, got shape {tuple(b.shape)}")
    check_shape(op, "b_scale", b_scale, (g, cdiv(n, BLOCK_K), cdiv(k, BLOCK_K)),
                "[G, ceil(N/128), ceil(K/128)]")
    return g, n


def _check_k(op, a, k):
    if k < 1:
        raise ValueError(f"{op}: K must be >= 1, got a of shape {tuple(a.shape)}")


def check_grouped(op, a, a_scale, b, b_scale, group_sizes, out_dtype):
    """Validates the contiguous layout; returns (m, n, k, g)."""
    check_ndim(op, "a", a, 2, "[M, K]")
    check_dtype(op, "a", a, (FP8,))
    check_dtype(op, "a_scale", a_scale, (jnp.float32,))
    check_out_dtype(op, out_dtype)
    m, k = a.shape
    if m < 1:
        raise ValueError(f"{op}: a must have M >= 1 rows, got shape {tuple(a.shape)}")
    _check_k(op, a, k)
    check_shape(op, "a_scale", a_scale, (m, cdiv(k, BLOCK_K)), "[M, ceil(K/128)]")
    g, n = _check_grouped_b(op, b, b_scale, k)
    check_shape(op, "group_sizes", group_sizes, (g,), "[G]")
    check_dtype(op, "group_sizes", group_sizes, (jnp.int32,))
    _check_concrete_sizes(op, group_sizes, m)
    return m, n, k, g


def check_masked(op, a, a_scale, b, b_scale, masked_m, out_dtype):
    """Validates the masked layout; returns (g, mmax, n, k)."""
    check_ndim(op, "a", a, 3, "[G, Mmax, K]")
    check_dtype(op, "a", a, (FP8,))
    check_dtype(op, "a_scale", a_scale, (jnp.float32,))
    check_out_dtype(op, out_dtype)
    g, mmax, k = a.shape
    if mmax < 1:
        raise ValueError(f"{op}: a must have Mmax >= 1, got shape {tuple(a.shape)}")
    _check_k(op, a, k)
    check_shape(op, "a_scale", a_scale, (g, mmax, cdiv(k, BLOCK_K)), "[G, Mmax, ceil(K/128)]")
    gb, n = _check_grouped_b(op, b, b_scale, k)
    if gb != g:
        raise ValueError(f"{op}: b has {gb} groups, a has {g}: shapes {tuple(b.shape)} and "
                         f"{tuple(a.shape)}")
    check_shape(op, "masked_m", masked_m, (g,), "[G]")
    check_dtype(op, "masked_m", masked_m, (jnp.int32,))
    valid = concrete(masked_m)  # None when traced: the kernel clamps them
    if valid is not None:
        if valid.size and (valid.min() < 0 or valid.max() > mmax):
            raise ValueError(f"{op}: masked_m must lie in [0, Mmax = {mmax}], got min "
                             f"{valid.min()}, max {valid.max()}")
    return g, mmax, n, k


def _sequential_vmap(f):
    """f (of arrays) with a vmap rule that loops over the batch (`lax.scan`), as the kernels'
    ffi_calls do (vmap_method="sequential").

    jax's batching rule for ragged_dot_general takes only operands that are all batched along
    axis 0 ("ragged_dot vmap over any dim but 0 - NYI"), so a vmap over a with b or the group
    sizes shared failed, and nested vmaps fail even when every operand is batched. Here the
    unbatched operands are closed over, and f inside the loop is wrapped again, so an outer vmap
    meets this rule once more instead of the primitive's.
    """
    f = jax.custom_batching.custom_vmap(f)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        def one(_, batched_args):
            it = iter(batched_args)
            return None, f(*[next(it) if batched else x for x, batched in zip(args, in_batched)])

        xs = [x for x, batched in zip(args, in_batched) if batched]
        out = jax.lax.scan(one, None, xs, length=axis_size)[1]
        return out, jax.tree.map(lambda _: True, out)

    return f


def _ragged_dot(lhs, rhs, sizes, dims, precision=_HIGHEST):
    """jax.lax.ragged_dot_general with float32 accumulation (HIGHEST unless told) that runs under
    any jax.vmap and keeps its reverse-mode gradient (a custom_vmap has none of its own:
    custom_vjp goes outside)."""
    dot = lambda lhs, rhs, sizes: jax.lax.ragged_dot_general(
        lhs, rhs, sizes, dims, precision=precision, preferred_element_type=jnp.float32)
    dot_vjp = lambda lhs, rhs, sizes, ct: jax.vjp(lambda l, r: dot(l, r, sizes), lhs, rhs)[1](ct)
    forward, backward = _sequential_vmap(dot), _sequential_vmap(dot_vjp)

    @jax.custom_vjp
    def ragged(lhs, rhs, sizes):
        return forward(lhs, rhs, sizes)

    def ragged_bwd(res, ct):
        return (*backward(*res, ct), None)  # no gradient for the (integer) sizes

    ragged.defvjp(lambda *args: (forward(*args), args), ragged_bwd)
    return ragged(lhs, rhs, sizes)


def _clamped_sizes(group_sizes, m: int):
    """Negative sizes count as empty groups, and groups are cut at row M (the contract asks for
    sum(group_sizes) <= M; a traced violation must not read past a). The running sum saturates
    at M, so sizes near 2^31 cannot wrap it around in int32 (the kernel sums in 64 bits)."""
    sizes = jnp.clip(group_sizes, 0, m).astype(jnp.int32)
    ends = jax.lax.associative_scan(lambda x, y: jnp.minimum(x + y, m), sizes)
    return jnp.diff(ends, prepend=0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(5,))
def _grouped_reference(a, a_scale, b, b_scale, group_sizes, out_dtype):
    a32 = dequantize_fp8(a, a_scale, (1, BLOCK_K))
    b32 = dequantize_fp8(b, b_scale, (BLOCK_K, BLOCK_K))
    sizes = _clamped_sizes(group_sizes, a.shape[0])
    out = grouped_matmul(a32, b32, sizes, windows=True, weight_copies=False)
    return out.astype(out_dtype)


def grouped_fp8_gemm_reference(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16):
    """Pure-JAX contiguous grouped FP8 GEMM, float32 math. Equivalent to the following JAX code:

      a32 = dequantize_fp8(a, a_scale, (1, 128)); b32 = dequantize_fp8(b, b_scale, (128, 128))
      start = 0
      for g in range(G):
          out[start:start + group_sizes[g]] = a32[start:start + group_sizes[g]] @ b32[g].T
          start += group_sizes[g]
      out[start:] = 0
    """
    check_grouped("grouped_fp8_gemm_reference", a, a_scale, b, b_scale, group_sizes, out_dtype)
    return _grouped_reference(a, a_scale, b, b_scale, group_sizes, np.dtype(out_dtype))


def grouped_fp8_gemm(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16,
                     impl="auto"):
    """Contiguous grouped FP8 GEMM: row block g of a times b[g]^T.

    Args:
      a: float8_e4m3fn [M, K], rows sorted by group; any K >= 1 (the kernel path zero-pads K
        to a multiple of 128: exact, at the cost of a copy of a and b).
      a_scale: float32 [M, ceil(K/128)] (per 1x128 group).
      b: float8_e4m3fn [G, N, K]; b_scale: float32 [G, ceil(N/128), ceil(K/128)] (128x128
        blocks).
      group_sizes: int32 [G], each >= 0, sum <= M; zeros allowed, no alignment needed.
        Concrete values are checked (ValueError); traced ones are clamped as the kernel does
        (a negative size counts as 0, groups are cut at row M), never read past a.
      out_dtype: bfloat16 or float32.

    Returns:
      out_dtype [M, N]; rows at or past sum(group_sizes) are zero.
    """
    op = "grouped_fp8_gemm"
    m, n, k, g = check_grouped(op, a, a_scale, b, b_scale, group_sizes, out_dtype)
    if _ffi.resolve_impl(op, GROUPED_TARGET, impl, _unsupported(g)) == "xla":
        return _grouped_reference(a, a_scale, b, b_scale, group_sizes, np.dtype(out_dtype))
    a, b = pad_to(a, 1, BLOCK_K), pad_to(b, 2, BLOCK_K)  # the kernel's K: whole 128-blocks
    cfg = grouped_config(cdiv(m, g), g, n, a.shape[1], _ffi.num_sms())
    return ffi_grouped_fp8_gemm(GROUPED_TARGET, a, a_scale, b, b_scale, group_sizes, (m, n),
                                out_dtype, cfg)


@functools.partial(jax.jit, static_argnums=(5,))
def _masked_reference(a, a_scale, b, b_scale, masked_m, out_dtype):
    a32 = dequantize_fp8(a, a_scale, (1, BLOCK_K))
    b32 = dequantize_fp8(b, b_scale, (BLOCK_K, BLOCK_K))
    out = jnp.einsum("GMK,GNK->GMN", a32, b32, precision=_HIGHEST,
                     preferred_element_type=jnp.float32)
    valid = jnp.arange(a.shape[1])[None, :] < masked_m[:, None]
    return jnp.where(valid[:, :, None], out, 0.0).astype(out_dtype)


def masked_grouped_fp8_gemm_reference(a, a_scale, b, b_scale, masked_m, *,
                                      out_dtype=jnp.bfloat16):
    """Pure-JAX masked grouped FP8 GEMM, float32 math. Equivalent to the following JAX code:

      out[g, :masked_m[g]] = dequant(a[g, :masked_m[g]]) @ dequant(b[g]).T;  out[g, masked_m[g]:] = 0
    """
    check_masked("masked_grouped_fp8_gemm_reference", a, a_scale, b, b_scale, masked_m, out_dtype)
    return _masked_reference(a, a_scale, b, b_scale, masked_m, np.dtype(out_dtype))


def masked_grouped_fp8_gemm(a, a_scale, b, b_scale, masked_m, *, out_dtype=jnp.bfloat16,
                            impl="auto"):
    """Masked grouped FP8 GEMM (decode): static [G, Mmax, K] shapes, masked_m[g] valid rows.

    Args:
      a: float8_e4m3fn [G, Mmax, K]; a_scale: float32 [G, Mmax, ceil(K/128)]; any K >= 1 (as
        `grouped_fp8_gemm`).
      b: float8_e4m3fn [G, N, K]; b_scale: float32 [G, ceil(N/128), ceil(K/128)].
      masked_m: int32 [G], valid rows of each group (0..Mmax). Concrete values are checked
        (ValueError); traced ones are clamped to [0, Mmax].
      out_dtype: bfloat16 or float32.

    Returns:
      out_dtype [G, Mmax, N]; rows at or past masked_m[g] are zero.
    """
    op = "masked_grouped_fp8_gemm"
    g, mmax, n, k = check_masked(op, a, a_scale, b, b_scale, masked_m, out_dtype)
    if _ffi.resolve_impl(op, MASKED_TARGET, impl, _unsupported(g)) == "xla":
        return _masked_reference(a, a_scale, b, b_scale, masked_m, np.dtype(out_dtype))
    a, b = pad_to(a, 2, BLOCK_K), pad_to(b, 2, BLOCK_K)  # the kernel's K: whole 128-blocks
    cfg = grouped_config(mmax, g, n, a.shape[2], _ffi.num_sms())
    return ffi_grouped_fp8_gemm(MASKED_TARGET, a, a_scale, b, b_scale, masked_m, (g, mmax, n),
                                out_dtype, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_fp8_linear(x, w, group_sizes, impl):
    return _grouped_fp8_linear_fwd(x, w, group_sizes, impl)[0]


def _grouped_fp8_linear_fwd(x, w, group_sizes, impl):
    x_fp8, x_scale = quantize_fp8(pad_to(x, 1, BLOCK_K), block=(1, BLOCK_K), impl=impl)
    w_fp8, w_scale = quantize_fp8(pad_to(w, 2, BLOCK_K), block=(BLOCK_K, BLOCK_K), impl=impl)
    y = grouped_fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, group_sizes,
                         out_dtype=gemm_out_dtype(x.dtype), impl=impl).astype(x.dtype)
    return y, (x, w, w_fp8, w_scale, group_sizes)


def _grouped_fp8_linear_bwd(impl, res, dy):
    x, w, w_fp8, w_scale, group_sizes = res
    k = x.shape[-1]
    # dgrad: dx[rows of g] = dy @ w[g]; each expert's 128x128 blocks transpose exactly, and N is
    # zero-padded to whole blocks on both sides (changes no sum).
    dy_fp8, dy_scale = quantize_fp8(pad_to(dy, 1, BLOCK_K), block=(1, BLOCK_K), impl=impl)
    w_fp8_GKN = pad_to(jnp.swapaxes(w_fp8, 1, 2), 2, BLOCK_K)
    dx = grouped_fp8_gemm(dy_fp8, dy_scale, w_fp8_GKN, jnp.swapaxes(w_scale, 1, 2), group_sizes,
                          out_dtype=jnp.float32, impl=impl)[:, :k]
    dw = grouped_wgrad(dy, x, _clamped_sizes(group_sizes, x.shape[0]))
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_grouped_fp8_linear.defvjp(_grouped_fp8_linear_fwd, _grouped_fp8_linear_bwd)


# The rule between windows and XLA's ragged dot counts bytes moved as FLOPs at this rate: the
# 16-bit matrix rate over the HBM bandwidth (about 780 TFLOP/s over 3.35 / 4.8 TB/s on an
# H100 / H200). A count for the rule, not a measurement (NOTES-moe, "The wgrad ...").
FLOP_PER_BYTE = 200
# The windows' one big extra buffer ([windows, N, K]: the weight copies of the forward, the
# float32 products of the wgrad; about 2 G N K elements) stays under this. The wgrad then runs
# its windows in chunks (a scan adding each chunk's products into dw); the forward leaves it to
# the ragged dot, whose only buffer is its output. (G = 32 of n4096 k7168 would want 7.5 GB of
# wgrad products at once, G = 256 of n2048 k7168 15-30 GB.) 4 GiB: the forward of 32 x 256 rows,
# n4096 k7168 (3.8 GB of weight copies) ran 4.9x the ragged dot on the H200 (NOTES-moe).
WINDOW_BUFFER_BYTES = 4 << 30


def group_windows(m: int, g: int) -> tuple[int, int]:
    """(window rows W, window count) for M rows in G groups: W = ceil(M / G) and G + ceil(M / W)
    windows, enough for any sizes (group g needs ceil(m_g / W) of them, and
    sum_g ceil(m_g / W) <= sum_g (m_g / W + 1) <= M / W + G)."""
    window = max(1, cdiv(m, g))
    return window, g + cdiv(m, window)


def uses_windows(kind: str, m: int, g: int, n: int, k: int) -> bool:
    """Whether the windows cost less than XLA's ragged dot (G dense GEMMs over all M rows), both
    counted in FLOPs with their extra bytes at `FLOP_PER_BYTE`. 16-bit operands.

    kind "wgrad" (dw[g] = dy[rows of g]^T x[rows of g], dy [M, N], x [M, K]): the windows' rows of
    GEMM, their gathered rows of dy and x (written and read: 4 (N + K) bytes a row) and each
    window's float32 [N, K] product (written and read: 8 N K bytes).
    kind "forward" (out[rows of g] = x[rows of g] @ w[g]^T, x [M, K], w [G, N, K]): the windows'
    rows of GEMM, their gathered rows of x (4 K bytes a row), each window's copy of its weight
    (4 N K bytes), each window row's float32 product (8 N bytes) and the output rows (2 N).
    The wgrad's products past `WINDOW_BUFFER_BYTES` go in chunks, whose adds into dw cost another
    8 N K bytes a window. Never for G <= 2 (the windows then do as many rows of GEMM as the ragged
    dot), nor for a forward whose weight copies would pass `WINDOW_BUFFER_BYTES`.

    E.g. the wgrad of n4096 k7168 takes the windows from about M = 3783 rows at G = 4 and 3450 at
    G = 32 (chunked); that of n512 k1024 never at G = 4 (the gathers outweigh the GEMM rows saved),
    from about 2200 at G = 16 and 1852 at G = 32 (the window size's rounding makes the rule flip
    back for a few M just past such a point).
    """
    if kind not in ("wgrad", "forward"):
        raise ValueError(f"uses_windows: kind must be 'wgrad' or 'forward', got {kind!r}")
    if g < 1 or m < 1:
        return False
    window, count = group_windows(m, g)
    rows = count * window
    if kind == "wgrad":
        chunked = count * n * k * 4 > WINDOW_BUFFER_BYTES
        extra = rows * 4 * (n + k) + count * (16 if chunked else 8) * n * k
    elif count * n * k * 2 > WINDOW_BUFFER_BYTES:
        return False
    else:
        extra = rows * (4 * k + 8 * n) + count * 4 * n * k + m * 2 * n
    return 2 * n * k * rows + FLOP_PER_BYTE * extra < 2 * n * k * g * m


def _windows(sizes, m: int, g: int):
    """The windows of `group_windows(m, g)` over rows contiguous by group, `sizes` clamped [G]:
    (group [count] int32, G for a spare window; rows [count, W] int32, the row of each window
    slot, M where the slot holds no row)."""
    window, count = group_windows(m, g)
    per_group = (sizes + window - 1) // window                            # windows of each group
    ends = jnp.cumsum(per_group)
    w = jnp.arange(count, dtype=jnp.int32)
    group = jnp.searchsorted(ends, w, side="right").astype(jnp.int32)
    safe = jnp.minimum(group, g - 1)
    first = ends[safe] - per_group[safe]                                  # group's first window
    row0 = (jnp.cumsum(sizes) - sizes)[safe] + (w - first) * window
    left = jnp.where(group < g, sizes[safe] - (w - first) * window, 0)    # rows in the window
    offs = jnp.arange(window, dtype=jnp.int32)
    rows = jnp.where(offs[None, :] < left[:, None], row0[:, None] + offs[None, :], m)
    return group, rows


def _window_of_rows(sizes, m: int, g: int):
    """For each row r of M: (window, slot) holding it in `_windows`, and whether a group owns r."""
    window, _ = group_windows(m, g)
    r = jnp.arange(m, dtype=jnp.int32)
    ends = jnp.cumsum(sizes)
    group = jnp.minimum(jnp.searchsorted(ends, r, side="right"), g - 1).astype(jnp.int32)
    local = r - (ends - sizes)[group]
    per_group = (sizes + window - 1) // window
    first = jnp.cumsum(per_group) - per_group
    return first[group] + local // window, local % window, r < ends[-1]


def _batched_dot(spec, a, b, precision):
    """einsum with float32 accumulation and result; 16-bit operands go as they are (XLA:CPU takes
    batched 16-bit dots with a float32 result too: checked in jax 0.11.2 and 0.12)."""
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _take_rows(x, rows):
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)  # row index M: zeros


def grouped_wgrad(dy, x, sizes, windows: bool | None = None):
    """float32 [G, N, K]: dw[g] = dy[rows of g]^T x[rows of g], the rows contiguous by group.

    Not XLA's ragged dot: on the GPU that costs one dense GEMM over all M rows per group (NOTES-moe,
    "The wgrad of grouped_fp8_linear"), G x M rows in all. Here each group's rows are cut into
    windows of W = ceil(M / G) rows (its last window masked), a static count of them
    (`group_windows`), gathered into [windows, W, *]; one batched dot gives each window's product,
    and an add into dw by the windows' groups sums them (in chunks past `WINDOW_BUFFER_BYTES`):
    about 2 M rows of GEMM for any G (G + M when M < G), and a float32 [windows, N, K] buffer
    (about twice dw). Where that costs more than the ragged dot (G <= 2, or few rows:
    `uses_windows("wgrad", ...)`), the ragged dot runs.
    The operands go in x's dtype with float32 accumulation (`gemm.matmul_operands`). `sizes`:
    clamped [G] (non-negative, sum <= M). `windows` True / False forces one way (tests); None:
    the rule.
    """
    (m, k), n, g = x.shape, dy.shape[1], sizes.shape[0]
    if m == 0 or g == 0:
        return jnp.zeros((g, n, k), jnp.float32)
    dy, x = matmul_operands(dy, x)
    precision = matmul_precision(x.dtype)
    if not (uses_windows("wgrad", m, g, n, k) if windows is None else windows):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=(0,), rhs_group_dimensions=())
        return _ragged_dot(dy, x, sizes, dims, precision=precision)
    group, rows = _windows(sizes, m, g)
    # windows a chunk: all of them unless their float32 products would pass the buffer cap; the
    # last chunk's spare windows (group G, every row index M) gather zeros and are dropped
    count = group.shape[0]
    per_chunk = max(1, min(count, WINDOW_BUFFER_BYTES // (4 * n * k)))
    chunks = cdiv(count, per_chunk)
    pad = chunks * per_chunk - count
    group = jnp.pad(group, (0, pad), constant_values=g).reshape(chunks, per_chunk)
    rows = jnp.pad(rows, ((0, pad), (0, 0)), constant_values=m).reshape(chunks, per_chunk, -1)
    dy_w, x_w = _take_rows(dy, rows), _take_rows(x, rows)               # [chunks, per_chunk, W, *]

    def add_chunk(dw, chunk):  # spare windows (group G) are dropped
        groups, a, b = chunk
        return dw.at[groups].add(_batched_dot("wmn,wmk->wnk", a, b, precision), mode="drop",
                                 indices_are_sorted=True), None

    zeros = vary_like(jnp.zeros((g, n, k), jnp.float32), dy_w, x_w)  # a carry typed as its adds
    return jax.lax.scan(add_chunk, zeros, (group, dy_w, x_w))[0]


def grouped_matmul(x, w, sizes, *, transpose_w: bool = False, windows: bool | None = None,
                   weight_copies: bool = True):
    """float32 [M, N]: out[rows of g] = x[rows of g] @ w[g]^T (w [G, N, K]; with transpose_w,
    x[rows of g] @ w[g] for w [G, K, N]), rows contiguous by group, rows past the sum zero.
    `sizes`: clamped [G]. x and w in one dtype; float32 at HIGHEST, 16-bit with float32
    accumulation.

    By windows where `uses_windows("forward", ...)` says they cost less than XLA's ragged dot (as
    `grouped_wgrad`): each window's rows of x and a copy of its group's weight, one batched dot,
    and each row read back from its window's product. `windows` forces one way (tests).
    Each row meets its own group's weight only; XLA's ragged dot (on XLA:CPU at least) is a
    masked product over every group's weight, so there a NaN or Inf in the weight of a group
    with no rows reaches every row (0 * NaN).

    weight_copies=False (with windows): the windows one after another (jax.lax.map), each
    against its group's weight in place: no [windows, N, K] buffer, for any size (the FP8
    grouped reference, `grouped_fp8_gemm_reference`). The ragged dot copies no weight, so the
    flag changes nothing there.
    """
    m, g = x.shape[0], w.shape[0]
    n, k = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    if m == 0 or g == 0:
        return jnp.zeros((m, n), jnp.float32)
    precision = matmul_precision(x.dtype)
    if not (uses_windows("forward", m, g, n, k) if windows is None else windows):
        contract = 1 if transpose_w else 2
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((1,), (contract,)), ((), ())),
            lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))
        return _ragged_dot(x, w, sizes, dims, precision=precision)  # vmaps with w shared too
    group, rows = _windows(sizes, m, g)
    group = jnp.minimum(group, g - 1)  # spare windows: zero rows of x, never read back
    if weight_copies:
        part = _batched_dot("wmk,wkn->wmn" if transpose_w else "wmk,wnk->wmn",
                            _take_rows(x, rows), jnp.take(w, group, axis=0), precision)
    else:
        spec = "mk,kn->mn" if transpose_w else "mk,nk->mn"
        part = jax.lax.map(lambda gr: _batched_dot(spec, _take_rows(x, gr[1]), w[gr[0]],
                                                   precision), (group, rows))
    win, slot, owned = _window_of_rows(sizes, m, g)  # part: [count, W, N]
    return jnp.where(owned[:, None], part[win, slot], 0.0)


def _check_grouped_linear(op: str, x, w, group_sizes) -> None:
    floats = (jnp.bfloat16, jnp.float16, jnp.float32)
    check_dtype(op, "x", x, floats)
    check_dtype(op, "w", w, floats)
    check_ndim(op, "x", x, 2, "[M, K]")
    check_ndim(op, "w", w, 3, "[G, N, K]")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: expected x [M, K] and w [G, N, K], got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    check_shape(op, "group_sizes", group_sizes, (w.shape[0],), "[G]")
    check_dtype(op, "group_sizes", group_sizes, (jnp.int32,))
    _check_concrete_sizes(op, group_sizes, x.shape[0])


def _check_concrete_sizes(op, group_sizes, m):
    """Concrete group sizes must be >= 0 with sum <= M (ValueError); traced ones are clamped."""
    sizes = concrete(group_sizes)  # None when traced: the kernel clamps them
    if sizes is not None:
        sizes = sizes.astype(np.int64)
        if sizes.size and (sizes.min() < 0 or sizes.sum() > m):
            raise ValueError(f"{op}: group_sizes must be >= 0 with sum <= M = {m}, got min "
                             f"{sizes.min()}, sum {sizes.sum()}")


def grouped_linear(x, w, group_sizes, *, impl="auto"):
    """out[rows of g] = x[rows of g] @ w[g]^T in x's dtype (bf16 / f16 / f32; w cast to it),
    rows sorted by group, rows past sum(group_sizes) zero: the bf16 expert FFN's GEMM.

    `jax.lax.ragged_dot` semantics with the weight in [G, N, K] ("NT") layout, without its cost on
    GPUs (one dense GEMM over all M rows per group): forward, dgrad and wgrad go by windows of
    each group's rows (`grouped_matmul`, `grouped_wgrad`) where those cost less. float32
    accumulation throughout (float32 operands at HIGHEST). No gradient to group_sizes (int32
    [G], >= 0 with sum <= M: a ValueError when concrete; traced, negative sizes count as empty
    and groups are cut at row M). Reverse mode only (a custom_vjp, as `grouped_fp8_linear`):
    jax.jvp / jacfwd refuse it. Empty x or w (M, N, K or G = 0) give zeros.

    impl: "auto" runs the forward and dgrad through the bf16 grouped kernel
    (`jax_ds_grouped_bf16_gemm`: the FP8 grouped kernel's body on bf16 operands, float32
    accumulation, one rounding to bf16) when x is bf16, K and N are multiples of 8 and the
    library is loaded on a CUDA GPU; else (and with "xla") the windows / ragged dot above. The
    dgrad reads w as it is (the kernel's MN-major B). The wgrad is the windows' batched dot
    either way.
    """
    op = "grouped_linear"
    _check_grouped_linear(op, x, w, group_sizes)
    use_kernel = False
    if min(x.shape) > 0 and min(w.shape) > 0:
        use_kernel = _ffi.resolve_impl(op, BF16_TARGET, impl, _bf16_unsupported(x, w)) == "ffi"
    else:
        _ffi.resolve_impl(op, BF16_TARGET, impl)  # impl checked; empty operands give zeros
    x, w = match_vma(x, w)  # inside shard_map: w's cotangent varies wherever x does
    return _grouped_linear(x, w, group_sizes, use_kernel)


def _bf16_unsupported(x, w):
    """Why the bf16 grouped kernel cannot take x [M, K] and w [G, N, K], or None."""
    g, n, k = w.shape
    if np.dtype(x.dtype) != np.dtype(jnp.bfloat16):
        return f"grouped_linear: the kernel takes bf16 x, got {np.dtype(x.dtype).name}"
    if k % 8 or n % 8:
        return f"grouped_linear: the kernel needs K and N multiples of 8, got K {k}, N {n}"
    if g > MAX_GROUPS or x.shape[0] >= 2**31 or g * max(n, k) >= 2**31 - 512:
        return (f"grouped_linear: the kernel takes up to {MAX_GROUPS} groups and int32 sizes, "
                f"got x {tuple(x.shape)}, w {tuple(w.shape)}")
    return None


def bf16_grouped_config(m: int, g: int, n: int, k: int, num_sms: int):
    """The bf16 kernel's tile for a [m, k] x [g, n, k] grouped GEMM: `grouped_config` with K in
    bytes (a k block is 64 bf16, 128 bytes, as FP8's is 128 FP8), mapped onto the bf16 kernel's
    compiled tiles (64x64, 64x128 single; 128x128, 128x192 single or pairs). Not tuned on a GPU
    yet."""
    cfg = grouped_config(cdiv(m, max(g, 1)), g, n, 2 * k, num_sms)
    if cfg.block_m == 64:
        return type(cfg)(64, 128 if cfg.block_n >= 128 else 64, num_sms, 1)
    block_n = 192 if cfg.block_n == 192 else 128
    # pairs only where the (possibly widened) tile's column blocks pair up, as grouped_config's
    # rule: an odd count leaves every pair's second tile past N (computed, not stored)
    cluster_n = cfg.cluster_n if cdiv(n, block_n) % 2 == 0 else 1
    return type(cfg)(128, block_n, num_sms, cluster_n)


def ffi_grouped_bf16_gemm(a, b, sizes, out_dtype, cfg=None, *, transpose_b=False):
    """out [M, N] = the bf16 grouped kernel on a bf16 [M, K], b bf16 [G, N, K] (out = a @ b[g]^T
    per group) or, transpose_b, [G, K, N] (out = a @ b[g]: the dgrad reads the forward's weight
    as it is, N a multiple of 8), and sizes int32 [G] (the contiguous layout; rows past the
    groups zero); cfg None: bf16_grouped_config. No validation (grouped_linear's)."""
    m = a.shape[0]
    g, n, k = (b.shape[0], b.shape[2], b.shape[1]) if transpose_b else b.shape
    cfg = cfg or bf16_grouped_config(m, g, n, k, _ffi.num_sms())
    return _ffi.kernel_call(BF16_TARGET, jax.ShapeDtypeStruct((m, n), out_dtype), a, b,
                            sizes.astype(jnp.int32), **cfg.attrs(),
                            transpose_b=np.int32(bool(transpose_b)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_linear(x, w, group_sizes, use_kernel):
    return _grouped_linear_fwd(x, w, group_sizes, use_kernel)[0]


def _grouped_linear_fwd(x, w, group_sizes, use_kernel):
    sizes = _clamped_sizes(group_sizes, x.shape[0])
    if use_kernel:
        y = ffi_grouped_bf16_gemm(x, w.astype(jnp.bfloat16), sizes, x.dtype)
    else:
        y = grouped_matmul(x, w.astype(x.dtype), sizes).astype(x.dtype)
    return y, (x, w, sizes)


def _grouped_linear_bwd(use_kernel, res, dy):
    x, w, sizes = res
    if use_kernel:  # dx = dy @ w[g]: w [G, N, K] read MN-major, as it is
        dx = ffi_grouped_bf16_gemm(dy.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sizes,
                                   x.dtype, transpose_b=True)
    else:
        dx = grouped_matmul(dy.astype(x.dtype), w.astype(x.dtype), sizes, transpose_w=True)
    dw = grouped_wgrad(dy.astype(x.dtype), x, sizes)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_grouped_linear.defvjp(_grouped_linear_fwd, _grouped_linear_bwd)


def grouped_fp8_linear(x, w, group_sizes, *, impl="auto"):
    """y[rows of g] = x[rows of g] @ w[g]^T with FP8 operands quantized on the fly, differentiable.

    The expert-FFN building block. Forward and dgrad run `grouped_fp8_gemm` (x and dy per 1x128,
    w per 128x128 block, transposed exactly for dgrad); wgrad is XLA (not FP8 yet): a batched
    dot over windows of each group's rows (`grouped_wgrad`), on the operands in x's dtype with
    float32 accumulation. K and N need no alignment (zero-padded, exact).

    Args:
      x: bf16 / f16 / f32 [M, K], rows sorted by group.
      w: bf16 / f16 / f32 [G, N, K].
      group_sizes: int32 [G], >= 0 with sum <= M (a ValueError when concrete; traced ones are
        clamped as in `grouped_fp8_gemm`).

    Returns:
      x.dtype [M, N], zero past sum(group_sizes). No gradient flows to group_sizes.
    """
    op = "grouped_fp8_linear"
    _check_grouped_linear(op, x, w, group_sizes)
    if min(x.shape) < 1 or min(w.shape) < 1:
        raise ValueError(f"{op}: x and w must be non-empty, got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    _ffi.resolve_impl(op, GROUPED_TARGET, impl)  # impl checked and the path logged as this op
    x, w = match_vma(x, w)  # inside shard_map: w's cotangent varies wherever x does
    return _grouped_fp8_linear(x, w, group_sizes, impl)
