"""A paged KV cache for MLA decode, with a block allocator that runs inside `jit`.

MLA caches one row per token and layer: [c_kv (kv_lora_rank) ; k_rope (qk_rope_dim)], post-norm and
rotated, shared by every head (576 wide in V2/V3). Rows live in fixed 64-row blocks of a pool
shared by all sequences; each sequence slot has a block table (the block holding rows 64j..64j+63
is block_table[seq, j]) and a length. All layers use the same block ids, so one allocation serves
the whole model, and `kv[layer]` is exactly the `kv_cache` argument of `jax_ds.ops.mla_decode`.

Everything is a pure function of a `PagedKVCache` pytree with static shapes. A block's refcount
counts the tables that hold it (0: free); `fork` shares the full blocks of a prefix by reference
and copies the partial last block, so appends only ever write into blocks owned by one sequence
and no copy-on-write is needed. Free blocks are taken lowest id first.

FP8 (`init_cache(..., fp8=True)`, rows 576 wide): the pool holds FlashMLA's FP8 rows, uint8
[..., 656] (`jax_ds.ops.mla.quantize_kv_fp8`: 512 e4m3 latent values, 4 float32 scales, 64 bf16
rope values), 1.76x smaller than bf16's 1152 bytes; `write` quantizes the rows it is given and
`mla_decode` reads such a cache directly.

Running out cannot raise inside `jit`; it sets a sticky bit in `cache.error` instead (OUT_OF_BLOCKS:
the pool is empty; SEQ_TOO_LONG: a sequence needs more than max_blocks_per_seq blocks) and the rows
that found no block are dropped: a sequence's length never exceeds the rows it has blocks for.
`check(cache)` raises a RuntimeError naming the flags (outside jit).

Sequence ids must be slots, in [0, max_seqs), and distinct within one call (one call writes one
position per slot). Concrete ids are checked (ValueError, also for ids that are not integers:
1.7 or True are not slot 1); traced ones cannot be, so a call with a
bad one changes nothing but the sticky BAD_SEQ bit (jnp's index clamping would otherwise act on
another slot: free the last slot's blocks while it still holds them). Likewise a concrete
`num_new` must be an int >= 0, and a traced negative one counts as 0 (a length moved back into
shared blocks would let the next append overwrite another sequence's rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_ds.ops import mla as mla_ops
from jax_ds.ops._checks import concrete, is_int

BLOCK_SIZE = 64
OUT_OF_BLOCKS = 1
SEQ_TOO_LONG = 2
BAD_SEQ = 4
_FLAG_NAMES = {OUT_OF_BLOCKS: "out of blocks (the pool is exhausted)",
               SEQ_TOO_LONG: "a sequence needs more than max_blocks_per_seq blocks",
               BAD_SEQ: "a sequence id outside [0, max_seqs) or repeated in one call (the call "
                        "changed nothing)"}


@struct.dataclass
class PagedKVCache:
    kv: jax.Array           # [L, num_blocks, block_size, 1, W] the rows of every layer
    block_table: jax.Array  # [S, max_blocks_per_seq] int32, -1 where no block is held
    lengths: jax.Array      # [S] int32 rows written (committed) per sequence slot
    refcount: jax.Array     # [num_blocks] int32 tables holding each block (0: free)
    error: jax.Array        # [] int32 sticky OUT_OF_BLOCKS | SEQ_TOO_LONG | BAD_SEQ bits

    @property
    def block_size(self) -> int:
        return self.kv.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]

    @property
    def max_seqs(self) -> int:
        return self.lengths.shape[0]

    @property
    def fp8(self) -> bool:
        """Whether rows are stored in the FP8 layout ([..., 656] bytes: uint8, or float8_e4m3fn
        as FlashMLA types them)."""
        return mla_ops.is_fp8_cache(self.kv)


def init_cache(num_layers: int, num_blocks: int, max_seqs: int, max_blocks_per_seq: int,
               width: int, dtype=jnp.bfloat16, block_size: int = BLOCK_SIZE, *,
               fp8: bool = False) -> PagedKVCache:
    """An empty cache: every block free, every sequence slot empty (length 0, no blocks).

    fp8=True stores rows of width 576 (c_kv 512 ; k_rope 64) in FlashMLA's FP8 layout (uint8,
    656 bytes a row; `dtype` is then ignored). An 8-bit `dtype` (uint8, float8_e4m3fn) without
    fp8=True is refused: a pool of that type is read as the FP8 layout."""
    for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks),
                    ("max_seqs", max_seqs), ("max_blocks_per_seq", max_blocks_per_seq),
                    ("width", width), ("block_size", block_size)):
        if not is_int(v) or v < 1:
            raise ValueError(f"init_cache: {name} must be a positive int, got {v!r}")
    if not fp8 and mla_ops.is_fp8_cache(jax.ShapeDtypeStruct((), dtype)):
        raise ValueError(f"init_cache: an 8-bit pool holds FlashMLA's FP8 rows; pass fp8=True "
                         f"(got dtype {jnp.dtype(dtype).name} with fp8=False)")
    if fp8:
        if width != mla_ops.HEAD_DIM_QK:
            raise ValueError(f"init_cache: the FP8 layout holds rows of {mla_ops.HEAD_DIM_QK} "
                             f"(c_kv {mla_ops.HEAD_DIM_V} ; k_rope "
                             f"{mla_ops.HEAD_DIM_QK - mla_ops.HEAD_DIM_V}), got width {width}")
        width, dtype = mla_ops.FP8_ROW_BYTES, jnp.uint8
    return PagedKVCache(
        kv=jnp.zeros((num_layers, num_blocks, block_size, 1, width), dtype),
        block_table=jnp.full((max_seqs, max_blocks_per_seq), -1, jnp.int32),
        lengths=jnp.zeros((max_seqs,), jnp.int32),
        refcount=jnp.zeros((num_blocks,), jnp.int32),
        error=jnp.zeros((), jnp.int32))


def check(cache: PagedKVCache) -> PagedKVCache:
    """Raises RuntimeError if an allocation failed or a call had a bad sequence id (call outside
    jit); returns the cache."""
    flags = int(cache.error)
    if flags:
        names = [text for bit, text in _FLAG_NAMES.items() if flags & bit]
        dropped = "; rows that found no block were dropped" if flags & (
            OUT_OF_BLOCKS | SEQ_TOO_LONG) else ""
        raise RuntimeError(f"PagedKVCache: {'; '.join(names)} (error bits {flags}){dropped}")
    return cache


def num_free_blocks(cache: PagedKVCache) -> jax.Array:
    return jnp.sum(cache.refcount == 0).astype(jnp.int32)


def _seq_ids(op: str, cache: PagedKVCache, seqs):
    """(ids int32 [B], bad): `seqs` (a slot or [B] slots) checked when concrete (ValueError);
    when traced, bad is true if one lies outside [0, max_seqs) or repeats (the op then changes
    nothing but BAD_SEQ), else a constant False."""
    values = concrete(seqs)
    if values is not None:
        # checked before the int32 cast, which would truncate 1.7 to slot 1, take True as 1
        # and fail obscurely on 2**33 or "1"
        if values.size and values.dtype.kind not in "iu":
            raise ValueError(f"{op}: sequence ids must be integers, got {seqs!r} "
                             f"({values.dtype.name})")
        if values.ndim > 1:
            raise ValueError(f"{op}: seqs must be a slot id or [B] slot ids, got shape "
                             f"{values.shape}")
        values = np.atleast_1d(values).tolist()
        if any(not 0 <= v < cache.max_seqs for v in values):
            raise ValueError(f"{op}: sequence ids must lie in [0, max_seqs = {cache.max_seqs}), "
                             f"got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"{op}: sequence ids must be distinct, got {values}")
        return jnp.asarray(values, jnp.int32), jnp.zeros((), bool)
    if not jnp.issubdtype(seqs.dtype, jnp.integer):
        raise ValueError(f"{op}: sequence ids must be integers, got a traced {seqs.dtype}")
    ids = jnp.atleast_1d(seqs.astype(jnp.int32))
    if ids.ndim != 1:
        raise ValueError(f"{op}: seqs must be a slot id or [B] slot ids, got shape {ids.shape}")
    repeated = jnp.triu(ids[:, None] == ids[None, :], k=1)
    return ids, jnp.any((ids < 0) | (ids >= cache.max_seqs)) | jnp.any(repeated)


def _flag(error, bad):
    return error | jnp.where(bad, BAD_SEQ, 0)


def _num_new(op: str, num_new):
    """A row count: an int >= 0 when concrete (ValueError otherwise), a traced one clamped at 0."""
    value = concrete(num_new)
    if value is None:
        return jnp.maximum(num_new, 0)
    if value.ndim or not np.issubdtype(value.dtype, np.integer) or value < 0:
        raise ValueError(f"{op}: num_new must be an int >= 0, got {num_new!r}")
    return num_new


def _row_width(cache: PagedKVCache) -> int:
    """The width of the rows `write` and `append` take (an FP8 pool quantizes 576-wide rows)."""
    return mla_ops.HEAD_DIM_QK if cache.fp8 else cache.kv.shape[-1]


def _held(cache, seqs):
    """Blocks the slot(s) hold, int32 (a slot's blocks are a prefix of its table row)."""
    return jnp.sum(cache.block_table[seqs] >= 0, axis=-1).astype(jnp.int32)


def held_rows(cache: PagedKVCache, seqs) -> jax.Array:
    """[len(seqs)] int32: the rows the slots' blocks hold. A length the pool could not grow to
    (OUT_OF_BLOCKS, SEQ_TOO_LONG) exceeds it; `commit` caps lengths at it."""
    return _held(cache, seqs) * cache.block_size


def _grow_one(cache: PagedKVCache, seq, rows) -> PagedKVCache:
    """Takes free blocks until slot `seq` holds blocks for `rows` rows (flags what it cannot)."""
    max_blocks = cache.block_table.shape[1]
    need = (rows + cache.block_size - 1) // cache.block_size
    error = cache.error | jnp.where(need > max_blocks, SEQ_TOO_LONG, 0)
    need = jnp.minimum(need, max_blocks)

    def cond(state):
        c, _ = state
        return (_held(c, seq) < need) & (jnp.min(c.refcount) == 0)

    def body(state):
        c, _ = state
        block = jnp.argmin(c.refcount).astype(jnp.int32)  # lowest free id (refcount 0 is min)
        c = c.replace(block_table=c.block_table.at[seq, _held(c, seq)].set(block),
                      refcount=c.refcount.at[block].set(1))
        return c, 0

    cache, _ = jax.lax.while_loop(cond, body, (cache.replace(error=error), 0))
    short = _held(cache, seq) < need
    return cache.replace(error=cache.error | jnp.where(short, OUT_OF_BLOCKS, 0))


def reserve(cache: PagedKVCache, seqs, num_new: int) -> PagedKVCache:
    """Ensures each slot in `seqs` [B] holds blocks for lengths + num_new rows (a decode step)."""
    seqs, bad = _seq_ids("reserve", cache, seqs)
    num_new = _num_new("reserve", num_new)

    def body(i, c):  # a bad call asks for 0 rows: nothing to take
        return _grow_one(c, seqs[i], jnp.where(bad, 0, c.lengths[seqs[i]] + num_new))

    cache = jax.lax.fori_loop(0, seqs.shape[0], body, cache)
    return cache.replace(error=_flag(cache.error, bad))


def _slots(cache: PagedKVCache, seqs, num_new: int):
    """(block [B, T], row [B, T]) where the next num_new rows of each sequence go; block is
    num_blocks (out of range: writes dropped) where no block was reserved."""
    pos_BT = cache.lengths[seqs][:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
    col_BT = pos_BT // cache.block_size
    max_blocks = cache.block_table.shape[1]
    block_BT = jnp.take_along_axis(cache.block_table[seqs], jnp.minimum(col_BT, max_blocks - 1),
                                   axis=1)
    block_BT = jnp.where((col_BT < max_blocks) & (block_BT >= 0), block_BT, cache.num_blocks)
    return block_BT, pos_BT % cache.block_size


def write(cache: PagedKVCache, layer: int, seqs, rows_BTW) -> PagedKVCache:
    """Writes rows [B, T, W] of `layer` after each sequence's committed length (reserve first).

    Does not move the lengths (every layer writes the same positions; `commit` once per step).
    An FP8 cache takes float rows [B, T, 576] and stores them quantized.
    """
    seqs, bad = _seq_ids("write", cache, seqs)
    width = _row_width(cache)
    if rows_BTW.ndim != 3 or rows_BTW.shape[0] != seqs.shape[0] or rows_BTW.shape[2] != width:
        raise ValueError(f"write: rows must be [B, T, W] = [{seqs.shape[0]}, T, {width}], got "
                         f"{tuple(rows_BTW.shape)}")
    layer_value = concrete(layer)
    if layer_value is not None and not 0 <= layer_value < cache.kv.shape[0]:
        raise ValueError(f"write: layer must lie in [0, {cache.kv.shape[0]}), got {layer}")
    block_BT, row_BT = _slots(cache, seqs, rows_BTW.shape[1])
    block_BT = jnp.where(bad, cache.num_blocks, block_BT)  # out of range: dropped
    if cache.fp8:  # the row's bytes, retyped (not converted) to the pool's 8-bit type
        rows_BTW = jax.lax.bitcast_convert_type(mla_ops.quantize_kv_fp8(rows_BTW), cache.kv.dtype)
    kv = cache.kv.at[layer, block_BT, row_BT, 0].set(rows_BTW.astype(cache.kv.dtype),
                                                    mode="drop")
    return cache.replace(kv=kv, error=_flag(cache.error, bad))


def commit(cache: PagedKVCache, seqs, num_new: int) -> PagedKVCache:
    """lengths[seqs] += num_new, capped at the rows their blocks hold (failed reservations)."""
    seqs, bad = _seq_ids("commit", cache, seqs)
    num_new = _num_new("commit", num_new)
    new = jnp.minimum(cache.lengths[seqs] + num_new, held_rows(cache, seqs))
    lengths = cache.lengths.at[jnp.where(bad, cache.max_seqs, seqs)].set(new, mode="drop")
    return cache.replace(lengths=lengths, error=_flag(cache.error, bad))


def append(cache: PagedKVCache, seq, rows_LTW) -> PagedKVCache:
    """Appends T rows of every layer ([L, T, W]) to slot `seq`: reserve + write + commit."""
    _seq_ids("append", cache, seq)
    width = _row_width(cache)
    if rows_LTW.ndim != 3 or rows_LTW.shape[0] != cache.kv.shape[0] or rows_LTW.shape[2] != width:
        raise ValueError(f"append: rows must be [L, T, W] = [{cache.kv.shape[0]}, T, {width}], "
                         f"got {tuple(rows_LTW.shape)}")
    t = rows_LTW.shape[1]
    cache = reserve(cache, seq, t)
    for layer in range(rows_LTW.shape[0]):
        cache = write(cache, layer, seq, rows_LTW[layer][None])
    return commit(cache, seq, t)


def free(cache: PagedKVCache, seq) -> PagedKVCache:
    """Releases slot `seq` (or [B] slots): drops one reference to each of its blocks; length 0,
    no blocks. Freeing an empty slot (a second free) changes nothing."""
    seqs, bad = _seq_ids("free", cache, seq)
    seqs = jnp.where(bad, cache.max_seqs, seqs)  # out of range: the sets below drop
    table_BM = cache.block_table[seqs]
    held_BM = (table_BM >= 0) & ~bad
    refcount = cache.refcount.at[jnp.where(held_BM, table_BM, cache.num_blocks)].add(
        -1, mode="drop")
    return cache.replace(refcount=refcount,
                         block_table=cache.block_table.at[seqs].set(-1, mode="drop"),
                         lengths=cache.lengths.at[seqs].set(0, mode="drop"),
                         error=_flag(cache.error, bad))


def allocate(cache: PagedKVCache, seq) -> PagedKVCache:
    """Starts a new sequence in slot `seq` (releasing whatever it held); blocks come on append."""
    return free(cache, seq)


def fork(cache: PagedKVCache, src, dst) -> PagedKVCache:
    """Slot `dst` becomes a copy of `src` (a shared prompt prefix, beam search, MTP drafts).

    Full blocks are shared by reference (refcount + 1); the partial last block, which either
    sequence's next append would write into, is copied to a fresh block for `dst`. `dst` = `src`
    changes nothing.
    """
    (src,), bad_src = _seq_ids("fork", cache, src)
    (dst,), bad_dst = _seq_ids("fork", cache, dst)
    bad = bad_src | bad_dst
    return jax.lax.cond(bad | (src == dst), lambda c: c.replace(error=_flag(c.error, bad)),
                        lambda c: _fork(c, src, dst), cache)


def _fork(cache: PagedKVCache, src, dst) -> PagedKVCache:
    cache = free(cache, dst)
    length = cache.lengths[src]
    full = length // cache.block_size
    cols = jnp.arange(cache.block_table.shape[1])
    src_table = cache.block_table[src]
    shared = (cols < full) & (src_table >= 0)
    refcount = cache.refcount.at[jnp.where(shared, src_table, cache.num_blocks)].add(
        1, mode="drop")
    cache = cache.replace(block_table=cache.block_table.at[dst].set(jnp.where(shared, src_table,
                                                                              -1)),
                          refcount=refcount, lengths=cache.lengths.at[dst].set(full *
                                                                               cache.block_size))
    partial = length % cache.block_size

    def copy_partial(c):
        c = _grow_one(c, dst, length)
        dst_block = c.block_table[dst, full]
        ok = dst_block >= 0
        src_block = src_table[full]
        kv = c.kv.at[:, jnp.where(ok, dst_block, c.num_blocks)].set(c.kv[:, src_block],
                                                                   mode="drop")
        return c.replace(kv=kv, lengths=c.lengths.at[dst].set(jnp.where(ok, length,
                                                                        c.lengths[dst])))

    return jax.lax.cond(partial > 0, copy_partial, lambda c: c, cache)


def gather(cache: PagedKVCache, layer: int, seq):
    """The rows of slot `seq` in `layer` read through its block table: [max_blocks * bs, W]
    as stored (an FP8 cache: uint8 [.., 656], `mla.dequantize_kv_fp8` reads them; rows at or
    past lengths[seq] are unspecified). For tests and debugging."""
    _seq_ids("gather", cache, seq)
    table = jnp.clip(cache.block_table[seq], 0, cache.num_blocks - 1)
    return cache.kv[layer, table, :, 0].reshape(-1, cache.kv.shape[-1])
