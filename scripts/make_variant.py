"""A copy of the `jax_ds` package (with its built `_C*.so`) whose module constants are overridden,
for `scripts/lib_ab.py` A/Bs of a knob such as `gemm.WIDE_MAX_KBLOCKS` or `mla.FUSE_MAX_SPLITS`.

    python scripts/make_variant.py DIR jax_ds.ops.gemm.WIDE_MAX_KBLOCKS=15 [MODULE.NAME=VALUE ...]
    python scripts/make_variant.py BASE                    # an unchanged copy: the A side
    python scripts/lib_ab.py BASE DIR --suite dense --rounds 3

DIR/jax_ds is replaced by a copy of the imported package; each override is appended to its
module's source as `NAME = VALUE` (VALUE a Python literal, checked with ast.literal_eval), so
functions reading the global at call time see it. The module must already define NAME.
"""

import argparse
import ast
import pathlib
import shutil
import sys

import jax_ds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("overrides", nargs="*", metavar="MODULE.NAME=VALUE")
    args = ap.parse_args(argv)
    src = pathlib.Path(jax_ds.__file__).parent
    if not list(src.glob("_C*.so")):
        print(f"warning: {src} holds no built _C*.so; the copy runs the references only",
              file=sys.stderr)
    edits = []  # (relative module path, name, value), all checked before anything is copied
    for item in args.overrides:
        target, sep, value = item.partition("=")
        module, _, name = target.rpartition(".")
        if not sep or not module.startswith("jax_ds.") or not name.isidentifier():
            ap.error(f"{item!r}: expected jax_ds.MODULE.NAME=VALUE")
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            ap.error(f"{item!r}: {value!r} is not a Python literal")
        rel = pathlib.Path(*module.split(".")[1:]).with_suffix(".py")
        if not (src / rel).is_file() or not any(
                line.startswith((f"{name} =", f"{name}:"))
                for line in (src / rel).read_text().splitlines()):
            ap.error(f"{item!r}: {src / rel} defines no module-level {name}")
        edits.append((rel, name, value))
    dst = args.dir / "jax_ds"
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents or \
            dst.resolve() in src.resolve().parents:
        ap.error(f"{dst} is, or overlaps, the package it copies ({src}): choose another DIR")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, name, value in edits:
        path = dst / rel
        path.write_text(path.read_text() + f"\n\n{name} = {value}  # scripts/make_variant.py\n")
        print(f"{path}: {name} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
