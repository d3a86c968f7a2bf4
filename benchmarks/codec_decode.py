"""Codec decoding on a GPU: a full-size synthetic codec.pth (official layout, random weights) loaded
decode-only in bf16; correctness of chunked and streamed decoding against the whole-sequence decode; peak GPU
memory and speed of decoding 60 s of codes chunked, streamed and in one pass; a real-speech round trip.

Run on the GPU machine:  python benchmarks/codec_decode.py
Quick check on the CPU:  python benchmarks/codec_decode.py --device cpu --config tiny --seconds 5
Writes benchmarks/results/codec-decode-<gpu>-<date>.md and prints the table. Exits 1 if the chunked or
streamed decode differs from the whole decode by more than 1e-4 in fp32.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from report import write_measured  # noqa: E402
from runtime.audio import load_reference  # noqa: E402
from runtime.codec import Codec, CodecConfig, decode_to_file, load_codec  # noqa: E402
from runtime.synthetic_codec import random_codes, write_synthetic_codec  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "librivox_sense_and_sensibility_0870.wav"
FP32_TOLERANCE = 1e-4
GB = 1e9


class Meter:
    """Wall time and peak GPU memory of one step (the CPU reports no memory)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, step: Callable[[], object]) -> tuple[object, float, int, int]:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        start = time.perf_counter()
        result = step()
        self.sync()
        elapsed = time.perf_counter() - start
        if not self.cuda:
            return result, elapsed, 0, 0
        return result, elapsed, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def memory(alloc: int, reserved: int) -> str:
    return f"{alloc / GB:.3f} GB allocated, {reserved / GB:.3f} GB reserved" if reserved else "n/a on the CPU"


def check_chunking(codec: Codec, frames: int) -> tuple[float, float]:
    """Max |chunked - whole| and |streamed - whole| on a short random input."""
    codes = random_codes(frames, codec.config, seed=1)
    whole = codec.decode(codes, chunk_frames=None)
    chunked = codec.decode(codes, chunk_frames=7)
    streamed = torch.cat(list(codec.decode_stream((codes[:, i] for i in range(frames)), min_frames=3)))
    return float((chunked - whole).abs().max()), float((streamed - whole).abs().max())


def stream_all(codec: Codec, codes: torch.Tensor, min_frames: int, meter: Meter) -> tuple[float, int]:
    """Feed frames one at a time like the engine does; return (seconds to the first audio, samples)."""
    start, first, samples = time.perf_counter(), None, 0
    for chunk in codec.decode_stream((codes[:, i] for i in range(codes.shape[1])), min_frames=min_frames):
        samples += chunk.numel()
        if first is None:
            meter.sync()
            first = time.perf_counter() - start
    return first or 0.0, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="s2pro", help="codec config: s2pro, or tiny for a quick CPU check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the random codes to decode")
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--stream-frames", type=int, default=8, help="frames per streamed piece")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write codec.pth (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = CodecConfig.load(args.config)
    meter = Meter(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the correctness check
    torch.backends.cudnn.allow_tf32 = False
    rows: list[tuple[str, str]] = []
    failed = False

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        path = Path(work) / "codec.pth"
        stale = (16384, 4096) if args.config == "s2pro" else None
        start = time.perf_counter()
        write_synthetic_codec(path, config, seed=0, stale_blocks=stale)
        size = path.stat().st_size
        rows.append(("write synthetic codec.pth", f"{time.perf_counter() - start:.1f} s, {size:,} bytes"))

        fp32 = load_codec(path, config, device, torch.float32)
        chunk_err, stream_err = check_chunking(fp32, frames=40)
        ok = chunk_err <= FP32_TOLERANCE and stream_err <= FP32_TOLERANCE
        failed |= not ok
        rows.append(("fp32 chunked (7 frames) / streamed (3 frames) vs whole, 40 frames, max abs diff",
                     f"{chunk_err:.2e} / {stream_err:.2e} ({'ok' if ok else 'FAIL'}, tolerance {FP32_TOLERANCE:g})"))
        del fp32

        codec, load_s, alloc, reserved = meter.run(lambda: load_codec(path, config, device, torch.bfloat16))
        weights = sum(p.numel() * p.element_size() for p in codec.parameters())
        rows.append(("load decode-only bf16", f"{load_s:.2f} s; {sum(p.numel() for p in codec.parameters()):,} "
                                               f"parameters = {weights / GB:.3f} GB; {memory(alloc, reserved)}"))
        chunk_err, stream_err = check_chunking(codec, frames=40)
        rows.append(("bf16 chunked / streamed vs whole, max abs diff", f"{chunk_err:.2e} / {stream_err:.2e}"))

        frames = round(args.seconds * config.sample_rate / config.frame_length)
        codes = random_codes(frames, config, seed=2)
        audio_s = frames * config.frame_length / config.sample_rate
        codec.decode(codes[:, :16], chunk_frames=8)  # warm-up: kernels, allocator
        for chunk in args.chunk_frames:
            _, dt, alloc, reserved = meter.run(lambda: codec.decode(codes, chunk_frames=chunk))
            rows.append((f"decode {audio_s:.1f} s, chunks of {chunk} frames",
                         f"{dt:.2f} s = {dt / audio_s * 1e3:.1f} ms per audio second; peak {memory(alloc, reserved)}"))
        (first, samples), dt, alloc, reserved = meter.run(lambda: stream_all(codec, codes, args.stream_frames, meter))
        assert samples == frames * config.frame_length
        rows.append((f"stream {audio_s:.1f} s, frames pushed one by one, decoded every {args.stream_frames}",
                     f"{dt:.2f} s = {dt / audio_s * 1e3:.1f} ms per audio second; first audio after "
                     f"{first * 1e3:.0f} ms; peak {memory(alloc, reserved)}"))
        try:
            _, dt, alloc, reserved = meter.run(lambda: codec.decode(codes, chunk_frames=None))
            rows.append((f"decode {audio_s:.1f} s in one pass (no chunks)",
                         f"{dt:.2f} s; peak {memory(alloc, reserved)}"))
        except torch.OutOfMemoryError:
            rows.append((f"decode {audio_s:.1f} s in one pass (no chunks)", "out of memory"))

        reference = load_reference(FIXTURE)
        codec.load_encoder()
        ref_codes, dt, alloc, reserved = meter.run(lambda: codec.encode(reference.samples))
        rows.append((f"encode {reference.samples.size / config.sample_rate:.1f} s of LibriVox speech (bf16)",
                     f"{dt:.2f} s; codes {list(ref_codes.shape)}; peak {memory(alloc, reserved)}"))
        codec.release_encoder()
        out_wav = Path(work) / "round_trip.wav"
        _, dt, _, _ = meter.run(lambda: decode_to_file(ref_codes, codec, out_wav))
        rows.append(("decode it back and write a wav", f"{dt:.2f} s; {out_wav.stat().st_size:,} bytes"))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    driver = "n/a"
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    date = datetime.date.today().isoformat()
    command = shlex.join(["python", "benchmarks/codec_decode.py", *(sys.argv[1:] if argv is None else argv)])
    notes = [f"- date: {date}; torch {torch.__version__}; CUDA {torch.version.cuda}; driver {driver}",
             f"- command: `{command}`",
             "- codec: synthetic codec.pth in the official layout (runtime/synthetic_codec.py), random weights; "
             "decode-only load (quantizer codebooks, post_module, upsample, decoder)"]
    write_measured(args.out, "codec-decode", f"{gpu}-{args.config}", date, f"Codec decode ({gpu}, {args.config})",
                   notes, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
