"""jax_ds.storage under faults: a process SIGKILLed mid-save, a full disk, training that goes on
(donating the state) while an async save is written.

The faults happen to real child processes on the real filesystem: a small tmpfs of their own
(in a user+mount namespace, where the machine allows one) or a file-size limit for the full disk;
SIGKILL at chosen points and after delays for the kills.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ds.storage import CheckpointManager, threefs


def test_async_save_is_a_snapshot(tmp_path, monkeypatch):
    """Training goes on (donating the state to a jit) while an async save is written: the
    checkpoint holds the values at save time."""
    real = threefs.PosixIO.write_file

    def slow(self, path, pieces, **kwargs):
        time.sleep(0.2)   # the donating steps below run before the bytes are written
        return real(self, path, pieces, **kwargs)

    monkeypatch.setattr(threefs.PosixIO, "write_file", slow)
    state = {"w": jnp.ones((256, 256)), "b": jnp.ones(7, jnp.int32)}
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    with CheckpointManager(tmp_path / "c") as mngr:
        mngr.save(1, state)
        for _ in range(3):
            state = bump(state)
        mngr.wait_until_finished()
        got = mngr.restore(target=state).state
    np.testing.assert_array_equal(np.asarray(got["w"]), 1.0)
    np.testing.assert_array_equal(np.asarray(state["w"]), 4.0)


# Runs in a child process (on a small tmpfs, or under a file-size limit): a save that runs out
# of space must raise in Python, leave older steps restorable and the space free, and the
# manager must save again afterwards. Prints a JSON report.
_DISK_FULL_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    import numpy as np, jax.numpy as jnp
    from jax_ds.storage import CheckpointManager
    root, limit, backend = sys.argv[1:4]

    def state(seed, nbytes):   # random bits: nothing compresses
        rng = np.random.default_rng(seed)
        return {"w": jnp.asarray(rng.integers(0, 1 << 31, nbytes // 4, dtype=np.int32))}

    def free():
        st = os.statvfs(root)
        return st.f_bavail * st.f_frsize

    mngr = CheckpointManager(root, backend=backend, max_to_keep=None)
    mngr.save(1, state(1, 64 << 10))
    mngr.wait_until_finished()
    before, error = free(), None
    if limit == "rlimit":   # a file-size limit stands in for the full disk (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        mngr.save(2, state(2, 16 << 20))
        mngr.wait_until_finished()
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    if limit == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report = {"error": error, "steps": mngr.all_steps(), "lost_bytes": before - free(),
              "leftovers": sorted(p for p in os.listdir(root) if "tmp" in p)}
    got = mngr.restore(1, target=state(0, 64 << 10)).state
    report["step1_ok"] = bool(np.array_equal(got["w"], state(1, 64 << 10)["w"]))
    mngr.save(2, state(3, 64 << 10))
    mngr.wait_until_finished()
    got = mngr.restore(2, target=state(0, 64 << 10)).state
    report["resaved_ok"] = bool(np.array_equal(got["w"], state(3, 64 << 10)["w"]))
    report["steps_after"] = mngr.all_steps()
    print(json.dumps(report))
""")


def _child_env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}


@functools.cache
def _tmpfs_in_namespace() -> str | None:
    """Why a user+mount namespace with its own tmpfs is unavailable here (None: it works)."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    with tempfile.TemporaryDirectory() as d:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               'mount -t tmpfs -o size=1m jax_ds_probe "$0"', d],
                              capture_output=True, text=True)
    return None if done.returncode == 0 else f"unshare -rm + mount tmpfs: {done.stderr.strip()}"


@pytest.mark.parametrize("limit,backend", [("tmpfs", "auto"), ("tmpfs", "orbax"),
                                           ("rlimit", "auto")])
def test_disk_full_fails_the_save_only(tmp_path, limit, backend):
    """A save that runs out of space (an 8 MiB tmpfs of its own, in a user+mount namespace;
    or a file-size limit) raises a clear Python error and the process lives on: older steps
    restore, the failed step's bytes are given back, the manager saves again."""
    root = tmp_path / "c"
    root.mkdir()
    cmd = [sys.executable, "-c", _DISK_FULL_CHILD, str(root), limit, backend]
    if limit == "tmpfs":
        if reason := _tmpfs_in_namespace():
            pytest.skip(f"no private tmpfs ({reason}); the rlimit case covers the logic")
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               'mount -t tmpfs -o size=8m jax_ds_full "$0" && exec "$@"', str(root), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    reason = "No space left on device" if limit == "tmpfs" else "File too large"
    assert report["error"] and reason in report["error"], report
    if backend == "auto":   # our shard files: the error names the file
        assert "shards.p0" in report["error"], report
    assert report["steps"] == [1] and report["step1_ok"] and not report["leftovers"], report
    if limit == "tmpfs":   # the failed save's bytes are given back (others share the disk)
        assert report["lost_bytes"] < 64 << 10, report
    assert report["resaved_ok"] and report["steps_after"] == [1, 2], report


