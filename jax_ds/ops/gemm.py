"""Dense FP8 GEMM with DeepSeek-V3 block scales, and an FP8 linear layer built on it.

`fp8_gemm` is "NT": out[m, n] = sum_k a[m, k] * b[n, k], each operand dequantized by its block
scales (a: one per row and 128 columns, b: one per 128x128 block). The CUDA kernel is a persistent
grid over (ceil(M/block_m) x ceil(N/block_n)) output tiles, optionally in clusters of two CTAs
that compute neighbouring tiles of one row band and multicast its A rows to each other;
`gemm_config` picks the tile and the cluster size. When the tiles leave a short last wave, its
tiles are computed as K slices on the idle SMs (split-K of the tail: the slices' float32 partial
sums meet in a workspace, and the last slice to finish adds them in slice order, so the result
does not depend on which finished last).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds import _ffi
from jax_ds.ops._checks import (BLOCK_K, cdiv, check_dtype, check_fp8_gemm, gemm_out_dtype,
                                pad_to, prod)
from jax_ds.ops._vma import match_vma
from jax_ds.ops.quant import dequantize_fp8, quantize_fp8

TARGET = "jax_ds_fp8_gemm"
_ffi.declare_op("fp8_gemm", TARGET)
_ffi.declare_op("fp8_linear", TARGET)

# (block_m, block_n) compiled into the library, widest first (gemm_config walks them in this
# order); block_n divides the 128-wide B scale block, so a tile sees one B scale per k-block,
# except 128x192 (two scale blocks per tile; one accumulator set, its k blocks issued, waited and
# promoted in turn). 128-row tiles run two consumer warpgroups.
TILES = ((128, 192), (128, 128), (128, 64), (128, 32), (128, 16), (64, 128), (64, 64), (64, 32),
         (64, 16))
# Compiled into the dense GEMM only (not the grouped kernels): 192x128, three consumer
# warpgroups of one accumulator set each (512 threads, 152 registers a consumer); gemm_config
# takes it in place of a 128-row pick (TALL_MAX_KBLOCKS below), never in its walk.
TALL = (192, 128)
DENSE_EXTRA_TILES = (TALL,)
DENSE_TILES = TILES + DENSE_EXTRA_TILES  # every tile of the dense GEMM
CLUSTERS = (1, 2)  # CTAs per cluster along N (2: the pair shares A, loaded once from L2)
FILL_FRACTION = 0.75  # a tile shape is "wide enough" once its tiles cover this share of the SMs
# Split-K of the last, partial wave (dense GEMM): a slice gets at least SPLIT_MIN_KBLOCKS k blocks,
# the partial sums' round trip is estimated at SPLIT_COST_KBLOCKS k blocks' time, and the split is
# used only when it saves SPLIT_MIN_GAIN of the estimated time.
# 16: on the H100 (2026-12-06, sustained, 128x128 pairs) slices of 8 and 4 k blocks (1024x7168x2048,
# 1536x7168x2048) lost 9% and 4% against no split, slices of 19-64 gained 2-23% (k 7168, 16384).
SPLIT_MIN_KBLOCKS = 16
SPLIT_COST_KBLOCKS = 2
SPLIT_MIN_GAIN = 0.07  # (4096x7168x2048, 128x192: 6% by the count, 1% slower measured)
# The 128x192 tile's epilogue overlap from this many k blocks on (H200 sweep of 2026-12-03:
# +4-7% at 12 to 128 k blocks, -12% at 4).
OVERLAP_MIN_KBLOCKS = 8
OVERLAP_TILES = ((128, 192), TALL)  # the tiles of one accumulator set, with the overlap
# At m > 128, 128x192 only up to this many k blocks where its columns are emptier than 128x128's
# (N's tail); None: no such limit (the rule the 2026-12-03 sweeps fitted). In the H200 sweep of
# 2026-12-05 (kernel times, after the kernel changes of the eleventh to fifteenth sessions) 15
# picks the faster tile at all seven m >= 4096 shapes (128x128 pairs +1..+4.6% at
# 4096x{4096x7168, 7168x2048, 7168x16384}); sustained on the H100 (2026-12-06, scripts/lib_ab.py,
# 3 rounds, device-bound): 4096x4096x7168 +1.6%, 4096x7168x2048 +1.4%, 8192^3 +0.4%,
# 4096x7168x16384 -1.4%, 1024x4096x7168 +20% (128x192's 1.3 waves, split, against 1.9 waves of
# pairs). benchmarks/NOTES-gemm.md, twenty-first session. With bench gemm's repeats and 16 input
# sets (the benchmark takes 4 at these shapes; twenty-fifth session): +20% / +7% / +3% at
# 1024x4096x7168 / 2048x4096x7168 / 2048x7168x16384, -1..-3% at 8192^3, 16384x4096x7168,
# 1024x7168x16384, 4096x7168x16384 -0.3% and -3.9% in two calls.
WIDE_MAX_KBLOCKS: int | None = 15
# ... except where 128x192's tiles fill whole waves (768x4096x7168, 132 tiles: 9% ahead of
# 128x128's 1.45 waves, split, on the H100 in the same A/B).
WIDE_KEEP_FULL_WAVES = True
# At m <= 128, a grid of fewer tiles than SHORT_GRID_FILL x the SMs (n = 576, DeepSeek-V3's kv_a
# projection: 36 tiles of 64x16) leaves most SMs, and with them most of HBM's bandwidth, idle:
# every unit is cut into as many K slices as fit one wave, each of at least SHORT_GRID_MIN_KBLOCKS
# k blocks (split_plan's short grid). None: off. With 0.5 on the H100 (scripts/lib_ab.py, 2026-12-06, device-bound):
# 64x576x7168 +10% (3 slices), 64x256x7168 +24% (7), 64x1024x7168 +0% (2), but 8x576x7168 -16%
# (3; why m = 8 loses where m = 64 gains is not known) and 64x576x2048 -40% (2 slices of 8 k
# blocks). benchmarks/NOTES-gemm.md, twenty-third session.
SHORT_GRID_FILL: float | None = None
SHORT_GRID_MIN_KBLOCKS = 8
# 192x128 (DENSE_EXTRA_TILES: three consumer warpgroups of one accumulator set, with the
# epilogue overlap) in place of a 128-row pick >= 128 wide at m > 128 when K has at most
# TALL_MAX_KBLOCKS k blocks (None: never), M's tail leaves its rows at least TALL_MIN_ROWS_USED
# used and its tiles make TALL_MIN_WAVES waves. Sustained on the H100 (2026-12-06,
# scripts/lib_ab.py, 3 rounds, device-bound): 4096x7168x2048 +6% (990 -> 1052 TFLOP/s),
# 4096x32768x512 +4%, 4096x24576x1536 +0.3%; at k >= 7168 it lost 3-7% (4096x7168x16384,
# 8192^3, 4096x2112x7168) or tied (4096x4096x7168). Timed as bench gemm times (16 input sets,
# up to 32 repeats per executable) the three short-K gains shrink to +0.6 / +1.3 / +1.0%.
# benchmarks/NOTES-gemm.md, twenty-fifth session. Only m = 4096 was measured (9.3 to 42 waves
# of 192x128 tiles, 97% of its rows used); the row and wave limits keep the rule there, where
# M's tail and the last wave cost 192-row tiles about what they cost 128-row ones.
TALL_MAX_KBLOCKS: int | None = 16
TALL_MIN_ROWS_USED = 0.95
TALL_MIN_WAVES = 8
# To measure 192x128 against the picks: when True, at m > 128 every pick of 128 rows and >= 128
# columns becomes 192x128, its cluster size, split and overlap chosen as for any pick. Off.
TALL_TILE = False


@dataclasses.dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int  # rows of a per tile (64 per consumer warpgroup)
    block_n: int  # rows of b per tile; (block_m, block_n) is one of DENSE_TILES (grouped: TILES)
    num_sms: int  # SMs the persistent grid may use (the kernel also caps it at the tile count)
    cluster_n: int = 1  # one of CLUSTERS
    # Dense GEMM only: the last `split_units` work units (a unit is cluster_n tiles side by side)
    # are each computed as `splits` K slices on different SMs, their partial sums added in a
    # workspace (0 / 1: no split).
    split_units: int = 0
    splits: int = 1
    # Dense GEMM, tiles of one accumulator set (128x192) only: each tile is stored while the
    # next tile's first k block runs on the tensor cores (the other tiles ignore it).
    overlap: bool = False

    def attrs(self) -> dict:
        """The FFI attributes of the GEMM custom calls, the tile's (+ split: `split_attrs`)."""
        return dict(block_m=np.int32(self.block_m), block_n=np.int32(self.block_n),
                    cluster_n=np.int32(self.cluster_n), num_sms=np.int32(self.num_sms))

    def split_attrs(self) -> dict:
        """The dense GEMM's attributes: the tile's and the split-K plan's."""
        return dict(self.attrs(), split_units=np.int32(self.split_units),
                    splits=np.int32(self.splits), overlap=np.int32(self.overlap))

    @property
    def split(self) -> bool:
        """Whether the plan cuts anything along K (the kernel ignores a plan that does not)."""
        return self.split_units > 0 and self.splits > 1

    def key(self) -> str:
        """A short name, e.g. "128x192c1so": tile, cluster size, "s" when the last wave is
        split along K, "o" with the epilogue overlap (the sweeps' JSON keys)."""
        return (f"{self.block_m}x{self.block_n}c{self.cluster_n}"
                + "s" * self.split + "o" * bool(self.overlap))

    def workspace_floats(self) -> int:
        """float32 elements of the dense GEMM's split-K workspace (partials + counters), >= 1."""
        if not self.split:
            return 1
        unit = self.cluster_n * self.block_m * self.block_n
        return (self.split_units * self.splits * unit
                + self.split_units * self.cluster_n * (self.block_m // 64))


def work_units(m: int, n: int, block_m: int, block_n: int, cluster_n: int = 1) -> int:
    """The dense kernel's work units for an [m, n] output: tiles of block_m x block_n, cluster_n
    of them side by side in N per unit (the kernel's DenseScheduler::num_tile_units)."""
    return cdiv(m, block_m) * cdiv(cdiv(n, block_n), cluster_n)


def used(extent: int, block: int) -> float:
    """The share of `block`-wide tiles over `extent` that lies inside it (the tail tile's
    emptiness): N's columns for block_n, M's rows for block_m."""
    return extent / (cdiv(extent, block) * block)


def wide_over_long_k(n: int, k_blocks: int, limit: int | None) -> bool:
    """The long-K limit of 128x192 (dense WIDE_MAX_KBLOCKS, grouped GROUPED_WIDE_MAX_KBLOCKS):
    past `limit` k blocks (None: no limit) 128x192 gives way where its columns are emptier than
    128x128's."""
    return limit is not None and k_blocks > limit and used(n, 192) < used(n, 128)


def split_plan(units: int, clusters: int, k_blocks: int, *, short_grid: bool = False,
               min_kblocks: int | None = None) -> tuple[int, int, int]:
    """(split_units, splits, estimated time in k-block steps) for `units` work units of
    `k_blocks` each on `clusters` persistent clusters.

    Without a split the last wave holds `units % clusters` units and leaves the other clusters
    idle for a whole K loop; cut into `splits` K slices each (at most clusters // tail, at least
    SPLIT_MIN_KBLOCKS k blocks a slice) it takes ceil(k_blocks / splits) plus the partial sums'
    round trip (SPLIT_COST_KBLOCKS). Only a full wave before the tail is split (smaller problems
    choose smaller tiles instead), unless `short_grid`: then a grid of less than one wave is
    split too, every unit (`scripts/sweep_gemm.py --split`, and gemm_config's SHORT_GRID_FILL,
    off by default). `min_kblocks`: the shortest slice instead of SPLIT_MIN_KBLOCKS.
    A split is returned only when it saves SPLIT_MIN_GAIN of the time.
    """
    min_kblocks = SPLIT_MIN_KBLOCKS if min_kblocks is None else min_kblocks
    waves, tail = divmod(units, clusters)
    whole = cdiv(units, clusters) * k_blocks
    splits = min(clusters // tail, k_blocks // min_kblocks) if tail else 0
    if (waves == 0 and not short_grid) or splits < 2:
        return 0, 1, whole
    t = waves * k_blocks + cdiv(k_blocks, splits) + SPLIT_COST_KBLOCKS
    if t > (1 - SPLIT_MIN_GAIN) * whole:
        return 0, 1, whole
    return tail, splits, t


def gemm_config(m: int, n: int, k: int, num_sms: int, *, tiles=DENSE_TILES) -> GemmConfig:
    """Chooses the output tile for an [m, k] x [n, k]^T FP8 GEMM on `num_sms` SMs.

    m > 128: the widest tile (most FLOPs per byte pulled from L2, which is what bounds large
    shapes) whose tiles still occupy at least 3/4 of the SMs, 128-row tiles first (128x192 only
    where N's tail leaves its columns at least 0.9x as used as 128x128's); when no tile fills the
    machine, the one with the most tiles. 128x192 stores each tile under the next tile's first
    k block (`overlap`) from OVERLAP_MIN_KBLOCKS k blocks on, and then runs in CTA pairs where
    its column blocks pair up; 128x128 runs in pairs too. The last wave is split along K
    (`split_plan`) where it is short, and pairs give way to single CTAs when the singles' last
    wave (with its split) is 3% shorter by that count. At m > 128, 128x192 only up to
    WIDE_MAX_KBLOCKS k blocks unless its columns are as full as 128x128's (n = 2112: 11 x 192).
    64 < m <= 128: one 128-row tile 192, 128 or 64 wide when such tiles fill 3/4 of the SMs, the
    one that keeps the SMs busier over its waves (128x64 pays 10%); otherwise 64-row tiles as for
    m <= 64, which double the parallelism; no pairs and no split at m <= 128 (the split lost 17%
    at 64x24576x1536; SHORT_GRID_FILL, off by default, splits grids under a share of the SMs).
    Checked against every tile timed on every benchmark shape (scripts/sweep_gemm.py, kernel
    times; tests/test_gemm.py checks each file): at m <= 128 on the H200
    (benchmarks/results/gemm-tiles-sweep-h200-2026-12-03.json) the fastest tile on 11 of 12
    shapes, the 12th within 1%; on the H100 (gemm-tiles-sweep-h100-2026-11-24.json) 11 of 12,
    the 12th within 2%. At m >= 4096 on the H200 (gemm-tiles-sweep-h200-2026-12-05-one-acc-128.json,
    main's two runs: 128x128 and 128x192, clusters, splits and overlap) within 3% of the fastest
    on all 7; in the H100's sustained A/Bs of 2026-12-06 (lib-ab-h100-2026-12-06-*.json: 17
    shapes from 384 to 16384 rows, long-K limit and split on and off) within 1.4% of the fastest
    variant, the fastest on 16 (tests/test_gemm.py checks both files).
    Up to TALL_MAX_KBLOCKS k blocks (short K) at m = 4096-like M, 192x128 in place of a 128-row
    pick >= 128 wide (`_tall`).
    `tiles`: the (block_m, block_n) it may pick (a subset of DENSE_TILES, in its order): those of
    TILES walked widest first, those of DENSE_EXTRA_TILES only in place of a pick as above (the
    grouped kernels pass theirs, without them).
    """
    k_blocks = max(1, k // BLOCK_K)
    count = {t: work_units(m, n, *t) for t in DENSE_TILES}  # tiles of each shape
    fills = lambda t: count[t] >= FILL_FRACTION * num_sms
    # 128x192 only where its columns are not much emptier than 128x128's (N's tail tile): it is
    # 5-16% faster per tile at m = 4096 (the H200 sweep of 2026-12-03), not at n = 48.
    narrow = lambda t: t == (128, 192) and used(n, 192) < 0.9 * used(n, 128)
    # (128x192 reaches the `wide` walk below at m > 128 only)
    long_k = lambda t: (t == (128, 192) and wide_over_long_k(n, k_blocks, WIDE_MAX_KBLOCKS)
                        and not (WIDE_KEEP_FULL_WAVES and count[t] % num_sms == 0))
    if 64 < m <= 128:
        # share of the SMs busy over all waves; 128x64 tiles pay ~10% per FLOP
        busy = {t: count[t] / (cdiv(count[t], num_sms) * num_sms) * (0.9 if t[1] == 64 else 1.0)
                for t in ((128, 192), (128, 128), (128, 64))
                if t in tiles and fills(t) and not narrow(t)}
        if busy:
            bm, bn = max(busy, key=busy.get)  # (a tie goes to the wider tile)
            return GemmConfig(bm, bn, min(count[(bm, bn)], num_sms), 1,
                              overlap=_overlap(m, n, bm, bn, 1, k_blocks, num_sms))
    candidates = [t for t in tiles if (m > 128 or t[0] == 64) and t not in DENSE_EXTRA_TILES]
    wide = [t for t in candidates if fills(t) and not narrow(t) and not long_k(t)]
    bm, bn = wide[0] if wide else max(candidates, key=lambda t: (count[t], t[0]))
    if (TALL in tiles and m > 128 and bm == 128 and bn >= 128
            and (TALL_TILE or _tall(m, k_blocks, count, num_sms))):
        bm, bn = TALL
    if m <= 128:  # 64-row tiles, no clusters (2-15% slower there) and no split (below) ...
        units = count[(bm, bn)]  # ... but for SHORT_GRID_FILL
        if SHORT_GRID_FILL is not None and units < SHORT_GRID_FILL * num_sms:
            split_units, splits, _ = split_plan(units, num_sms, k_blocks, short_grid=True,
                                                min_kblocks=SHORT_GRID_MIN_KBLOCKS)
            if splits > 1:
                return GemmConfig(bm, bn, units * splits, 1, split_units, splits)
        return GemmConfig(bm, bn, min(units, num_sms), 1)
    # Pairs of CTAs that share (multicast) the A tile: on the H100 +15-18% on the long-K large
    # shapes (4096x7168x16384, 4096x4096x7168, 8192^3) with 128x128 tiles, where L2 -> SM traffic
    # bounds them, -2..+6% on the others. On the H200 within 2% either way at 128x128; at 128x192
    # 7-15% slower without the epilogue overlap, up to 4% faster with it, where the column
    # blocks pair up (an odd count leaves a pair's second tile past N: 2% slower at n = 2112).
    pairs = cdiv(n, bn) % 2 == 0 and ((bm, bn) == (128, 128) or _can_overlap(bm, bn, k_blocks))
    cluster_n = 2 if pairs else 1
    # The split of the last wave (at m <= 128 it lost up to 17%: 64x24576x1536 in 64x128 tiles,
    # 12 k blocks in 2 slices; the partial sums' round trip weighs more next to small tiles).
    plans = {c: split_plan(work_units(m, n, bm, bn, c), max(1, num_sms // c), k_blocks)
             for c in {1, cluster_n}}
    if plans[1][2] < 0.97 * plans[cluster_n][2]:  # (the H200's sweeps: clusters gain <= 4%)
        cluster_n = 1
    split_units, splits, _ = plans[cluster_n]
    return GemmConfig(bm, bn, min(count[(bm, bn)], num_sms), cluster_n, split_units, splits,
                      _overlap(m, n, bm, bn, cluster_n, k_blocks, num_sms))


def _tall(m, k_blocks, count, num_sms) -> bool:
    """Whether 192x128 replaces a 128-row pick (TALL_MAX_KBLOCKS and the limits beside it)."""
    return (TALL_MAX_KBLOCKS is not None and k_blocks <= TALL_MAX_KBLOCKS
            and used(m, TALL[0]) >= TALL_MIN_ROWS_USED
            and count[TALL] >= TALL_MIN_WAVES * num_sms)


def _can_overlap(bm, bn, k_blocks) -> bool:
    """The epilogue overlap exists for the tiles of one accumulator set (OVERLAP_TILES) and pays
    from OVERLAP_MIN_KBLOCKS k blocks on."""
    return (bm, bn) in OVERLAP_TILES and k_blocks >= OVERLAP_MIN_KBLOCKS


def _overlap(m, n, bm, bn, cluster_n, k_blocks, num_sms) -> bool:
    """The overlap of a launch: where the tile has it, and a cluster gets more than one unit (with
    one there is no next tile to store under, and the pick keys the sweeps without "o")."""
    return (_can_overlap(bm, bn, k_blocks)
            and work_units(m, n, bm, bn, cluster_n) > num_sms // cluster_n)


def fp8_gemm_reference(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16):
    """Pure-JAX FP8 GEMM in float32 math; the CPU path and the kernel's oracle.

    Equivalent to the following JAX code:

      a32 = a.astype(f32) * jnp.repeat(a_scale, 128, axis=1)                         # [M, K]
      b32 = b.astype(f32) * jnp.repeat(jnp.repeat(b_scale, 128, 0)[:N], 128, axis=1)  # [N, K]
      out = (a32 @ b32.T).astype(out_dtype)             # precision HIGHEST, f32 accumulation

    Args/returns as `fp8_gemm`.
    """
    check_fp8_gemm("fp8_gemm_reference", a, a_scale, b, b_scale, out_dtype)
    return _gemm_reference(a, a_scale, b, b_scale, np.dtype(out_dtype))


@functools.partial(jax.jit, static_argnums=(4,))  # one compile per shape when called eagerly
def _gemm_reference(a, a_scale, b, b_scale, out_dtype):
    a32 = dequantize_fp8(a, a_scale, (1, BLOCK_K))
    b32 = dequantize_fp8(b, b_scale, (BLOCK_K, BLOCK_K))
    out = jnp.einsum("MK,NK->MN", a32, b32, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, impl="auto"):
    """out = (a * a_scale) @ (b * b_scale)^T with FP8 operands and float32 accumulation.

    Args:
      a: float8_e4m3fn [M, K]; any M, K >= 1 (the kernel path zero-pads K to a multiple of 128:
        exact, at the cost of a copy of a and b; quantize with K padded to skip it).
      a_scale: float32 [M, ceil(K/128)], one scale per row per 128 columns (`quantize_fp8`,
        (1, 128)).
      b: float8_e4m3fn [N, K]; any N >= 1.
      b_scale: float32 [ceil(N/128), ceil(K/128)], one per 128x128 block (`quantize_fp8`,
        (128, 128)).
      out_dtype: bfloat16 or float32.
      impl: "auto" (CUDA kernel when available, else the reference), "ffi" or "xla".

    Returns:
      out_dtype [M, N].
    """
    op = "fp8_gemm"
    m, n, k = check_fp8_gemm(op, a, a_scale, b, b_scale, out_dtype)
    if _ffi.resolve_impl(op, TARGET, impl) == "xla":
        return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=out_dtype)
    a, b = pad_to(a, 1, BLOCK_K), pad_to(b, 1, BLOCK_K)  # the kernel's K: whole 128-blocks
    return ffi_fp8_gemm(a, a_scale, b, b_scale, gemm_config(m, n, a.shape[1], _ffi.num_sms()),
                        out_dtype)


def ffi_fp8_gemm(a, a_scale, b, b_scale, cfg: GemmConfig, out_dtype=jnp.bfloat16):
    """The kernel's custom call with an explicit tile and split (tests, sweeps); no validation."""
    types = (jax.ShapeDtypeStruct((a.shape[0], b.shape[0]), out_dtype),
             jax.ShapeDtypeStruct((cfg.workspace_floats(),), jnp.float32))
    return _ffi.kernel_call(TARGET, types, a, a_scale, b, b_scale, **cfg.split_attrs())[0]


def matmul_operands(a, b):
    """A float32-accumulated dot's operands as the matrix unit takes them (the wgrads, the bf16
    expert GEMMs): bf16 / f16 as they are (each product of two is exact in float32, and the dot
    accumulates in float32: the values of the float32 dot up to the order of its float32 sums,
    at the 16-bit rate instead of the far slower float32 GEMM on GPUs), float32 as float32."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def matmul_precision(dtype):
    """HIGHEST for float32 operands (no silent TF32 / bf16 passes), the default for 16-bit ones
    (already the unit's exact input type)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, w, impl):
    y, _ = _fp8_linear_fwd(x, w, impl)
    return y


def _fp8_linear_fwd(x, w, impl):
    k, n = x.shape[-1], w.shape[0]
    x_MK = pad_to(x.reshape(prod(x.shape[:-1]), k), 1, BLOCK_K)
    w_NK = pad_to(w, 1, BLOCK_K)
    x_fp8, x_scale = quantize_fp8(x_MK, block=(1, BLOCK_K), impl=impl)
    w_fp8, w_scale = quantize_fp8(w_NK, block=(BLOCK_K, BLOCK_K), impl=impl)
    y = fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, out_dtype=gemm_out_dtype(x.dtype), impl=impl)
    y = y.astype(x.dtype).reshape(*x.shape[:-1], n)
    return y, (x, w, w_fp8, w_scale)  # w only for its dtype: it is alive anyway (a parameter)


def _fp8_linear_bwd(impl, res, dy):
    x, w, w_fp8, w_scale = res
    k, n = x.shape[-1], w.shape[0]
    dy_MN = dy.reshape(-1, n)
    # dgrad dx = dy @ w: reduce over N, so dy is quantized per (1, 128) along N and w's 128x128
    # blocks are transposed (exact: a block's scale does not care about orientation). N is
    # zero-padded to whole blocks on both sides, which changes no sum.
    dy_fp8, dy_scale = quantize_fp8(pad_to(dy_MN, 1, BLOCK_K), block=(1, BLOCK_K), impl=impl)
    w_fp8_KN = pad_to(w_fp8.T, 1, BLOCK_K)  # [Kp, Np], the "b" operand
    dx = fp8_gemm(dy_fp8, dy_scale, w_fp8_KN, w_scale.T, out_dtype=jnp.float32, impl=impl)
    dx = dx[:, :k].astype(x.dtype).reshape(x.shape)
    # wgrad dw = dy^T @ x through XLA (not FP8 yet), float32 accumulation.
    dw = jnp.einsum("MN,MK->NK", *matmul_operands(dy_MN, x.reshape(-1, k)),
                    preferred_element_type=jnp.float32, precision=matmul_precision(x.dtype))
    return dx, dw.astype(w.dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(x, w, *, impl="auto"):
    """y = x @ w^T with both operands quantized to FP8 on the fly, differentiable.

    Forward: x per (1, 128) groups, w per (128, 128) blocks, `fp8_gemm`. Backward: dgrad
    dx = dy @ w through the FP8 GEMM (dy quantized per (1, 128) along N, the forward's quantized
    w reused transposed); wgrad dw = dy^T @ x through XLA (wgrad is not FP8 yet): the operands
    in x's dtype (bf16 / f16 at the 16-bit matrix rate, float32 at HIGHEST), float32 accumulation.
    K and N need no alignment: they are zero-padded to multiples of 128, which is exact.

    Args:
      x: bf16 / f16 / f32 [..., K] activations.
      w: bf16 / f16 / f32 [N, K] weight (PyTorch `nn.Linear` layout).
      impl: "auto", "ffi" or "xla", applied to every quantize and GEMM inside.

    Returns:
      x.dtype [..., N].
    """
    op = "fp8_linear"
    floats = (jnp.bfloat16, jnp.float16, jnp.float32)
    check_dtype(op, "x", x, floats)
    check_dtype(op, "w", w, floats)
    if x.ndim < 1 or w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: expected x [..., K] and w [N, K], got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    if math.prod(x.shape[:-1]) == 0 or min(w.shape) == 0:
        raise ValueError(f"{op}: x and w must be non-empty, got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    _ffi.resolve_impl(op, TARGET, impl)  # impl checked and the path logged as this op
    x, w = match_vma(x, w)  # inside shard_map: w's cotangent varies wherever x does
    return _fp8_linear(x, w, impl)
