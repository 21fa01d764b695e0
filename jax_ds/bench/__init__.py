"""Benchmarks as commands: `python -m jax_ds.bench <suite>` prints a table, writes JSON and a plot.

A suite is a module with `add_arguments(parser)` and `run(args) -> int`; it is listed in SUITES by
name and imported only when asked for. This package also holds what every suite reports the same
way: the environment (device, versions, driver), the table, the JSON file and the bar plot.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess

SUITES = {  # name -> (module, one-line help)
    "gemm": ("jax_ds.bench.gemm", "dense FP8 GEMM (1x128 / 128x128 scales) vs XLA and cuBLAS"),
    "moe": ("jax_ds.bench.moe", "grouped FP8 GEMMs (contiguous, masked) and MoE routing"),
    "mla": ("jax_ds.bench.mla", "MLA decode over a paged KV cache vs the XLA reference"),
    "eplb": ("jax_ds.bench.eplb", "EPLB expert placement plan time at DeepSeek-V3 scale"),
    "ep": ("jax_ds.bench.ep", "expert-parallel dispatch/combine (bf16, FP8) vs XLA all_to_all"),
    "pipeline": ("jax_ds.bench.pipeline",
                 "pipeline schedules' step time and bubble vs the simulator's prediction"),
    "train": ("jax_ds.bench.train",
              "full-model training step on a data x expert mesh: tokens/s, EP overlap (trace)"),
    "checkpoint": ("jax_ds.bench.checkpoint",
                   "checkpoint save/restore GB/s: ours vs Orbax defaults vs raw disk"),
    "standings": ("jax_ds.bench.standings",
                  "result files of gemm, moe and mla against the issues' acceptance bars (no GPU)"),
}

_PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "jax-cuda12-pjrt", "torch", "numpy", "ml_dtypes")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment():
    """Device name, date, python, package and driver versions: the header of every result file."""
    import jax

    from jax_ds.bench import _timing

    device = jax.devices()[0]
    _timing.reset_fell_back()  # a suite starts here: its result file lists its own fallbacks
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        versions["torch_cuda"] = torch.version.cuda
    except Exception:  # torch is optional; any import failure just means no torch column
        pass
    smi = None
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            smi = f"nvidia-smi failed: {e}"
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions,
        "nvidia_smi": smi,
        "jax_ds_impl_env": os.environ.get("JAX_DS_IMPL"),
        # XLA's flags change what is measured (e.g. command buffers on or off): keep them with it
        "xla_flags": os.environ.get("XLA_FLAGS"),
        # device-bound executables write their outputs in place (donated) unless "fresh"
        "bench_outputs": "in-place" if _timing.outputs_in_place() else "fresh",
    }


def write_json(out_dir, suite, env, payload, tag=""):
    """Writes `<suite>-<device-slug>-<date>[-<tag>].json` under out_dir; returns its path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}-{slug(env['device'])}-{env['date'][:10]}{'-' + tag if tag else ''}.json"
    from jax_ds.bench import _timing

    # the cells timed with fresh outputs although the file says in place (a warning said so)
    names = _timing.fell_back()
    fell_back = {"bench_outputs_fell_back": names} if names else {}
    path.write_text(json.dumps({"suite": suite, **env, **fell_back, **payload}, indent=1,
                               default=str) + "\n")
    return path


def error_cell(e: BaseException) -> dict:
    """A failed measurement's result: {"error": "Type: first line of the message"}."""
    lines = str(e).strip().splitlines()
    return {"error": f"{type(e).__name__}: {lines[0][:300] if lines else ''}"}


def print_table(title, columns, rows, footnotes=()):
    """Prints rows (lists of strings) under columns, with rich when it is importable."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:  # plain text: "[g]" or "[all rows]" is not rich markup
        table = Table(title=escape(title), caption=escape("\n".join(footnotes)) or None,
                      caption_justify="left")
        for c in columns:
            table.add_column(escape(c), justify="right", no_wrap=False)
        for r in rows:
            table.add_row(*(escape(v) for v in r))
        Console(width=max(200, shutil.get_terminal_size().columns)).print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    for f in footnotes:
        print(f)


def bar_plot(path, title, labels, series, ylabel):
    """Grouped bars: one group per label, one bar per series (None = missing). Returns the path,
    or None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written")
        return None
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(labels)), 5))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
