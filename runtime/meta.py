"""Building modules on the meta device (no memory; the weights are assigned while loading) without leaking them.

torch imports torch._dynamo on a process's first `normal_` of a meta tensor (nn.Embedding's initialisation), and
that import keeps the frames running at the time alive for good, with their locals: the first model built under
`torch.device("meta")` in a process would never be freed, nor whatever its callers held (with torch 2.11-2.13, a
bf16 model of 9 GB on the GPU). That first call is made once on a short-lived thread instead, whose frames hold
nothing.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@functools.cache
def _first_meta_init() -> None:
    thread = threading.Thread(target=lambda: torch.empty(0, device="meta").normal_(), name="meta-init")
    thread.start()
    thread.join()


@contextmanager
def meta_device() -> Iterator[None]:
    """`torch.device("meta")` as a context, after the process's first meta initialisation has run elsewhere."""
    _first_meta_init()
    with torch.device("meta"):
        yield
