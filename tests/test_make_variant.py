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
