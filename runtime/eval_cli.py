"""`s2edge eval`: how far each precision mode's next-token distributions lie from bf16's, on this checkpoint.

The teacher-forced part of the quality protocol's tier 3 (spec/quality-protocol.md): bf16 generates a few takes,
then every mode replays the same prompts and frames one token at a time, as generation runs them
(runtime/replay.py), and its distributions are compared with bf16's per codebook: mean KL and how often both put
the same code on top. With --audio each mode also speaks the takes' texts with their seeds and the decoded audio is
heard (runtime/eval_audio.py): word errors, speaker similarity and a predicted opinion score, paired with bf16's
takes. The suggested gates
are for the released weights: random ones (a synthetic checkpoint) say nothing about quality and usually fail them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from quant.kernels.choices import KERNEL_CHOICES, remember_in
from runtime import audio_judges
from runtime.cache_cli import cache_dir_option
from runtime.checkpoint import open_checkpoint
from runtime.codec_cli import CODEC_CONFIG_HELP, codec_config, open_codec
from runtime.engine import Generation, GenerationConfig, generate
from runtime.errors import InputError, S2EdgeError
from runtime.eval_audio import AudioGate, Take, audio_table, listen
from runtime.files import atomic_path, check_output
from runtime.loader import LoadedModel, WeightFormats, load_model, resolve_device, store_path
from runtime.model import DualAR
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
    audio: AudioGate  # ... and on what is heard (--audio)


EIGHT_BIT_HEARD, NF4_HEARD = AudioGate(0.5, -0.01, -0.05), AudioGate(1.0, -0.02, -0.10)
MODES = {
    "fp8": Mode(WeightFormats("fp8", "fp8"), 0.005, 0.96, EIGHT_BIT_HEARD),
    "int8": Mode(WeightFormats("int8", "int8"), 0.005, 0.96, EIGHT_BIT_HEARD),
    "nf4": Mode(WeightFormats("nf4", "bf16"), 0.04, 0.90, NF4_HEARD),
    "nf4-all": Mode(WeightFormats("nf4", "nf4"), 0.04, 0.90, NF4_HEARD),
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
        loaded = load_model(checkpoint, device, torch.bfloat16, on_tensor=lambda _k, n: bar.update(n),
                            formats=formats, store=store_path(cache_dir, checkpoint, formats))
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    return loaded


def release(device: torch.device) -> None:
    """Hand the memory of the model just dropped back to the driver before the next one loads."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def speak(model: DualAR, jobs: list[tuple[str, torch.Tensor, int]], frames: int, label: str) -> list[Generation]:
    """A take of every (text, prompt, seed) job."""
    with click.progressbar(jobs, label=f"generating {label} takes", file=sys.stderr) as bar:
        return [generate(model, prompt, GenerationConfig(max_new_tokens=frames, sampling=SamplingParams(), seed=seed))
                for _, prompt, seed in bar]


def as_takes(jobs: list[tuple[str, torch.Tensor, int]], spoken: list[Generation]) -> list[Take]:
    return [Take(text, generation.codes, generation.stopped) for (text, _, _), generation in zip(jobs, spoken)]


def replay_all(model, takes: list[tuple[torch.Tensor, torch.Tensor]], label: str) -> list[Replay]:
    with click.progressbar(takes, label=f"replaying {label}", file=sys.stderr) as bar:
        return [replay(model, prompt, codes) for prompt, codes in bar]


@click.command("eval")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=Path("checkpoints/s2-pro"),
              show_default=True, help="Folder with config.json, tokenizer.json and the safetensors shards.")
@click.option("--modes", help="Comma-separated: fp8, int8, nf4 (fast AR in bf16), nf4-all. [default: the plans this "
                              "device would run: its 8-bit format, nf4, nf4-all; fp8, int8 on the CPU]")
@click.option("--text", "-t", "texts", multiple=True, help="What the takes say; repeat for several texts, each spoken "
                                                           "with every seed. [default: two sentences of English]")
@click.option("--voice", "voices", multiple=True, help="Speak in this library voice (repeat for several speakers).")
@voices_dir_option
@click.option("--takes", type=click.IntRange(min=1),
              help="Takes per text (seeds 0, 1, ...) that bf16 generates and every mode replays (and, with --audio, "
                   "speaks itself). [default: 2, or 3 with --audio]")
@click.option("--frames", type=click.IntRange(min=1),
              help="Frames per take at most (21.5 per second of audio). [default: 128, or 512 with --audio, so that "
                   "the takes can say the whole text]")
@click.option("--audio", is_flag=True,
              help="Also hear the takes: each mode speaks the same texts and seeds, the codec decodes them, Whisper "
                   "tiny.en counts word errors, a speaker encoder compares the voice with the reference (with "
                   "exactly one --voice) and DNSMOS predicts the opinion score. "
                   "Needs: pip install -e \".[audio-eval]\"")
@click.option("--codec", "codec_path", type=click.Path(path_type=Path),
              help="codec.pth for --audio [default: codec.pth in the checkpoint folder].")
@click.option("--codec-config", "codec_config_name", default="auto", show_default=True, help=CODEC_CONFIG_HELP)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--reference-device", help="Run the bf16 reference here instead, e.g. cpu where bf16 does not fit the "
                                          "GPU (about 9 GB of host RAM; minutes). [default: --device]")
