"""`s2edge eval`: how far each precision mode's next-token distributions lie from bf16's, on this checkpoint.

The teacher-forced part of the quality protocol's tier 3 (spec/quality-protocol.md): bf16 generates a few takes,
then every mode replays the same prompts and frames one token at a time, as generation runs them
(runtime/replay.py), and its distributions are compared with bf16's per codebook: mean KL and how often both put
the same code on top. The suggested gates are for the released weights: random ones (a synthetic checkpoint) say
nothing about quality and usually fail them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from runtime.checkpoint import open_checkpoint
from runtime.engine import GenerationConfig, generate
from runtime.errors import InputError, S2EdgeError
from runtime.files import atomic_path
from runtime.loader import DEFAULT_CACHE_DIR, LoadedModel, WeightFormats, load_model, resolve_device, store_path
from runtime.prompt import build_prompt
from runtime.replay import Replay, per_codebook, replay
from runtime.sampling import SamplingParams
from runtime.voice_cli import voices_dir_option
from runtime.voices import VoiceLibrary

DEFAULT_TEXT = ("The old lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, polished "
                "the lens and watched the ships pass safely through the narrow channel below.")


@dataclass(frozen=True)
class Mode:
    formats: WeightFormats
    max_kl: float  # suggested gate on codebook 0's mean KL from bf16 (nats)
    min_same_top: float  # ... and on the share of positions with the same top code


MODES = {
    "fp8": Mode(WeightFormats("fp8", "fp8"), 0.005, 0.96),
    "int8": Mode(WeightFormats("int8", "int8"), 0.005, 0.96),
    "nf4": Mode(WeightFormats("nf4", "bf16"), 0.04, 0.90),
    "nf4-all": Mode(WeightFormats("nf4", "nf4"), 0.04, 0.90),
}


def default_modes(device: torch.device) -> list[str]:
    """The quantized plans this device would run: the 8-bit format of its generation and both NF4 plans."""
    if device.type != "cuda":
        return ["fp8", "int8"]
    return ["fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "int8", "nf4", "nf4-all"]


def parse_modes(text: str | None, device: torch.device) -> list[str]:
    modes = default_modes(device) if text is None else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"unknown mode(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MODES)}")
    if device.type != "cuda" and any(MODES[m].formats.slow == "nf4" for m in modes):
        raise InputError("nf4 needs a CUDA GPU (bitsandbytes); on the CPU evaluate fp8 or int8")
    return modes


def load(checkpoint: Path, device: torch.device, formats: WeightFormats, cache_dir: Path, label: str) -> LoadedModel:
    total = open_checkpoint(checkpoint).total_bytes()
    with click.progressbar(length=total, label=f"loading {label}", file=sys.stderr) as bar:
        return load_model(checkpoint, device, torch.bfloat16, on_tensor=lambda _k, n: bar.update(n), formats=formats,
                          store=store_path(cache_dir, checkpoint, formats))


def release(device: torch.device) -> None:
    """Hand the memory of the model just dropped back to the driver before the next one loads."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def replay_all(model, takes: list[tuple[torch.Tensor, torch.Tensor]], label: str) -> list[Replay]:
    with click.progressbar(takes, label=f"replaying {label}", file=sys.stderr) as bar:
        return [replay(model, prompt, codes) for prompt, codes in bar]


@click.command("eval")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=Path("checkpoints/s2-pro"),
              show_default=True, help="Folder with config.json, tokenizer.json and the safetensors shards.")
@click.option("--modes", help="Comma-separated: fp8, int8, nf4 (fast AR in bf16), nf4-all. [default: the plans this "
                              "device would run: its 8-bit format, nf4, nf4-all; fp8, int8 on the CPU]")
@click.option("--text", "-t", default=DEFAULT_TEXT, help="What the takes say. [default: two sentences of English]")
@click.option("--voice", "voices", multiple=True, help="Speak in this library voice (repeat for several speakers).")
@voices_dir_option
@click.option("--takes", type=click.IntRange(min=1), default=2, show_default=True,
              help="bf16 takes (seeds 0, 1, ...) every mode replays.")
