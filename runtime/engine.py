"""Generation: prefill the prompt, then one frame at a time (slow step, legal-row head, semantic draw with RAS,
10 fast-AR passes) until <|im_end|> or the frame budget.

Generation logic lives here, separate from the model (gpt-fast style). The frame loop below is the eager path,
used on the CPU and as the reference for the graph-captured loop that a GPU runs (decode.FrameLoop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from runtime.decode import FrameLoop, decode_frame
from runtime.errors import InputError
from runtime.model import DualAR
from runtime.prompt import Reference, build_prompt
from runtime.sampling import RAS_WINDOW, SamplingParams
from runtime.tokenizer import Tokenizer

CAPACITY_BUCKET = 256  # KV-cache sizes are rounded up to this so similar requests reuse one allocation


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 1024  # frames; 1024 frames = 47.6 s of audio
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    max_context: int | None = None  # prompt + frames at most (the KV cache a memory plan reserved); None: the model's
    cuda_graph: bool = True  # on a GPU, decode each frame as one replay of a captured CUDA graph (decode.py)


@dataclass
class Generation:
    codes: torch.Tensor  # [num_codebooks, n] int64 on the CPU, <|im_end|> frame excluded
    stopped: bool  # True if the model emitted <|im_end|>; False if the frame budget ran out
    prompt_tokens: int


def context_limit(model: DualAR, config: GenerationConfig) -> int:
    """Prompt + frames at most: the plan's context if given, never more than the model's trained one."""
    limit = model.config.max_seq_len
    return limit if config.max_context is None else min(limit, config.max_context)


def frame_budget(model: DualAR, prompt_len: int, config: GenerationConfig) -> int:
    """Frames we may generate: the request's budget, clamped to the context (the plan's, else the model's)."""
    limit = context_limit(model, config)
    if prompt_len >= limit:
        raise InputError(f"the prompt is {prompt_len} tokens, which leaves no room in a context of {limit}: "
                         "shorten the text or references, or raise --max-context")
    if config.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    return min(config.max_new_tokens, limit - prompt_len)


def bucket(n: int) -> int:
    return -(-n // CAPACITY_BUCKET) * CAPACITY_BUCKET


def graph_decoding(model: DualAR, config: GenerationConfig) -> bool:
    """Frames by CUDA graph replay (decode.FrameLoop): asked for, and on a GPU."""
    return config.cuda_graph and model.legal_ids.device.type == "cuda"


@torch.inference_mode()
def generate(
    model: DualAR,
    prompt: torch.Tensor,
    config: GenerationConfig,
    on_frame: Callable[[int], None] | None = None,
    on_codes: Callable[[torch.Tensor], None] | None = None,
) -> Generation:
    """prompt [1 + num_codebooks, L] -> codes [num_codebooks, n]. `on_frame(i)` is called after every frame;
    `on_codes` with the codes [num_codebooks, k] of new frames as soon as the host has them (every frame eagerly,
    at each host check in graph replay: after frames 1, 2, 4, 8, 16, then every 16), in order: to decode audio while
    the rest is made."""
    device = model.legal_ids.device  # the compute device (the text embedding table may stay in host RAM)
    dtype = model.norm.weight.dtype
    prompt_len = prompt.shape[1]
    budget = frame_budget(model, prompt_len, config)
    capacity = bucket(prompt_len + budget)
    if config.max_context is not None:
        capacity = min(capacity, config.max_context)  # never more KV cache than the plan reserved
    if model.capacity < capacity:
        model.setup_caches(capacity, dtype, device)
    generator = torch.Generator(device)
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())

    hidden = model.forward_slow(prompt[None].to(device), 0)[:, -1]  # [1, D]
    if graph_decoding(model, config):
        loop = FrameLoop.for_request(model, hidden, prompt_len, budget, config.sampling, generator)
        columns, stopped = loop.run(on_frame, capture=device.type == "cuda", on_codes=on_codes)
    else:
        columns, stopped = eager_frames(model, hidden, prompt_len, budget, config.sampling, generator, on_frame,
                                        on_codes)
    return Generation(codes=columns[1:].cpu(), stopped=stopped, prompt_tokens=prompt_len)


def eager_frames(model: DualAR, hidden: torch.Tensor, prompt_len: int, budget: int, params: SamplingParams,
                 generator: torch.Generator, on_frame: Callable[[int], None] | None,
                 on_codes: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, bool]:
    """The reference frame loop: positions as Python ints, K/V read up to the position, a host check per frame.
    -> (frames [1 + num_codebooks, n] without the <|im_end|> frame, stopped)."""
    window = torch.zeros(RAS_WINDOW, dtype=torch.int64, device=hidden.device)
    frames: list[torch.Tensor] = []
    for i in range(budget):
        frame = decode_frame(model, hidden, window, params, generator)
        if on_frame is not None:
            on_frame(i)
        if int(frame[0]) == model.config.im_end_id:
            return _columns(model, frames), True
        frames.append(frame)
        if on_codes is not None:
            on_codes(frame[1:, None])
        window[i % RAS_WINDOW] = frame[0]
        if i + 1 < budget:
            hidden = model.forward_slow(frame.view(1, -1, 1), prompt_len + i)[:, -1]
    return _columns(model, frames), False


def _columns(model: DualAR, frames: list[torch.Tensor]) -> torch.Tensor:
    if not frames:
        return torch.zeros(1 + model.config.num_codebooks, 0, dtype=torch.int64)
    return torch.stack(frames, dim=1)


@dataclass
class LongGeneration:
    codes: torch.Tensor  # [num_codebooks, n]: every batch's frames, in order
    batches: list[Generation]
    history_kept: list[int]  # per batch, how many earlier batches its prompt replayed


def generate_batches(
    model: DualAR,
    tokenizer: Tokenizer,
    texts: list[str],
    references: list[Reference],
    config: GenerationConfig,
    on_frame: Callable[[int], None] | None = None,
    on_batch: Callable[[Generation], None] | None = None,
    on_codes: Callable[[torch.Tensor], None] | None = None,
) -> LongGeneration:
    """Several texts (see prompt.text_batches) spoken one after the other in one voice; `on_batch` gets each
    batch's result as it finishes (a caller can keep what is done if a later batch fails or is interrupted), and
    `on_codes` every batch's new frames in order, as `generate` gives them.

    As the reference, each request replays the earlier batches as user/assistant turns (their text and generated
    codes) after the references, so voice and prosody carry over. Beyond it, the oldest turns are dropped while
    the prompt plus `max_new_tokens` would not fit the context (the plan's or the model's).
    """
    limit = context_limit(model, config)
    history: list[tuple[str, torch.Tensor]] = []
    results: list[Generation] = []
    kept: list[int] = []
    for text in texts:
        prompt = build_prompt(tokenizer, text, references, model.config.num_codebooks, history)
        while history and prompt.shape[1] + config.max_new_tokens > limit:
            history = history[1:]
            prompt = build_prompt(tokenizer, text, references, model.config.num_codebooks, history)
        kept.append(len(history))
        result = generate(model, prompt, config, on_frame, on_codes)
        results.append(result)
        history.append((text, result.codes))
        if on_batch is not None:
            on_batch(result)
    return LongGeneration(torch.cat([r.codes for r in results], dim=1), results, kept)
