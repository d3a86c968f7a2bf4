"""Shared fixtures: a tiny synthetic checkpoint in the official layout, written once per test session; and a check
that a one-token layer replays from a CUDA graph as it runs eagerly.

Without CUDA, our Triton kernels run in Triton's interpreter on CPU tensors where a test calls them
(tests/test_quant_kernels.py): TRITON_INTERPRET must be set before Triton is first imported, by whichever test
file imports it first, so it is set here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from runtime.config import bundled_config
from runtime.loader import load_model
from runtime.synthetic import write_checkpoint

DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _forget_kernel_choices():
    """A command run in-process (CliRunner) keeps its kernel choices in its cache folder from then on: not for the
    tests after it, whose first calls must time."""
    yield
    from quant.kernels.choices import remember_in

    remember_in(None)


@pytest.fixture(autouse=True)
def _cache_dir_of_its_own(tmp_path_factory, monkeypatch):
    """Commands keep quantized weights, kernel choices and encoded recordings in their --cache-dir: each test gets
    an empty one (S2EDGE_CACHE), so that no test sees another's entries and none writes to the user's."""
    monkeypatch.setenv("S2EDGE_CACHE", str(tmp_path_factory.mktemp("cache")))


def spec_tensors(component: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """Rows of the official tensor inventory (checkpoint key, runtime key, shape) whose component starts so."""
    rows = []
    for line in (DATA_DIR / "s2pro-tensors.tsv").read_text().splitlines():
        if line.startswith("#") or not line.startswith(component):
            continue
        _, ckpt_key, runtime_key, shape = line.split("\t")
        rows.append((ckpt_key, runtime_key, tuple(int(n) for n in shape.split("x"))))
    return rows


@pytest.fixture(scope="session")
def tiny_config():
    return bundled_config("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_config, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny model in fp32 on the CPU (reference precision for numerics tests)."""
    return load_model(tiny_checkpoint, torch.device("cpu"), torch.float32)


def assert_graph_replays_eager(layer, x: torch.Tensor) -> None:
    """`layer(x)` captured in a CUDA graph, replayed on a new x in place, equals an eager call on that x bit for bit
    (the output poisoned first). Call the layer once before: its first call may choose a kernel (and sync)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x2 = torch.randn_like(x)
    expected = layer(x2)
    x.copy_(x2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
