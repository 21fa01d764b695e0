"""The WGMMA wrapper headers in ffi/common are what scripts/gen_wgmma.py writes (no hand edits)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wgmma_headers_match_generator():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_wgmma.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