@click.option("--frames", type=click.IntRange(min=1), default=128, show_default=True,
              help="Frames per take at most (21.5 per second of audio).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--reference-device", help="Run the bf16 reference here instead, e.g. cpu where bf16 does not fit the "
                                          "GPU (about 9 GB of host RAM; minutes). [default: --device]")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=DEFAULT_CACHE_DIR,
              show_default=True, help="Pre-quantized weights, shared with `synthesize`.")
@click.option("--report", type=click.Path(path_type=Path), help="Also write the table here (markdown).")
def evaluate(checkpoint: Path, modes: str | None, text: str, voices: tuple[str, ...], voices_dir: Path, takes: int,
             frames: int, device: str, reference_device: str | None, cache_dir: Path, report: Path | None) -> None:
    """Compare each precision mode's next-token distributions with bf16's on this checkpoint (teacher-forced).

    bf16 generates the takes; each mode then replays them and is compared per codebook (mean KL from bf16, same top
    code). Exits with status 1 if a mode misses its suggested gate on codebook 0 (FP8 and INT8: KL <= 0.005, same
    top >= 96 %; NF4: KL <= 0.04, same top >= 90 %). bf16 must fit the device, or --reference-device cpu.

    Example: s2edge eval --checkpoint checkpoints/s2-pro --voice alice --modes fp8,nf4
    """
    if not text.strip():
        raise InputError("the text to speak is empty")
    target = resolve_device(device)
    chosen = parse_modes(modes, target)
    home = target if reference_device is None else resolve_device(reference_device)
    loaded = load(checkpoint, home, WeightFormats(), cache_dir, "bf16")
    model, config = loaded.model, loaded.model.config
    references = [VoiceLibrary(voices_dir).load(name, config.num_codebooks, config.codebook_size).reference()
                  for name in voices]
    prompt = build_prompt(loaded.tokenizer, text, references, config.num_codebooks)
    recorded = []
    with click.progressbar(range(takes), label="generating bf16 takes", file=sys.stderr) as bar:
        for seed in bar:
            generation = generate(model, prompt, GenerationConfig(max_new_tokens=frames, sampling=SamplingParams(),
                                                                  seed=seed))
            if generation.codes.shape[1] == 0:
                raise S2EdgeError(f"take {seed} stopped before its first frame: nothing to compare")
            recorded.append((prompt, generation.codes))
    reference = replay_all(model, recorded, "bf16")
    del model, loaded
    release(home)
    rows, failed = [], []
    for name in chosen:
        mode = MODES[name]
        model = load(checkpoint, target, mode.formats, cache_dir, name).model
        agreements = per_codebook(reference, replay_all(model, recorded, name))
        del model
        release(target)
        first, rest = agreements[0], agreements[1:]
        passed = first.mean_kl <= mode.max_kl and first.same_top >= mode.min_same_top
        failed += [] if passed else [name]
        rows.append(f"| {name} | {first.mean_kl:.2e} | {first.same_top:.1%} | "
                    f"{sum(a.mean_kl for a in rest) / len(rest):.2e} (worst {max(a.mean_kl for a in rest):.2e}) | "
                    f"{sum(a.same_top for a in rest) / len(rest):.1%} | {'pass' if passed else 'FAIL'} |")
    frames_total = sum(codes.shape[1] for _, codes in recorded)
    table = [f"Teacher-forced against bf16 ({home}) on {checkpoint} ({target}): {takes} take(s), "
             f"{frames_total} frames.", "",
             "| mode | KL codebook 0 | same top 0 | KL codebooks 1-9: mean (worst) | same top 1-9 | gate |",
             "|---|---|---|---|---|---|", *rows]
    click.echo("\n".join(table))
    if report is not None:
        with atomic_path(report) as tmp:
            tmp.write_text("\n".join(table) + "\n")
    if failed:
        raise S2EdgeError(f"{', '.join(failed)} missed the suggested gate on codebook 0")
