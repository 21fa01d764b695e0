"""Checkpoint save and restore throughput on one disk: ours vs Orbax defaults vs the raw ceiling.

A sharded train-state-like pytree of --size-gb (bfloat16 expert weights and float32 Adam
moments sharded over the `expert` axis of every device, a column-sharded projection, a
replicated embedding that is stored once; random bits, so nothing compresses) is saved and
restored, in one run and in the same directory, by:
  raw     a plain sequential write: the same bytes (every shard with replica_id 0) written by
          one writer into one file in --raw-block-mb pieces, fsync'ed; read back the same way
  raw direct     the same with O_DIRECT (no page-cache copy)
  raw direct x8  the same bytes in files of `ShardOptions.file_bytes`, 8 written (read) at a
          time, O_DIRECT: a virtual or networked disk serves parallel streams faster than one
  orbax   orbax.checkpoint.CheckpointManager with default options (async, OCDBT, zarr3):
          StandardSave, then StandardRestore into the abstract target
  ours    jax_ds.storage.CheckpointManager with default options (shard files + CRC-32C checked
          at restore, settings in `ShardOptions`), restore(target=abstract)
Save: from the call until the step is committed (`wait_until_finished`). Restore: from the call
until every array is on its device, targets with the saved shardings. Between the two, every
file of the contestant is fsync'ed and dropped from the page cache (posix_fadvise DONTNEED), so
restores read the disk; the fsync's seconds are recorded (a contestant that left dirty pages
would show them there). A cache below a virtual machine's disk is out of reach: the raw row has
the same exposure. --rounds interleave the contestants in rotating order; the table shows the
median, the JSON every round.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds import cli
from jax_ds.bench import environment, print_table, write_json
from jax_ds.parallel.mesh import make_mesh, request_cpu_devices
from jax_ds.storage import CheckpointManager, ShardOptions
from jax_ds.storage.threefs import ALIGN, PosixIO, aligned_empty

request_cpu_devices(8)  # CPU hosts: a sharded state over 8 virtual devices (GPUs ignore it)

LEAVES = (  # name, share of the bytes, dtype, partition of a [rows, cols] array
    ("experts.w_gate", 0.2, jnp.bfloat16, P("expert")),
    ("experts.w_up", 0.2, jnp.bfloat16, P("expert")),
    ("experts.w_down", 0.2, jnp.bfloat16, P("expert")),
    ("adam.mu.experts", 0.15, jnp.float32, P("expert")),
    ("adam.nu.experts", 0.15, jnp.float32, P("expert")),
    ("attention.wq", 0.07, jnp.bfloat16, P(None, "expert")),
    ("embed", 0.03, jnp.bfloat16, P()),   # replicated: stored once
)
COLUMNS = ("", "save GB/s", "% of raw", "% of best", "restore GB/s", "% of raw", "% of best",
           "save s", "blocking s", "restore s", "fsync after save s", "exact")


def add_arguments(parser):
    parser.add_argument("--size-gb", type=cli.positive_float, default=2.0,
                        help="state size (1e9 bytes)")
    parser.add_argument("--rounds", type=cli.at_least(1), default=3,
                        help="save+restore rounds each")
    parser.add_argument("--dir", default=None,
                        help="folder on the disk to measure (default: a new temp folder)")
    parser.add_argument("--raw-block-mb", type=cli.at_least(1), default=64,
                        help="bytes per pwrite/preadv call of the raw row (MiB)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    defaults = ShardOptions()
    parser.add_argument("--threads", type=cli.at_least(1), default=defaults.threads,
                        help="ours: shard handler threads")
    parser.add_argument("--file-mb", type=cli.at_least(1), default=defaults.file_bytes >> 20,
                        help="ours: shard file size (MiB)")
    parser.add_argument("--read-mb", type=cli.at_least(1), default=defaults.read_bytes >> 20,
                        help="ours: bytes per restore read task (MiB)")


def shard_options(args) -> ShardOptions:
    """The shard handler's settings as the command line gives them (defaults: ShardOptions())."""
    return dataclasses.replace(ShardOptions(), threads=args.threads,
                               file_bytes=args.file_mb << 20, read_bytes=args.read_mb << 20)


