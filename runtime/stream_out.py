"""Audio decoded beside the generation: after the first 16 frames, the codes of each host check go to a thread of
their own, which decodes them with the causal codec on a CUDA stream of its own and hands the audio on, while the
frame loop goes on.

Why a thread: decoding a 16-frame piece launches hundreds of small kernels, 16-35 ms on an H100 when done between
the frame loop's host checks, which slowed a bf16 frame from 5.9-6.8 to 7.0-9.3 ms; on the thread the launches
overlap the loop's replays (benchmarks/results/stream-latency-*.md). Why not from the start: a new thread's first
decode took 160-190 ms (its own library handles and first launches), so a player that started with the first
frame ran dry for up to 0.3 s; started after the first piece, its warm-up slowed the caller's next decodes into
gaps of up to 70 ms. The caller decodes the first 16 frames (pieces of 1, 1, 2, 4 and 8 frames, the frame loop's
first host checks); then 0.74 s of audio is out, the thread starts and warms up while the next piece is made.
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

INLINE_FRAMES = 16  # frames decoded by the caller before the thread takes over


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for all decoders: the caching allocator keeps its blocks per stream, so a new stream
    per request would hold on to memory that later requests cannot use."""
    return torch.cuda.Stream(device)


class BackgroundDecoder:
    """`push` codes [10, n] in order (a generation's `on_codes`); `sink` gets their audio [2048 n] (float32, host)
    in the same order: the first INLINE_FRAMES frames' from the caller, the others' from the decoding thread.
    `close` waits for the last piece; an error of the decoding or the sink (a closed pipe) is raised by `push` or
    by `close`."""

    def __init__(self, codec: Codec, sink: Callable[[np.ndarray], None]) -> None:
        self.codec, self.decoder, self.sink = codec, DecodeStream(codec), sink
        self.stream = _decode_stream(codec.device) if codec.device.type == "cuda" else None
        self.pieces: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._decode_all, name="s2edge-audio", daemon=True)
        self.inline_frames = 0

    def push(self, codes: torch.Tensor) -> None:
        """Hand over codes [10, n]. The first INLINE_FRAMES frames are decoded now, on the caller's stream (the
        stream's start must not wait); later ones are copied to the host (the generation reuses its buffer; the
        host check that found them has already waited for them, so the copy is quick) and queued."""
        if self.error is not None:
            raise self.error
        if self.inline_frames < INLINE_FRAMES:  # the decoder's state is on the device once the audio is on the host
            self.sink(self.decoder.push(codes).cpu().numpy())
            self.inline_frames += codes.shape[1]
            if self.inline_frames >= INLINE_FRAMES:
                self.thread.start()  # it warms up while the next piece is made, not beside the caller's decodes
            return
        self.pieces.put(codes.to("cpu", copy=True))

    def close(self) -> None:
        """Decode what is queued, stop the thread, and raise its error, if any."""
        if self.thread.is_alive():
            self.pieces.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _decode_all(self) -> None:
        with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()):
            self._guarded(self.codec.warm_up)  # this thread's handles and first launches
            while (codes := self.pieces.get()) is not None:
                if self.error is None:  # after an error only drain: close() reports the first one
                    self._guarded(lambda: self.sink(self.decoder.push(codes).cpu().numpy()))

    def _guarded(self, work: Callable[[], object]) -> None:
        """Run `work`, keeping its error for the generating thread: the thread must live on to drain the queue."""
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
            self.error = exc
