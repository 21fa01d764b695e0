"""Orbax checkpoints of a sharded train state, on local disk or 3FS.

`CheckpointManager` wraps `orbax.checkpoint.CheckpointManager` (step directories, atomic
temporary-directory-then-rename commit, async save, `max_to_keep`, save interval) and picks how
array bytes reach the files:

  backend="orbax"   Orbax's own tensorstore path (OCDBT + zarr3); the default off 3FS.
  backend="posix"   `ShardHandler` over `threefs.PosixIO` (pwritev/preadv, fsync, CRC-32).
  backend="usrbio"  `ShardHandler` over `threefs.UsrbioIO` (3FS native batched I/O).
  backend="auto"    usrbio on a 3FS mount when the client imports, posix on a 3FS mount
                    without it, orbax elsewhere.

The shard handler
-----------------
Orbax keeps what it does well: the step directories, the temporary-directory-then-rename
commit, async saves, `max_to_keep`, the save interval. This handler only replaces how array
bytes reach the files, so that on 3FS they go through USRBIO in large batches, one writer per
file, each file synced (`force_fsync`/`fsync`) before Orbax commits.

Layout of an item directory (one set per process):

    shards.p<k>.<n>.bin   shard bytes of process k, packed at 4 KiB-aligned offsets
    index.p<k>.json       for every leaf: key path, global shape, dtype, and per stored shard
                          its file, offset, byte count, global [start, stop) box and CRC-32

Only shards with replica_id 0 are written, so replicated arrays are stored once. Restore reads
the shards overlapping what each target device needs and assembles arrays of any sharding
(`jax.make_array_from_callback`), which is how a checkpoint saved at expert=8 loads at
expert=4 or on one device. CRC-32 of every shard is checked on read: a flipped bit or a
truncated file fails the restore with the file's name instead of returning wrong weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import glob
import json
import os
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import future as ocp_future

from jax_ds.storage import threefs

ALIGN = 4096            # file offsets of shards: page- and O_DIRECT-friendly
FILE_BYTES = 512 << 20  # start a new file past this size, so large states write in parallel


class CorruptCheckpointError(ValueError):
    """A shard's bytes do not match the checksum recorded when it was saved."""


@dataclasses.dataclass
class ShardSave(ocp.args.CheckpointArgs):
    state: Any


@dataclasses.dataclass
class ShardRestore(ocp.args.CheckpointArgs):
    # A pytree of jax.ShapeDtypeStruct (or arrays) with the target shardings; None returns
    # {key path: numpy array} on the host.
    target: Any = None


def _box(index, shape) -> tuple[list[int], list[int]]:
    """A shard index (tuple of slices) -> ([start...], [stop...])."""
    start, stop = [], []
    for sl, n in zip(index, shape):
        a, b, _ = sl.indices(n)
        start.append(a)
        stop.append(b)
    return start, stop