def build_state(size_bytes: int, mesh):
    """The benchmark pytree: {name: array [rows, 4096]} of about `size_bytes` (random bits)."""
    n = mesh.shape["expert"]
    state = {}
    for i, (name, share, dtype, spec) in enumerate(LEAVES):
        dtype, cols = np.dtype(dtype), 4096
        rows = max(n, int(size_bytes * share / dtype.itemsize / cols) // n * n)
        sharding = NamedSharding(mesh, spec)
        rng = np.random.default_rng(i)

        def fill(index, rows=rows, dtype=dtype, rng=rng):
            shape = [len(range(*sl.indices(d))) for sl, d in zip(index, (rows, cols))]
            bits = rng.integers(0, 256, [*shape, dtype.itemsize], dtype=np.uint8)
            return bits.view(dtype).reshape(shape)

        state[name] = jax.make_array_from_callback((rows, cols), sharding, fill)
    return jax.block_until_ready(state)


def stored_bytes(state) -> list[np.ndarray]:
    """The bytes a checkpoint holds: every shard with replica_id 0, as uint8 views."""
    return [np.asarray(s.data).reshape(-1).view(np.uint8) for x in state.values()
            for s in x.addressable_shards if s.replica_id == 0]


def drop_cache(folder) -> float:
    """fsyncs every file under `folder` and drops it from the page cache; returns the fsync
    seconds."""
    synced = 0.0
    for parent, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                os.fsync(fd)
                synced += time.perf_counter() - t0
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return synced


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
               for k in a)


@dataclasses.dataclass
class Round:
    save_s: float       # until committed
    blocking_s: float   # until `save` returned: what a training loop waits for
    restore_s: float
    fsync_after_save_s: float
    exact: bool | None


def run_raw(folder, data, block, *, direct=False, writers=1, file_bytes=None) -> Round:
    """The bytes `data` into files of `file_bytes` (one file: None), one writer per file and
    `writers` at a time, fsync'ed; then read back the same way. With `direct`, O_DIRECT (data,
    block and file_bytes are 4 KiB multiples, data 4 KiB-aligned)."""
    total = data.nbytes
    step = file_bytes or total
    files = [(os.path.join(folder, f"raw.{i}.bin"), start, min(start + step, total))
             for i, start in enumerate(range(0, total, step))]
    flag = os.O_DIRECT if direct else 0

    def write(file):
        path, start, stop = file
        view = memoryview(data)[start:stop]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        for at in range(0, len(view), block):
            os.pwrite(fd, view[at:at + block], at)
        os.fsync(fd)
        os.close(fd)

    def read(file):
        path, start, stop = file
        view = memoryview(out)[start:stop]
        fd = os.open(path, os.O_RDONLY | flag)
        for at in range(0, len(view), block):
            if os.preadv(fd, [view[at:at + block]], at) != len(view[at:at + block]):
                raise OSError(f"{path}: short read at {at}")
        os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        t0 = time.perf_counter()
        list(pool.map(write, files))
        save_s = time.perf_counter() - t0
        synced = drop_cache(folder)
        out = aligned_empty(total)
        t0 = time.perf_counter()
        list(pool.map(read, files))
        restore_s = time.perf_counter() - t0
    return Round(save_s, save_s, restore_s, synced, bool(np.array_equal(out, data)))


def run_orbax(folder, state, abstract, check) -> Round:
    mngr = ocp.CheckpointManager(os.path.join(folder, "orbax"))
    t0 = time.perf_counter()
    mngr.save(0, args=ocp.args.StandardSave(state))
    blocking_s = time.perf_counter() - t0
    mngr.wait_until_finished()
    save_s = time.perf_counter() - t0
    synced = drop_cache(folder)
    t0 = time.perf_counter()
    got = jax.block_until_ready(mngr.restore(0, args=ocp.args.StandardRestore(abstract)))
    restore_s = time.perf_counter() - t0
    mngr.close()
    return Round(save_s, blocking_s, restore_s, synced,
                 _same(state, got) if check else None)


def run_ours(folder, state, abstract, check, options: ShardOptions = ShardOptions()) -> Round:
    with CheckpointManager(os.path.join(folder, "ours"), shard_options=options) as mngr:
        t0 = time.perf_counter()
        mngr.save(0, state)
        blocking_s = time.perf_counter() - t0
        mngr.wait_until_finished()
        save_s = time.perf_counter() - t0
        synced = drop_cache(folder)
        t0 = time.perf_counter()
        got = jax.block_until_ready(mngr.restore(0, target=abstract).state)
        restore_s = time.perf_counter() - t0
    return Round(save_s, blocking_s, restore_s, synced, _same(state, got) if check else None)


