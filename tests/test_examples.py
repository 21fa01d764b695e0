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


def test_decode_example_checks_a_batch_against_the_forward_pass(tmp_path):
    """Prompts of different lengths (two prefill calls at least), one crossing a 64-row block."""
    out = run_example("decode.py", "--batch", "3", "--prompt-lens", "2-70", "--max-new-tokens",
                      "3", "--check", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "check: 9 of 9 tokens are the full forward pass's argmax; worst gap 0 of" in \
        " ".join(out.stdout.split())


@pytest.mark.parametrize("name,args,message", [
    ("fp8_demo.py", ("--m", "0"), "argument --m: must be >= 1, got 0"),
    ("fp8_demo.py", ("--lr", "nan"), "argument --lr: must be a finite number > 0"),
    ("rebalance.py", ("--replicas", "10"), "error: rebalance_experts: num_replicas=10"),
    ("decode.py", ("--prompt-lens", "5-2"), "argument --prompt-lens: need 1 <= LO <= HI"),
    ("decode.py", ("--check", "--temperature", "1"), "error: --check compares greedy"),
])
def test_examples_report_bad_arguments_in_one_line(name, args, message, tmp_path):
    """Counts out of range are argparse's usage errors; combinations the library rejects are
    one `error:` line (exit 2), not a traceback."""
    out = run_example(name, *args, tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_cli_helpers(capsys, monkeypatch):
    import argparse

    from jax_ds import cli
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=cli.at_least(0))
    assert p.parse_args(["--n", "0"]).n == 0
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SystemExit):
            p.parse_args(["--n", bad])
    assert "must be >= 0, got -1" in capsys.readouterr().err
    for bad in ("0", "-2", "inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_float(bad)
    assert cli.positive_float("3e-3") == 3e-3

    def fails():
        raise ValueError("bad shape")
    with pytest.raises(SystemExit) as e:
        cli.run(fails)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad shape\n"
    monkeypatch.setenv("JAX_DS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad shape"):
        cli.run(fails)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: 1)
    assert e.value.code == 1
