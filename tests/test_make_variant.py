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