def disk_of(folder) -> dict:
    """The mount holding `folder` (device, type, options) and its free space."""
    real, best = os.path.realpath(folder), None
    with open("/proc/mounts") as f:
        for line in f:
            dev, point, fstype, opts = line.split()[:4]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and (
                    best is None or len(point) > len(best["mount"])):
                best = {"device": dev, "mount": point, "fstype": fstype, "options": opts}
    st = os.statvfs(folder)
    return {**(best or {}), "free_gb": st.f_bavail * st.f_frsize / 1e9}


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(args):
    env = environment()
    mesh = make_mesh(expert=jax.device_count())
    state = build_state(int(args.size_gb * 1e9), mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    bufs = stored_bytes(state)
    nbytes = sum(b.nbytes for b in bufs)
    data = aligned_empty(-(-nbytes // ALIGN) * ALIGN)   # O_DIRECT wants whole 4 KiB blocks
    np.concatenate(bufs, out=data[:nbytes])
    data[nbytes:] = 0
    del bufs
    options = shard_options(args)
    block, file_bytes = args.raw_block_mb << 20, options.file_bytes
    contestants = {
        "raw": lambda folder, check: run_raw(folder, data, block),
        "raw direct": lambda folder, check: run_raw(folder, data, block, direct=True),
        "raw direct x8": lambda folder, check: run_raw(folder, data, block, direct=True,
                                                       writers=8, file_bytes=file_bytes),
        "orbax": lambda folder, check: run_orbax(folder, state, abstract, check),
        "ours": lambda folder, check: run_ours(folder, state, abstract, check, options),
    }
    names = list(contestants)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="jax_ds_bench_ckpt_", dir=args.dir)
    disk = disk_of(root)
    print(f"{nbytes / 1e9:.2f} GB in {len(state)} arrays over {jax.device_count()} "
          f"{env['platform']} devices; disk {disk.get('device')} ({disk.get('fstype')}) at "
          f"{root}; load average {os.getloadavg()}")
    rounds = {name: [] for name in names}
    try:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                folder = os.path.join(root, name.replace(" ", "_"))
                os.makedirs(folder)
                res = contestants[name](folder, r == 0)
                shutil.rmtree(folder)
                os.sync()   # the deletion's discards settle before the next contestant
                rounds[name].append(res)
                print(f"round {r + 1}/{args.rounds} {name:>13}: save "
                      f"{nbytes / res.save_s / 1e9:.2f} GB/s, restore "
                      f"{nbytes / res.restore_s / 1e9:.2f} GB/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary = {}
    for name, rs in rounds.items():
        med = {f: statistics.median(getattr(r, f) for r in rs)
               for f in ("save_s", "blocking_s", "restore_s", "fsync_after_save_s")}
        summary[name] = {"save_gbps": nbytes / med["save_s"] / 1e9,
                         "restore_gbps": nbytes / med["restore_s"] / 1e9,
                         **{f"{f}_median": v for f, v in med.items()},
                         "exact": rs[0].exact, "rounds": [dataclasses.asdict(r) for r in rs]}
    best = {what: max(summary[n][what] for n in names if n.startswith("raw"))
            for what in ("save_gbps", "restore_gbps")}
    table = []
    for name, s in summary.items():
        row = [name]
        for what in ("save_gbps", "restore_gbps"):
            row += [f"{s[what]:.2f}", f"{100 * s[what] / summary['raw'][what]:.0f}%",
                    f"{100 * s[what] / best[what]:.0f}%"]
        table.append(row + [f"{s['save_s_median']:.2f}", f"{s['blocking_s_median']:.2f}",
                            f"{s['restore_s_median']:.2f}",
                            f"{s['fsync_after_save_s_median']:.2f}",
                            {True: "yes", False: "NO", None: "-"}[s["exact"]]])
    io = PosixIO()
    print_table(
        f"Checkpoint of {nbytes / 1e9:.2f} GB ({jax.device_count()} {env['platform']} devices) "
        f"on {disk.get('device')} ({disk.get('fstype')}), median of {args.rounds} rounds",
        COLUMNS, table,
        ["GB = 1e9 bytes. save: until committed, fsync'ed; blocking: until save() returned; "
         "restore: until on device, after fsync + posix_fadvise(DONTNEED) of every file",
         "(page cache dropped for all rows; O_DIRECT rows and ours bypass it anyway). "
         "% of raw: of the sequential buffered row; % of best: of the fastest raw row",
         f"raw: one writer, one file, {args.raw_block_mb} MiB pwrite/preadv; direct: O_DIRECT; "
         f"x8: {file_bytes >> 20} MiB files, 8 at a time",
         f"orbax: CheckpointManager defaults; ours: jax_ds CheckpointManager, shard files, "
         f"CRC-32C per shard, {options}, O_DIRECT={io.direct} through "
         f"{io.stage_bytes >> 20} MiB staging buffers"])
    path = write_json(args.out, "checkpoint", env, {
        "bytes": nbytes, "arrays": {k: [list(x.shape), str(x.dtype), str(x.sharding.spec)]
                                    for k, x in state.items()},
        "disk": disk, "page_cache": "fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every file "
                                    "after each save, before the restore",
        "raw_block_bytes": block, "ours_options": dataclasses.asdict(options),
        "ours_io": {"direct": io.direct, "stage_bytes": io.stage_bytes},
        "orbax_checkpoint": _version("orbax-checkpoint"), "tensorstore": _version("tensorstore"),
        "cpu_count": os.cpu_count(), "load_average_1_5_15_min": os.getloadavg(),
        "results": summary})
    print(f"wrote {path}")
    return 0
