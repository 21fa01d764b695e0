"""The paged MLA cache and its allocator: invariants under random allocate/append/fork/free.

After every operation: each block's refcount equals the number of tables holding it (no block is
owned twice except shared full blocks after a fork), free blocks are exactly those with refcount
0, a sequence holds ceil(length / 64) blocks, and its rows read back through the block table equal
what was appended (a numpy shadow of every sequence).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds.models import kv_cache as kvc

L, W, BS = 2, 8, 64
_append = jax.jit(kvc.append)
_fork = jax.jit(kvc.fork)
_free = jax.jit(kvc.free)


def invariants(cache, shadow):
    table = np.asarray(cache.block_table)
    refcount = np.asarray(cache.refcount)
    lengths = np.asarray(cache.lengths)
    counts = np.bincount(table[table >= 0], minlength=cache.num_blocks)
    np.testing.assert_array_equal(refcount, counts)  # refcount = tables holding the block
    for seq in range(table.shape[0]):
        held = table[seq][table[seq] >= 0]
        assert len(set(held.tolist())) == len(held), "a table holds one block twice"
        assert (table[seq, :len(held)] >= 0).all(), "holes in a block table"
        rows = shadow.get(seq, np.zeros((L, 0, W), np.float32))
        assert lengths[seq] == rows.shape[1]
        assert len(held) == -(-lengths[seq] // BS)
        for layer in range(L):
            got = np.asarray(kvc.gather(cache, layer, seq))[:lengths[seq]]
            np.testing.assert_array_equal(got, rows[layer])
    # A block written by appends belongs to one sequence unless it is a full shared block.
    for block in np.flatnonzero(refcount > 1):
        for seq in range(table.shape[0]):
            cols = np.flatnonzero(table[seq] == block)
            assert all((c + 1) * BS <= lengths[seq] for c in cols), "shared partial block"


def test_random_operations_keep_invariants():
    rng = np.random.default_rng(0)
    cache = kvc.init_cache(L, num_blocks=24, max_seqs=4, max_blocks_per_seq=6, width=W,
                           dtype=jnp.float32)
    shadow = {}
    for _ in range(40):
        op = rng.choice(["append", "append", "append", "fork", "free"])
        seq = int(rng.integers(4))
        if op == "append":
            t = int(rng.choice([1, 5, 63, 64, 65]))
            if shadow.get(seq, np.zeros((L, 0, W))).shape[1] + t > 6 * BS:
                continue
            if int(kvc.num_free_blocks(cache)) < -(-t // BS) + 1:
                continue
            rows = rng.standard_normal((L, t, W)).astype(np.float32)
            cache = kvc.check(_append(cache, seq, jnp.asarray(rows)))
            shadow[seq] = np.concatenate([shadow.get(seq, np.zeros((L, 0, W), np.float32)),
                                          rows], axis=1)
        elif op == "fork":
            dst = int((seq + 1 + rng.integers(3)) % 4)
            if int(kvc.num_free_blocks(cache)) < 1:
                continue
            cache = kvc.check(_fork(cache, seq, dst))
            shadow[dst] = shadow.get(seq, np.zeros((L, 0, W), np.float32)).copy()
        else:
            cache = _free(cache, seq)
            shadow.pop(seq, None)
        invariants(cache, shadow)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    cache = kvc.init_cache(L, num_blocks=8, max_seqs=3, max_blocks_per_seq=4, width=W,
                           dtype=jnp.float32)
    prefix = np.arange(L * 130 * W, dtype=np.float32).reshape(L, 130, W)
    cache = kvc.append(cache, 0, jnp.asarray(prefix))  # 2 full blocks + 2 rows
    cache = kvc.fork(cache, 0, 1)
    table = np.asarray(cache.block_table)
    assert list(table[1, :2]) == list(table[0, :2]) and table[1, 2] != table[0, 2]
    assert list(np.asarray(cache.refcount)[table[0, :3]]) == [2, 2, 1]
    # Appends after the fork diverge without touching each other's rows.
    a, b = np.full((L, 1, W), 7.0, np.float32), np.full((L, 1, W), -7.0, np.float32)
    cache = kvc.append(kvc.append(cache, 0, jnp.asarray(a)), 1, jnp.asarray(b))
    invariants(cache, {0: np.concatenate([prefix, a], 1), 1: np.concatenate([prefix, b], 1)})
    # Freeing the source keeps the shared blocks alive for the fork; freeing both returns all.
    cache = kvc.free(cache, 0)
    invariants(cache, {1: np.concatenate([prefix, b], 1)})
    cache = kvc.free(cache, 1)
    assert int(kvc.num_free_blocks(cache)) == 8
    # Freed blocks are reusable: the whole pool again.
    full = np.ones((L, 4 * BS, W), np.float32)
    cache = kvc.check(kvc.append(kvc.append(cache, 0, jnp.asarray(full)), 2, jnp.asarray(full)))
    assert int(kvc.num_free_blocks(cache)) == 0


def test_out_of_blocks_and_too_long_are_flagged():
    cache = kvc.init_cache(1, num_blocks=2, max_seqs=2, max_blocks_per_seq=3, width=W,
                           dtype=jnp.float32)
    cache = kvc.append(cache, 0, jnp.ones((1, 100, W)))
    cache = jax.jit(kvc.append)(cache, 1, jnp.ones((1, 10, W)))  # both blocks are seq 0's
    assert int(cache.error) == kvc.OUT_OF_BLOCKS
    assert int(cache.lengths[1]) == 0 and int(cache.lengths[0]) == 100  # capped at its blocks
    with pytest.raises(RuntimeError, match="out of blocks"):
        kvc.check(cache)
    cache = kvc.init_cache(1, num_blocks=8, max_seqs=1, max_blocks_per_seq=2, width=W)
    cache = kvc.append(cache, 0, jnp.ones((1, 129, W)))
    assert int(cache.error) == kvc.SEQ_TOO_LONG and int(cache.lengths[0]) == 128
    with pytest.raises(RuntimeError, match="max_blocks_per_seq"):
        kvc.check(cache)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        kvc.init_cache(1, 0, 1, 1, W)
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got True"):
        kvc.init_cache(1, True, 1, 1, W)  # a bool is no size (_checks.is_int)
    assert kvc.init_cache(1, np.int64(2), 1, 1, W).kv.shape[1] == 2  # numpy ints are


def _filled():
    """Two sequences, one forked from the other (shared full blocks), for the checks below."""
    cache = kvc.init_cache(L, num_blocks=8, max_seqs=3, max_blocks_per_seq=3, width=W,
                           dtype=jnp.float32)
    rows = np.arange(L * 70 * W, dtype=np.float32).reshape(L, 70, W)
    cache = kvc.fork(kvc.append(cache, 0, jnp.asarray(rows)), 0, 1)
    return cache, {0: rows, 1: rows.copy()}


def test_sequence_ids_outside_the_slots_or_repeated_are_refused():
    """Concrete ids are checked (ValueError); traced ones cannot be, so the call changes nothing
    but the sticky BAD_SEQ bit. Before, jnp's index clamping made free(cache, max_seqs) release
    the last slot's blocks while it still held them, and -1 wrapped to the last slot."""
    cache, shadow = _filled()
    one = jnp.ones((L, 1, W), jnp.float32)
    lie = r"sequence ids must lie in \[0, max_seqs = 3\)"
    for bad in (3, -1):
        with pytest.raises(ValueError, match="append: " + lie):
            kvc.append(cache, bad, one)
        with pytest.raises(ValueError, match="free: " + lie):
            kvc.free(cache, bad)
        with pytest.raises(ValueError, match="fork: " + lie):
            kvc.fork(cache, bad, 2)
        with pytest.raises(ValueError, match="fork: " + lie):
            kvc.fork(cache, 0, bad)
    for bad in (1.7, True, "1", np.array([0.0, 1.0]), 2 ** 33):  # were slot 1 / obscure errors
        with pytest.raises(ValueError, match="free: sequence ids must"):
            kvc.free(cache, bad)
    with pytest.raises(ValueError, match="append: sequence ids must be integers, got a traced"):
        jax.jit(lambda c, s: kvc.append(c, s, one))(cache, 1.0)
    with pytest.raises(ValueError, match=r"reserve: sequence ids must be distinct, got \[0, 0\]"):
        kvc.reserve(cache, jnp.array([0, 0]), 1)
    with pytest.raises(ValueError, match=r"write: sequence ids must be distinct"):
        kvc.write(cache, 0, np.array([1, 1]), jnp.ones((2, 1, W)))
    traced = [lambda c, s: _append(c, s, one), _free, lambda c, s: _fork(c, s, 2),
              lambda c, s: _fork(c, 0, s),
              jax.jit(lambda c, s: kvc.reserve(c, jnp.array([0, s]), 65)),
              jax.jit(lambda c, s: kvc.commit(c, jnp.array([0, s]), 1)),
              jax.jit(lambda c, s: kvc.write(c, 0, jnp.array([s, 2]), jnp.ones((2, 1, W))))]
    for op in traced:
        for bad in (3, -1, 2 ** 20):
            got = op(cache, bad)
            assert int(got.error) == kvc.BAD_SEQ
            invariants(got, shadow)
            np.testing.assert_array_equal(np.asarray(got.kv), np.asarray(cache.kv))
            with pytest.raises(RuntimeError, match="a sequence id outside"):
                kvc.check(got)
    got = jax.jit(lambda c, s: kvc.commit(c, jnp.array([1, s]), 1))(cache, 1)  # repeated
    assert int(got.error) == kvc.BAD_SEQ and list(np.asarray(got.lengths)) == [70, 70, 0]


