"""scripts/make_variant.py: a copy of the package with module constants overridden (lib_ab A/Bs)."""

import pathlib

import pytest

from jax_ds.testing import load_script

SCRIPTS = pathlib.Path(__file__).parent.parent / "scripts"
make_variant = load_script(SCRIPTS / "make_variant.py")


def test_copy_with_overrides(tmp_path):
    assert make_variant.main([str(tmp_path), "jax_ds.ops.gemm.WIDE_MAX_KBLOCKS=15",
                              "jax_ds.ops.mla.FUSE_MAX_SPLITS=4"]) == 0
    gemm = (tmp_path / "jax_ds" / "ops" / "gemm.py").read_text()
    assert gemm.endswith("\n\nWIDE_MAX_KBLOCKS = 15  # scripts/make_variant.py\n")
    assert (tmp_path / "jax_ds" / "ops" / "mla.py").read_text().endswith(
        "FUSE_MAX_SPLITS = 4  # scripts/make_variant.py\n")
    assert (tmp_path / "jax_ds" / "ops" / "quant.py").is_file()
    assert not list(tmp_path.rglob("__pycache__"))


def test_refuses_to_overwrite_the_package_it_copies():
    src = pathlib.Path(make_variant.jax_ds.__file__).parent
    for target in (src.parent, src):  # DIR/jax_ds is the package, or inside it
        with pytest.raises(SystemExit):
            make_variant.main([str(target)])
    assert (src / "__init__.py").is_file()


@pytest.mark.parametrize("item", ["jax_ds.ops.gemm.NOPE=1", "jax_ds.ops.gemm.WIDE_MAX_KBLOCKS=x+",
                                  "gemm.WIDE_MAX_KBLOCKS=1", "jax_ds.ops.nomodule.X=1"])
def test_bad_overrides_copy_nothing(tmp_path, item):
    with pytest.raises(SystemExit):
        make_variant.main([str(tmp_path), item])
    assert not (tmp_path / "jax_ds").exists()


def test_lib_ab_shape_arguments():
    lib_ab = load_script(SCRIPTS / "lib_ab.py")
    assert lib_ab._mnk("4096x7168x2048") == (4096, 7168, 2048)
    assert lib_ab._grouped("Masked:32x256:7168x2048") == ("masked", 32, 256, 7168, 2048)
    for bad in ("dense:1x2:3x4", "masked:0x2:3x4", "masked:1x2", "masked:1x2:3x4x5", "1x2x3"):
        with pytest.raises(Exception, match="expected|KIND"):
            lib_ab._grouped(bad)
    assert lib_ab._mla("128:8192:128:1") == (128, 8192, 128, 1, False)
    assert lib_ab._mla("128:4096:128:2:VAR") == (128, 4096, 128, 2, True)
    for bad in ("128:4096:128", "128:4096:128:1:fixed", "0:4096:128:1", "128x4096x128x1"):
        with pytest.raises(Exception, match="expected"):
            lib_ab._mla(bad)


def test_lib_ab_report_against_the_first_variant(tmp_path, capsys):
    """The report: medians per variant, then each variant's median ratios to the first and every
    round's first figure against the first variant's median; `--show` reads a written file."""
    import json

    lib_ab = load_script(SCRIPTS / "lib_ab.py")
    results = {"ab/A": {"dense 1x2x3": [[100.0, 200.0], [110.0, 210.0], [90.0, 190.0]]},
               "ab/B": {"dense 1x2x3": [[105.0, 180.0], [99.0, 200.0], [120.0, 190.0]]}}
    path = tmp_path / "lib-ab.json"
    path.write_text(json.dumps({"results": results}))
    assert lib_ab.main(["--show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dense 1x2x3" in out and "     100 /     200" in out and "     105 /     190" in out
    line = next(s for s in out.splitlines() if s.startswith("  dense 1x2x3"))
    assert "+5.0% /  -5.0%" in line and line.endswith("rounds +5.0% -1.0% +20.0%")
    # a first variant that timed nothing (0) gives NaN ratios, not a ZeroDivisionError
    results["ab/A"]["dense 1x2x3"] = [[0.0, 0.0]]
    lib_ab.report(results)
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("  dense 1x2x3"))
    assert "nan%" in line and line.endswith("rounds +nan% +nan% +nan%")


def test_lib_ab_drops_a_variant_that_hangs_or_fails(tmp_path, monkeypatch, capsys):
    """A variant whose child process gives no result in time (a hung kernel) or fails leaves the
    remaining rounds, said in the written file; the others are still timed. A baseline that hangs
    stops the run (the others are compared with it). The child processes are stood in for: a
    real one would need a GPU kernel that hangs."""
    import json
    import subprocess

    lib_ab = load_script(SCRIPTS / "lib_ab.py")
    variants = []
    for name in ("base", "hangs", "fails", "good"):
        (tmp_path / name / "jax_ds").mkdir(parents=True)
        (tmp_path / name / "jax_ds" / "_C.so").write_text("")
        variants.append(str(tmp_path / name))
    calls = []

    def child(cmd, *, cwd, timeout, **kwargs):
        name = pathlib.Path(cwd).name
        calls.append((name, timeout))
        if name == "hangs":
            raise subprocess.TimeoutExpired(cmd, timeout, stderr=b"stuck in a kernel")
        if name == "fails":
            return subprocess.CompletedProcess(cmd, 3, stdout="", stderr="a failed check")
        return subprocess.CompletedProcess(
            cmd, 0, stdout=json.dumps([["dense 1x2x3", 100.0, 200.0]]), stderr="")

    monkeypatch.setattr(lib_ab.subprocess, "run", child)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert lib_ab.main([*variants, "--rounds", "3", "--child-timeout", "5"]) == 0
    names = [n for n, _ in calls]
    assert {t for _, t in calls} == {5.0}
    assert [names.count(n) for n in ("base", "hangs", "fails", "good")] == [3, 1, 1, 3]
    data = json.loads(next((tmp_path / "out").glob("lib-ab*.json")).read_text())
    assert sorted(data["dropped"]) == sorted(variants[1:3])
    assert "5 s" in data["dropped"][variants[1]] and "exit 3" in data["dropped"][variants[2]]
    assert len(data["results"][variants[3]]["dense 1x2x3"]) == 3
    assert data["results"][variants[1]] == {}
    # the children's stderr is echoed, the hung one's (bytes from TimeoutExpired) decoded
    err = capsys.readouterr().err
    assert "stuck in a kernel" in err and "a failed check" in err
    assert lib_ab.main(["--show", str(next((tmp_path / "out").glob("lib-ab*.json")))]) == 0
    assert f"{variants[1]}: dropped, no result within 5 s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run stopped"):
        lib_ab.main([variants[1], variants[0], "--child-timeout", "5"])
