"""Where a graph-replayed decode frame spends its GPU time: kernels per frame and their time, by family.

Per precision plan: load the full-size synthetic checkpoint (quantizing on the fly), prefill a prompt, run the
frame loop's first step eagerly, capture it, warm up, then time 16 replays (wall ms/frame) and profile 8 more
with torch.profiler (CUPTI traces every kernel a graph replay launches). Kernel families are matched by name.

Run on the GPU machine:  python benchmarks/decode_profile.py --workdir /tmp/s2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_speed import PLANS, full_checkpoint, plan_and_prompts  # noqa: E402

from runtime.decode import FrameLoop  # noqa: E402
from runtime.engine import bucket  # noqa: E402
from runtime.files import atomic_path  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402

# (substring of the kernel name, family): the first match wins
FAMILIES = (("gemv_nf4", "our NF4 GEMV"), ("gemv8", "our 8-bit / bf16 GEMV"), ("norm_rope", "our norm / RoPE / SwiGLU"),
            ("rms_norm", "our norm / RoPE / SwiGLU"), ("silu_mul", "our norm / RoPE / SwiGLU"),
            ("_sample_kernel", "our sampling"), ("decode_attention", "our decode attention"), ("sdpa", "attention"),
            ("cudnn", "attention"), ("flash", "attention"), ("nvjet", "cuBLAS GEMM"), ("gemm", "cuBLAS GEMM"),
            ("splitkreduce", "cuBLAS GEMM"), ("gemv", "cuBLAS GEMV"), ("topk", "sort / top-k"),
            ("sort", "sort / top-k"), ("reduce", "reductions"), ("softmax", "reductions"),
            ("index", "copies and indexing"), ("copy", "copies and indexing"), ("cat", "copies and indexing"),
            ("elementwise", "elementwise"))
REPLAYS = 8


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((fam for key, fam in FAMILIES if key in name), "other")


def profile_plan(ckpt: Path, plan: str) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """-> (wall ms/frame, kernels/frame, {family: (ms/frame, kernels/frame)})."""
    model, prompt, _ = plan_and_prompts(ckpt, plan)
    budget = 64
    model.setup_caches(bucket(prompt.shape[1] + budget), torch.bfloat16, torch.device("cuda"))
    generator = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        hidden = model.forward_slow(prompt[None].cuda(), 0)[:, -1]
        loop = FrameLoop(model, hidden, prompt.shape[1], budget, SamplingParams(), generator)
        loop.step()
        graph = loop.capture()
        for _ in range(8):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(16):
            graph.replay()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / 16 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(REPLAYS):
                graph.replay()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for event in kernels:
        entry = totals[family(event.name)]
        entry[0] += event.device_time / 1e3 / REPLAYS
        entry[1] += 1 / REPLAYS
    return wall_ms, len(kernels) / REPLAYS, {fam: (ms, n) for fam, (ms, n) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plans", default="bf16,nf4-all", help=f"comma-separated subset of: {', '.join(PLANS)}")
    args = parser.parse_args()

    ckpt = full_checkpoint(args.workdir)
    gpu = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# Decode frame profile: GPU time per kernel family in one graph replay ({gpu})", "",
             f"- date: {now:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; CUDA {torch.version.cuda}",
             f"- command: `python benchmarks/decode_profile.py --plans {args.plans}`",
             "- full-size synthetic checkpoint, a 536-token prompt, frames at the prompt's end; wall: 16 replays "
             f"timed; kernels: {REPLAYS} replays under torch.profiler, per frame", ""]
    for name in args.plans.split(","):
        slow, fast = PLANS[name]
        wall_ms, count, families = profile_plan(ckpt, name)
        busy = sum(ms for ms, _ in families.values())
        lines += [f"## {name} ({slow}/{fast}): {wall_ms:.2f} ms/frame wall, {count:.0f} kernels, "
                  f"{busy:.2f} ms of kernel time", "", "| kernel family | ms per frame | kernels per frame | us each |",
                  "|---|---|---|---|"]
        for fam, (ms, n) in sorted(families.items(), key=lambda item: -item[1][0]):
            lines.append(f"| {fam} | {ms:.3f} | {n:.0f} | {ms / n * 1e3:.1f} |")
        lines.append("")
        print("\n".join(lines[-len(families) - 5:]), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-profile-{gpu.replace(' ', '-')}-{now:%Y-%m-%d}.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
