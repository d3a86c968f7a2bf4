"""Teacher-forced replay: the next-token distributions a model gives along a fixed prompt and frames, computed as
decode computes them, and how far two models' distributions lie apart per codebook.

Quality of a quantized mode is judged this way (spec/quality-protocol.md, tier 3): the bf16 model generates the
frames once, then every mode replays the same prompt and frames and its distributions are compared with bf16's at
each position. The replay runs one token at a time exactly as a generated frame does (the slow step at a device
position, the fast AR's positions one by one), so on a GPU every quantized linear takes the GEMV kernel that
generation uses, not the matrix-multiply path of a whole-sequence forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant.quality import Agreement, agreement
from runtime.model import DualAR


@dataclass
class Replay:
    slow: Tensor  # [n, 1 + num_semantic] fp32 head logits predicting frame t's token (the legal ids), on the CPU
    fast: Tensor  # [n, num_codebooks - 1, codebook_size] fp32 logits predicting codebooks 1.., on the CPU


@torch.inference_mode()
def replay(model: DualAR, prompt: Tensor, codes: Tensor) -> Replay:
    """prompt [1 + num_codebooks, L] and the frames that followed it, codes [num_codebooks, n] -> the logits that
    predicted each frame's codebooks, teacher-forced."""
    c = model.config
    device = model.legal_ids.device
    n = codes.shape[1]
    model.setup_caches(prompt.shape[1] + n, model.norm.weight.dtype, device)
    codes = codes.to(device)
    frames = torch.cat([codes[:1] + c.semantic_begin_id, codes])  # [1 + num_codebooks, n] as generated
    hidden = model.forward_slow(prompt[None].to(device), 0)[:, -1:]  # [1, 1, D]
    slow, fast = [], []
    for t in range(n):
        slow.append(model.head_logits(hidden)[0, 0].float().cpu())
        model.forward_fast(hidden, 0)  # position 0 primes the fast cache, as in decode_frame
        fast.append(torch.stack([
            model.fast_logits(model.forward_fast(model.fast_embeddings(codes[k - 1, t]).view(1, 1, -1), k))[0, 0]
            for k in range(1, c.num_codebooks)]).float().cpu())
        if t + 1 < n:
            position = torch.full((1,), prompt.shape[1] + t, dtype=torch.int64, device=device)
            hidden = model.forward_slow(frames[None, :, t:t + 1], position)
    return Replay(torch.stack(slow), torch.stack(fast))


def per_codebook(reference: list[Replay], test: list[Replay]) -> list[Agreement]:
    """Agreement of `test` with `reference` (replays of the same takes) for codebook 0, 1, ..., each over all
    positions of all takes."""
    slow = agreement(torch.cat([r.slow for r in reference]), torch.cat([t.slow for t in test]))
    fast_ref, fast_test = torch.cat([r.fast for r in reference]), torch.cat([t.fast for t in test])
    return [slow, *(agreement(fast_ref[:, k], fast_test[:, k]) for k in range(fast_ref.shape[1]))]
