"""Every precision plan on the full-size synthetic checkpoint: measured GPU memory against the planner's prediction.

For each plan (and for the plan `--vram-budget` 8 / 12 / 24 GB picks) a fresh process detects the GPU, loads the
Dual-AR quantizing on the fly (no pre-quantized store), loads the decode-only codec in bf16, prefills a prompt,
generates frames and decodes them, and reports peak memory. "device peak" = CUDA context (measured before any
allocation) + peak reserved by torch's allocator: what the card must hold. The planner's total includes its own
context estimate, so the two are compared directly.

Run on the GPU machine:  python benchmarks/plans.py --workdir /tmp/s2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + '/benchmarks')
from random_weights import never_stop
from runtime.codec import CodecConfig, load_codec
from runtime.devices import detect_device, parse_size, skip_cudnn_attention, use_expandable_segments
from runtime.engine import GenerationConfig, generate
from runtime.loader import WeightFormats, load_model
from runtime.planner import PlanRequest, choose_plan
from runtime.prompt import Reference, build_prompt
from runtime.checkpoint import open_checkpoint
ckpt, codec_path, precision, fast, budget, frames = sys.argv[2:8]
use_expandable_segments()  # as the CLI does, before the first CUDA allocation
skip_cudnn_attention()
dev = torch.device("cuda")
torch.zeros(1, device=dev)
free0, total = torch.cuda.mem_get_info()
context = total - free0
CONTEXT = 4096
request = PlanRequest(precision, None if fast == "-" else fast, CONTEXT, None if budget == "-" else parse_size(budget))
choice = choose_plan(open_checkpoint(ckpt).config, detect_device(dev), request)
plan = choice.plan
t0 = time.perf_counter()
loaded = load_model(ckpt, dev, torch.bfloat16, formats=WeightFormats(plan.slow_format, plan.fast_format),
                    embeddings_on_host=plan.embeddings_on_host)
torch.cuda.synchronize()
load_s = time.perf_counter() - t0
load_peak = torch.cuda.max_memory_reserved()
resident = torch.cuda.memory_allocated()
codec = load_codec(codec_path, CodecConfig.load("s2pro"), dev, torch.bfloat16)
model = loaded.model
never_stop(model)
def reference(frames_of_codes):
    return Reference(torch.randint(0, 1024, (10, frames_of_codes), generator=torch.Generator().manual_seed(0)),
                     "words " * 60)
text = "Hello there, this is a measurement. " * 20
# The reference fills the planned context: prompt + generated frames = CONTEXT, the size the plan was made for.
overhead = build_prompt(loaded.tokenizer, text, [reference(1)], 10).shape[1] - 1
prompt = build_prompt(loaded.tokenizer, text, [reference(CONTEXT - int(frames) - overhead)], 10)
t0 = time.perf_counter()
out = generate(model, prompt, GenerationConfig(max_new_tokens=int(frames), seed=0))
torch.cuda.synchronize()
gen_s = time.perf_counter() - t0
audio = codec.decode(out.codes.to(dev))
torch.cuda.synchronize()
stamps = []  # a second, warm generation: decode time per frame after the first frame (prefill excluded)
generate(model, prompt, GenerationConfig(max_new_tokens=int(frames), seed=0),
         on_frame=lambda _i: stamps.append(time.perf_counter()))
warm_frame_s = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
print(json.dumps({
    "plan": plan.name, "predicted": plan.total, "predicted_parts": plan.components, "context": context,
    "load_s": load_s, "load_peak_reserved": load_peak, "resident_after_load": resident,
    "peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
    "prompt": prompt.shape[1], "frames": out.codes.shape[1], "gen_s": gen_s, "audio": audio.numel(),
    "warm_frame_s": warm_frame_s,
    "usable": choice.usable_bytes,
}))
"""