class ShardHandler(ocp.AsyncCheckpointHandler):
    """Saves and restores a pytree of arrays as raw shard files through a `threefs` backend."""

    def __init__(self, io, *, threads: int = 8, file_bytes: int = FILE_BYTES):
        self.io = io
        self.threads = threads
        self.file_bytes = file_bytes

    # ----------------------------------------------------------------------------- save

    def _snapshot(self, state):
        """Copies every stored shard to host memory (the only blocking part of a save)."""
        leaves = jax.tree_util.tree_leaves_with_path(state)
        for _, x in leaves:
            if isinstance(x, jax.Array):
                x.copy_to_host_async()
        proc = jax.process_index()
        entries, files = [], {}
        n, used = 0, 0
        for path, x in leaves:
            key = jax.tree_util.keystr(path)
            if isinstance(x, jax.Array):
                if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                    raise TypeError(f"checkpoint: {key} is a PRNG key array; store "
                                    f"jax.random.key_data(...) instead")
                parts = [(s.index, np.array(s.data, copy=True))
                         for s in x.addressable_shards if s.replica_id == 0]
            else:
                arr = np.array(x, copy=True)
                parts = [((slice(None),) * arr.ndim, arr)] if proc == 0 else []
            shape = tuple(np.shape(x))
            entry = {"key": key, "shape": list(shape), "dtype": np.dtype(x.dtype).name,
                     "shards": []}
            for index, data in parts:
                if used and used + data.nbytes > self.file_bytes:
                    n, used = n + 1, 0
                name = f"shards.p{proc}.{n}.bin"
                start, stop = _box(index, shape)
                shard = {"file": name, "offset": used, "nbytes": int(data.nbytes),
                         "start": start, "stop": stop}
                # Raw bytes (uint8 view): bfloat16 and float8 have no buffer-protocol format.
                raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                files.setdefault(name, []).append((shard, raw))
                entry["shards"].append(shard)
                used += -(-data.nbytes // ALIGN) * ALIGN
            entries.append(entry)
        return proc, entries, files

    def _write(self, directory, snapshot) -> None:
        proc, entries, files = snapshot
        directory = os.fspath(directory)

        def write_one(item):
            name, parts = item
            for shard, data in parts:
                shard["crc32"] = zlib.crc32(data)
            self.io.write_file(os.path.join(directory, name),
                               [(shard["offset"], memoryview(data)) for shard, data in parts])

        # One writer per file (3FS/FUSE serialises writes to a file); files in parallel.
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(write_one, files.items()))
        # The index goes last: a directory without it is visibly incomplete.
        body = json.dumps({"format": "jax_ds.shards/1", "leaves": entries}).encode()
        self.io.write_file(os.path.join(directory, f"index.p{proc}.json"),
                           [(0, memoryview(body))])

    async def async_save(self, directory, args: ShardSave):
        snapshot = self._snapshot(args.state)

        async def commit():
            await asyncio.to_thread(self._write, directory, snapshot)

        return [ocp_future.CommitFutureAwaitingContractedSignals(commit(), name="jax_ds_shards")]

    def save(self, directory, args: ShardSave):
        self._write(directory, self._snapshot(args.state))

    # -------------------------------------------------------------------------- restore

    def _index(self, directory) -> dict[str, dict]:
        leaves: dict[str, dict] = {}
        paths = sorted(glob.glob(os.path.join(os.fspath(directory), "index.p*.json")))
        if not paths:
            raise FileNotFoundError(f"{directory}: no index.p*.json (not a jax_ds shard "
                                    f"checkpoint, or an incomplete one)")
        for p in paths:
            with open(p) as f:
                for e in json.load(f)["leaves"]:
                    leaves.setdefault(e["key"], {**e, "shards": []})["shards"] += e["shards"]
        return leaves

    def _read(self, directory, wanted) -> dict[tuple[str, int], np.ndarray]:
        """Reads shards [(entry, shard)], batched per file; verifies CRC-32 of each."""
        by_file: dict[str, list] = {}
        for entry, shard in wanted:
            by_file.setdefault(shard["file"], []).append((entry, shard))
        out = {}

        def read_one(item):
            name, items = item
            path = os.path.join(os.fspath(directory), name)
            bufs = [np.empty(shard["nbytes"], np.uint8) for _, shard in items]
            self.io.read_file(path, [(s["offset"], memoryview(b)) for (_, s), b in
                                     zip(items, bufs)])
            for (entry, shard), buf in zip(items, bufs):
                if zlib.crc32(buf) != shard["crc32"]:
                    raise CorruptCheckpointError(
                        f"{path}: checksum mismatch in {entry['key']} at offset "
                        f"{shard['offset']} ({shard['nbytes']} bytes): the file is corrupt")
                shape = [b - a for a, b in zip(shard["start"], shard["stop"])]
                out[(name, shard["offset"])] = buf.view(np.dtype(entry["dtype"])).reshape(shape)

        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(read_one, by_file.items()))
        return out

    def restore(self, directory, args: ShardRestore | None = None):
        index = self._index(directory)
        target = None if args is None else args.target
        if target is None:
            wanted = [(e, s) for e in index.values() for s in e["shards"]]
            data = self._read(directory, wanted)
            return {k: _assemble(e, data, (slice(None),) * len(e["shape"]))
                    for k, e in index.items()}
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        plans, wanted = [], []
        for path, t in leaves:
            key = jax.tree_util.keystr(path)
            if key not in index:
                raise KeyError(f"checkpoint {directory} has no {key}; it holds "
                               f"{len(index)} arrays, e.g. {sorted(index)[:3]}")
            entry = index[key]
            if tuple(entry["shape"]) != tuple(t.shape):
                raise ValueError(f"checkpoint {key}: saved shape {tuple(entry['shape'])}, "
                                 f"target shape {tuple(t.shape)}")
            regions = t.sharding.addressable_devices_indices_map(tuple(t.shape)).values()
            boxes = [_box(r, t.shape) for r in regions]
            wanted += [(entry, s) for s in entry["shards"]
                       if any(_overlaps(s, b) for b in boxes)]
            plans.append((entry, t))
        data = self._read(directory, _unique(wanted))
        arrays = [jax.make_array_from_callback(
            tuple(t.shape), t.sharding,
            lambda idx, e=entry, t=t: _assemble(e, data, idx).astype(t.dtype, copy=False))
            for entry, t in plans]
        return jax.tree_util.tree_unflatten(treedef, arrays)


