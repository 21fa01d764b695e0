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


def test_sass_mode_reads_a_page_without_source_lines(tmp_path):
    """--sass: a page exported with `--print-source sass` (cuBLAS's kernels carry no lines), each
    address once: opcode shares of executions and samples, reasons, and the hot instructions."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)",
              "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
              "stall_dispatch", "stall_selected", "stall_dispatch (Not Issued)"]
    rows = [["Function Name", "nvjet_sm90_k"], header,
            ["0x7f00", "FFMA R1, R2, R3, R1", "10", "7", "300", "7", "3", "7"],
            ["0x7f10", "@!P0 BRA 0x7f00", "5", "5", "100", "5", "0", "5"],
            ["0x7f20", "EXIT", "-", "-", "1", "-", "-", "-"],
            ["0x7f00", "FFMA R1, R2, R3, R1", "10", "7", "300", "7", "3", "7"]]
    page = tmp_path / "sass.csv"
    with open(page, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    out = subprocess.run([sys.executable, str(SCRIPT), "--sass", str(page), "100"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "3 instructions, 401 executed (warp level), 15 samples"
    assert out[1] == "executed, by opcode (%): [('FFMA', 74.8), ('BRA', 24.9), ('EXIT', 0.2)]"
    assert out[2] == "samples, by opcode (%): [('FFMA', 66.7), ('BRA', 33.3), ('EXIT', 0.0)]"
    assert out[3] == "reasons (% of samples): [('dispatch', 80.0), ('selected', 20.0)]"
    assert [line.split()[:3] for line in out[4:]] == [["0", "300", "10"], ["10", "100", "5"]]
    assert out[4].endswith("dispatch 7, selected 3")
