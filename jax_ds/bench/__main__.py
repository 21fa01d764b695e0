"""`python -m jax_ds.bench <suite> [options]`; `python -m jax_ds.bench --help` lists the suites."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jax_ds.bench import SUITES


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # torch may share the GPU with JAX in one run (the vendor baseline): keep JAX from taking 75%
    # of the memory up front. The variable is read when the backend starts, after this line.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    parser = argparse.ArgumentParser(prog="python -m jax_ds.bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    modules = {}
    for name, (module_name, help_text) in SUITES.items():
        suite_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # import only the suite asked for
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(suite_parser)
    args = parser.parse_args(argv)
    return modules[args.suite].run(args)


if __name__ == "__main__":
    sys.exit(main())
