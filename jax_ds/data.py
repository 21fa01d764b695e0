"""A tiny byte-level corpus that needs no download: the docstrings of Python's own standard library.

Every Python install carries a few hundred KB of English prose in its modules' docstrings. They
are read with `ast` from the stdlib sources (nothing is imported); where an install ships no
sources, the same docstrings come from the imported modules' `__doc__` attributes. Tokens are
bytes (vocabulary 256), so there is no tokenizer to ship either.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sysconfig
from typing import Iterator

import numpy as np

# Modules with long, prose-like docstrings, in a fixed order (the corpus is deterministic for a
# given Python version).
MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "doctest", "email.message", "enum", "fractions", "ftplib", "functools", "heapq",
    "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "logging", "mailbox",
    "multiprocessing.pool", "optparse", "os", "pathlib", "pickle", "pydoc", "random", "re",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tkinter", "turtle", "typing", "unittest.case", "unittest.mock",
    "urllib.request", "uuid", "warnings", "xml.dom.minidom", "zipfile",
)
VOCAB_SIZE = 256


def _docstrings_from_source(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _docstrings_from_module(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # tkinter and friends may be missing: the corpus just gets smaller
        return []
    docs = [inspect.getdoc(module)]
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) == name:
            docs.append(inspect.getdoc(obj))
    return [d for d in docs if d]


def _source_path(name: str) -> str | None:
    base = os.path.join(sysconfig.get_paths()["stdlib"], *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(path):
            return path
    return None


def load_corpus(max_bytes: int | None = None) -> bytes:
    """The corpus as UTF-8 bytes: docstrings separated by blank lines (some hundreds of KB)."""
    parts: list[str] = []
    for name in MODULES:
        path = _source_path(name)
        try:
            parts += _docstrings_from_source(path) if path else _docstrings_from_module(name)
        except (OSError, SyntaxError, UnicodeDecodeError):
            parts += _docstrings_from_module(name)
    data = "\n\n".join(parts).encode("utf-8")
    if len(data) < 10_000:
        raise RuntimeError(f"stdlib docstring corpus is only {len(data)} bytes; is this Python "
                           "run with -OO (docstrings stripped)?")
    return data[:max_bytes] if max_bytes else data


def split_corpus(data: bytes, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) uint8 arrays; the validation part is the corpus's tail."""
    tokens = np.frombuffer(data, dtype=np.uint8)
    n_val = int(len(tokens) * val_fraction)
    return tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0
            ) -> Iterator[np.ndarray]:
    """Endless random windows: int32 [batch_size, seq_len + 1] (inputs and shifted targets)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len={seq_len} "
                         f"(a window is seq_len + 1 tokens)")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    while True:  # every start whose window fits: [0, len - seq_len - 1]
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        yield tokens[starts[:, None] + offsets].astype(np.int32)


def decode(tokens) -> str:
    """Bytes back to text (invalid UTF-8 shown as replacement characters)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")