@cache_dir_option("Pre-quantized weights and kernel choices, shared with `synthesize`")
@click.option("--report", type=click.Path(path_type=Path), help="Also write the tables here (markdown).")
def evaluate(checkpoint: Path, modes: str | None, texts: tuple[str, ...], voices: tuple[str, ...], voices_dir: Path,
             takes: int | None, frames: int | None, audio: bool, codec_path: Path | None, codec_config_name: str,
             device: str, reference_device: str | None, cache_dir: Path, report: Path | None) -> None:
    """Compare each precision mode with bf16 on this checkpoint: next-token distributions; with --audio, what is heard.

    bf16 generates the takes; each mode then replays them and is compared per codebook (mean KL from bf16, same top
    code). Exits with status 1 if a mode misses its suggested gate on codebook 0 (FP8 and INT8: KL <= 0.005, same
    top >= 96 %; NF4: KL <= 0.04, same top >= 90 %) or, with --audio, on what is heard, paired with bf16's take of
    the same text and seed (FP8 and INT8: word error rate at most 0.5 points higher, speaker similarity at most
    0.01 and predicted opinion score at most 0.05 lower; NF4: 1.0, 0.02 and 0.10). bf16 must fit the device, or
    --reference-device cpu.

    Example: s2edge eval --checkpoint checkpoints/s2-pro --voice alice --modes fp8,nf4 --audio
    """
    texts = texts or (DEFAULT_TEXT,)
    if any(not text.strip() for text in texts):
        raise InputError("the text to speak is empty")
    if report is not None:
        check_output(report)
    takes = takes or (3 if audio else 2)
    frames = frames or (512 if audio else 128)
    target = resolve_device(device)
    chosen = parse_modes(modes, target)
    if audio:  # everything --audio needs is checked before the first model loads
        audio_judges.require()
        if any(not audio_judges.words(text) for text in texts):
            raise InputError("with --audio every text needs words to check the transcripts against")
        codec_file = codec_path or checkpoint / "codec.pth"
        codec_arch = codec_config(codec_config_name, codec_file)
    home = target if reference_device is None else resolve_device(reference_device)
    remember_in(cache_dir / KERNEL_CHOICES)
    loaded = load(checkpoint, home, WeightFormats(), cache_dir, "bf16")
    model, config = loaded.model, loaded.model.config
    library = VoiceLibrary(voices_dir)
    references = [library.load(name, config.num_codebooks, config.codebook_size).reference() for name in voices]
    prompts = [build_prompt(loaded.tokenizer, text, references, config.num_codebooks) for text in texts]
    jobs = [(text, prompt, seed) for text, prompt in zip(texts, prompts) for seed in range(takes)]
    spoken = speak(model, jobs, frames, "bf16")
    for i, generation in enumerate(spoken):
        if generation.codes.shape[1] == 0:
            raise S2EdgeError(f"bf16 take {i} stopped before its first frame: nothing to compare")
    recorded = [(prompt, generation.codes) for (_, prompt, _), generation in zip(jobs, spoken)]
    heard_takes = {"bf16": as_takes(jobs, spoken)}
    reference = replay_all(model, recorded, "bf16")
    del model, loaded
    release(home)
    rows, failed = [], []
    for name in chosen:
        mode = MODES[name]
        model = load(checkpoint, target, mode.formats, cache_dir, name).model
        agreements = per_codebook(reference, replay_all(model, recorded, name))
        if audio:
            heard_takes[name] = as_takes(jobs, speak(model, jobs, frames, name))
        del model
        release(target)
        first, rest = agreements[0], agreements[1:]
        passed = first.mean_kl <= mode.max_kl and first.same_top >= mode.min_same_top
        failed += [] if passed else [name]
        rows.append(f"| {name} | {first.mean_kl:.2e} | {first.same_top:.1%} | "
                    f"{sum(a.mean_kl for a in rest) / len(rest):.2e} (worst {max(a.mean_kl for a in rest):.2e}) | "
                    f"{sum(a.same_top for a in rest) / len(rest):.1%} | {'pass' if passed else 'FAIL'} |")
    frames_total = sum(codes.shape[1] for _, codes in recorded)
    table = [f"Teacher-forced against bf16 ({home}) on {checkpoint} ({target}): {len(recorded)} take(s), "
             f"{frames_total} frames.", "",
             "| mode | KL codebook 0 | same top 0 | KL codebooks 1-9: mean (worst) | same top 1-9 | gate |",
             "|---|---|---|---|---|---|", *rows]
    if audio:
        codec = open_codec(codec_file, codec_arch, str(target), "auto", with_encoder=False)
        voice_codes = references[0].codes if len(references) == 1 else None
        heard = listen(heard_takes, codec, voice_codes)
        del codec
        release(target)
        lines, missed = audio_table(heard, {name: MODES[name].audio for name in chosen})
        table += ["", *lines]
        failed += [name for name in missed if name not in failed]
    click.echo("\n".join(table))
    if report is not None:
        with atomic_path(report) as tmp:
            tmp.write_text("\n".join(table) + "\n")
    if failed:
        raise S2EdgeError(f"{', '.join(failed)} missed the suggested gate{'s' if audio else ' on codebook 0'}")
