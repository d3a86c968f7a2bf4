"""runtime/meta.py: a model built on the meta device is freed when dropped, the first one of a process too.

Each case runs in a fresh process (the first meta initialisation happens once per process) with the cycle
collector off, so only reference counts free anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
print("alive" if build()() is not None else "freed")
"""


@pytest.mark.parametrize("context, expected", [("meta_device()", "freed"), ('torch.device("meta")', "alive")])
def test_the_first_meta_build_of_a_process_is_freed(context, expected):
    """The negative control documents the torch behaviour meta_device works around: should it read "freed",
    torch no longer pins the frames and the workaround can go."""
    out = subprocess.run([sys.executable, "-c", FIRST_BUILD.format(root=str(ROOT), context=context)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == expected
