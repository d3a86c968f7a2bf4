"""Shared fixtures: a tiny synthetic checkpoint in the official layout, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
