"""What the first run on a machine costs: `s2edge synthesize` with Triton's kernel cache empty, then again with it
full, per precision, each a fresh process; with --baseline, the same runs of another checkout of s2edge (its root
folder) alternate with this one's, on the same machine and checkpoint.

Each (checkout, precision) gets an empty Triton cache (TRITON_CACHE_DIR) and an empty --cache-dir for its first run,
which then compiles every kernel, times the GEMV candidates and quantizes; its later runs reuse both. The phases
are those of cli_wall.py: start -> the reference's codes, the plan -> "generating" (loading; now with the GEMV
compiles beside it), "generating" -> the .mp3 (the frames, the first frame's compiles and timings, the codec).

Run on the GPU machine:  python benchmarks/first_run.py --workdir /tmp/s2 --baseline /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_wall import ENV, RECORDING, TEXT, TRANSCRIPT, phase_table, phases, timed_lines  # noqa: E402
from report import run_notes, write_page  # noqa: E402


def synthesize(checkout: Path, checkpoint: Path, precision: str, state: Path, frames: int) -> dict:
    """One fresh `synthesize` process of `checkout`, its Triton cache and --cache-dir under `state`."""
    env = ENV | {"TRITON_CACHE_DIR": str(state / "triton"),
                 "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [ENV.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "runtime.cli", "synthesize", "-c", str(checkpoint), "-r", str(RECORDING),
               "--reference-text", TRANSCRIPT, "-t", TEXT, "--seed", "0", "--max-new-tokens", str(frames),
               "--precision", precision, "--cache-dir", str(state / "cache"), "-o", str(state / "out.mp3")]
    wall, lines, code = timed_lines(command, env=env, cwd=checkout)
    for t, line in lines:
        print(f"  {t:7.2f}  {line}", flush=True)
    return phases(wall, lines) | {"code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--baseline", type=Path, help="Another checkout's root folder, run alternately.")
    parser.add_argument("--precisions", default="nf4,bf16")
    parser.add_argument("--again", type=int, default=2, help="Runs after the first, per checkout and precision.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Whole rounds, each starting again from empty caches (first runs vary by seconds).")
    parser.add_argument("--frames", type=int, default=64)
    args = parser.parse_args()
    checkpoint = args.workdir / "s2-pro"
    ENV["PYTHONPYCACHEPREFIX"] = str(args.workdir / "pycache")
    if not (checkpoint / "codec.pth").exists():
        subprocess.run([sys.executable, "-m", "runtime.cli", "synthetic", str(checkpoint), "--config", "s2-pro",
                        "--device", "cuda"], check=True, env=ENV, cwd=ROOT)
    subprocess.run(["sync"], check=True)  # the checkpoint's writeback would slow the first run's reads otherwise
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    for round_ in range(1, args.rounds + 1):
        for precision in args.precisions.split(","):
            for run in range(1 + args.again):
                for name, checkout in checkouts.items():
                    print(f"== round {round_}: {name} {precision} {'first' if run == 0 else 'again'}", flush=True)
                    state = args.workdir / f"state-{name}-{precision}"
                    if run == 0:  # a first run: Triton's cache and the cache folder empty, whatever ran before
                        shutil.rmtree(state, ignore_errors=True)
                    row = synthesize(checkout, checkpoint, precision, state, args.frames)
                    rows.append(row | {"round": round_, "checkout": name, "precision": precision,
                                       "run": "first" if run == 0 else "again"})
    props = torch.cuda.get_device_properties(0)
    table = phase_table(rows, ["round", "checkout", "precision", "run"])
    date, notes = run_notes()
    write_page(args.out, "first-run", props.name, date, [
        f"# The first run on a machine: `s2edge synthesize` with an empty Triton cache ({props.name})", "", *notes,
        f"- Python {sys.version.split()[0]}; each row a fresh process, checkouts alternating: `s2edge synthesize -r "
        f"{RECORDING.name} --reference-text ... -t \"{TEXT}\" --max-new-tokens {args.frames} --precision P -o "
        "out.mp3` on the full-size synthetic checkpoint; \"first\": Triton's cache and --cache-dir empty (compiling, "
        "timing the GEMV candidates, quantizing, encoding the recording); \"again\": both kept", "", *table])


if __name__ == "__main__":
    main()
