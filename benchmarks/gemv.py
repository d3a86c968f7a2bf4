"""Batch-1 GEMV speed on the S2 shapes: bf16 cuBLAS, bitsandbytes NF4, torch._scaled_mm FP8 and our Triton kernels.

Protocol (as in spec/quantization.md section 6): per shape, 36 distinct weights (one per layer of the 36-layer slow
AR, so nothing stays in L2), one CUDA graph of 36 calls per variant, CUDA events around each replay; the median
replay is reported as ms per 36 calls with the effective GB/s of the bytes the variant reads per call. Every
variant is also checked on the GPU: its 36 eager outputs against the dequantized reference
(x.float() @ W.float().T: relative Frobenius error and cosine), and its graph: after capture the input changes,
the outputs are poisoned with NaN, and one replay must reproduce the eager outputs for the new input.

Run from the repository root on a CUDA machine (about 2-4 minutes on an H100, most of it Triton compiling and
our kernels' first-call choice per shape):
    python benchmarks/gemv.py
    python benchmarks/gemv.py --shapes 2560x9728 --variants ours-nf4,bnb-nf4 --no-write
The table goes to benchmarks/results/gemv-<gpu>-<date>.md. bitsandbytes is optional: without it its column and
ours-nf4 (quantized by bitsandbytes) read "n/a".
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import platform
import re
import shlex
import subprocess
import sys
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/gemv.py`

from quant.base import error_stats, reference_output  # noqa: E402
from quant.kernels import replay_ms  # noqa: E402
from runtime.files import atomic_path  # noqa: E402

# (out, in, what the shape is in S2 Pro)
SHAPES: list[tuple[int, int, str]] = [
    (6144, 2560, "wqkv"),
    (2560, 4096, "wo"),
    (9728, 2560, "w1, w3"),
    (2560, 9728, "w2"),
    (4096, 2560, "fast_output"),
    (4097, 2560, "slow head, 4 097 legal rows"),
]
TARGETS = [("ours-nf4", "bnb-nf4", 2.0), ("ours-fp8", "bf16", 1.5), ("ours-int8", "bf16", 1.5),
           ("ours-bf16", "bf16", 1.0)]
GRAPH_CLOSE = 1e-3  # replay vs eager: anything above this is a failed replay


@dataclass
class Cell:
    """One variant on one shape: timing, accuracy and graph check, or why there is none."""

    ms: float | None = None  # median per replay of the 36-call graph
    gbps: float | None = None
    rel: float | None = None
    cos: float | None = None
    graph: str | None = None  # "exact", "close (rel ...)" or "FAIL ..."
    note: str | None = None  # "n/a: ..." or "error: ..."


# --------------------------------------------------------------------------------------------------------------
# Variants: each holds the quantized form of the 36 weights, a static input and one call per layer.


class Variant(ABC):
    key: str
    title: str

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.n, self.k, self.device = n, k, device
        self.x = torch.zeros(1, k, dtype=torch.bfloat16, device=device)  # static input, [1, K]

    def unavailable(self) -> str | None:
        """Why this variant cannot run here (n/a), or None."""
        return None

    @abstractmethod
    def prepare(self, weights: list[torch.Tensor]) -> int:
        """Build the per-layer state from bf16 weights [N, K]; return the bytes one call reads."""

    def set_input(self, x: torch.Tensor) -> None:
        self.x.copy_(x)

    @abstractmethod
    def run(self, i: int) -> torch.Tensor:
        """Layer i on the static input -> [1, N] (captured in the graph)."""

    @abstractmethod
    def reference(self, i: int) -> torch.Tensor:
        """x_eff.float() @ W_i.float().T for the input as this variant sees it, [1, N] fp32."""


class Bf16(Variant):
    key, title = "bf16", "bf16 cuBLAS"

    def prepare(self, weights):
        self.w = weights
        return self.n * self.k * 2

    def run(self, i):
        return F.linear(self.x, self.w[i])

    def reference(self, i):
        return self.x.float() @ self.w[i].float().T


class OursBf16(Variant):
    """The bf16 layers' one-token forward (quant/base.py FloatLinear): our GEMV, or cuBLAS where the first call
    timed it quicker (the chosen configurations below say which)."""

    key, title = "ours-bf16", "our bf16 GEMV (or cuBLAS where quicker)"

    def unavailable(self):
        from quant.kernels import triton_available

        return None if triton_available() else "n/a: triton not installed"

    def prepare(self, weights):
        from quant.base import FloatLinear

        self.layers = []
        for w in weights:
            layer = FloatLinear(self.k, self.n, bias=False, device="meta")
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            self.layers.append(layer)
        if not self.layers[0].gemv_applies(self.x):
            raise RuntimeError("the layer does not take the kernel path for this input")
        return self.n * self.k * 2

    def run(self, i):
        return self.layers[i](self.x)

    def reference(self, i):
        return self.x.float() @ self.layers[i].weight.float().T


class BnbNF4(Variant):
    key, title = "bnb-nf4", "bnb NF4"

    def unavailable(self):
        return _bnb_missing()

    def prepare(self, weights):
        import bitsandbytes.functional as bnbf

        self.q = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
        packed, state = self.q[0]
        return packed.nbytes + sum(t.nbytes for t in state.as_dict(packed=True).values())

    def run(self, i):
        import bitsandbytes as bnb

        packed, state = self.q[i]
        return bnb.matmul_4bit(self.x, packed.t(), quant_state=state)

    def reference(self, i):
        import bitsandbytes.functional as bnbf

        packed, state = self.q[i]
        state32 = copy.copy(state)
        state32.dtype = torch.float32  # dequantize in fp32, not rounded to bf16
        return self.x.float() @ bnbf.dequantize_4bit(packed, state32).T


class ScaledMmFP8(Variant):
    """torch._scaled_mm with per-row weight scales; x quantized to e4m3 (per tensor) and padded to 16 rows."""

    key, title = "scaled-mm-fp8", "fp8 `torch._scaled_mm` (M padded to 16)"

    def unavailable(self):
        if torch.cuda.get_device_capability(self.device) < (8, 9):
            return "n/a: needs sm_89+"
        return None

    def prepare(self, weights):
        from quant.fp8 import FP8Linear

        layers = [FP8Linear.from_float(w) for w in weights]
        self.w_t = [layer.weight.t() for layer in layers]  # [K, N] column-major, as _scaled_mm wants
        self.scale_b = [layer.scale.reshape(1, self.n).contiguous() for layer in layers]
        self.layers = layers
        self.xq = torch.zeros(16, self.k, dtype=torch.float8_e4m3fn, device=self.device)
        self.scale_a = torch.ones(16, 1, dtype=torch.float32, device=self.device)
        return self.n * self.k + self.n * 4

    def set_input(self, x):
        super().set_input(x)
        scale = x.float().abs().amax().clamp_min(1e-12) / 448.0
        self.xq.zero_()
        self.xq[:1] = (x.float() / scale).to(torch.float8_e4m3fn)
        self.scale_a.fill_(scale)

    def run(self, i):
        return torch._scaled_mm(self.xq, self.w_t[i], scale_a=self.scale_a, scale_b=self.scale_b[i],
                                out_dtype=torch.bfloat16)[:1]

    def reference(self, i):
        return (self.xq[:1].float() * self.scale_a[:1]) @ self.layers[i].dequantize().T


class OursLayer(Variant):
    """Our quantized layer's forward: with one token on CUDA it runs our Triton GEMV."""

    fmt: str

    def unavailable(self):
        from quant.kernels import triton_available

        if not triton_available():
            return "n/a: triton not installed"
        return _bnb_missing() if self.fmt == "nf4" else None

    def prepare(self, weights):
        from quant.base import quantize_linear

        self.layers = [quantize_linear(w, self.fmt) for w in weights]
        if not self.layers[0].gemv_applies(self.x):
            raise RuntimeError("the layer does not take the kernel path for this input")
        return sum(t.nbytes for t in self.layers[0].buffers())

    def run(self, i):
        return self.layers[i](self.x)

    def reference(self, i):
        return reference_output(self.x, self.layers[i])


