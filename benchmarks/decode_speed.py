"""Decode speed on the full-size synthetic checkpoint: frames decoded eagerly against one CUDA graph replay per frame.

Per precision plan (in one process, one after the other): load the checkpoint quantizing on the fly, prefill a
prompt of a 200-frame reference and a sentence, then time a warm generation of `--frames` frames both ways
(`GenerationConfig.cuda_graph`); ms/frame is timed from frame 17 on (past the prefill, the eagerly run first
frame, the capture and the first chunk of replays). Also measured: the capture's time, the time to the first frame
with this prompt and with a 30 s reference (first_frame_ms); and checked: every greedy frame replayed from the graph
is an argmax of the eager model's logits (greedy_gap).

Run on the GPU machine:  python benchmarks/decode_speed.py --workdir /tmp/s2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from random_weights import never_stop  # noqa: E402

from runtime import decode  # noqa: E402
from runtime.config import bundled_config  # noqa: E402
from runtime.decode import FrameLoop  # noqa: E402
from runtime.devices import skip_cudnn_attention  # noqa: E402
from runtime.engine import GenerationConfig, generate  # noqa: E402
from runtime.files import atomic_path  # noqa: E402
from runtime.loader import WeightFormats, load_model  # noqa: E402
from runtime.model import DualAR  # noqa: E402
from runtime.prompt import Reference, build_prompt  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from runtime.synthetic import write_checkpoint  # noqa: E402

PLANS = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8"), "int8": ("int8", "int8"), "nf4": ("nf4", "bf16"),
         "nf4-all": ("nf4", "nf4")}


def full_checkpoint(workdir: Path) -> Path:
    """The full-size synthetic checkpoint under workdir, written on the GPU the first time."""
    ckpt = workdir / "s2-pro"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_checkpoint(ckpt, bundled_config("s2-pro"), seed=0, shards=2, device="cuda")
    return ckpt


LONG_REFERENCE_FRAMES = 645  # a 30 s reference at 21.5 frames per second, the longest the model card advises


def plan_and_prompts(ckpt: Path, plan: str) -> tuple[DualAR, torch.Tensor, torch.Tensor]:
    """The model loaded on the GPU in one of PLANS (quantized while loading, <|im_end|> suppressed) and two
    measurement prompts: a 200-frame reference and a sentence (536 tokens); a 30 s reference and the same sentence."""
    slow, fast = PLANS[plan]
    loaded = load_model(ckpt, torch.device("cuda"), torch.bfloat16, formats=WeightFormats(slow, fast))
    model = loaded.model
    never_stop(model)

    def prompt(frames: int) -> torch.Tensor:
        codes = torch.randint(0, model.config.codebook_size, (10, frames), generator=torch.Generator().manual_seed(0))
        return build_prompt(loaded.tokenizer, "Hello, this is a measurement of the decoding speed.",
                            [Reference(codes, "a reference transcript " * (8 * frames // 200))],
                            model.config.num_codebooks)

    return model, prompt(200), prompt(LONG_REFERENCE_FRAMES)


def per_frame_ms(model, prompt: torch.Tensor, frames: int, graph: bool) -> float:
    """Warm ms per frame over the frames after the first host check of the graph loop (frame 0, the capture and
    frames 1-16 excluded; the graph loop reports frames in chunks, so time is measured between chunk ends)."""
    config = GenerationConfig(max_new_tokens=frames, seed=0, cuda_graph=graph)
    generate(model, prompt, GenerationConfig(max_new_tokens=4, seed=0, cuda_graph=graph))  # warm-up
    stamps: list[float] = []
    result = generate(model, prompt, config, on_frame=lambda _i: stamps.append(time.perf_counter()))
    assert result.codes.shape[1] == frames
    first = FrameLoop.check_every  # frame 16: the end of the first replayed chunk
    return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first) * 1e3


WAYS = ("first request", "captured first", "graph reused")


def first_frame_ms(model, prompt: torch.Tensor, repeats: int = 5) -> tuple[float, ...]:
    """Warm (a generation of this prompt first), medians of `repeats`, in ms: the prompt's prefill alone; and the time
    from calling generate to its first frame (the prefill, the first frame, a capture where there is one) three ways
    (WAYS): the first request of its configuration on the model (the first frame eager, then the capture; here the
    model's record of earlier requests is cleared), a new loop of a configuration that ran before (the capture
    first), and a request that replays the last request's graph (no capture)."""
    generate(model, prompt, GenerationConfig(max_new_tokens=4, seed=0))  # cache sized and kernels chosen
    prefills, firsts = [], {way: [] for way in WAYS}
    for _ in range(repeats):
        with torch.inference_mode():
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.forward_slow(prompt[None].cuda(), 0)
            torch.cuda.synchronize()
            prefills.append(time.perf_counter() - start)
        for way in WAYS:
            if way != "graph reused":
                model.frame_loop = None
            if way == "first request":
                decode._stepped.pop(model, None)
            stamps: list[float] = []
            start = time.perf_counter()
            generate(model, prompt, GenerationConfig(max_new_tokens=32, seed=0),
                     on_frame=lambda _i: stamps.append(time.perf_counter()))
            firsts[way].append(stamps[0] - start)
    return tuple(statistics.median(v) * 1e3 for v in (prefills, *firsts.values()))


def capture_ms(model, prompt: torch.Tensor) -> float:
    """Time FrameLoop.capture in a warm generation with a new loop: what a request pays for its graph where it
    cannot replay the last request's (FrameLoop.for_request)."""
    real, spent = FrameLoop.capture, []
    model.frame_loop = None

    def timed(loop):
        start = time.perf_counter()
        graph = real(loop)
        spent.append(time.perf_counter() - start)
        return graph

    FrameLoop.capture = timed
    try:
        generate(model, prompt, GenerationConfig(max_new_tokens=4, seed=0))
    finally:
        FrameLoop.capture = real
    return spent[0] * 1e3