ocp.args.register_with_handler(ShardHandler, for_save=True)(ShardSave)
ocp.args.register_with_handler(ShardHandler, for_restore=True)(ShardRestore)


def _overlaps(shard, box) -> bool:
    start, stop = box
    return all(a < d and c < b for a, b, c, d in zip(shard["start"], shard["stop"], start, stop))


def _unique(wanted):
    seen, out = set(), []
    for entry, shard in wanted:
        k = (shard["file"], shard["offset"])
        if k not in seen:
            seen.add(k)
            out.append((entry, shard))
    return out


def _assemble(entry, data, index) -> np.ndarray:
    """The region `index` of the saved array, copied together from its stored shards."""
    shape = entry["shape"]
    start, stop = _box(index, shape)
    out = np.empty([b - a for a, b in zip(start, stop)], np.dtype(entry["dtype"]))
    covered = 0
    for s in entry["shards"]:
        if not _overlaps(s, (start, stop)) and len(shape):
            continue
        block = data.get((s["file"], s["offset"]))
        if block is None:
            continue
        lo = [max(a, c) for a, c in zip(s["start"], start)]
        hi = [min(b, d) for b, d in zip(s["stop"], stop)]
        dst = tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, start))
        src = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, s["start"]))
        out[dst] = block[src]
        covered += int(np.prod([h - l for l, h in zip(lo, hi)]))
    if covered < out.size:
        raise ValueError(f"checkpoint {entry['key']}: stored shards cover {covered} of "
                         f"{out.size} elements of region {list(zip(start, stop))}")
    return out


# ----------------------------------------------------------------------------- manager

BACKENDS = ("auto", "orbax", "posix", "usrbio")


class Restored(NamedTuple):
    step: int
    state: Any   # the array pytree, in the target's structure and shardings
    meta: dict   # JSON metadata saved with it (data position, ...)


def abstract_state(tree, mesh: Mesh | None = None):
    """A pytree of `jax.ShapeDtypeStruct`s with shardings, for restoring `tree`'s structure.

    `tree` holds arrays or ShapeDtypeStructs (e.g. `nnx.state(nnx.eval_shape(...))`). With a
    mesh, every leaf gets NamedSharding(mesh, spec): spec from the NNX `sharding_names`
    metadata, else the leaf's own NamedSharding spec, else replicated. Without one, leaves keep
    their sharding (or go to the first device).
    """
    specs = jax.tree_util.tree_leaves(nnx.get_partition_spec(tree),
                                      is_leaf=lambda x: isinstance(x, P))
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(specs) != len(leaves):   # no NNX metadata to line up with: use the leaves alone
        specs = [P()] * len(leaves)

    def one(x, spec):
        own = getattr(x, "sharding", None)
        if mesh is None:
            sharding = own if own is not None else SingleDeviceSharding(jax.devices()[0])
        else:
            if not spec and isinstance(own, NamedSharding):
                spec = own.spec
            sharding = NamedSharding(mesh, spec or P())
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    return jax.tree_util.tree_unflatten(treedef, [one(x, s) for x, s in zip(leaves, specs)])


