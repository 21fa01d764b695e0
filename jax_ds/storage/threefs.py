"""3FS for checkpoints: mount detection, and shard-file I/O through USRBIO or plain POSIX calls.

3FS (DeepSeek's Fire-Flyer File System) is reached two ways on a client node: the FUSE mount
(POSIX calls, kernel-bounded) and USRBIO, the native user-space batch I/O client: a shared-memory
buffer registered with the client (`iovec`), a submission/completion ring (`ioring`), and
registered file descriptors. Its Python binding is `hf3fs_fuse.io` (over `hf3fs_py_usrbio`):

    iov = make_iovec(shm, mount)                 # shm: multiprocessing.shared_memory.SharedMemory
    ior = make_ioring(mount, entries, for_read)  # one ring per direction
    fd = os.open(path, ...); register_fd(fd)
    ior.prepare(iov[a:b], for_read, fd, offset, userdata=...)
    done = ior.submit().wait(min_results=n)      # each has .result (bytes or -errno), .userdata
    force_fsync(fd); deregister_fd(fd); os.close(fd)

Facts from 3FS's design notes this module respects:
  * a file's length is only eventually consistent while it is open for writing; close or
    (with USRBIO) `force_fsync` makes it final, so every shard file is synced before commit;
  * Linux 5.x FUSE serialises writes to one file, so each file has exactly one writer
    (parallelism comes from writing many files at once);
  * commit by writing into a temporary directory and renaming it (Orbax's default on POSIX).

`shard_io(path)` picks the backend: USRBIO when the path is on a 3FS mount and the client
imports, POSIX (`os.pwritev`/`os.preadv`, then `fsync`) otherwise. Both move a list of
(offset, buffer) pieces of one file per call, as large batched requests. `PosixIO` uses O_DIRECT
where the filesystem accepts it: the disk DMAs from and into user memory with no page-cache
copy (on a 2-core VM, 2-4x the buffered write bandwidth, and reads that really read the disk).
"""

from __future__ import annotations

import errno
import importlib
import logging
import mmap
import os
import queue
import threading
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

# The FUSE client's filesystem type in /proc/mounts ("hf3fs.<cluster> /3fs/stage fuse.hf3fs ...").
FSTYPE = "fuse.hf3fs"
# Where mounts are listed; tests point this at a file of their own (or set JAX_DS_3FS_MOUNTS).
MOUNTS_FILE = "/proc/mounts"
# Module names of the USRBIO Python client, tried in order.
CLIENT_MODULES = ("hf3fs_fuse.io",)

# Linux accepts at most IOV_MAX (1024) buffers per pwritev/preadv call.
_IOV_MAX = 1024
# O_DIRECT needs buffer addresses, file offsets and lengths on logical-block boundaries; 4 KiB
# (the page size) covers 512-byte and 4Kn disks.
ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)   # Linux only


def _mounts_file(mounts_file: str | None) -> str:
    return mounts_file or os.environ.get("JAX_DS_3FS_MOUNTS") or MOUNTS_FILE


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as octal escapes.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def _mount_table(mounts_file: str | None) -> list[tuple[str, bool]]:
    """(mount point, is 3FS) of every line of a /proc/mounts-format file, in its order."""
    try:
        with open(_mounts_file(mounts_file)) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            # the FUSE type, or a FUSE mount of an "hf3fs..." source (not an NFS export so named)
            is_3fs = fields[2] == FSTYPE or (fields[0].startswith("hf3fs")
                                             and fields[2].split(".")[0] == "fuse")
            table.append((os.path.normpath(_unescape(fields[1])), is_3fs))
    return table


def threefs_mounts(mounts_file: str | None = None) -> list[str]:
    """Mount points of 3FS FUSE clients listed in a /proc/mounts-format file."""
    return [point for point, is_3fs in _mount_table(mounts_file) if is_3fs]


def _innermost(table, path: str) -> tuple[str, bool] | None:
    """The entry of the mount that holds `path`: the longest mount point containing it (the
    later one of equal points, which is mounted over the earlier)."""
    best = None
    for point, is_3fs in table:
        if _contains(point, path) and (best is None or len(point) >= len(best[0])):
            best = (point, is_3fs)
    return best


