"""Quality tier 2 as a table: the numbers behind tests/test_quality.py's GPU gates, on the GPU at hand.

A model of S2 Pro's widths with 2 slow and 2 fast layers and random weights, plain and with function-preserving
outlier channels, teacher-forced one token at a time as decode runs it (every quantized linear on its GEMV
kernel). Per format: the largest per-layer relative error of our kernels against x @ the reference
dequantization, and the mean KL from the bf16 run of our runtime and of the fake-quant reference (codebook 0 /
codebooks 1-9), with their ratio. bf16 against fp32 through the same path, and naive per-row int4, for scale.

Run on the GPU machine:  python benchmarks/quality_real_shapes.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from report import run_notes  # noqa: E402
from runtime.files import atomic_path  # noqa: E402
from test_quality import (FORMATS, compare, decoded_logits, layer_errors, quantized,  # noqa: E402
                          real_shapes_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    date, notes = run_notes()
    gpu = torch.cuda.get_device_name()
    rows = []
    for variant in ("plain", "outliers"):
        base = real_shapes_model(outliers=variant == "outliers")
        float_bf16 = copy.deepcopy(base).to(torch.bfloat16)
        bf16 = decoded_logits(float_bf16)
        fp32 = compare(decoded_logits(base), bf16)  # bf16 itself, against fp32
        rows.append(f"| {variant} | bf16 (against fp32) | - | {fp32[0].mean_kl:.2e} / {fp32[1].mean_kl:.2e} | - | - |")
        for fmt in FORMATS:
            ours_model = quantized(base, fmt, runtime=True)
            worst = max(layer_errors(ours_model, float_bf16, fmt).values())
            ours = compare(bf16, decoded_logits(ours_model))
            del ours_model
            ref = compare(bf16, decoded_logits(quantized(base, fmt, runtime=False)))
            ratio = " / ".join(f"{o.mean_kl / r.mean_kl:.3f}" for o, r in zip(ours, ref))
            rows.append(f"| {variant} | {fmt} | {worst:.2e} | {ours[0].mean_kl:.2e} / {ours[1].mean_kl:.2e} | "
                        f"{ref[0].mean_kl:.2e} / {ref[1].mean_kl:.2e} | {ratio} |")
        naive = compare(bf16, decoded_logits(quantized(base, "naive-int4", runtime=False)))
        rows.append(f"| {variant} | naive per-row int4 (fake quant) | - | - | "
                    f"{naive[0].mean_kl:.2e} / {naive[1].mean_kl:.2e} | - |")
    lines = [f"# Quality tier 2: our kernels at S2's real shapes against the fake-quant reference ({gpu})", "",
             *notes, "- model: S2 Pro widths (dim 2560, 32/8 heads of 128, FFN 9728, 4 097-row head, 10 codebooks of "
             "4 096), 2 slow + 2 fast layers, weights N(0, 0.02); 'outliers': one channel per norm 30x in the weights"
             " reading it (function-preserving)",
             "- per layer: every quantized linear (21) on one bf16 token with one 30x feature, against x @ the "
             "reference dequantization (bitsandbytes for NF4, the cast and rounding rules for FP8 and INT8); gate 1e-2",
             "- end to end: 2 held-out sequences, 16 text tokens then 12 teacher-forced frames one token at a time "
             "(the slow step at a device position, the fast AR's 10 positions); mean KL from the bf16 run, codebook"
             " 0 / codebooks 1-9; gate: ours at most 2x the reference", "",
             "| weights | mode | worst layer rel. error | KL ours | KL fake-quant reference | ours / reference |",
             "|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.out / f"quality-real-shapes-{gpu.replace(' ', '-')}-{date}.md") as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    main()
