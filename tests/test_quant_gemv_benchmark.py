"""The GPU benchmark script's CPU-side parts: argument parsing, report layout, and its variants' reference math."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from quant.base import error_stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gemv.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gemv_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_arguments(bench):
    assert bench.parse_shapes(None) == [(n, k) for n, k, _ in bench.SHAPES]
    assert bench.parse_shapes("2560x9728, 4097x2560") == [(2560, 9728), (4097, 2560)]
    assert [v.key for v in bench.parse_variants("ours-nf4,bnb-nf4")] == ["ours-nf4", "bnb-nf4"]
    with pytest.raises(SystemExit, match="OUTxIN"):
        bench.parse_shapes("2560*9728")
    with pytest.raises(SystemExit, match="unknown"):
        bench.parse_variants("ours-int4")
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_report_layout(bench):
    Cell = bench.Cell
    cells = {
        "bf16": Cell(0.523, 2164, 1e-3, 0.99999, "exact"),
        "bnb-nf4": Cell(0.425, 666, 2e-3, 0.9999, "exact"),
        "ours-nf4": Cell(0.2, 1400, 2e-3, 0.9999, "exact"),
        "ours-int8": Cell(0.4, 1300, 1e-3, 0.99999, "exact"),
        "ours-fp8": Cell(note="error: " + bench._one_line("RuntimeError: a | b\nc")),
    }
    meta = {"gpu": "Test GPU", "date": "today", "command": "`python benchmarks/gemv.py`"}
    report = bench.render_report(meta, {(6144, 2560): cells}, bench.VARIANTS, [])
    table = [line for line in report.splitlines() if line.startswith("| 6144x2560 (wqkv)")]
    assert len(table) == 1 and table[0].count("|") == len(bench.VARIANTS) + 2  # a pipe in an error stays escaped
    assert "| 6144x2560 | 2.12x (met) | - | 1.31x (missed) |" in report
    assert report.startswith("# Batch-1 GEMV speed, Test GPU") and "- command: `python benchmarks/gemv.py`" in report


@pytest.mark.parametrize("key", ["bf16", "bnb-nf4", "scaled-mm-fp8"])
def test_library_variants_agree_with_their_references(bench, key):
    """The reference each variant is checked against on the GPU, exercised on the CPU."""
    if key == "bnb-nf4":
        pytest.importorskip("bitsandbytes")
    variant = bench.parse_variants(key)[0](64, 256, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(64, 256, generator=gen) * 0.02).bfloat16() for _ in range(2)]
    assert variant.prepare(weights) > 0
    variant.set_input(torch.randn(1, 256, generator=gen).bfloat16())
    for i in range(2):
        try:
            out = variant.run(i)
        except RuntimeError as e:  # torch 2.11's CPU _scaled_mm takes per-tensor scales only
            if key == "scaled-mm-fp8" and "per-tensor" in str(e):
                pytest.skip("this torch's CPU _scaled_mm has no per-row scales")
            raise
        assert error_stats(out, variant.reference(i)).ok()


def test_our_variants_refuse_the_fallback_path(bench):
    """On the CPU our layers dequantize + matmul; the benchmark must not time that as a kernel."""
    variant = bench.parse_variants("ours-int8")[0](64, 256, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="kernel path"):
        variant.prepare([torch.randn(64, 256).bfloat16()])
