"""Compiling a request's kernels in threads while the weights load: the decode's GEMV candidates and the rest of
its kernels (runtime/stand_in_frame.py).

Why: the first run on a machine (Triton's kernel cache empty) compiled every GEMV candidate the first frame times
shape after shape, as decode reached it: 27 s from "generating" to the audio for the NF4 plan on an H100 host, most
of it in 65 GEMV compiles (benchmarks/results/first-run-*.md). The shapes and formats are known once the model is
built on the meta device, and a kernel's compilation depends on K, the dtypes, the flags and the candidate, not on
N: so the candidates compile on small zero stand-ins (tiles.stand_in_rows) beside the loading, and the first
frame's calls find them compiled and only time them. NF4's first run: 32.6 s instead of 36.1 on that host. The
request's other kernels (norms, RoPE, attention, sampling, NF4's dequantization) compile the same way, first
(runtime/stand_in_frame.py): bf16's first run 12.7-14.0 s instead of 18.0-20.5. The compiles, not the loading,
bound NF4's: Triton's front end holds the GIL (WORKERS). Runs whose choices and marks are kept
(quant/kernels/choices.py, once_per_machine) run nothing here: their first frame loads the kernels from Triton's
cache.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from quant.base import FloatLinear, QuantizedLinear
from quant.kernels import choices, kernels_supported
from runtime.sampling import SamplingParams
from runtime.stand_in_frame import frame_calls, frame_key

LayerClass = type[FloatLinear] | type[QuantizedLinear]


@dataclass(frozen=True)
class DecodeGemv:
    """One distinct batch-1 GEMV of a decode frame: a layer class and its shape; `gated`: the FFN's gate with its
    up layer in one launch."""

    layer: LayerClass
    out_features: int
    in_features: int
    gated: bool = False


def decode_gemvs(model: nn.Module, layer_class: Callable[[str], LayerClass]) -> list[DecodeGemv]:
    """The distinct GEMVs of one frame of `model` (a DualAR, on the meta device is enough): each stack's first block
    (its blocks are alike), the fast AR's output layer and the slow head over the legal ids. `layer_class(weight
    key)` names the class loading will give each linear."""
    gemvs = []
    for stack in ("layers", "fast_layers"):
        block = getattr(model, stack)[0]
        for name, gated in (("attention.wqkv", False), ("attention.wo", False), ("feed_forward.w1", True),
                            ("feed_forward.w2", False)):
            linear = block.get_submodule(name)
            gemvs.append(DecodeGemv(layer_class(f"{stack}.0.{name}.weight"), linear.out_features,
                                    linear.in_features, gated))
    gemvs.append(DecodeGemv(layer_class("fast_output.weight"), model.fast_output.out_features,
                            model.fast_output.in_features))
    gemvs.append(DecodeGemv(FloatLinear, model.legal_ids.numel(), model.config.dim))
    return list(dict.fromkeys(gemvs))


COMPILED = "compiled"  # the mark a stand-in call keeps in the kernel-choices file once it has run on a machine


def once_per_machine(calls: list[Callable[[], Any]], key: tuple, device: torch.device) -> list[Callable[[], Any]]:
    """`calls`, each keeping its mark under `key` in the kernel-choices file (quant/kernels/choices.py: per GPU,
    library versions and kernel sources) once it has run; none where an earlier process kept all their marks.
    Their kernels are then in Triton's cache, and loading them from there in the first frame costs less than
    running the stand-ins beside the loading, which took it 0.4-0.7 s longer (a cache emptied since then only
    means that the first frame compiles them). Every call where no file is kept."""
    file = choices.current()
    if file is None:
        return calls
    keys = [(*key, i) for i in range(len(calls))]
    if all(file.recall(device, k, [COMPILED]) is not None for k in keys):
        return []

    def marking(call: Callable[[], Any], k: tuple) -> Callable[[], Any]:
        def run() -> Any:
            result = call()
            file.keep(device, k, [COMPILED], COMPILED)
            return result

        return run

    return [marking(call, k) for call, k in zip(calls, keys)]


def prefill_calls(gemvs: list[DecodeGemv], dtype: torch.dtype, device: torch.device) -> list[Callable[[], Any]]:
    """The calls that compile the prefill's kernels of each quantized layer class among `gemvs` (NF4's
    dequantization): once per class."""
    classes = dict.fromkeys(g.layer for g in gemvs if issubclass(g.layer, QuantizedLinear))
    return [call for cls in classes for call in cls.prefill_ahead_calls(dtype, device)]


def stand_in_calls(model: nn.Module, gemvs: list[DecodeGemv], dtype: torch.dtype, device: torch.device,
                sampling: SamplingParams) -> list[Callable[[], Any]]:
    """The stand-in calls of a request's other kernels and of the prefill's, for `model` (a DualAR on the meta
    device), its `gemvs` and the first request's `sampling`: once per machine."""
    classes = sorted({g.layer.__name__ for g in gemvs})
    return (once_per_machine(frame_calls(model, dtype, device, sampling), frame_key(model, dtype, sampling), device)
            + once_per_machine(prefill_calls(gemvs, dtype, device), ("prefill", *classes, dtype), device))


# Threads compiling at once. Triton's front end runs in Python, so a compile holds the GIL much of the time, and
# the loading beside it needs the GIL for every chunk it reads. NF4's first run on H100 hosts (16 cores): 37.1 s with
# 16 threads and 28.8 with 8 on one host; 32.6 with 8 (and a 0.5 ms GIL switch interval) and 31.4 with 4 on another
# (47.6 compiling in the first frame instead); bf16's GEMVs compiled as fast on 4 as on 8
# (benchmarks/results/first-run-*.md).
WORKERS = 4


class AheadCompiles:
    """The calls of `first` (a request's other kernels), then the GEMV candidates of `gemvs`, run on threads from
    construction on; `finish` waits for them (before any CUDA-graph capture, which another thread's launch would
    break), `abandon` drops the ones not started. A call that fails (a candidate this GPU cannot run, out of memory)
    is dropped: the first frame's call meets the same and deals with it where it belongs."""

    def __init__(self, gemvs: list[DecodeGemv], dtype: torch.dtype, device: torch.device,
                 workers: int | None = None, first: Sequence[Callable[[], Any]] = ()) -> None:
        self._gemvs, self._dtype, self._device, self._first = gemvs, dtype, device, first
        self._workers = workers or min(WORKERS, os.cpu_count() or 1)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s2edge-compile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        calls = list(self._first)
        for gemv in self._gemvs:
            calls += self._on_device(lambda g=gemv: g.layer.ahead_calls(g.out_features, g.in_features, self._dtype,
                                                                          self._device, g.gated)) or []
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="s2edge-compile") as pool:
            list(pool.map(self._on_device, calls))

    def _on_device(self, call: Callable[[], Any]) -> Any:
        """call() with the device current and on the compiles' stream (unless abandoned): the loading's work on
        the default stream does not hold back their launches, nor they the loading's; one stream for all, as one
        call's stand-ins serve the next calls. None where it raised: the first frame's call raises it again, where
        it belongs."""
        if self._stop.is_set():
            return None
        on_gpu = self._device.type == "cuda"
        with torch.cuda.device(self._device) if on_gpu else nullcontext(), \
                torch.cuda.stream(self._stream) if on_gpu else nullcontext():
            try:
                return call()
            except Exception:  # noqa: BLE001
                return None

    def finish(self) -> None:
        """Wait for these compiles, and for any an earlier load abandoned (a plan that ran out of memory)."""
        for thread in (*_abandoned, self._thread):
            thread.join()
        _abandoned.clear()

    def abandon(self) -> None:
        """Drop the compiles not started and return at once: a compile cannot be interrupted, and one running
        (up to a few seconds) must not hold back an error or a Ctrl-C. It finishes on its own, before the next
        load's `finish` returns."""
        self._stop.set()
        _abandoned.append(self._thread)


_abandoned: list[threading.Thread] = []  # threads of abandoned compiles that may still launch a stand-in call


@contextmanager
def compiling_ahead(model: nn.Module, layer_class: Callable[[str], LayerClass], dtype: torch.dtype,
                    device: torch.device, sampling: SamplingParams = SamplingParams()) -> Iterator[None]:
    """Compile `model`'s kernels (a DualAR on the meta device) on `device`, those of draws with `sampling`, while the
    block runs (the loading); wait for them at its end, or drop those not started where it raises. Nothing where
    our kernels do not run on `device`."""
    if not kernels_supported(device):
        yield
        return
    gemvs = decode_gemvs(model, layer_class)
    compiles = AheadCompiles(gemvs, dtype, device, first=stand_in_calls(model, gemvs, dtype, device, sampling))
    try:
        yield
    except BaseException:
        compiles.abandon()
        raise
    compiles.finish()
