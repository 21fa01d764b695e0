"""Small helpers for the command lines of `examples/` and `python -m jax_ds.bench`: argument types
that reject a count out of range with argparse's usage error, and a runner that prints a user
error (a bad argument combination found by the library's own checks) as one line instead of a
traceback.

    p.add_argument("--steps", type=cli.at_least(1), default=30)
    if __name__ == "__main__":
        cli.run(main)

Set JAX_DS_TRACEBACK=1 to see the full traceback of such an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    """An argparse `type`: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def run(main: Callable[[], int | None]) -> None:
    """Runs `main` and exits with its status; a ValueError (the library's checks of shapes,
    sizes and files raise ValueError or a subclass) is printed as `error: ...`, exit status 2."""
    try:
        status = main()
    except ValueError as e:
        if os.environ.get("JAX_DS_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
