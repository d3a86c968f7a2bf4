"""Full-size load on a GPU: write a synthetic S2 Pro checkpoint (two shards, 9.1 GB), inspect it, load it in bf16
and measure load time, peak host memory and peak GPU memory; then time decoding (a CUDA-graph replay per frame, the
default; the 2026-11-25 table predates it and timed eager steps).

Run on the GPU machine:  python benchmarks/load_bf16.py --workdir /tmp/s2 --out benchmarks/results
Writes benchmarks/results/load-bf16-<gpu>-<date>.md and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import write_measured  # noqa: E402

MEASURE = r"""
import json, resource, sys, time, psutil, torch
sys.path.insert(0, sys.argv[2])
from runtime.loader import load_model
dev = torch.device(sys.argv[3])
cuda = dev.type == "cuda"
if cuda:
    torch.zeros(1, device=dev)
proc = psutil.Process()
base_rss = proc.memory_info().rss
t0 = time.perf_counter()
loaded = load_model(sys.argv[1], dev, torch.bfloat16)
if cuda:
    torch.cuda.synchronize()
elapsed = time.perf_counter() - t0
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = loaded.model
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({
    "load_s": elapsed, "base_rss": base_rss, "peak_rss": peak_rss, "end_rss": proc.memory_info().rss,
    "gpu_peak_alloc": torch.cuda.max_memory_allocated() if cuda else 0,
    "gpu_reserved": torch.cuda.max_memory_reserved() if cuda else 0, "resident_weight_bytes": weights,
}))
"""

DECODE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[2] + '/benchmarks')
from random_weights import never_stop
from runtime.loader import load_model
from runtime.engine import GenerationConfig, generate
from runtime.prompt import Reference, build_prompt
from runtime.sampling import SamplingParams
dev = torch.device(sys.argv[4])
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
loaded = load_model(sys.argv[1], dev, torch.bfloat16)
model, tok = loaded.model, loaded.tokenizer
ref = Reference(torch.randint(0, model.config.codebook_size, (10, 200), generator=torch.Generator().manual_seed(0)), "a reference transcript " * 8)
prompt = build_prompt(tok, "Hello, this is a test of the decoding speed. " * 4, [ref], 10)
never_stop(model)
cfg = GenerationConfig(max_new_tokens=16, sampling=SamplingParams(0.8, 0.8, 30), seed=0)
generate(model, prompt, cfg)  # warm-up
sync()
n = int(sys.argv[3])
t0 = time.perf_counter()
out = generate(model, prompt, GenerationConfig(max_new_tokens=n, sampling=cfg.sampling, seed=1))
sync()
dt = time.perf_counter() - t0
print(json.dumps({"prompt_tokens": prompt.shape[1], "frames": out.codes.shape[1], "seconds": dt,
                  "peak_alloc": torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0}))
"""


def run_json(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/s2edge-full"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--config", default="s2-pro", help="model config (tiny for a quick check on the CPU)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch

    from runtime.config import bundled_config
    from runtime.synthetic import write_checkpoint

    gb = 1e9
    rows: list[tuple[str, str]] = []
    ckpt = args.workdir / args.config
    t0 = time.perf_counter()
    write_checkpoint(ckpt, bundled_config(args.config), seed=0, shards=2, device=args.device)
    rows.append(("write synthetic checkpoint", f"{time.perf_counter() - t0:.1f} s"))
    sizes = {p.name: p.stat().st_size for p in sorted(ckpt.glob("*.safetensors"))}
    rows.append(("shards", ", ".join(f"{k} {v / gb:.2f} GB" for k, v in sizes.items())))
    rows.append(("total on disk", f"{sum(sizes.values()):,} bytes"))
    inspect = subprocess.run([sys.executable, "-m", "runtime.cli", "inspect", str(ckpt)], capture_output=True,
                             text=True, cwd=ROOT)
    params_line = next((ln for ln in inspect.stdout.splitlines() if ln.startswith("parameters")), inspect.stderr)
    rows.append(("s2edge inspect", params_line.strip()))

    warm = run_json(MEASURE, str(ckpt), str(ROOT), args.device)
    cold_ok = drop_page_cache()
    cold = run_json(MEASURE, str(ckpt), str(ROOT), args.device) if cold_ok else None
    for label, m in (("page cache warm", warm), ("page cache dropped", cold)):
        if m is None:
            rows.append((f"load bf16 ({label})", "could not drop the page cache here"))
            continue
        above = m["peak_rss"] - m["base_rss"]
        rows.append((f"load bf16 ({label})", f"{m['load_s']:.1f} s = {sum(sizes.values()) / m['load_s'] / gb:.2f} GB/s"))
        rows.append((f"peak host RSS above pre-load RSS ({label})", f"{above / gb:.2f} GB (pre-load {m['base_rss'] / gb:.2f} GB, peak {m['peak_rss'] / gb:.2f} GB)"))
        rows.append((f"GPU peak allocated ({label})", f"{m['gpu_peak_alloc'] / gb:.2f} GB; resident weights {m['resident_weight_bytes'] / gb:.3f} GB"))
    dec = run_json(DECODE, str(ckpt), str(ROOT), str(args.frames), args.device)
    ms = dec["seconds"] / dec["frames"] * 1e3
    rows.append(("decode bf16 (CUDA graph)", f"{ms:.1f} ms/frame = {1e3 / ms:.1f} frames/s ({dec['frames']} frames, "
                                      f"prompt {dec['prompt_tokens']} tokens)"))
    rows.append(("GPU peak during decode", f"{dec['peak_alloc'] / gb:.2f} GB"))

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    date = datetime.date.today().isoformat()
    notes = [f"- date: {date}; torch {torch.__version__}; CUDA {torch.version.cuda}; host RAM "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gb:.0f} GB",
             f"- command: `python benchmarks/load_bf16.py --frames {args.frames} --config {args.config}`",
             "- checkpoint: synthetic, official layout, random bf16 weights (written by runtime/synthetic.py)"]
    write_measured(args.out, "load-bf16", gpu, date, f"Full-size load, bf16 ({gpu})", notes, rows)


if __name__ == "__main__":
    main()
