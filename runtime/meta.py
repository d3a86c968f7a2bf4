"""Building modules on the meta device (no memory; the weights are assigned while loading), without their random
initialisation.

The initialisation of a meta tensor computes nothing, but torch runs `normal_` on one (nn.Embedding's
initialisation) through its Python reference implementation, which imports torch._dynamo on a process's first call:
1-4 s of every command's start-up (sympy, torch.distributed, ...; benchmarks/results/cli-wall-*.md), and that import
keeps the frames running at the time alive for good, with their locals, so the first model built under
`torch.device("meta")` in a process would never be freed, nor whatever its callers held (with torch 2.11-2.13, a
bf16 model of 9 GB on the GPU). Inside `meta_device()` the random initialisations return their tensor untouched:
the loader overwrites every parameter anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

# The calls a module's reset_parameters makes to fill a tensor at random: nn.init's (which dispatch on the function
# itself while a mode is active) and the tensor methods they end in.
_RANDOM_INITS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
    torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
    torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
})


# Constant tensors made on the context's device (no `device=`): on the meta device they hold no values either, and
# torch 2.11 makes each `torch.ones` there through a Python reference, 1.2 ms a call: 0.19 s of S2's model for its
# 154 norms (H100 host, cProfile of a load). `torch.empty` makes the same meta tensor at once.
_CONSTANT_FILLS = {
    torch.ones: lambda *size, **kwargs: torch.empty(*size, **kwargs),
    torch.zeros: lambda *size, **kwargs: torch.empty(*size, **kwargs),
    torch.full: lambda size, fill_value, **kwargs: torch.empty(size, **kwargs),
}


class _SkipRandomInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INITS:  # nn.init passes its tensor by keyword, a tensor method as self
            return args[0] if args else kwargs["tensor"]
        if func in _CONSTANT_FILLS and kwargs.get("device") is None:
            return _CONSTANT_FILLS[func](*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """`torch.device("meta")` as a context, with random initialisations and constant fills skipped."""
    with torch.device("meta"), _SkipRandomInit():
        yield
