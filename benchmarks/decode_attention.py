"""One decode token's attention over a slow-AR layer's K/V cache: SDPA over the whole cache with the visibility mask
(what the CUDA-graph decode step ran before) against our kernel, which reads the filled slots only.

Protocol: S2's slow AR (32 query heads, 8 KV heads of 128), 36 layers with their own bf16 caches, one CUDA graph of
36 calls per variant, median of 50 replays (ms per 36 calls); per cache capacity, a position early in the cache and
the last slot. Each variant is checked against fp32 SDPA over the visible slots (relative Frobenius error).

Run from the repository root on a CUDA machine (under a minute on an H100):
    python benchmarks/decode_attention.py
The page goes to benchmarks/results/decode-attention-<gpu>-<date>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "benchmarks"))

from gemv import graph_ms  # noqa: E402
from quant.base import error_stats  # noqa: E402
from report import run_notes, write_measured  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 36


def measure(capacity: int, position: int, device: torch.device) -> tuple[str, str]:
    from quant.kernels.decode_attention import decode_attention

    gen = torch.Generator(device=device).manual_seed(capacity + position)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen, device=device).bfloat16()
    caches = [[torch.randn(1, KV_HEADS, capacity, HEAD_DIM, generator=gen, device=device).bfloat16()
               for _ in range(2)] for _ in range(LAYERS)]
    index = torch.tensor([position], device=device)
    visible = torch.arange(capacity, device=device)[None, :] <= position  # [1, capacity], the step's mask

    def sdpa(i: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, *caches[i], attn_mask=visible, enable_gqa=True)

    def ours(i: int) -> torch.Tensor:
        return decode_attention(q, *caches[i], index)

    k, v = caches[0]
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)
    errors = [error_stats(fn(0), reference).rel_fro for fn in (sdpa, ours)]
    sdpa_ms, ours_ms = graph_ms(sdpa, LAYERS), graph_ms(ours, LAYERS)
    return (f"capacity {capacity}, position {position}",
            f"SDPA {sdpa_ms:.3f} ms (rel {errors[0]:.1e}); ours {ours_ms:.3f} ms (rel {errors[1]:.1e}); "
            f"{sdpa_ms / ours_ms:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacities", default="768,2048,4096", help="comma-separated cache capacities")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the page")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    with torch.inference_mode():
        for capacity in (int(c) for c in args.capacities.split(",")):
            for position in sorted({min(550, capacity - 1), capacity - 1}):
                rows.append(measure(capacity, position, device))
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device)
    date, notes = run_notes()
    notes += [f"- one bf16 query of {HEADS} heads over {KV_HEADS} KV heads of {HEAD_DIM}, slots 0..position visible; "
              f"ms per {LAYERS} calls (each layer its own cache) replayed from one CUDA graph, median of 50; rel: "
              "relative error against fp32 SDPA over the visible slots"]
    write_measured(args.out, "decode-attention", gpu, date,
                   f"Decode attention over the K/V cache: SDPA with a mask or our kernel ({gpu})", notes, rows)


if __name__ == "__main__":
    main()
