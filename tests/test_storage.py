"""jax_ds.storage: Orbax checkpoints of a sharded train state; 3FS detection and shard I/O.

Everything runs on the real filesystem (tmp_path) with real Orbax/tensorstore and real optax
state. The one stand-in is `FakeUsrbio`, a thin double of the 3FS USRBIO client module
(`hf3fs_fuse.io`) that mirrors its documented calls and performs them with pread/pwrite.
"""

import errno
import fcntl
import functools
import json
import os
import re
import sys
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.models import DeepSeekConfig, Transformer
from jax_ds.parallel.load_stats import init_expert_load, update_expert_load
from jax_ds.parallel.mesh import make_mesh
from jax_ds.storage import CheckpointManager, CorruptCheckpointError, abstract_state, shards, threefs

CFG = DeepSeekConfig.tiny(num_layers=2)
TX = optax.adamw(1e-2)


# ----------------------------------------------------------------------------- fixtures


def _abstract_train_state():
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    opt = nnx.eval_shape(lambda: nnx.Optimizer(model, TX, wrt=nnx.Param))
    load = jax.eval_shape(lambda: init_expert_load(CFG.num_moe_layers, CFG.num_experts))
    plan = {"phy2log": jax.ShapeDtypeStruct((CFG.num_moe_layers, 8), jnp.int32)}
    return {"model": nnx.state(model), "optimizer": nnx.state(opt), "load": load, "plan": plan}


@pytest.fixture(scope="module")
def train_state():
    """A train state at expert=8: NNX params, optax AdamW state after a step, load stats, plan."""
    mesh = make_mesh(expert=8)
    rng = np.random.default_rng(0)
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    shapes = abstract_state(nnx.state(model), mesh)
    values = jax.tree.map(lambda s: jax.device_put(
        rng.standard_normal(s.shape).astype(s.dtype), s.sharding), shapes)
    nnx.update(model, values)
    opt = nnx.Optimizer(model, TX, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, seed):
        params = nnx.state(model, nnx.Param)
        grads = jax.tree.map(lambda p: jnp.sin(p * seed), params)
        opt.update(model, grads)

    step(model, opt, 3.0)
    counts = jnp.asarray(rng.integers(0, 100, (CFG.num_moe_layers, CFG.num_experts)))
    load = update_expert_load(init_expert_load(CFG.num_moe_layers, CFG.num_experts), counts)
    phy2log = jax.device_put(jnp.tile(jnp.arange(8, dtype=jnp.int32), (CFG.num_moe_layers, 1)),
                             NamedSharding(mesh, P(None, "expert")))
    return {"model": nnx.state(model), "optimizer": nnx.state(opt), "load": load,
            "plan": {"phy2log": phy2log}}


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _small_state(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(32), jnp.bfloat16),
            "count": jnp.asarray(seed, jnp.int32)}


class FakeUsrbio(types.ModuleType):
    """Thin double of `hf3fs_fuse.io`: make_iovec, make_ioring, (de)register_fd, force_fsync,
    extract_mount_point. I/O requests are carried out with os.pread/os.pwrite at wait()."""

    def __init__(self, mount):
        super().__init__("hf3fs_fuse.io")
        self.mount = mount
        self.registered, self.fsynced, self.batches = set(), [], []
        self.fsync_status = 0

    def make_iovec(self, shm, hf3fs_mount_point, block_size=0, numa=-1):
        assert hf3fs_mount_point == self.mount
        return shm.buf   # the real iovec slices like a memoryview of the shared buffer

    def make_ioring(self, hf3fs_mount_point, entries, for_read=True, io_depth=0, priority=None,
                    timeout=None, numa=-1, flags=0):
        return _FakeRing(self, entries, for_read)

    def register_fd(self, fd):
        self.registered.add(fd)

    def deregister_fd(self, fd):
        self.registered.remove(fd)

    def force_fsync(self, fd):  # the binding's ioctl status: 0, or -1 on failure
        assert fd in self.registered
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR, "fd must be readable"
        os.fsync(fd)
        self.fsynced.append(fd)
        return self.fsync_status

    def extract_mount_point(self, path):
        path = os.path.abspath(path)
        return self.mount if path.startswith(self.mount) else None