def measure(ckpt: Path, codec: Path, precision: str, fast: str, budget: str, frames: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(ckpt), str(codec), precision, fast, budget,
                          str(frames)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--only", help="comma-separated case numbers to run (default: all)")
    args = parser.parse_args()

    import torch

    from runtime.codec import CodecConfig
    from runtime.config import bundled_config
    from runtime.synthetic import write_checkpoint
    from runtime.synthetic_codec import write_synthetic_codec

    ckpt = args.workdir / "s2-pro"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_checkpoint(ckpt, bundled_config("s2-pro"), seed=0, shards=2, device="cuda")
    codec = ckpt / "codec.pth"
    if not codec.exists():
        write_synthetic_codec(codec, CodecConfig.load("s2pro"))

    gib = 2**30
    cases = [("bf16", "-", "-"), ("fp8", "-", "-"), ("int8", "-", "-"), ("nf4", "-", "-"), ("nf4", "nf4", "-"),
             ("auto", "-", "8GB"), ("auto", "-", "12GB"), ("auto", "-", "24GB"), ("auto", "-", "5GB")]
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    rows = []
    for precision, fast, budget in cases:
        t0 = time.perf_counter()
        m = measure(ckpt, codec, precision, fast, budget, args.frames)
        label = f"--precision {precision}" + (f" --fast-ar-precision {fast}" if fast != "-" else "") + (
            f" --vram-budget {budget}" if budget != "-" else "")
        if "error" in m:
            rows.append(f"| `{label}` | error: {m['error']} | | | | | | | | |")
            print(label, m["error"], flush=True)
            continue
        predicted = m["predicted"] - m["predicted_parts"].get("cuda_context", 0)
        within = f"{(m['peak_reserved'] / predicted - 1) * 100:+.1f} %"
        within_alloc = f"{(m['peak_allocated'] / predicted - 1) * 100:+.1f} %"
        ms = m["gen_s"] / max(m["frames"], 1) * 1e3
        rows.append(
            f"| `{label}` | {m['plan']} | {predicted / gib:.2f} | {m['peak_reserved'] / gib:.2f} ({within}) | "
            f"{m['peak_allocated'] / gib:.2f} ({within_alloc}) | {m['context'] / gib:.2f} | {m['resident_after_load'] / gib:.2f} | "
            f"{m['load_s']:.1f} s | {ms:.0f} ms | {m['warm_frame_s'] * 1e3:.0f} ms |"
        )
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)

    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    text = "\n".join([
        f"# Precision plans on the full-size synthetic checkpoint ({gpu})",
        "",
        f"- date: {date}; torch {torch.__version__}; CUDA {torch.version.cuda}",
        f"- command: `python benchmarks/plans.py --frames {args.frames}`",
        "- each row: a fresh process; quantize while loading (no pre-quantized store); decode-only codec in bf16; "
        f"the planned context of 4 096 tokens filled: a reference as long as fits beside the text and the {args.frames} "
        "frames, generated (one CUDA graph replay per frame, the default) and decoded",
        "- the CUDA allocator runs with expandable segments, as the CLI sets it\n"
        "- predicted = the planner's total minus its CUDA-context term; compared with torch's peak reserved memory "
        "(what the card holds) and peak allocated memory (what tensors use). "
        "'in use before' = total - free on the card right after CUDA initialisation (context and whatever else "
        "holds the GPU). GiB = 2^30 bytes",
        "- first run ms/frame: the first generation of the process, prefill included (the kernels' first-call "
        "choices, warm-up and graph capture too; compiling them where Triton's cache is empty); warm ms/frame: a "
        "second generation of the same prompt, per frame after the first\n"
        "- the first run is not a "
        "speed measurement",
        "",
        "| request | plan chosen | predicted GiB | peak reserved GiB (vs predicted) | peak allocated GiB (vs predicted) "
        "| in use before GiB | weights resident GiB | load | first run ms/frame | warm ms/frame |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"plans-{gpu.replace(' ', '-')}-{date}.md").write_text(text)


if __name__ == "__main__":
    main()