class OursNF4(OursLayer):
    key, title, fmt = "ours-nf4", "our NF4 GEMV", "nf4"


class OursFP8(OursLayer):
    key, title, fmt = "ours-fp8", "our FP8 GEMV", "fp8"


class OursInt8(OursLayer):
    key, title, fmt = "ours-int8", "our INT8 GEMV", "int8"


class OursFP8Bits(OursLayer):
    """Our FP8 kernel with the integer bit decode that RTX 30xx cards (sm_86) use, timed here for comparison."""

    key, title, fmt = "ours-fp8-bits", "our FP8 GEMV, bit decode (sm_86 path)", "fp8"

    def run(self, i):
        from quant.kernels.gemv8 import gemv8

        layer = self.layers[i]
        return gemv8(self.x.view(-1), layer.weight, layer.scale, fp8_bits=True).view(1, -1)


VARIANTS: list[type[Variant]] = [Bf16, OursBf16, BnbNF4, ScaledMmFP8, OursNF4, OursFP8, OursFP8Bits, OursInt8]


def _bnb_missing() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA build
        return f"n/a: bitsandbytes unavailable ({type(e).__name__})"
    return None


# --------------------------------------------------------------------------------------------------------------
# Measuring one variant on one shape.


def measure(variant: Variant, weights: list[torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor], replays: int,
            warmup: int) -> Cell:
    reason = variant.unavailable()
    if reason:
        return Cell(note=reason)
    layers = len(weights)
    nbytes = variant.prepare(weights)
    x, x2 = inputs

    variant.set_input(x)
    eager = [variant.run(i) for i in range(layers)]  # first calls: our kernels' choices, before capture
    torch.cuda.synchronize()
    refs = [variant.reference(i) for i in range(layers)]
    acc = error_stats(torch.cat(eager), torch.cat(refs))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [variant.run(i) for i in range(layers)]
    variant.set_input(x2)
    expected = torch.cat([variant.run(i) for i in range(layers)])
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    replayed = torch.cat(outs)
    if torch.equal(replayed, expected):
        graph_check = "exact"
    else:
        rel = error_stats(replayed, expected).rel_fro
        graph_check = f"close (rel {rel:.1e})" if rel <= GRAPH_CLOSE else f"FAIL (rel {rel:.1e})"

    ms = replay_ms(graph, replays, warmup)
    return Cell(ms=ms, gbps=nbytes * layers / (ms * 1e-3) / 1e9, rel=acc.rel_fro, cos=acc.cosine, graph=graph_check)