# Runs in a child process, again and again on one directory: checks that every committed step
# restores with its own values, then saves step after step (async, max_to_keep=2, 9 file
# writes per step) until it is SIGKILLed: by itself inside its n-th file write ("write:n",
# after half of that file) or half-way through deleting an old step ("purge"), or by the test
# after a delay ("time:s").
_KILL_CHILD = textwrap.dedent("""
    import glob, os, shutil, signal, sys
    import numpy as np, jax.numpy as jnp
    from jax_ds.storage import CheckpointManager, ShardOptions, threefs
    root, kill = sys.argv[1:3]

    def state(step):   # 8 arrays of 256 KiB, one shard file each; values name the step
        return {f"w{i}": jnp.full((256, 256), step * 10 + i, jnp.float32) for i in range(8)}

    mngr = CheckpointManager(root, max_to_keep=2,
                             shard_options=ShardOptions(file_bytes=256 << 10))
    steps = mngr.all_steps()
    for step in steps:
        got = mngr.restore(step, target=state(0)).state
        assert all((np.asarray(got[k]) == v).all() for k, v in state(step).items()), step
    if kill.startswith("write:"):
        n, calls, real = int(kill[6:]), [0], threefs.PosixIO.write_file

        def write_file(self, path, pieces, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                offset, data = pieces[0]
                real(self, path, [(offset, data[:len(data) // 2])])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, path, pieces, **kwargs)

        threefs.PosixIO.write_file = write_file
    if kill == "purge":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if "_deleted" in str(path):
                files = sorted(glob.glob(f"{path}/**/*.bin", recursive=True))
                for f in files[:len(files) // 2]:
                    os.unlink(f)
                os.kill(os.getpid(), signal.SIGKILL)
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    print("READY", steps, flush=True)
    for step in range((steps[-1] if steps else 0) + 1, 10 ** 6):
        mngr.save(step, state(step))
""")


def test_sigkill_during_save(tmp_path):
    """SIGKILL at varied moments of a save (inside a shard file, between files, inside the
    index, while deleting an old step, and after delays that land anywhere, Orbax's commit
    included): every committed step stays restorable, none is lost, and the next process saves
    on. Each run checks what the previous one left."""
    root = tmp_path / "c"
    last = 0
    for kill in ("write:1", "time:0", "write:5", "time:0.15", "write:9", "time:0.4", "purge",
                 "write:14", "time:1"):
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(root), kill],
                                 env=_child_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.startswith("READY"), f"{kill}: {child.stderr.read()[-3000:]}"
            steps = json.loads(line[len("READY"):])
            assert not steps or steps[-1] >= last, (kill, steps, last)   # nothing lost
            last = steps[-1] if steps else 0
            if kill.startswith("time:"):
                time.sleep(float(kill[5:]))
                child.send_signal(signal.SIGKILL)
            child.wait(timeout=120)
        finally:
            child.kill()
        assert child.returncode == -signal.SIGKILL, f"{kill}: {child.stderr.read()[-3000:]}"
    with CheckpointManager(root, max_to_keep=2, async_save=False) as mngr:
        assert not [p for p in os.listdir(root) if "tmp" in p]   # leftovers cleaned at open
        steps = mngr.all_steps()
        assert steps and steps[-1] >= last
        for step in steps:
            got = mngr.restore(step, target={"w0": jnp.zeros((256, 256))}).state
            np.testing.assert_array_equal(np.asarray(got["w0"]), step * 10)
        mngr.save(steps[-1] + 1, {"w0": jnp.full((256, 256), 7.0)})
        assert mngr.latest_step() == steps[-1] + 1