def load_client():
    """The USRBIO client module (`hf3fs_fuse.io`), or None when it is not importable."""
    for name in CLIENT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def mount_point(path, *, mounts_file: str | None = None) -> str | None:
    """The 3FS mount point holding `path` (which need not exist yet), or None.

    The path with its symlinks resolved (`os.path.realpath`: where the file is, so a link into
    a 3FS mount is on 3FS and a link out of one is not; ".." applies after the links, as the OS
    does) is looked up: the innermost mount of the mounts file containing it decides (a local
    disk mounted inside a 3FS mount is not 3FS). Otherwise the client library
    (`extract_mount_point`), if importable, may name a 3FS mount the file does not mark as one
    (a FUSE type of another name); its answer counts only when it is not outside the innermost
    listed mount holding the path, which a real mounts file always has ("/"): a disk mounted
    inside 3FS stays local whatever the client says.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.path.realpath(path)
    listed = _innermost(_mount_table(mounts_file), path)
    if listed is not None and listed[1]:
        return listed[0]
    client = load_client()
    if client is None or not hasattr(client, "extract_mount_point"):
        return None
    try:
        point = client.extract_mount_point(path)
    except (OSError, ValueError):
        point = None
    if not point:
        return None
    point = os.path.normpath(os.fsdecode(point) if isinstance(point, bytes) else point)
    return point if listed is None or _contains(listed[0], point) else None


def _contains(outer: str, path: str) -> bool:
    """`path` is `outer` or lies below it (both normalised absolute paths)."""
    return path == outer or path.startswith(outer.rstrip("/") + "/")


def is_3fs_path(path, *, mounts_file: str | None = None) -> bool:
    """True when `path` lies on a 3FS FUSE mount."""
    return mount_point(path, mounts_file=mounts_file) is not None


Pieces = Sequence[tuple[int, memoryview]]   # (file offset, bytes) pieces of one file


def _aligned_view(base: np.ndarray, align: int, nbytes: int) -> np.ndarray:
    """The `nbytes` of uint8 `base` (align extra bytes long) that start on an `align` boundary."""
    start = -base.ctypes.data % align
    return base[start:start + nbytes]


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an ALIGN boundary: what O_DIRECT
    needs, and what lets a CPU `jax.device_put` use the array as the device buffer (no copy).

    Plain (4 KiB) pages: restores read into these, and they become the arrays. Huge pages were
    tried for them and dropped (a one-off A/B, NOTES-checkpoint.md); the long-lived staging
    buffers of a save use huge pages instead (`staging_buffer`).
    """
    return _aligned_view(np.empty(nbytes + ALIGN, np.uint8), ALIGN, nbytes)


# Transparent huge pages on x86-64 and most arm64 kernels: 2 MiB, physically contiguous.
_HUGE_PAGE = 2 << 20


