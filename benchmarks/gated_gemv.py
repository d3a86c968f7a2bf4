"""The FFN's gate and up GEMVs with SiLU x up: three launches (two GEMVs, then silu_mul) against the gated form's one.

Protocol as benchmarks/gemv.py: 36 layers with distinct weights (a gate and an up weight of 9728x2560 each, N(0,
0.02)), one CUDA graph of 36 calls per variant, median of the timed replays in ms per 36 calls; each variant's
first call chooses its kernel configuration before capture, as in decode. Each variant is checked against the
fp32 reference SiLU(x W_gate^T) * (x W_up^T) from the dequantized weights (relative Frobenius error).

Run from the repository root on a CUDA machine (about a minute on an H100):
    python benchmarks/gated_gemv.py
The page goes to benchmarks/results/gated-gemv-<gpu>-<date>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "benchmarks"))

from gemv import graph_ms  # noqa: E402
from quant.base import FloatLinear, QuantizedLinear, error_stats, quantize_linear, silu_gated  # noqa: E402
from report import run_notes, write_measured  # noqa: E402

OUT, IN, LAYERS = 9728, 2560, 36


def timed(call: Callable[[int], torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(ms per 36 calls replayed from one graph, relative error of the eager outputs against the reference)."""
    eager = torch.cat([call(i).view(1, -1) for i in range(LAYERS)])  # first calls: kernel choices, before capture
    return graph_ms(call, LAYERS), error_stats(eager, torch.cat(reference)).rel_fro


def layer_of(weight: torch.Tensor, fmt: str) -> QuantizedLinear | FloatLinear:
    """The model's linear layer for `fmt` ("bf16": FloatLinear, decode's bf16 layer) holding `weight`."""
    if fmt != "bf16":
        return quantize_linear(weight, fmt)
    layer = FloatLinear(IN, OUT, bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    return layer


def dense(layer: QuantizedLinear | FloatLinear) -> torch.Tensor:
    """The weight the layer computes with, in fp32."""
    return layer.weight.float() if isinstance(layer, FloatLinear) else layer.dequantize()


def measure(fmt: str, device: torch.device) -> list[tuple[str, str]]:
    from quant.kernels.swiglu import silu_mul

    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [[layer_of(torch.randn(OUT, IN, generator=gen, device=device, dtype=torch.bfloat16) * 0.02, fmt)
              for _ in range(2)] for _ in range(LAYERS)]
    x = torch.randn(1, 1, IN, generator=gen, device=device).bfloat16()
    reference = [F.silu(x.view(1, IN).float() @ dense(g).T) * (x.view(1, IN).float() @ dense(u).T)
                 for g, u in pairs]
    three_ms, three_rel = timed(lambda i: silu_mul(pairs[i][0](x), pairs[i][1](x)), reference)
    rows = [(f"{fmt}: two GEMVs + silu_mul (3 launches)", f"{three_ms:.3f} ms (rel {three_rel:.1e})")]
    if fmt == "bf16":  # what the layers would cost as plain nn.Linear: cuBLAS
        def cublas(i: int) -> torch.Tensor:
            return silu_mul(F.linear(x, pairs[i][0].weight), F.linear(x, pairs[i][1].weight))

        cublas_ms, cublas_rel = timed(cublas, reference)
        rows.append(("bf16: two cuBLAS GEMMs + silu_mul (3 launches)", f"{cublas_ms:.3f} ms (rel {cublas_rel:.1e})"))
    if silu_gated(*pairs[0], x) is None:
        return rows + [(f"{fmt}: gated form", "not chosen (the three launches timed faster on the first call)")]
    gated_ms, gated_rel = timed(lambda i: silu_gated(pairs[i][0], pairs[i][1], x), reference)
    return rows + [(f"{fmt}: gated form (1 launch)", f"{gated_ms:.3f} ms (rel {gated_rel:.1e}), "
                                                     f"{three_ms / gated_ms:.2f}x")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="bf16,fp8,int8,nf4",
                        help="comma-separated subset of bf16, fp8, int8, nf4")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the page")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gated_gemv.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows: list[tuple[str, str]] = []
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            rows += measure(fmt.strip(), device)
    gpu = torch.cuda.get_device_name(device)
    date, notes = run_notes()
    notes += [f"- {LAYERS} layers of a gate and an up weight {OUT}x{IN} each (N(0, 0.02)), one token of bf16; ms per "
              f"{LAYERS} calls replayed from one CUDA graph (median of 50); rel: relative error against the fp32 "
              "reference from the dequantized weights"]
    write_measured(args.out, "gated-gemv", gpu, date,
                   f"FFN gate + up + SiLU x up: three launches or one ({gpu})", notes, rows)


if __name__ == "__main__":
    main()