def graph_ms(call: Callable[[int], object], layers: int, replays: int = 50, warmup: int = 10) -> float:
    """call(0), ..., call(layers - 1) captured in one CUDA graph: median ms per replay (call once before, so that
    kernel choices happen outside the capture)."""
    from quant.kernels.tiles import graph_bench

    return graph_bench(lambda: [call(i) for i in range(layers)], replays, warmup)


def run_shape(n: int, k: int, variants: list[type[Variant]], layers: int, replays: int, warmup: int,
              device: torch.device) -> dict[str, Cell]:
    gen = torch.Generator(device=device).manual_seed(n * 100_003 + k)
    weights = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    inputs = (torch.randn(1, k, generator=gen, device=device).bfloat16(),
              torch.randn(1, k, generator=gen, device=device).bfloat16())
    cells: dict[str, Cell] = {}
    for cls in variants:
        variant = cls(n, k, device)
        try:
            cells[cls.key] = measure(variant, weights, inputs, replays, warmup)
        except Exception as e:  # one failing variant must not stop the others
            traceback.print_exc(limit=3)
            cells[cls.key] = Cell(note=f"error: {type(e).__name__}: {_one_line(str(e))}")
        print(f"  {n}x{k} {cls.key:14s} {format_cell(cells[cls.key])} | {format_check(cells[cls.key])}", flush=True)
        del variant
        gc.collect()
        torch.cuda.empty_cache()
    return cells


# --------------------------------------------------------------------------------------------------------------
# The report (pure Python: tested on the CPU).


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_cell(cell: Cell) -> str:
    if cell.note:
        return cell.note
    return f"{cell.ms:.3f} ({cell.gbps:.0f})"


def format_check(cell: Cell) -> str:
    if cell.note:
        return "-"
    return f"rel {cell.rel:.1e}, cos {cell.cos:.6f}, graph {cell.graph}"


def speedup(cells: dict[str, Cell], ours: str, base: str, target: float) -> str:
    a, b = cells.get(ours), cells.get(base)
    if not a or not b or a.ms is None or b.ms is None:
        return "-"
    ratio = b.ms / a.ms
    return f"{ratio:.2f}x ({'met' if ratio >= target else 'missed'})"