class CheckpointManager:
    """Saves and restores a train state pytree every `save_interval_steps`, keeping the newest
    `max_to_keep`; a thin layer over `orbax.checkpoint.CheckpointManager`.

    The state is any pytree of arrays; the usual one is

        {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
         "load": ExpertLoad, "plan": {"phy2log": ..., ...}}

    with scalars such as the data position in `meta` (saved as JSON beside it). A save writes
    into a temporary directory that Orbax renames once every file is synced, so a save killed
    at any moment leaves the previous steps restorable; unfinished directories are invisible
    to `latest_step`/`all_steps`/`restore`.

    Args:
      directory: root of the step directories (local disk or a 3FS mount).
      max_to_keep: newest checkpoints kept (None keeps all).
      save_interval_steps: `save` writes only on multiples of this (unless force=True).
      async_save: return from `save` once arrays are copied to host; files are written in the
        background (`wait_until_finished` blocks until committed).
      backend: "auto", "orbax", "posix" or "usrbio" (see the module docstring).
      mounts_file: /proc/mounts-format file for 3FS detection (tests).
      usrbio_client: the `hf3fs_fuse.io` module to use (default: import it).
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True, backend: str = "auto", mounts_file: str | None = None,
                 usrbio_client=None):
        if backend not in BACKENDS:
            raise ValueError(f"CheckpointManager: backend={backend!r}, expected one of {BACKENDS}")
        self.directory = os.path.abspath(os.fspath(directory))
        mount = threefs.mount_point(self.directory, mounts_file=mounts_file)
        if backend == "auto":
            if mount is None:
                backend = "orbax"
            else:
                client = usrbio_client or threefs.load_client()
                backend = "usrbio" if client is not None else "posix"
        if backend == "usrbio":
            client = usrbio_client or threefs.load_client()
            self.io = threefs.UsrbioIO(mount or self.directory, client)
        elif backend == "posix":
            self.io = threefs.PosixIO()
        else:
            self.io = None
        self.backend = backend
        self.mount = mount
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True)
        state_handler = (ShardHandler(self.io) if self.io is not None
                         else ocp.StandardCheckpointHandler())
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": state_handler, "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state, *, meta: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` (and JSON `meta`) as `step`; False if the interval skips it."""
        item = ShardSave(state) if self.io is not None else ocp.args.StandardSave(state)
        meta = {"step": int(step), **(meta or {})}
        return self._manager.save(
            int(step), args=ocp.args.Composite(state=item, meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int | None = None, *, target=None,
                target_mesh: Mesh | None = None) -> Restored:
        """Restores `step` (default: the latest committed one).

        target: the state's structure, as arrays or ShapeDtypeStructs (e.g.
          `{"model": nnx.state(nnx.eval_shape(make_model)), ...}`); see `abstract_state`.
          None returns the arrays as saved: nested dicts (orbax) or {key path: numpy} (shards).
        target_mesh: place every array on this mesh (same PartitionSpecs, any axis sizes):
          a checkpoint saved at expert=8 restores at expert=4 or on one device.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        abstract = None if target is None else abstract_state(target, target_mesh)
        if self.io is not None:
            item = ShardRestore(abstract)
        else:
            item = ocp.args.StandardRestore(abstract)
        out = self._manager.restore(
            int(step), args=ocp.args.Composite(state=item, meta=ocp.args.JsonRestore()))
        return Restored(int(step), out["state"], dict(out["meta"] or {}))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def wait_until_finished(self) -> None:
        """Blocks until the running async save has committed (raises its error, if any)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
