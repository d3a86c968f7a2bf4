"""Audio decoded beside the generation: the codes of each host check after the first go to a thread of their own,
which decodes them with the causal codec on a CUDA stream of its own and hands the audio on, while the frame loop
goes on.

Why a thread: decoding a 16-frame piece launches hundreds of small kernels, 19-35 ms on an H100 when done between
the frame loop's host checks, which slowed a bf16 frame from 6.7-6.8 to 8.4-9.0 ms
(benchmarks/results/stream-latency-*.md). On a thread the launches overlap the loop's replays. The first piece
is decoded by the caller at once: on the thread, beside the loop's first replays, it came out 180-235 ms after
the call instead of 50-80 ms.
"""

from __future__ import annotations

import functools
import queue
import threading
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from runtime.codec import Codec, DecodeStream


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for all decoders: the caching allocator keeps its blocks per stream, so a new stream
    per request would hold on to memory that later requests cannot use."""
    return torch.cuda.Stream(device)


class BackgroundDecoder:
    """`push` codes [10, n] in order (a generation's `on_codes`); `sink` gets their audio [2048 n] (float32, host)
    in the same order: the first piece's from the caller, the others' from the decoding thread. `close` waits for
    the last piece; an error of the decoding or the sink (a closed pipe) is raised by `push` or by `close`."""

    def __init__(self, codec: Codec, sink: Callable[[np.ndarray], None]) -> None:
        self.decoder, self.sink = DecodeStream(codec), sink
        self.stream = _decode_stream(codec.device) if codec.device.type == "cuda" else None
        self.pieces: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._decode_all, name="s2edge-audio", daemon=True)
        self.started = False

    def push(self, codes: torch.Tensor) -> None:
        """Hand over codes [10, n]. The first piece is decoded now, on the caller's stream (its audio is the
        stream's start: it must not wait); later ones are copied to the host (the generation reuses its buffer;
        the host check that found them has already waited for them, so the copy is quick) and queued."""
        if self.error is not None:
            raise self.error
        if not self.started:  # the decoder's state is on the device once the audio is on the host: safe to hand on
            self.sink(self.decoder.push(codes).cpu().numpy())
            self.thread.start()
            self.started = True
            return
        self.pieces.put(codes.to("cpu", copy=True))

    def close(self) -> None:
        """Decode what is queued, stop the thread, and raise its error, if any."""
        if self.started:
            self.pieces.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _decode_all(self) -> None:
        with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()):
            while (codes := self.pieces.get()) is not None:
                if self.error is not None:
                    continue  # drain: close() reports the first error
                try:
                    self.sink(self.decoder.push(codes).cpu().numpy())
                except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
                    self.error = exc
