"""runtime/meta.py: a model built on the meta device is freed when dropped, the first one of a process too, and
building it imports nothing more (torch._dynamo's import is seconds of every command's start-up).

Each case runs in a fresh process (the first meta initialisation happens once per process) with the cycle
collector off, so only reference counts free anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIRST_BUILD = """
import gc, sys, weakref, torch
sys.path.insert(0, {root!r})
from runtime.meta import meta_device
gc.disable()
def build():
    with {context}:
        module = torch.nn.Embedding(10, 4)
    return weakref.ref(module)
print("alive" if build()() is not None else "freed", "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("context, expected", [("meta_device()", ["freed", "False"]),
                                               ('torch.device("meta")', ["alive", "True"])])
def test_the_first_meta_build_of_a_process_is_freed(context, expected):
    """The negative control documents the torch behaviour meta_device works around: should it read "freed False",
    torch no longer imports torch._dynamo for a meta initialisation and the workaround can go."""
    out = subprocess.run([sys.executable, "-c", FIRST_BUILD.format(root=str(ROOT), context=context)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == expected


def test_meta_modules_are_built_as_without_the_context(tiny_config):
    """Skipping the random initialisation changes nothing but the values: the same parameters, shapes and dtypes,
    all on the meta device."""
    from runtime.meta import meta_device
    from runtime.model import DualAR

    with meta_device():
        skipped = DualAR(tiny_config)
    with torch.device("meta"):
        initialised = DualAR(tiny_config)
    shapes = [(k, v.shape, v.dtype, v.device.type) for k, v in skipped.state_dict().items()]
    assert shapes == [(k, v.shape, v.dtype, v.device.type) for k, v in initialised.state_dict().items()]
    assert {device for *_, device in shapes} == {"meta"}


def test_constants_stay_constants_off_the_meta_device():
    """Inside meta_device, ones / zeros / full made on the meta device skip their fill (no values there); those made
    elsewhere explicitly keep it."""
    from runtime.meta import meta_device

    with meta_device():
        made = [torch.ones(2, 3), torch.zeros(4, dtype=torch.bfloat16), torch.full((5,), 2.0)]
        cpu = [torch.ones(2, 3, device="cpu"), torch.zeros(4, device="cpu"), torch.full((5,), 2.0, device="cpu")]
    assert [(t.device.type, tuple(t.shape), t.dtype) for t in made] == [
        ("meta", (2, 3), torch.float32), ("meta", (4,), torch.bfloat16), ("meta", (5,), torch.float32)]
    assert cpu[0].eq(1).all() and cpu[1].eq(0).all() and cpu[2].eq(2).all()
