"""benchmarks/sass_count.py: our kernels compiled for sm_90 on this machine (no GPU), instructions counted.

Run in a fresh process: the kernel tests may have switched Triton to its interpreter in this one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
    pytest.skip("this Triton has no nvdisasm", allow_module_level=True)


def _count(*args: str) -> tuple[int, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_count.py"), *args], capture_output=True,
                         text=True, env=env, check=True).stdout
    total = int(re.search(r"(\d+) instructions per program", out).group(1))
    opcodes = {op: int(n) for op, n in re.findall(r"([A-Z][A-Z0-9_]*) (\d+)", out.splitlines()[-1])}
    return total, opcodes


def test_shuffle_lookup_needs_fewer_instructions_than_the_gather():
    shuffle, ops = _count("nf4", "--k", "2560", "--tile", "1,256,1", "--shuffle")
    gather, _ = _count("nf4", "--k", "2560", "--tile", "1,256,1")
    words_per_thread = 2560 // 8 // 32
    assert ops.get("SHFL", 0) >= 8 * words_per_thread  # one shuffle per weight: the asm path was compiled
    assert shuffle < gather  # the reason it exists (a timed choice, not a fallback in disguise)
    assert shuffle / (2560 / 32) < 8  # instructions per weight per thread stay in single digits


def test_ptx_kernel_assembles_with_fewer_instructions_per_weight():
    """The generated PTX assembles for sm_90 (a syntax error would fail here, not on a user's GPU) and issues
    fewer instructions per weight than the Triton shuffle kernel; one shuffle per weight shows the lookup is there."""
    ptx, ops = _count("nf4-ptx", "--k", "2560", "--tile", "2,0,1")
    shuffle, _ = _count("nf4", "--k", "2560", "--tile", "1,256,1", "--shuffle")
    weights_per_thread = 2 * 2560 // 32
    assert ops.get("SHFL", 0) >= weights_per_thread
    assert ptx / weights_per_thread < shuffle / (2560 / 32)
    _, split_ops = _count("nf4-ptx", "--k", "4096", "--tile", "2,0,2")  # K split over two warps
    assert split_ops.get("SHFL", 0) >= 2 * 4096 // 64  # each thread: 2 rows x its half of K, one shuffle per weight
    _, chained = _count("nf4-ptx", "--k", "2560", "--tile", "2,2,1")  # two FMA chains: each unit starts two sums
    assert ops["FMUL"] == 2 * 5 and chained["FMUL"] == 2 * ops["FMUL"]


def test_ptx_orders_and_register_cap_keep_the_arithmetic():
    """The plans' PTX orders and register cap assemble and keep one shuffle per weight and every FMA: ptxas may
    schedule them differently, never drop work."""
    _, units = _count("nf4-ptx", "--k", "2560", "--tile", "2,2,1")
    for flags in (["--rows-first", "--max-registers", "80"], ["--rows-first", "--loads-by-row"]):
        _, ordered = _count("nf4-ptx", "--k", "2560", "--tile", "2,2,1", *flags)
        assert {op: ordered[op] for op in ("SHFL", "FFMA", "FMUL")} == {op: units[op] for op in ("SHFL", "FFMA", "FMUL")}