class _FakeRing:
    def __init__(self, client, entries, for_read):
        self.client, self.entries, self.for_read, self.queue = client, entries, for_read, []

    def prepare(self, iov, for_read, fd, offset, userdata=None):
        assert for_read == self.for_read, "a ring only does the direction it was made for"
        assert fd in self.client.registered, "fd used by USRBIO before register_fd"
        assert len(self.queue) < self.entries
        self.queue.append((iov, fd, offset, userdata))

    def submit(self):
        return self

    def wait(self, min_results=1):
        done, self.queue = self.queue, []
        self.client.batches.append(len(done))
        results = []
        for iov, fd, offset, userdata in done:
            if self.for_read:
                data = os.pread(fd, len(iov), offset)
                iov[:len(data)] = data
                n = len(data)
            else:
                n = os.pwrite(fd, iov, offset)
            results.append(types.SimpleNamespace(result=n, userdata=userdata))
        return results


@pytest.fixture
def on_3fs(tmp_path, monkeypatch):
    """tmp_path/3fs is a 3FS mount (per a fake /proc/mounts) with the fake client importable."""
    mount = tmp_path / "3fs"
    mount.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\nhf3fs.stage {mount} fuse.hf3fs rw,nosuid 0 0\n")
    monkeypatch.setenv("JAX_DS_3FS_MOUNTS", str(mounts))
    client = FakeUsrbio(str(mount))
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", types.ModuleType("hf3fs_fuse"))
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", client)
    return mount, client


# ----------------------------------------------------------------------------- 3FS detection


def test_mount_detection(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("sysfs /sys sysfs rw 0 0\n"
                      "hf3fs.a /mnt/3fs fuse.hf3fs rw 0 0\n"
                      "hf3fs.b /mnt/3fs/with\\040space fuse.hf3fs rw 0 0\n"
                      "fuse /mnt/other fuse.sshfs rw 0 0\n")
    f = str(mounts)
    assert threefs.mount_point("/mnt/3fs/ckpt/1", mounts_file=f) == "/mnt/3fs"
    assert threefs.mount_point("/mnt/3fs/with space/x", mounts_file=f) == "/mnt/3fs/with space"
    assert threefs.mount_point("/mnt/3fsx/y", mounts_file=f) is None
    assert not threefs.is_3fs_path("/mnt/other/z", mounts_file=f)
    assert threefs.is_3fs_path("/mnt/3fs", mounts_file=f)
    assert threefs.mount_point(b"/mnt/3fs/q", mounts_file=f) == "/mnt/3fs"  # bytes paths too


def test_innermost_mount_decides(tmp_path):
    """Nested mounts: the innermost mount holding the path decides (the later of two at one
    point); when that is not 3FS, the path with its symlinks resolved is looked up."""
    root = tmp_path.resolve()
    (root / "3fs" / "ckpt").mkdir(parents=True)
    (root / "link").symlink_to(root / "3fs" / "ckpt")
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n"
                      "hf3fs.a /mnt/3fs fuse.hf3fs rw 0 0\n"
                      "/dev/nvme0n1 /mnt/3fs/local ext4 rw 0 0\n"
                      "hf3fs.b /mnt/3fs/local/inner fuse.hf3fs rw 0 0\n"
                      "tmpfs /mnt/over tmpfs rw 0 0\n"
                      "hf3fs.c /mnt/over fuse.hf3fs rw 0 0\n"
                      f"hf3fs.d {root / '3fs'} fuse.hf3fs rw 0 0\n")
    f = str(mounts)
    assert threefs.mount_point("/mnt/3fs/ckpt", mounts_file=f) == "/mnt/3fs"
    assert threefs.mount_point("/mnt/3fs/local/ckpt", mounts_file=f) is None
    assert not threefs.is_3fs_path("/mnt/3fs/local", mounts_file=f)
    assert threefs.mount_point("/mnt/3fs/local/inner/x", mounts_file=f) == "/mnt/3fs/local/inner"
    assert threefs.mount_point("/mnt/over/x", mounts_file=f) == "/mnt/over"
    assert threefs.mount_point(root / "link" / "step1", mounts_file=f) == str(root / "3fs")
    assert threefs.is_3fs_path(root / "link", mounts_file=f)
    assert not threefs.is_3fs_path(root / "elsewhere", mounts_file=f)


