"""Decoding frames: one frame from the slow AR's hidden state, and the loop over frames as one CUDA graph replay each.

Eager decoding launches thousands of kernels per frame (36 slow layers, the 4 097-row head, two semantic draws,
10 fast passes of 4 layers) and is bound by launch latency, not by the GPU. What makes the step capturable: every
value that changes from frame to frame is a device tensor that the step itself updates (the slow position, the
frame counter, the RAS window, the hidden state); the slow step writes its K/V with `index_copy_` and attends over
the whole cache through a mask (model.DevicePosition) and takes the frame's text row from the head's copy of the
legal rows, never from a table in host RAM (model.embed); sampling never syncs with the host (sampling.py); and the
random draws come from a generator registered with the graph. The host reads the frames after frames 1, 2, 4, 8,
16 and then every `check_every` frames to find <|im_end|>; frames decoded after it are dropped. The checks come
often at first so that audio streamed while generating (runtime/stream_out.py) starts with pieces that arrive
before the ones before them have played.
"""

from __future__ import annotations

from typing import Callable
from weakref import WeakKeyDictionary, ref

import torch

from runtime.errors import ResourceError
from runtime.model import DualAR
from runtime.sampling import RAS_WINDOW, SamplingParams, sample, sample_semantic


def decode_frame(
    model: DualAR,
    hidden: torch.Tensor,
    window: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """From the slow AR's normed hidden [1, D] to one frame column [1 + num_codebooks]: [token, c0, ..., c9]."""
    c = model.config
    token = sample_semantic(model.head_logits(hidden)[0], model.legal_ids, window, params, generator)
    code = (token - c.semantic_begin_id).clamp(0, c.codebook_size - 1)
    codes = [code]
    model.forward_fast(hidden.view(1, 1, -1), 0)  # position 0 primes the fast cache; its logits are unused
    for k in range(1, c.num_codebooks):
        h = model.forward_fast(model.fast_embeddings(code).view(1, 1, -1), k)
        code = sample(model.fast_logits(h)[0, 0], params, generator)
        codes.append(code)
    return torch.stack([token, *codes])


# Per model, the step configurations (`configuration`) that have run eagerly once: every kernel of their step is
# compiled and every first-call choice made, so a later request may capture first.
_stepped: WeakKeyDictionary[DualAR, set[tuple]] = WeakKeyDictionary()


def configuration(model: DualAR, hidden: torch.Tensor, params: SamplingParams) -> tuple:
    """What a decode step's kernels and first-call choices depend on: cache capacity, dtype, device, sampling."""
    return model.capacity, hidden.dtype, hidden.device, params


class FrameLoop:
    """Decodes up to `budget` frames after a prefill whose last normed hidden [1, D] is `hidden`.

    step(): frame i from the hidden state (semantic draw with RAS, 10 fast passes), stored in `frames[:, i]`, then
    the slow step at position prompt_len + i for frame i + 1 (run after the last frame too: the cache holds
    prompt_len + budget positions, so it is in range and simply unused). Every value a request sets is a device
    tensor the step reads (the start position too), so `for_request` can hand the same loop and its captured graph
    to the next request of the same configuration.
    """

    check_every = 16  # frames between host checks for <|im_end|>: at most 15 frames decoded in vain

    def __init__(self, model: DualAR, hidden: torch.Tensor, prompt_len: int, budget: int, params: SamplingParams,
                 generator: torch.Generator) -> None:
        device = hidden.device
        self._model = ref(model)  # weak: the model keeps its last loop (model.frame_loop), not the other way round
        self.params, self.generator, self.budget = params, generator, budget
        self.rope = model.rope  # the caches this loop's graph reads: setup_caches replaces them and this table
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden = hidden.clone()  # [1, D]
        self.start = torch.full((1,), prompt_len, dtype=torch.int64, device=device)  # the first frame's position
        self.count = torch.zeros(1, dtype=torch.int64, device=device)  # frames decoded so far
        self.window = torch.zeros(RAS_WINDOW, dtype=torch.int64, device=device)  # the last semantic tokens
        width = max(budget, model.capacity)  # room for any later request's budget
        self.frames = torch.zeros(1 + model.config.num_codebooks, width, dtype=torch.int64, device=device)

    @property
    def model(self) -> DualAR:
        """The model this loop decodes for. Held weakly so that dropping the model frees it, its caches and this
        loop's graph at once (a reference cycle would wait for the cycle collector)."""
        return self._model()

    @classmethod
    def for_request(cls, model: DualAR, hidden: torch.Tensor, prompt_len: int, budget: int, params: SamplingParams,
                    generator: torch.Generator) -> FrameLoop:
        """The model's loop of its last request, with its captured graph, set to this request where nothing the graph
        holds has changed (the caches, dtype, device, sampling; the draws restart from `generator`'s seed), which
        saves the capture (37-80 ms on an H100); else a new loop, kept for the next request."""
        loop = model.frame_loop
        if (isinstance(loop, FrameLoop) and loop.rope is model.rope
                and configuration(model, loop.hidden, loop.params) == configuration(model, hidden, params)):
            loop.hidden.copy_(hidden)
            loop.start.fill_(prompt_len)
            loop.count.zero_()
            loop.window.zero_()
            loop.budget = budget
            loop.generator.manual_seed(generator.initial_seed())
            return loop
        model.frame_loop = cls(model, hidden, prompt_len, budget, params, generator)
        return model.frame_loop

    def step(self) -> None:
        frame = decode_frame(self.model, self.hidden, self.window, self.params, self.generator)  # [11]
        self.frames.index_copy_(1, self.count, frame[:, None])
        self.window.index_copy_(0, self.count % RAS_WINDOW, frame[:1])
        position = self.count + self.start  # [1]: where this frame goes in the slow cache
        self.hidden.copy_(self.model.forward_slow(frame.view(1, -1, 1), position)[:, -1])
        self.count += 1

    def run(self, on_frame: Callable[[int], None] | None, capture: bool,
            on_codes: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, bool]:
        """Decode until <|im_end|> or the budget -> (frames [1 + num_codebooks, n] without the <|im_end|> frame,
        stopped). `capture`: every frame a replay of one captured graph, this loop's from an earlier request if it
        has one (for_request). The first request of a configuration (capacity, dtype, device, sampling) on a model
        runs its first frame eagerly, which compiles the kernels and makes their first-call choices (neither may
        happen inside a capture), and captures after it; a later one without a graph captures before its first
        frame, which saves an eager frame (0-35 ms of the time to the first frame on an H100:
        benchmarks/results/decode-*.md). Otherwise every frame eagerly through the same step. `on_codes` gets the
        codes of the frames each host check finds ([num_codebooks, k], a view of the loop's buffer, valid during
        the call): after frames 1, 2, 4, ... up to `check_every`, then every `check_every`."""
        key = configuration(self.model, self.hidden, self.params)
        if capture and self.graph is None and self.budget > 1 and key in _stepped.get(self.model, ()):
            self.graph = self.capture()
        replay = self.graph.replay if capture and self.graph is not None else self.step
        done = 0
        im_end = self.model.config.im_end_id
        while done < self.budget:
            chunk = min(max(done, 1), self.check_every, self.budget - done)  # 1, 1, 2, 4, ... check_every
            for _ in range(chunk):
                replay()
            if done == 0:
                _stepped.setdefault(self.model, set()).add(key)
                if capture and self.budget > 1 and self.graph is None:  # before the first check: progress after it
                    self.graph = self.capture()
                    replay = self.graph.replay
            first, done = done, done + chunk
            stops = (self.frames[0, first:done] == im_end).nonzero()  # the host waits here, once per chunk
            end = first + int(stops[0, 0]) if stops.numel() else done
            if on_frame is not None:
                for i in range(first, min(end + 1, done)):
                    on_frame(i)
            if on_codes is not None and end > first:
                on_codes(self.frames[1:, first:end])
            if stops.numel():
                return self.frames[:, :end].clone(), True
        return self.frames[:, :done].clone(), False  # a copy: the next request of this loop writes its buffer

    def capture(self) -> torch.cuda.CUDAGraph:
        """Capture one step (after an eager one of the same configuration: nothing is compiled or timed inside the
        capture)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph):
                self.step()
        except RuntimeError as exc:  # an operation this GPU, driver or torch build cannot capture
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ResourceError(f"could not capture the decode step as a CUDA graph ({reason}); "
                                "run with --no-cuda-graph") from exc
        return graph
