"""The example scripts' advertised command lines get past their setup (no training steps:
compiling the models is the other tests' business)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, os.path.join(EXAMPLES, name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


@pytest.mark.parametrize("args", [
    ("--schedule", "dualpipev", "--pipe", "2"),           # the docstring's: 4 of 8 devices
    ("--schedule", "1f1b", "--pipe", "4", "--microbatches", "4"),  # too few for DualPipe's row
])
def test_dualpipe_example_sets_up(args, tmp_path):
    out = run_example("dualpipe.py", *args, "--steps", "0", "--seq-len", "8",
                      "--plot", str(tmp_path / "timeline.png"), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"in 0 {args[1]} steps" in " ".join(out.stdout.split())  # rich wraps lines


@pytest.mark.parametrize("mesh_flag", ["--train-mesh", "--resume-mesh"])
def test_checkpoint_example_takes_a_mesh_of_fewer_devices(mesh_flag, tmp_path):
    """A mesh of 4 of the 8 devices (restoring onto fewer devices, say) is a valid phase mesh."""
    phase = "train" if mesh_flag == "--train-mesh" else "resume"
    out = run_example("checkpoint.py", "--phase", phase, mesh_flag, "expert=4", "--steps", "0",
                      "--dir", str(tmp_path / "ckpt"), tmp_path=tmp_path)
    if phase == "train":
        assert out.returncode == 0, out.stderr[-2000:]
    else:  # an empty directory: it gets as far as looking for a committed step
        assert "no committed checkpoint" in out.stderr, out.stderr[-2000:]