def greedy_gap(model, prompt: torch.Tensor, frames: int) -> float:
    """Greedy frames replayed from the graph, re-scored by one eager forward over the prompt and those frames: the
    largest shortfall of a chosen semantic token's logit below the best, over the frames, in units of the logits'
    standard deviation. Near 0: every token was an argmax (up to bf16 rounding); a slow step one position off
    scored 0.18 on the tiny model (0 when right). Equality with an eager run is no test here: random weights give
    bf16 logits in the hundreds, exact ties are common, and topk breaks them either way."""
    c = model.config
    codes = generate(model, prompt, GenerationConfig(max_new_tokens=frames, sampling=SamplingParams(top_k=1),
                                                     seed=0)).codes  # [10, n]
    columns = torch.cat([codes[:1] + c.semantic_begin_id, codes])  # [11, n]: the frames as slow-AR tokens
    with torch.inference_mode():
        hidden = model.forward_slow(torch.cat([prompt, columns], dim=1)[None].cuda(), 0)[0]
        logits = model.head_logits(hidden[prompt.shape[1] - 1 : -1]).float()  # [n, legal]: before each frame
        chosen = logits.gather(1, (codes[:1].T + 1).cuda())  # legal row 1 + c is semantic token c
    return float((logits.max(dim=1, keepdim=True).values - chosen).max() / logits.std())


def full_size_arguments(parser: argparse.ArgumentParser, plans: str) -> None:
    """The arguments of the benchmarks on the full-size checkpoint: where it lives, where the page goes, which
    plans (default `plans`), and whether torch's cuDNN attention stays (see `attention_as_the_cli`)."""
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plans", default=plans, help=f"comma-separated subset of: {', '.join(PLANS)}")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="Keep cuDNN among torch's attention backends (torch's default; the CLI leaves it out).")


def attention_as_the_cli(args: argparse.Namespace) -> None:
    """Leave cuDNN out of torch's attention backends, as the CLI does, unless --cudnn-attention."""
    if not args.cudnn_attention:
        skip_cudnn_attention()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    full_size_arguments(parser, ",".join(PLANS))
    parser.add_argument("--frames", type=int, default=128)
    args = parser.parse_args()
    attention_as_the_cli(args)

    ckpt = full_checkpoint(args.workdir)
    rows = []
    for name in args.plans.split(","):
        slow, fast = PLANS[name]
        model, prompt, long_prompt = plan_and_prompts(ckpt, name)
        eager_ms = per_frame_ms(model, prompt, args.frames, graph=False)
        graph_ms = per_frame_ms(model, prompt, args.frames, graph=True)
        gap = greedy_gap(model, prompt, 48)
        capture = capture_ms(model, prompt)
        firsts = [first_frame_ms(model, p) for p in (prompt, long_prompt)]
        long_tokens = long_prompt.shape[1]
        rows.append((name, f"{slow}/{fast}", prompt.shape[1], eager_ms, graph_ms, capture, gap, firsts))
        print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# Decode speed: eager frames vs one CUDA graph replay per frame ({gpu})", "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; CUDA {torch.version.cuda}",
        f"- command: `python benchmarks/decode_speed.py --frames {args.frames}"
        f"{' --cudnn-attention' if args.cudnn_attention else ''}`",
        "- full-size synthetic checkpoint (official layout, random weights), quantized while loading; <|im_end|> "
        "suppressed so every run decodes all its frames; sampling temperature 0.8, top_p 0.8, top_k 30",
        "- ms/frame: a warm generation's frames 17 on (prefill, the eager first frame, the capture and the first "
        "16 replays excluded); audio runs at 21.5 frames per second, so 46.5 ms/frame is real time",
        "- greedy check: 48 greedy frames replayed from the graph, re-scored by one eager forward over prompt and "
        "frames; the largest shortfall of a chosen semantic token below the best logit, in logit standard "
        "deviations (0: all argmax; a slow step one position off scored 0.18 on the tiny model)",
        f"- first frame: warm, medians of 5, from the call to generate to its first frame (the prefill, the first "
        f"frame, a capture where there is one) for the first request of a sampling configuration on the model (its "
        f"first frame eager, then the capture), a new loop of a configuration that ran before (the capture first) "
        f"and a request replaying the last request's graph; and the prefill alone; for the table's prompt and for a "
        f"{LONG_REFERENCE_FRAMES}-frame (30 s) reference with the same sentence ({long_tokens} tokens)", "",
        "| plan (slow/fast AR) | prompt tokens | eager ms/frame | graph ms/frame | speed-up | graph: audio s per s "
        "| capture ms (a new loop) | greedy check (std) | first frame ms: " + " / ".join(WAYS) + " (prefill ms) "
        "| 30 s reference: the same |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, formats, prompt_len, eager_ms, graph_ms, capture, gap, firsts in rows:
        short, long = (" / ".join(f"{ms:.0f}" for ms in ways) + f" ({prefill:.0f})" for prefill, *ways in firsts)
        lines.append(f"| {name} ({formats}) | {prompt_len} | {eager_ms:.1f} | {graph_ms:.2f} | "
                     f"{eager_ms / graph_ms:.1f}x | {1e3 / graph_ms / 21.5:.1f} | {capture:.0f} | {gap:.3f} | "
                     f"{short} | {long} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{gpu.replace(' ', '-')}-{now:%Y-%m-%d}.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