def staging_buffer(nbytes: int) -> np.ndarray:
    """A uint8 buffer for O_DIRECT staging: anonymous memory aligned to 2 MiB and advised to use
    transparent huge pages (MADV_HUGEPAGE; a no-op where THP is off).

    Why: the kernel builds a disk request from the physical pages of the user buffer, at most
    `max_segments` of them (254 on virtio-blk). Small pages scattered in physical memory (as in
    a process that has allocated and freed a lot) cut a 4 MiB request into pieces (seen once
    on a 2-core VM, a one-off measurement: 2.6-3.2 MiB per request from malloc'ed buffers,
    3.7 MiB from 2 MiB pages). Staging buffers are reused by every save of the process, so the
    cost of finding huge pages is paid once.
    """
    # The anonymous map stays alive (and mapped) as long as an array uses its memory.
    m = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, np.uint8)
    view = _aligned_view(base, _HUGE_PAGE, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE, view.ctypes.data - base.ctypes.data,
                  -(-nbytes // ALIGN) * ALIGN)
    return view


def _with_fd(path: str, flags: int, direct: bool, use) -> None:
    """use(fd, direct_io) on `path` opened with O_DIRECT when `direct`; a filesystem that refuses
    O_DIRECT (EINVAL, at open or at the first aligned I/O) gets the same call without it."""
    for mode in ((True, False) if direct else (False,)):
        try:
            fd = os.open(path, flags | (_O_DIRECT if mode else 0), 0o644)
            try:
                use(fd, mode)
            finally:
                os.close(fd)
            return
        except OSError as e:
            if not (mode and e.errno == errno.EINVAL):
                raise


# Bytes copied into a staging buffer before they are checksummed there (within L2).
_CHECKSUM_CHUNK = 1 << 20


class PosixIO:
    """Shard files through the kernel: O_DIRECT where possible, fsync before commit.

    Writes: when every file-contiguous run of pieces starts and ends on an ALIGN boundary (the
    shard layout pads each shard to one), the bytes go through reused ALIGN-aligned staging
    buffers of `stage_bytes` and are written O_DIRECT; otherwise vectored buffered writes.
    Reads: O_DIRECT straight into the caller's buffers when they are aligned (address, offset,
    length), otherwise buffered. A filesystem that refuses O_DIRECT (EINVAL: tmpfs, some FUSE
    mounts) gets buffered I/O.
    """

    name = "posix"

    def __init__(self, *, direct: bool = True, stage_bytes: int = 16 << 20):
        if stage_bytes % ALIGN:
            raise ValueError(f"PosixIO: stage_bytes={stage_bytes} must be a multiple of {ALIGN}")
        self.direct = direct and bool(_O_DIRECT)
        self.stage_bytes = stage_bytes
        self._stages = queue.SimpleQueue()   # staging buffers, reused by every writer thread

    def write_file(self, path: str, pieces: Pieces, *, checksum=None) -> list[int] | None:
        """Writes `pieces` into a new file and fsyncs it (one writer per file).

        With `checksum` (a `zlib.crc32`-like `f(data, value) -> value`), returns each piece's
        checksum, in `pieces` order. On the O_DIRECT path it is computed on the staging buffer
        right after each cache-sized copy into it, so the bytes are read from memory once.
        """
        runs = _runs(pieces, indexed=True)
        direct = self.direct and all(offset % ALIGN == 0 and sum(len(b) for b, _ in items) % ALIGN
                                     == 0 for offset, items in runs)
        sums = [0] * len(pieces) if checksum else None

        def write(fd, direct_io):
            if direct_io:
                self._write_staged(fd, runs, checksum, sums)
            else:
                if checksum:
                    for i, (_, buf) in enumerate(pieces):
                        sums[i] = checksum(memoryview(buf).cast("B"))
                for offset, run in _runs(pieces, _IOV_MAX):
                    _pwritev_all(fd, run, offset)
            os.fsync(fd)   # data and length durable before Orbax renames the step dir

        _with_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct, write)
        return sums

    def read_file(self, path: str, pieces: Pieces) -> None:
        """Fills each (offset, writable buffer) of `pieces` from `path`; short reads raise."""
        direct = self.direct and all(
            offset % ALIGN == 0 and memoryview(buf).nbytes % ALIGN == 0 and
            np.frombuffer(buf, np.uint8).ctypes.data % ALIGN == 0 for offset, buf in pieces)
        def read(fd, direct_io):
            for offset, run in _runs(pieces, _IOV_MAX):
                _preadv_all(fd, run, offset, path)

        _with_fd(path, os.O_RDONLY, direct, read)

    def _write_staged(self, fd: int, runs, checksum=None, sums=None) -> None:
        """O_DIRECT writes of runs, each copied through aligned staging buffers (checksums of
        the pieces taken from a staging buffer while the copied bytes are in cache).

        Double-buffered: this thread copies into one staging buffer while a writer thread of
        this file writes the previous one, so the file always has a write in flight (copying
        first and then writing left each file's stream idle during the copy). Writes of one
        file stay sequential, from one thread (3FS's FUSE path needs one writer per file).
        `python -m jax_ds.bench checkpoint` measures the save against raw writes of the same
        bytes; the A/B against single buffering is in NOTES-checkpoint.md (one-off).
        """
        free, full = queue.SimpleQueue(), queue.SimpleQueue()
        for _ in range(2):
            try:
                free.put(self._stages.get_nowait())
            except queue.Empty:
                free.put(staging_buffer(self.stage_bytes))
        failed: list[BaseException] = []

        def writer():
            # Every buffer goes back to `free`, written or not: after a failed write the copier
            # sees `failed` at its next buffer instead of waiting for one forever.
            while (item := full.get()) is not None:
                stage, nbytes, offset = item
                if not failed:
                    try:
                        _pwritev_all(fd, [memoryview(stage)[:nbytes]], offset)
                    except BaseException as e:   # ENOSPC, EFBIG...: raised by write_file
                        failed.append(e)
                free.put(stage)

        thread = threading.Thread(target=writer, name="jax_ds-posix-writer", daemon=True)
        thread.start()
        step = _CHECKSUM_CHUNK if checksum else self.stage_bytes
        stage = None

        def hand_off(nbytes, offset):
            """The filled stage to the writer; the next free one (the writer hands back each
            buffer once written) to this thread."""
            nonlocal stage
            full.put((stage, nbytes, offset))
            stage = None   # the writer's now: the cleanup below must not hand it back too
            stage = free.get()
            if failed:
                raise failed[0]

        try:
            stage = free.get()
            for offset, items in runs:
                fill = 0
                for buf, i in items:
                    src = np.frombuffer(buf, np.uint8)
                    pos = 0
                    while pos < len(src):
                        n = min(len(src) - pos, len(stage) - fill, step)
                        stage[fill:fill + n] = src[pos:pos + n]   # numpy copies without the GIL
                        if checksum:
                            sums[i] = checksum(stage[fill:fill + n], sums[i])
                        fill, pos = fill + n, pos + n
                        if fill == len(stage):
                            hand_off(fill, offset)
                            offset, fill = offset + fill, 0
                if fill:   # a multiple of ALIGN, as the run's length is
                    hand_off(fill, offset)
        finally:
            full.put(None)
            thread.join()   # every write of this file has returned: fsync may follow
            if stage is not None:
                free.put(stage)
            while not free.empty():
                self._stages.put(free.get())
        if failed:
            raise failed[0]


class UsrbioIO:
    """Shard files through the 3FS USRBIO client: shared-memory iovec + batched io rings.

    Data is staged through one shared-memory buffer of `buffer_bytes`, cut into requests of at
    most `request_bytes`; each batch is submitted at once and reaped with one wait.
    """

    name = "usrbio"

    def __init__(self, mount: str, client=None, *, buffer_bytes: int = 256 << 20,
                 request_bytes: int = 16 << 20, entries: int = 64):
        self.mount = mount
        self.client = client or load_client()
        if self.client is None:
            raise RuntimeError("UsrbioIO: the 3FS USRBIO client (hf3fs_fuse.io) is not importable")
        self.buffer_bytes = buffer_bytes
        self.request_bytes = request_bytes
        self.entries = entries

    def write_file(self, path: str, pieces: Pieces, *, checksum=None) -> list[int] | None:
        """As PosixIO.write_file; checksums are taken from the shared-memory buffer right after
        each request's copy into it."""
        sums = [0] * len(pieces) if checksum else None
        # Readable too: force_fsync's documented requirement on its fd (hf3fs_py_usrbio).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.client.register_fd(fd)
            try:
                self._move(fd, pieces, for_read=False, path=path, checksum=checksum, sums=sums)
                # File length is eventually consistent in 3FS until synced. The binding returns
                # the ioctl's status (-1 on failure) instead of raising.
                status = self.client.force_fsync(fd)
                if status:
                    raise OSError(f"3FS force_fsync({path}) failed with status {status}: its "
                                  "length may not be final")
            finally:
                self.client.deregister_fd(fd)
        finally:
            os.close(fd)
        return sums

    def read_file(self, path: str, pieces: Pieces) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.client.register_fd(fd)
            try:
                self._move(fd, pieces, for_read=True, path=path)
            finally:
                self.client.deregister_fd(fd)
        finally:
            os.close(fd)

    def _move(self, fd: int, pieces: Pieces, *, for_read: bool, path: str, checksum=None,
              sums=None) -> None:
        requests = list(_split(pieces, min(self.request_bytes, self.buffer_bytes)))
        if not requests:
            return
        size = min(self.buffer_bytes, sum(len(b) for _, b, _ in requests))
        shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
        try:
            iov = self.client.make_iovec(shm, self.mount)
            ring = self.client.make_ioring(self.mount, self.entries, for_read)
            batch, used = [], 0
            for offset, buf, piece in requests + [(None, None, None)]:
                flush = buf is None or used + len(buf) > size or len(batch) == self.entries
                if flush and batch:
                    self._run_batch(ring, iov, shm, fd, batch, for_read, path, checksum, sums)
                    batch, used = [], 0
                if buf is not None:
                    batch.append((offset, buf, used, piece))
                    used += len(buf)
            del ring, iov
        finally:
            shm.close()
            shm.unlink()

    def _run_batch(self, ring, iov, shm, fd, batch, for_read, path, checksum=None, sums=None):
        for i, (offset, buf, at, piece) in enumerate(batch):
            if not for_read:
                shm.buf[at:at + len(buf)] = buf
                if checksum:   # requests of a piece come in order: a running checksum
                    sums[piece] = checksum(shm.buf[at:at + len(buf)], sums[piece])
            ring.prepare(iov[at:at + len(buf)], for_read, fd, offset, userdata=i)
        done = ring.submit().wait(min_results=len(batch))
        if len(done) != len(batch):
            raise OSError(f"{path}: USRBIO returned {len(done)} of {len(batch)} completions")
        for d in done:
            offset, buf, at, _ = batch[d.userdata]
            if d.result < 0:
                raise OSError(-d.result, f"USRBIO {'read' if for_read else 'write'} failed "
                                         f"at offset {offset}", path)
            if d.result != len(buf):
                raise OSError(f"{path}: short USRBIO {'read' if for_read else 'write'} at "
                              f"offset {offset}: {d.result} of {len(buf)} bytes (truncated file?)")
            if for_read:
                buf[:] = shm.buf[at:at + len(buf)]


def shard_io(path, *, mounts_file: str | None = None, client=None):
    """The I/O backend for files under `path`: UsrbioIO on 3FS with the client, else PosixIO."""
    point = mount_point(path, mounts_file=mounts_file)
    if point is None:
        return PosixIO()
    client = client or load_client()
    if client is None:
        log.warning("%s is on 3FS (%s) but hf3fs_fuse.io is not importable: using POSIX I/O "
                    "through the FUSE mount", path, point)
        return PosixIO()
    return UsrbioIO(point, client)


# ----------------------------------------------------------------------------- helpers


def _split(pieces: Pieces, limit: int):
    """Cuts pieces into requests of at most `limit` bytes: (offset, bytes, piece index)."""
    for i, (offset, buf) in enumerate(pieces):
        buf = memoryview(buf).cast("B")
        for start in range(0, len(buf), limit):
            yield offset + start, buf[start:start + limit], i


def _runs(pieces: Pieces, max_bufs: int | None = None, *, indexed: bool = False) -> list:
    """File-contiguous runs of the non-empty pieces, in file order: [(offset, [byte buffers])],
    each of at most `max_bufs` buffers (IOV_MAX for one pwritev/preadv call) when given; with
    `indexed`, each buffer comes as (buffer, its index in `pieces`)."""
    runs, end = [], None
    for i, (offset, buf) in sorted(enumerate(pieces), key=lambda p: p[1][0]):
        buf = memoryview(buf).cast("B")
        if not len(buf):
            continue
        end_at = offset + len(buf)
        buf = (buf, i) if indexed else buf
        if runs and offset == end and (max_bufs is None or len(runs[-1][1]) < max_bufs):
            runs[-1][1].append(buf)
        else:
            runs.append((offset, [buf]))
        end = end_at
    return runs


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers still to transfer after a vectored call moved n bytes."""
    while bufs and n >= len(bufs[0]):
        n -= len(bufs[0])
        bufs = bufs[1:]
    return [bufs[0][n:]] + bufs[1:] if bufs and n else bufs


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    while bufs:
        n = os.pwritev(fd, bufs, offset)
        offset += n
        bufs = _advance(bufs, n)


def _preadv_all(fd: int, bufs: list[memoryview], offset: int, path: str) -> None:
    want = sum(len(b) for b in bufs)
    got = 0
    while bufs:
        n = os.preadv(fd, bufs, offset)
        if n == 0:
            raise OSError(f"{path}: file ends at {offset}, {want - got} bytes short "
                          f"(truncated shard file)")
        got += n
        offset += n
        bufs = _advance(bufs, n)
