"""scripts/ncu_stalls.py on a small source page in ncu's CSV layout: an instruction listed under
a header and under the kernel file counts once, under the kernel file's line."""

import csv
import gzip
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "ncu_stalls.py"
HEADER = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "stall_barrier", "stall_long_sb",
          "stall_barrier (Not Issued)"]


def _page(path):
    rows = [
        ["File Path", "cuda/helpers.cuh"], ["Function Name", "K"], HEADER,
        ["7", "wait();", "-", "-", "0", "0", "0", "0", "0"],
        ["", "", "0x10", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "30", "30", "0", "30"],
        ["File Path", "ffi/k.cu"], ["Function Name", "K"], HEADER,
        ["40", "wgmma_wait<0>();", "-", "-", "0", "0", "0", "0", "0"],
        ["", "", "0x10", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "30", "30", "0", "30"],
        ["90", "mbar_wait(full);", "-", "-", "0", "0", "0", "0", "0"],
        ["", "", "0x20", "@!P0 BRA 0x10", "10", "10", "0", "10", "0"],
        ["", "", "0x30", "NOP", "-", "-", "-", "-", "-"],
        ["File Path", "cuda/cuda_bf16.hpp"], ["Function Name", "K"], HEADER,
        ["9", "store();", "-", "-", "0", "0", "0", "0", "0"],
        ["", "", "0x40", "ST.E desc[UR4][R2.64], R0", "10", "10", "0", "10", "0"],
    ]
    with gzip.open(path, "wt", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


def test_counts_each_instruction_once_under_its_kernel_line(tmp_path):
    page = tmp_path / "page.csv.gz"
    _page(page)
    out = subprocess.run([sys.executable, str(SCRIPT), str(page), "k.cu", "first:1-50",
                          "second:51-99"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("50 samples over 4 instructions; 20% not attributed")
    assert "('barrier', 60), ('long_sb', 40)" in out
    assert "not attributed, by opcode (% of samples): [('ST.E', 20.0)]" in out
    assert "first (lines 1-50): 60.0% of samples; reasons [('barrier', 100)]" in out
    assert "second (lines 51-99): 20.0% of samples; reasons [('long_sb', 100)]" in out
    assert "   40  60.0%  wgmma_wait<0>();" in out
