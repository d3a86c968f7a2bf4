"""Shared fixtures: a tiny synthetic checkpoint in the official layout, written once per test session.

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
