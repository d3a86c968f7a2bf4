"""What a user waits for: `s2edge synthesize` end to end, as a fresh process, from a recording to an .mp3.

Per precision, three runs of the same command on the full-size synthetic checkpoint: the first on this machine
(no quantized store under --cache-dir: quantize while loading, then save the store), then two more (the store
loaded as it is). Triton's kernel cache is whatever the machine has: an empty one adds the compile time to each
plan's first run (the report gives the count it held). Every line the command prints is time-stamped, which
splits the wall time into: start -> the reference's codes (imports, checkpoint headers, reading the recording and
encoding it, or, on every run after the benchmark's first, reading its codes from the cache), plan -> generating
(loading), generating -> audio written (the frame loop, loading the decode-only codec, decoding, writing the .mp3),
and the rest (saving the codes, exit). The synthetic weights speak noise and
rarely stop on their own: each run generates --max-new-tokens frames.

Run on the GPU machine:  python benchmarks/cli_wall.py --workdir /tmp/s2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import run_notes, write_page  # noqa: E402

from runtime.encoded_cache import FOLDER  # noqa: E402

RECORDING = ROOT / "tests" / "fixtures" / "librivox_sense_and_sensibility_0870.wav"
TRANSCRIPT = ("and mister john dashwood had then leisure to consider how much there might be prudently in his power "
              "to do for them")
TEXT = "Hello from s2edge. This sentence is spoken in the voice of the recording."


# Each line when it is printed, not at exit; Python's bytecode cached as after a pip install, even where the
# installed packages are read-only (the GPU machine's are: every import compiled from source took 4-6 s).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONUNBUFFERED": "1"}


def timed_lines(command: list[str], env: dict[str, str] = ENV,
                cwd: Path | None = None) -> tuple[float, list[tuple[float, str]], int]:
    """Run `command`, stamping each line of its merged output with the seconds since the start."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=cwd)
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
    code = proc.wait()
    return time.perf_counter() - start, lines, code


def first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


def phases(wall: float, lines: list[tuple[float, str]]) -> dict[str, float | str | None]:
    encoded, plan = first(lines, r"^encoded |from the cache$"), first(lines, r"^plan ")
    generating, audio = first(lines, r"^generating"), first(lines, r"^wrote .*\.mp3")
    rate = next((m.group(1) for _, line in lines if (m := re.search(r"([\d.]+) frames/s", line))), None)
    frames = next((m.group(1) for _, line in lines if (m := re.search(r"codes \[10, (\d+)\]", line))), None)
    return {"wall": wall, "encoded": encoded, "load": None if plan is None or generating is None else generating - plan,
            "generate_decode": None if generating is None or audio is None else audio - generating,
            "frames": frames, "rate": rate}


def phase_table(rows: list[dict], leading: list[str]) -> list[str]:
    """A markdown table of runs: each row's `leading` columns, then its phases (`phases` and its exit code)."""
    seconds = (lambda v: "-" if v is None else f"{v:.1f}")
    header = [*leading, "wall s", "to the reference's codes", "loading", "frames + codec + .mp3", "frames",
              "frames/s (its own line)", "exit"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join([*(str(r[c]) for c in leading), seconds(r["wall"]), seconds(r["encoded"]), seconds(r["load"]),
                           seconds(r["generate_decode"]), r["frames"] or "-", r["rate"] or "-", str(r["code"])]) + " |"
        for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--precisions", default="nf4,fp8,bf16")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--encode-every-run", action="store_true",
                        help="Empty the cache of encoded recordings before each run, as before it existed.")
    args = parser.parse_args()
    cache_dir = Path(triton.knobs.cache.dir)
    compiled = len(list(cache_dir.iterdir())) if cache_dir.is_dir() else 0  # kernels compiled before this run
    ckpt, cache = args.workdir / "s2-pro", args.workdir / "cache"
    s2edge = [sys.executable, "-m", "runtime.cli"]
    ENV["PYTHONPYCACHEPREFIX"] = str(args.workdir / "pycache")
    subprocess.run([*s2edge, "--help"], env=ENV, check=True, capture_output=True)  # fills the bytecode cache
    if not (ckpt / "codec.pth").exists():
        subprocess.run([*s2edge, "synthetic", ckpt, "--config", "s2-pro", "--device", "cuda"], check=True)
    rows = []
    for precision in args.precisions.split(","):
        for run in range(args.runs):
            command = [*s2edge, "synthesize", "-c", str(ckpt), "-r", str(RECORDING), "--reference-text", TRANSCRIPT,
                       "-t", TEXT, "--seed", "0", "--max-new-tokens", str(args.frames), "--precision", precision,
                       "--cache-dir", str(cache), "--codes-out", str(args.workdir / "out.npy"),
                       "-o", str(args.workdir / "out.mp3")]
            if args.encode_every_run:
                shutil.rmtree(cache / FOLDER, ignore_errors=True)
            wall, lines, code = timed_lines(command)
            for t, line in lines:
                print(f"  {t:7.2f}  {line}", flush=True)
            row = phases(wall, lines) | {"precision": precision, "run": "first (no store)" if run == 0 else "again",
                                         "code": code}
            print(row, flush=True)
            rows.append(row)
    props = torch.cuda.get_device_properties(0)
    table = phase_table(rows, ["precision", "run"])
    date, notes = run_notes()
    write_page(args.out, "cli-wall", props.name, date, [
        f"# `s2edge synthesize` end to end, as a user runs it ({props.name})", "", *notes,
        f"- Python {sys.version.split()[0]}; Triton's kernel cache held {compiled} kernels at the start",
        f"- each row a fresh process: `s2edge synthesize -r {RECORDING.name} --reference-text ... -t \"{TEXT}\" "
        f"--max-new-tokens {args.frames} --precision P -o out.mp3` on the full-size synthetic checkpoint "
        f"(a 7.1 s recording at 16 kHz, encoded on the GPU "
        + ("by every run" if args.encode_every_run else "by the first run, its codes read from the cache by the "
           "others") + "); Python bytecode cached (PYTHONPYCACHEPREFIX)", "", *table])


if __name__ == "__main__":
    main()