def render_report(meta: dict[str, str], results: dict[tuple[int, int], dict[str, Cell]],
                  variants: list[type[Variant]], tiles: list[tuple[str, str, str]]) -> str:
    names = {(n, k): what for n, k, what in SHAPES}
    lines = [f"# Batch-1 GEMV speed, {meta['gpu']}", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "gpu"]
    lines += [
        "",
        "Milliseconds for 36 chained calls, each on its own weight (36 distinct weights per shape, one CUDA graph",
        "replayed; median of the replays), and in parentheses the effective GB/s of the bytes one call reads: bf16",
        "weights; bitsandbytes' stored NF4 (packed, 8-bit scales, second-level scales); our NF4 layout (packed plus",
        "fp16 block scales); 8-bit weights plus fp32 row scales. `torch._scaled_mm` times the matmul only (x already",
        "e4m3, padded to 16 rows).",
        "",
        "| shape (out x in) | " + " | ".join(v.title for v in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for (n, k), cells in results.items():
        row = [format_cell(cells[v.key]) if v.key in cells else "-" for v in variants]
        lines.append(f"| {n}x{k} ({names.get((n, k), '')}) | " + " | ".join(row) + " |")
    keys = {v.key for v in variants}
    targets = [t for t in TARGETS if t[0] in keys and t[1] in keys]
    if targets:
        lines += ["", "## Targets", "",
                  "| shape | " + " | ".join(f"{o} vs {b} (>= {t:g}x)" for o, b, t in targets) + " |",
                  "|---" * (len(targets) + 1) + "|"]
        for (n, k), cells in results.items():
            lines.append(f"| {n}x{k} | " + " | ".join(speedup(cells, o, b, t) for o, b, t in targets) + " |")
    lines += ["", "## Correctness on the GPU", "",
              "Relative Frobenius error and cosine of the 36 outputs against x.float() @ dequant(W).float().T, and the",
              "graph check (replay on a new input vs eager).", "",
              "| shape | " + " | ".join(v.key for v in variants) + " |",
              "|---" * (len(variants) + 1) + "|"]
    for (n, k), cells in results.items():
        row = [format_check(cells[v.key]) if v.key in cells else "-" for v in variants]
        lines.append(f"| {n}x{k} | " + " | ".join(row) + " |")
    if tiles:
        lines += ["", "## Configurations chosen on the first call (8-bit and bf16: tile or cuBLAS; NF4: Triton tile or PTX plan)", "",
                  "| kernel | key (N, K, ...) | choice |", "|---|---|---|"]
        lines += [f"| {kernel} | {key} | {choice} |" for kernel, key, choice in tiles]
    return "\n".join(lines) + "\n"


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_shapes(text: str | None) -> list[tuple[int, int]]:
    known = [(n, k) for n, k, _ in SHAPES]
    if not text:
        return known
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not m:
            raise SystemExit(f"--shapes: '{item}' is not OUTxIN (e.g. 2560x9728)")
        shapes.append((int(m.group(1)), int(m.group(2))))
    return shapes


def parse_variants(text: str | None) -> list[type[Variant]]:
    if not text:
        return VARIANTS
    by_key = {v.key: v for v in VARIANTS}
    unknown = [key for key in text.split(",") if key not in by_key]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(by_key)})")
    return [by_key[key] for key in text.split(",")]


# --------------------------------------------------------------------------------------------------------------


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, str]:
    props = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    versions = {"torch": torch.__version__, "CUDA": str(torch.version.cuda)}
    for module in ("triton", "bitsandbytes"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = "not installed"
    cc = torch.cuda.get_device_capability(device)
    return {
        "gpu": props.name,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "GPU": f"{props.name}, sm_{cc[0]}{cc[1]}, {props.total_memory / 2**30:.0f} GiB, "
               f"{props.multi_processor_count} SMs, driver {driver}",
        "software": ", ".join(f"{k} {v}" for k, v in versions.items()) + f", Python {platform.python_version()}",
        "command": "`python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
                   + "`",
        "protocol": f"{args.layers} weights per shape, {args.warmup} warm-up + {args.replays} timed replays, "
                    f"bf16 activations, weights N(0, 0.02)",
    }


def chosen_tiles() -> list[tuple[str, str, str]]:
    from quant.kernels import triton_available

    if not triton_available():
        return []
    from quant.kernels import gemv8, gemv_nf4

    return [(name, str(key[:-1]), choice) for name, chosen in (("gemv8", gemv8.chosen_tiles()),
                                                                ("gemv_nf4", gemv_nf4.chosen_paths()))
            for key, choice in chosen.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma-separated OUTxIN list (default: the six S2 shapes)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(v.key for v in VARIANTS)}")
    parser.add_argument("--layers", type=int, default=36, help="distinct weights per shape (default 36)")
    parser.add_argument("--replays", type=int, default=50, help="timed graph replays (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed graph replays first (default 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the table")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    args = parser.parse_args()
    shapes, variants = parse_shapes(args.shapes), parse_variants(args.variants)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemv.py needs a CUDA GPU")
    device = torch.device("cuda")
    meta = environment(device, args)
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)

    results: dict[tuple[int, int], dict[str, Cell]] = {}
    with torch.inference_mode():
        for n, k in shapes:
            results[(n, k)] = run_shape(n, k, variants, args.layers, args.replays, args.warmup, device)
    report = render_report(meta, results, variants, chosen_tiles())
    print("\n" + report)
    if not args.no_write:
        path = args.out / f"gemv-{gpu_slug(meta['gpu'])}-{dt.date.today().isoformat()}.md"
        with atomic_path(path) as tmp:
            tmp.write_text(report)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