def test_links_are_followed_before_the_lookup(tmp_path):
    """Where the file is decides: a link on 3FS pointing to local disk is local, and ".." after
    a link is the link target's sibling, as the OS resolves it. A mount of an "hf3fs..." source
    is 3FS only as a FUSE mount."""
    root = tmp_path.resolve()
    (root / "3fs").mkdir()
    (root / "local" / "data").mkdir(parents=True)
    (root / "3fs" / "tolocal").symlink_to(root / "local" / "data")
    (root / "local" / "link").symlink_to(root / "3fs")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nhf3fs.a {root / '3fs'} fuse.hf3fs rw 0 0\n"
                      "hf3fs-gw:/export /mnt/nfs nfs4 rw 0 0\n"
                      "hf3fs.b /mnt/other fuse.other rw 0 0\n")
    f = str(mounts)
    assert threefs.mount_point(root / "3fs" / "tolocal" / "ckpt", mounts_file=f) is None
    assert threefs.mount_point(root / "3fs" / "ckpt", mounts_file=f) == str(root / "3fs")
    # local/link/.. is root (the link's target's parent), not local
    assert threefs.mount_point(root / "local" / "link" / ".." / "3fs" / "x",
                               mounts_file=f) == str(root / "3fs")
    assert threefs.mount_point("/mnt/nfs/a", mounts_file=f) is None
    assert threefs.mount_point("/mnt/other/a", mounts_file=f) == "/mnt/other"
    with CheckpointManager(root / "local" / "link" / ".." / "ck", async_save=False) as mngr:
        assert mngr.directory == str(root / "ck")


def test_directory_with_glob_characters(tmp_path):
    """A run directory named like a glob pattern ("run[1]") restores: the shard index is
    looked up with the name escaped."""
    with CheckpointManager(tmp_path / "run[1]" / "x*?", async_save=False) as mngr:
        mngr.save(0, {"w": jnp.arange(3.0)})
        np.testing.assert_array_equal(np.asarray(mngr.restore().state["w"]), np.arange(3.0))


@pytest.mark.parametrize("kwargs, match", [(dict(max_to_keep=0), "max_to_keep=0"),
                                           (dict(save_interval_steps=0), "save_interval_steps=0"),
                                           (dict(save_interval_steps=1.5), "save_interval_steps")])
