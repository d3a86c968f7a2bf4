"""Streaming audio while generating (`synthesize -o -`): time to the first audio, and what the codec costs the frames.

Per precision plan, on the full-size synthetic checkpoint and codec (written on the GPU the first time): warm
generations of `--frames` frames (<|im_end|> suppressed) with the 200-frame-reference prompt and the 30 s one of
benchmarks/decode_speed.py, as the CLI streams them: every host check's new codes decoded by the causal codec
(DecodeStream) and copied to the host, either between the loop's host checks or beside the loop on a thread and
CUDA stream of its own (runtime/stream_out.py, what the CLI does). Medians of `--repeats`, in ms: from the call to
generate to the first decoded audio on the host (prefill, first frame, its decode; the graph of the previous
request replayed); the codec's time per 16-frame piece between checks; ms per frame from frame 17 on with and
without the streaming decode (its cost to the frame rate); and the least playback slack (for a player that starts
with the first piece: how early the tightest piece arrived). Checked: the streamed pieces concatenate to the codes'
audio decoded afterwards (largest difference).

Run on the GPU machine:  python benchmarks/stream_latency.py --workdir /tmp/s2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_speed import attention_as_the_cli, full_checkpoint, full_size_arguments, plan_and_prompts  # noqa: E402
from report import run_notes, write_measured  # noqa: E402

from runtime.codec import Codec, CodecConfig, DecodeStream, load_codec  # noqa: E402
from runtime.decode import FrameLoop  # noqa: E402
from runtime.engine import GenerationConfig, generate  # noqa: E402
from runtime.stream_out import BackgroundDecoder  # noqa: E402
from runtime.synthetic_codec import write_synthetic_codec  # noqa: E402


def full_codec(workdir: Path) -> Codec:
    """The full-size synthetic codec (decoder only) on the GPU in bf16, as `synthesize` opens it there."""
    path = workdir / "codec.pth"
    if not path.exists():
        write_synthetic_codec(path, CodecConfig.load("s2pro"))
    return load_codec(path, CodecConfig.load("s2pro"), "cuda", torch.bfloat16, with_encoder=False)


def streamed(model, codec: Codec, prompt: torch.Tensor, frames: int, background: bool) -> dict[str, object]:
    """One warm streamed generation, the pieces decoded between the loop's host checks (inline) or beside the loop
    (BackgroundDecoder, as `synthesize -o -`): first-audio time, inline codec seconds per piece, frame stamps, the
    pieces' audio."""
    pieces, decode_s, frame_stamps, arrivals = [], [], [], []
    start = time.perf_counter()

    def sink(audio) -> None:
        pieces.append(torch.as_tensor(audio))
        arrivals.append(time.perf_counter() - start)

    if background:
        decoder = BackgroundDecoder(codec, sink)
        on_codes = decoder.push
    else:
        stream = DecodeStream(codec)

        def on_codes(codes: torch.Tensor) -> None:
            begin = time.perf_counter()
            sink(stream.push(codes).cpu())  # the host copy waits for the decode, as a pipe's writer does
            decode_s.append(time.perf_counter() - begin)

    result = generate(model, prompt, GenerationConfig(max_new_tokens=frames, seed=0), on_codes=on_codes,
                      on_frame=lambda _i: frame_stamps.append(time.perf_counter()))
    if background:
        decoder.close()
    return {"first": arrivals[0], "slack": playback_slack(arrivals, [len(p) for p in pieces], codec.config.sample_rate),
            "decode": decode_s[1:-1], "stamps": frame_stamps, "pieces": pieces, "codes": result.codes}


def playback_slack(arrivals: list[float], lengths: list[int], sample_rate: int) -> float:
    """A player that starts with the first piece runs dry before piece i unless it arrives by the time the pieces
    before it have played: the least (deadline - arrival) over the pieces, in seconds (negative: a gap)."""
    played = [sum(lengths[:i]) / sample_rate for i in range(len(lengths))]
    return min(arrivals[0] + p - t for p, t in zip(played[1:], arrivals[1:]))


def plain_stamps(model, prompt: torch.Tensor, frames: int) -> list[float]:
    stamps: list[float] = []
    generate(model, prompt, GenerationConfig(max_new_tokens=frames, seed=0),
             on_frame=lambda _i: stamps.append(time.perf_counter()))
    return stamps


def ms_per_frame(stamps: list[float]) -> float:
    first = FrameLoop.check_every
    return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    full_size_arguments(parser, "bf16,nf4-all")
    parser.add_argument("--frames", type=int, default=129, help="frames per generation (1 + 8 pieces of 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    attention_as_the_cli(args)

    ckpt = full_checkpoint(args.workdir)
    codec = full_codec(args.workdir)
    rows: list[tuple[str, str]] = []
    for name in args.plans.split(","):
        model, prompt, long_prompt = plan_and_prompts(ckpt, name)
        for label, p in (("200-frame reference", prompt), ("30 s reference", long_prompt)):
            streamed(model, codec, p, args.frames, True)  # warm: kernels chosen, graph captured, cache sized
            plain = [plain_stamps(model, p, args.frames) for _ in range(args.repeats)]
            without_ms = statistics.median(ms_per_frame(s) for s in plain)
            for background in (False, True):
                runs = [streamed(model, codec, p, args.frames, background) for _ in range(args.repeats)]
                last = runs[-1]
                whole = DecodeStream(codec).push(last["codes"]).cpu()
                gap = (torch.cat(last["pieces"]) - whole).abs().max().item()
                first_ms = statistics.median(r["first"] for r in runs) * 1e3
                slack_ms = min(r["slack"] for r in runs) * 1e3
                with_ms = statistics.median(ms_per_frame(r["stamps"]) for r in runs)
                piece = ("beside the loop (BackgroundDecoder)" if background else
                         f"between host checks, {statistics.median(s for r in runs for s in r['decode']) * 1e3:.1f} "
                         "ms per 16-frame piece")
                rows.append((f"{name}, {label} ({p.shape[1]} tokens), decoded {piece}",
                             f"first audio {first_ms:.1f} ms after the call; least playback slack {slack_ms:.0f} ms; "
                             f"{with_ms:.2f} ms/frame streaming vs "
                             f"{without_ms:.2f} without; pieces vs whole max |diff| {gap:.1e}"))
                print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    date, notes = run_notes()
    notes += [f"- full-size synthetic checkpoint and codec (random weights, official layout), codec in bf16 on the "
              f"GPU; {args.frames} frames per generation with <|im_end|> suppressed; medians of {args.repeats} warm "
              "generations (the previous request's CUDA graph replayed); sampling 0.8 / 0.8 / 30",
              "- first audio: from the call to generate to the first frame's audio on the host (prefill, first "
              "frame, its decode); codec: one 16-frame piece (0.74 s of audio) decoded and copied to the host; "
              "ms/frame from frame 17 on",
              "- playback slack: for a player that starts at the first piece, the least margin by which a piece "
              "arrived before the audio ahead of it had played, over every piece of every run (negative: a gap)"]
    write_measured(args.out, "stream-latency", gpu, date, f"Streaming audio while generating ({gpu})", notes, rows)


if __name__ == "__main__":
    main()
