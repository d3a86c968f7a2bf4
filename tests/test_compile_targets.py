"""benchmarks/compile_targets.py: every runtime kernel builds for the users' architectures (sm_86, sm_89, sm_120)
on this machine, without a GPU; and the FP8 gate of the runtime matches what Triton can build.

Run in a fresh process: the kernel tests may have switched Triton to its interpreter in this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
    pytest.skip("this Triton has no nvdisasm", allow_module_level=True)

ARCHS = {86: (8, 6), 89: (8, 9), 120: (12, 0)}
NATIVE_FP8 = "FP8 GEMV (hardware conversion)"


@pytest.fixture(scope="module")
def builds() -> dict[tuple[int, str], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_targets.py"), "--arch",
                          ",".join(map(str, ARCHS))], capture_output=True, text=True, env=env, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("sm_")]
    return {(int(arch[3:]), name): result for arch, name, result in rows}


def test_every_kernel_builds_for_consumer_cards(builds):
    names = {name for _, name in builds}
    assert len(names) >= 12 and {arch for arch, _ in builds} == set(ARCHS)  # every kernel, every architecture
    failed = {key: result for key, result in builds.items() if result != "ok" and key != (86, NATIVE_FP8)}
    assert not failed


def test_fp8_gate_matches_what_triton_can_build(builds, monkeypatch):
    """The negative control: the hardware FP8 conversion cannot be built for sm_86 (so the target is honoured),
    and the runtime's gate sends exactly those cards to the bit decode."""
    import quant.kernels as kernels

    assert builds[(86, NATIVE_FP8)].startswith("cannot:")
    for arch, capability in ARCHS.items():
        monkeypatch.setattr(kernels, "_capability", lambda index, c=capability: c)
        assert kernels.fp8_native(torch.device("cuda", 0)) == (builds[(arch, NATIVE_FP8)] == "ok")
        assert builds[(arch, "FP8 GEMV (bit decode)")] == "ok"