def test_manager_rejects_bad_counts(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointManager(tmp_path / "ckpt", **kwargs)


def test_save_rejects_what_it_cannot_restore(tmp_path):
    with CheckpointManager(tmp_path / "ckpt", async_save=False) as mngr:
        with pytest.raises(TypeError, match=r"leaf \['x'\] is a str"):
            mngr.save(0, {"x": "hello"})
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            mngr.save(-1, {"x": jnp.ones(2)})
        assert mngr.all_steps() == []
    with pytest.raises(RuntimeError, match="save after close"):
        mngr.save(1, {"x": jnp.ones(2)})


@pytest.mark.parametrize("async_save", [False, True])
def test_save_rejects_meta_that_is_not_json(tmp_path, async_save):
    """Checked before anything is written (Orbax would fail mid-save, or, async, only at the
    next save, losing this step); the manager stays usable."""
    with CheckpointManager(tmp_path / "ckpt", async_save=async_save) as mngr:
        with pytest.raises(TypeError, match="meta must be JSON"):
            mngr.save(0, {"x": jnp.ones(2)}, meta={"n": np.int64(3)})
        with pytest.raises(TypeError, match="meta must be JSON"):
            mngr.save(0, {"x": jnp.ones(2)}, meta={("a", 1): 3})
        # a diverged run's NaN loss still saves, as Orbax's JsonSave writes it
        assert mngr.save(1, {"x": jnp.ones(2)}, meta={"n": 3, "loss": float("nan")})
        mngr.wait_until_finished()
        got = mngr.restore().meta
        assert mngr.all_steps() == [1] and got["n"] == 3 and np.isnan(got["loss"])


def test_manager_rejects_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        CheckpointManager(tmp_path / "f")


def test_mount_from_client(tmp_path, monkeypatch):
    """When the mounts file marks no 3FS mount holding the path, the client's
    extract_mount_point may name one, but never one outside the innermost listed mount."""
    (tmp_path / "mounts").write_text("")
    client = FakeUsrbio("/hf3fs-cluster")
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", types.ModuleType("hf3fs_fuse"))
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", client)
    f = str(tmp_path / "mounts")
    assert threefs.mount_point("/hf3fs-cluster/a/b", mounts_file=f) == "/hf3fs-cluster"
    assert threefs.mount_point("/tmp/x", mounts_file=f) is None
    (tmp_path / "nested").write_text("/dev/nvme0n1 /hf3fs-cluster/local ext4 rw 0 0\n")
    assert threefs.mount_point("/hf3fs-cluster/local/x",
                               mounts_file=str(tmp_path / "nested")) is None
    # A real mounts file lists "/" (and the 3FS mount, here under a FUSE type of another name):
    # the client still names the mount, but not for a disk mounted inside it.
    (tmp_path / "real").write_text("/dev/sda1 / ext4 rw 0 0\n"
                                   "cluster /hf3fs-cluster fuse.other rw 0 0\n"
                                   "/dev/nvme0n1 /hf3fs-cluster/local ext4 rw 0 0\n")
    real = str(tmp_path / "real")
    assert threefs.mount_point("/hf3fs-cluster/a/b", mounts_file=real) == "/hf3fs-cluster"
    assert threefs.mount_point("/hf3fs-cluster/local/x", mounts_file=real) is None
    assert threefs.mount_point("/tmp/x", mounts_file=real) is None


# ----------------------------------------------------------------------------- shard I/O


def _pieces(rng):
    # Two contiguous pieces, a gap, one more (4 KiB aligned like the handler's layout).
    a, b, c = (rng.integers(0, 256, n, dtype=np.uint8) for n in (5000, 3192, 777))
    return [(0, a), (5000, b), (12288, c)]


def test_posix_io_round_trip_fsyncs(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    pieces = _pieces(np.random.default_rng(1))
    path = str(tmp_path / "f.bin")
    threefs.PosixIO().write_file(path, [(o, memoryview(x)) for o, x in pieces])
    assert len(synced) == 1 and os.path.getsize(path) == 12288 + 777
    back = [(o, np.zeros_like(x)) for o, x in pieces]
    threefs.PosixIO().read_file(path, [(o, memoryview(x)) for o, x in back])
    for (_, x), (_, y) in zip(pieces, back):
        np.testing.assert_array_equal(x, y)
    os.truncate(path, 9000)
    with pytest.raises(OSError, match="f.bin.*short"):
        threefs.PosixIO().read_file(path, [(o, memoryview(x)) for o, x in back])


_REAL_PWRITEV = threefs._pwritev_all


def _count_calls(calls, fn, *args):
    calls.append(args)
    return fn(*args)


def _o_direct_works(folder) -> bool:
    """Whether the filesystem under `folder` takes an aligned O_DIRECT write."""
    try:
        fd = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.pwrite(fd, threefs.aligned_empty(4096), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_posix_io_direct_and_fallback(tmp_path, monkeypatch):
    """Aligned runs go O_DIRECT (through the staging buffer, several stages per file); a
    filesystem that refuses O_DIRECT (EINVAL) gets the same bytes through buffered I/O."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, 20000, dtype=np.uint8), rng.integers(0, 256, 4096, dtype=np.uint8)
    pad = np.zeros(20480 - 20000, np.uint8)
    pieces = [(0, memoryview(a)), (20000, memoryview(pad)), (20480, memoryview(b))]
    opened, real_open = [], os.open

    def fake_open(path, flags, *mode, refuse=False):
        opened.append(bool(flags & os.O_DIRECT))
        if refuse and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused", path)
        return real_open(path, flags, *mode)

    direct_ok = _o_direct_works(tmp_path)
    for refuse in (False, True):
        opened.clear()
        monkeypatch.setattr(os, "open", functools.partial(fake_open, refuse=refuse))
        path = str(tmp_path / f"d{refuse}.bin")
        io = threefs.PosixIO(stage_bytes=8192)
        staged = []
        monkeypatch.setattr(threefs, "_pwritev_all", functools.partial(
            _count_calls, staged, threefs._pwritev_all))
        io.write_file(path, pieces)
        monkeypatch.setattr(threefs, "_pwritev_all", _REAL_PWRITEV)
        back = [threefs.aligned_empty(20480), threefs.aligned_empty(4096)]
        io.read_file(path, [(0, memoryview(back[0])), (20480, memoryview(back[1]))])
        monkeypatch.setattr(os, "open", real_open)
        assert opened[0] and opened.count(True) == 2   # the write and the read tried O_DIRECT
        if refuse:   # (a filesystem without O_DIRECT falls back the same way)
            assert opened == [True, False, True, False]
        elif direct_ok:   # O_DIRECT really used (no silent fallback), 3 stages of 8 KiB
            assert opened == [True, True]
            assert len(staged) == 3
        np.testing.assert_array_equal(back[0][:20000], a)
        np.testing.assert_array_equal(back[1], b)
        assert os.path.getsize(path) == 24576


@pytest.mark.parametrize("direct", [True, False])
def test_posix_io_checksums_what_it_writes(tmp_path, monkeypatch, direct):
    """write_file(checksum=crc32) returns each piece's CRC-32, computed on the staging buffer
    (chunks smaller than a piece and than a stage) or, buffered, on the piece itself."""
    monkeypatch.setattr(threefs, "_CHECKSUM_CHUNK", 1000)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 256, 20000, dtype=np.uint8), rng.integers(0, 256, 4096, dtype=np.uint8)
    pieces = [(0, memoryview(a)), (20000, memoryview(np.zeros(480, np.uint8))),
              (20480, memoryview(b)), (24576, memoryview(np.zeros(0, np.uint8)))]
    io = threefs.PosixIO(direct=direct, stage_bytes=8192)
    sums = io.write_file(str(tmp_path / "c.bin"), pieces, checksum=zlib.crc32)
    assert sums == [zlib.crc32(p) for _, p in pieces]
    assert io.write_file(str(tmp_path / "n.bin"), pieces) is None


@pytest.mark.parametrize("nbytes", [4096, 5000, (8 << 20) + 4096])
def test_aligned_buffers(nbytes):
    for make, align in ((threefs.aligned_empty, threefs.ALIGN),
                        (threefs.staging_buffer, threefs._HUGE_PAGE)):
        x = make(nbytes)
        assert x.nbytes == nbytes and x.dtype == np.uint8 and x.flags.writeable
        assert x.ctypes.data % align == 0
        x[:] = 7
        assert int(x[-1]) == 7


def test_usrbio_io_checksums_what_it_writes(on_3fs):
    mount, _ = on_3fs
    io = threefs.shard_io(mount / "x")
    io.buffer_bytes, io.request_bytes, io.entries = 8192, 2048, 3   # pieces span requests
    pieces = [(o, memoryview(x)) for o, x in _pieces(np.random.default_rng(5))]
    assert io.write_file(str(mount / "c.bin"), pieces, checksum=zlib.crc32) == [
        zlib.crc32(p) for _, p in pieces]


def test_usrbio_io_round_trip(on_3fs):
    mount, client = on_3fs
    io = threefs.shard_io(mount / "x")
    assert isinstance(io, threefs.UsrbioIO) and io.mount == str(mount)
    io.buffer_bytes, io.request_bytes, io.entries = 8192, 2048, 3   # force many batches
    pieces = _pieces(np.random.default_rng(2))
    path = str(mount / "f.bin")
    io.write_file(path, [(o, memoryview(x)) for o, x in pieces])
    assert len(client.fsynced) == 1 and not client.registered
    back = [(o, np.zeros_like(x)) for o, x in pieces]
    io.read_file(path, [(o, memoryview(x)) for o, x in back])
    for (_, x), (_, y) in zip(pieces, back):
        np.testing.assert_array_equal(x, y)
    assert len(client.batches) >= 4 and max(client.batches) <= 3
    os.truncate(path, 9000)
    with pytest.raises(OSError, match="f.bin.*short"):
        io.read_file(path, [(o, memoryview(x)) for o, x in back])
    assert not client.registered


def test_usrbio_io_raises_when_force_fsync_fails(on_3fs):
    """The binding returns the ioctl's -1 rather than raising: a write that cannot make its
    length final is an error, and the fd is still deregistered and closed."""
    mount, client = on_3fs
    client.fsync_status = -1
    io = threefs.shard_io(mount / "x")
    with pytest.raises(OSError, match="force_fsync.*g.bin.*status -1"):
        io.write_file(str(mount / "g.bin"), [(0, memoryview(np.arange(64, dtype=np.uint8)))])
    assert not client.registered


# ----------------------------------------------------------------------------- manager


@pytest.mark.parametrize("backend", ["orbax", "posix"])
def test_reshard_restore(train_state, tmp_path, backend):
    """Saved at expert=8; restored at expert=4 and on one device with identical values."""
    with CheckpointManager(tmp_path / "ckpt", backend=backend) as mngr:
        assert mngr.save(7, train_state, meta={"data_position": 1234})
        mngr.wait_until_finished()
        assert mngr.latest_step() == 7
        target = _abstract_train_state()
        for devices, expert in ((jax.devices()[:4], 4), (jax.devices()[:1], 1)):
            mesh = make_mesh(expert=expert, devices=devices)
            got = mngr.restore(target=target, target_mesh=mesh)
            assert got.step == 7 and got.meta == {"step": 7, "data_position": 1234}
            _assert_same(got.state, train_state)
            w = got.state["model"]["blocks"][1]["ffn"]["w_up"][...]
            assert w.sharding.spec[0] == "expert" and w.sharding.mesh.shape["expert"] == expert
            assert len(w.addressable_shards) == expert
            assert got.state["plan"]["phy2log"].sharding.mesh.shape["expert"] == expert


def test_restored_state_drives_a_model(train_state, tmp_path):
    """The restored NNX state loads into a fresh abstract model and optimizer."""
    with CheckpointManager(tmp_path / "ckpt", backend="posix", async_save=False) as mngr:
        mngr.save(1, train_state)
        got = mngr.restore(target=_abstract_train_state(), target_mesh=make_mesh(
            devices=jax.devices()[:1]))
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    nnx.update(model, got.state["model"])
    opt = nnx.eval_shape(lambda: nnx.Optimizer(model, TX, wrt=nnx.Param))
    nnx.update(opt, got.state["optimizer"])
    assert int(opt.step[...]) == 1
    np.testing.assert_array_equal(np.asarray(model.embed[...]),
                                  np.asarray(train_state["model"]["embed"][...]))


@pytest.mark.parametrize("backend", ["orbax", "posix"])
def test_async_keep_and_interval(tmp_path, backend):
    with CheckpointManager(tmp_path / "c", backend=backend, max_to_keep=2,
                           save_interval_steps=2, async_save=True) as mngr:
        saved = [s for s in range(7) if mngr.save(s, _small_state(s))]
        mngr.wait_until_finished()
        assert saved == [0, 2, 4, 6]
        assert mngr.all_steps() == [4, 6]
        assert mngr.save(7, _small_state(7), force=True)
        mngr.wait_until_finished()
        assert mngr.all_steps() == [6, 7]
        got = mngr.restore(6, target=_small_state())
        _assert_same(got.state, _small_state(6))
        if backend == "posix":   # shard format restores without a target too
            raw = mngr.restore().state
            np.testing.assert_array_equal(raw["w"], np.asarray(_small_state(7)["w"]))


@pytest.mark.parametrize("backend", ["orbax", "posix"])
def test_uncommitted_save_is_ignored(tmp_path, backend):
    """A leftover temporary step directory (a save killed before commit) is invisible."""
    root = tmp_path / "c"
    with CheckpointManager(root, backend=backend, async_save=False) as mngr:
        mngr.save(1, _small_state(1))
    tmp = root / "2.orbax-checkpoint-tmp-1700000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "shards.p0.0.bin").write_bytes(b"\0" * 100)
    with CheckpointManager(root, backend=backend, async_save=False) as mngr:
        assert not tmp.exists()   # removed when a manager opens the directory
        assert mngr.latest_step() == 1 and mngr.all_steps() == [1]
        _assert_same(mngr.restore(target=_small_state()).state, _small_state(1))
        mngr.save(2, _small_state(2))
        assert mngr.latest_step() == 2
        _assert_same(mngr.restore(target=_small_state()).state, _small_state(2))


def test_odd_leaves_round_trip(tmp_path):
    """Empty arrays, numpy leaves, 3-D shards split two ways, bfloat16."""
    mesh = make_mesh(data=2, expert=4)
    x = jax.device_put(jnp.arange(8 * 8 * 4, dtype=jnp.bfloat16).reshape(8, 8, 4),
                       NamedSharding(mesh, P("expert", "data")))
    state = {"x": x, "empty": jnp.zeros((0, 4)), "np": np.arange(5, dtype=np.int32)}
    with CheckpointManager(tmp_path / "c", backend="posix", async_save=False) as mngr:
        mngr.save(1, state)
        got = mngr.restore(target=state, target_mesh=make_mesh(
            data=4, expert=2)).state
    _assert_same(got, state)
    assert got["x"].sharding.spec == P("expert", "data")


def test_wide_integers_never_wrap_around(tmp_path):
    """int64 numpy leaves (x64 off: JAX holds them as int32) restore into a target as int32
    when every value fits, and raise naming the leaf when one does not; without a target they
    come back as saved."""
    fits = {"k": np.array([7, -(2 ** 31)], np.int64)}
    wide = {"k": np.array([2 ** 40, -1], np.int64)}
    with CheckpointManager(tmp_path / "c", backend="posix", async_save=False) as mngr:
        mngr.save(1, fits)
        mngr.save(2, wide, force=True)
        got = mngr.restore(1, target=fits).state["k"]
        assert got.dtype == jnp.int32 and np.asarray(got).tolist() == [7, -(2 ** 31)]
        with pytest.raises(ValueError, match=r"\['k'\].*int64.*do not fit"):
            mngr.restore(2, target=wide)
        assert np.asarray(mngr.restore(2).state["k"]).tolist() == [2 ** 40, -1]


def _nested_state():
    rng = np.random.default_rng(1)
    return {"model": {"layers": [{"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
                                 {"w": jnp.ones((4, 3), jnp.bfloat16)}],
                      "embed": jnp.arange(6, dtype=jnp.int32)},
            "load": init_expert_load(2, 4),   # a NamedTuple: its fields restore as dict keys
            "by_id": {0: jnp.zeros(2), 7: jnp.ones(2)},
            "step": jnp.asarray(3, jnp.int32)}


def test_restore_without_target_keeps_the_nesting(tmp_path):
    """The shard index stores each leaf's key path, so a restore without a target gives the
    nested dicts and lists that were saved (numpy leaves on the host)."""
    state = _nested_state()
    with CheckpointManager(tmp_path / "c", backend="posix", async_save=False) as mngr:
        mngr.save(1, state)
        got = mngr.restore(1).state
    want = {**state, "load": state["load"]._asdict()}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    _assert_same(got, want)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))


def test_restore_without_target_of_an_old_index_is_flat(tmp_path):
    """An index written before the key paths were stored (no "path") restores as before:
    {key path string: array}."""
    state = _nested_state()
    with CheckpointManager(tmp_path / "c", backend="posix", async_save=False) as mngr:
        mngr.save(1, state)
        (index_path,) = (tmp_path / "c").rglob("index.p0.json")
        index = json.loads(index_path.read_text())
        for leaf in index["leaves"]:
            del leaf["path"]
        index_path.write_text(json.dumps(index))
        got = mngr.restore(1).state
    want = dict(jax.tree_util.tree_flatten_with_path(state)[0])
    assert sorted(got) == sorted(jax.tree_util.keystr(k) for k in want)
    for path, x in want.items():
        np.testing.assert_array_equal(got[jax.tree_util.keystr(path)], np.asarray(x))


def test_format_2_checkpoints_still_load(tmp_path):
    """Checkpoints written before CRC-32C (format /2: zlib CRC-32 per shard) restore, and their
    checksums are still checked."""
    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "b": jnp.ones(7)}
    with CheckpointManager(tmp_path / "c", backend="posix", async_save=False) as mngr:
        mngr.save(1, state)
        (index_path,) = (tmp_path / "c").rglob("index.p0.json")
        index = json.loads(index_path.read_text())
        assert index["format"] == shards.FORMAT == "jax_ds.shards/3"
        index["format"] = "jax_ds.shards/2"
        for leaf in index["leaves"]:
            for shard in leaf["shards"]:
                raw = (index_path.parent / shard["file"]).read_bytes()
                shard["crc32"] = zlib.crc32(raw[shard["offset"]:shard["offset"] + shard["nbytes"]])
                assert shards.crc32c(raw[shard["offset"]:shard["offset"] + shard["nbytes"]]) == \
                    shard.pop("crc32c")
        index_path.write_text(json.dumps(index))
        _assert_same(mngr.restore(1, target=state).state, state)
        index["leaves"][0]["shards"][0]["crc32"] ^= 1
        index_path.write_text(json.dumps(index))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            mngr.restore(1, target=state)


def _largest_file(root):
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("where", ["default", "3fs"])
def test_corruption_detected(train_state, tmp_path, where, request):
    """On the default path (local disk) and on 3FS: one flipped byte in the largest file of a
    checkpoint, or that file cut short, fails the restore with an error naming it; the other
    steps still restore."""
    root = request.getfixturevalue("on_3fs")[0] / "c" if where == "3fs" else tmp_path / "c"
    with CheckpointManager(root, max_to_keep=None) as mngr:
        assert mngr.backend == ("usrbio" if where == "3fs" else "posix")
        for step in (1, 2, 3):
            mngr.save(step, train_state)
        mngr.wait_until_finished()
        target = _abstract_train_state()
        flipped = _largest_file(root / "1")
        index = json.loads((flipped.parent / "index.p0.json").read_text())
        shard = max((s for e in index["leaves"] for s in e["shards"]
                     if s["file"] == flipped.name), key=lambda s: s["nbytes"])
        with open(flipped, "r+b") as f:   # one bit of one byte in the middle of a shard
            f.seek(shard["offset"] + shard["nbytes"] // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x04]))
        with pytest.raises(CorruptCheckpointError,
                           match=re.escape(str(flipped)) + ": checksum mismatch"):
            mngr.restore(1, target=target)
        cut = _largest_file(root / "2")
        os.truncate(cut, cut.stat().st_size - 100)
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(cut)) + ": truncated"):
            mngr.restore(2, target=target)
        _assert_same(mngr.restore(3, target=target).state, train_state)


def test_3fs_backend_via_usrbio(train_state, on_3fs):
    mount, client = on_3fs
    with CheckpointManager(mount / "ckpt") as mngr:
        assert mngr.backend == "usrbio" and mngr.mount == str(mount)
        mngr.io.buffer_bytes = 64 << 10   # smaller than the state: several batches per file
        mngr.save(3, train_state, meta={"data_position": 9})
        mngr.wait_until_finished()
        got = mngr.restore(target=_abstract_train_state(),
                           target_mesh=make_mesh(expert=4, devices=jax.devices()[:4]))
        _assert_same(got.state, train_state)
        assert got.meta["data_position"] == 9
    assert client.fsynced and not client.registered and len(client.batches) > 2


def test_3fs_without_client_uses_posix(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"hf3fs.stage {tmp_path} fuse.hf3fs rw 0 0\n")
    monkeypatch.setattr(threefs, "CLIENT_MODULES", ("no_such_hf3fs_client",))
    with CheckpointManager(tmp_path / "c", mounts_file=str(mounts)) as mngr:
        assert mngr.backend == "posix"
    with CheckpointManager(tmp_path / "d", mounts_file=str(tmp_path / "none")) as mngr:
        assert mngr.backend == "posix"   # local disk: the CRC-checked shard files