def test_fork_onto_itself_changes_nothing():
    """fork(cache, s, s) used to free s first and then copy the now empty s: the sequence was
    lost."""
    cache, shadow = _filled()
    for fork in (kvc.fork, _fork):
        got = fork(cache, 1, 1)
        invariants(got, shadow)
        assert int(got.error) == 0


def test_counts_layers_and_row_shapes_are_checked():
    """A negative count would move a length back into shared blocks (the next append then wrote
    over the other sequence's rows); rows of width 1, or fewer layers than the pool, were
    broadcast or silently left out; a layer past the pool's was dropped."""
    cache, shadow = _filled()
    with pytest.raises(ValueError, match=r"commit: num_new must be an int >= 0, got -1"):
        kvc.commit(cache, 1, -1)
    with pytest.raises(ValueError, match=r"reserve: num_new must be an int >= 0, got -2"):
        kvc.reserve(cache, 1, -2)
    got = jax.jit(kvc.commit)(cache, 1, -6)  # traced: counts as 0
    invariants(got, shadow)
    with pytest.raises(ValueError, match=r"write: rows must be \[B, T, W\] = \[1, T, 8\], got "
                                         r"\(1, 1, 1\)"):
        kvc.write(cache, 0, 1, jnp.ones((1, 1, 1)))
    with pytest.raises(ValueError, match=r"write: rows must be \[B, T, W\] = \[2, T, 8\]"):
        kvc.write(cache, 0, jnp.array([0, 1]), jnp.ones((1, 1, W)))
    with pytest.raises(ValueError, match=r"write: layer must lie in \[0, 2\), got 2"):
        kvc.write(cache, 2, 1, jnp.ones((1, 1, W)))
    with pytest.raises(ValueError, match=r"append: rows must be \[L, T, W\] = \[2, T, 8\], got "
                                         r"\(1, 1, 8\)"):
        kvc.append(cache, 1, jnp.ones((1, 1, W)))


def test_free_of_several_slots_and_twice():
    """free takes a slot or [B] slots (the first commit of the id checks freed only the first of
    several); a second free changes nothing."""
    cache, _ = _filled()
    for free in (kvc.free, _free):
        got = free(cache, jnp.array([0, 1]))
        invariants(got, {})
        assert int(kvc.num_free_blocks(got)) == 8 and int(got.error) == 0
        again = free(got, 1)
        invariants(again, {})
        assert int(kvc.num_free_blocks(again)) == 8 and int(again.error) == 0


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.uint8])
def test_an_8_bit_pool_without_fp8_is_refused(dtype):
    """An 8-bit pool is the FP8 layout (656-byte rows): asked for with fp8=False it used to be
    made 576 wide and then fail on the first write with a broadcasting error."""
    with pytest.raises(ValueError, match=r"init_cache: an 8-bit pool holds FlashMLA's FP8 rows; "
                                         r"pass fp8=True"):
        kvc.init_cache(1, 4, 1, 1, 576, dtype=dtype)
