"""The `s2edge` command line. Each user-caused failure prints one line and exits with its own code."""

from __future__ import annotations

import errno
import io
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch

from quant.kernels import compile_cache_empty, hash_triton_in_background, kernels_supported
from quant.kernels.choices import KERNEL_CHOICES, remember_in
from runtime import __version__
from runtime.audio import check_audio_output
from runtime.cache_cli import cache, cache_dir_option
from runtime.checkpoint import expected_shapes, open_checkpoint, validate
from runtime.codec import Codec, CodecConfig
from runtime.codec_cli import (CODEC_CONFIG_HELP, codec_config, codec_dtype, decode, encode, holds_codes, load_codes,
                               open_codec, read_reference_audio)
from runtime.config import bundled_config
from runtime.devices import detect_device, parse_size, skip_cudnn_attention, use_expandable_segments
from runtime.encoded_cache import EncodedCache
from runtime.engine import GenerationConfig
from runtime.errors import InputError, ResourceError, S2EdgeError
from runtime.eval_cli import evaluate
from runtime.files import check_output
from runtime.loader import PRECISIONS, WeightFormats, load_model, resolve_device, store_path
from runtime.plan_cli import plan
from runtime.planner import LINEAR_FORMATS, PlanRequest, choose_plan, fallbacks
from runtime.planner import PRECISIONS as PLAN_PRECISIONS
from runtime.prompt import Reference, check_codes
from runtime.sampling import SamplingParams
from runtime.speaker import Speaker, numbered
from runtime.synthetic import write_checkpoint
from runtime.synthetic_codec import write_synthetic_codec
from runtime.voice_cli import voice, voices_dir_option
from runtime.voices import VoiceLibrary


# errno values of file operations that fail for reasons a user fixes (the traceback would add nothing)
_FILE_SYSTEM_ERRORS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                                 errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EPIPE))


STDOUT = Path("-")  # -o -: stream the audio to standard output, as WAV


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a real file (a test's capture): nothing to flush
        pass


class _Main(click.Group):
    """Turns S2EdgeError (and a file system refusing a write or read) into `error: <message>` + exit code; `--debug`
    keeps the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except torch.OutOfMemoryError:
            if ctx.params.get("debug"):
                raise
            click.echo("error: out of memory: use a smaller precision, context or chunk size, or another device",
                       err=True)
            sys.exit(ResourceError.exit_code)
        except S2EdgeError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # the machine's, not ours: a full disk, a read-only or missing folder, permissions
            if ctx.params.get("debug") or exc.errno not in _FILE_SYSTEM_ERRORS:
                raise
            click.echo(f"error: {exc.strerror}" + (f": {exc.filename}" if exc.filename else ""), err=True)
            if exc.errno == errno.EPIPE:  # the player reading `-o -` went away
                _discard_stdout()
                sys.exit(S2EdgeError.exit_code)
            sys.exit(ResourceError.exit_code if exc.errno in (errno.ENOSPC, errno.EDQUOT) else InputError.exit_code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="s2edge")
def main(debug: bool) -> None:
    """Fish Audio S2 Pro voice cloning on one consumer GPU.

    Typical use: `s2edge synthesize --checkpoint checkpoints/s2-pro --text "..." --reference ref.wav
    --reference-text "transcript of ref" -o out.wav`.
    """
    use_expandable_segments()
    skip_cudnn_attention()


def _read_text(text: str | None, text_file: Path | None) -> str:
    if (text is None) == (text_file is None):
        raise InputError("give the text to speak with exactly one of --text or --text-file")
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{text_file}: not UTF-8 text (save it as UTF-8)") from None
        except OSError as exc:
            raise InputError(f"{text_file}: cannot read text ({exc.strerror or exc.__class__.__name__})") from None
    if not text.strip():
        raise InputError("the text to speak is empty")
    return text


def _read_references(paths: tuple[Path, ...], texts: tuple[str, ...], full: bool, num_codebooks: int, size: int,
                     open_encoder: Callable[[], Codec], cache: EncodedCache | None) -> list[Reference]:
    """--reference in order: codes files as they are, recordings from `cache` (None only where no recording is
    given) or encoded with the codec (loaded once, only if one is missing, and freed before the model loads). Every
    file is read and checked before the codec loads."""
    if len(paths) != len(texts):
        raise InputError(f"{len(paths)} --reference but {len(texts)} --reference-text: give one transcript per "
                         f"reference")
    for path, text in zip(paths, texts):
        if not text.strip():
            raise InputError(f"{path}: its --reference-text is empty")
    inputs = [check_codes(load_codes(path), num_codebooks, size, what=str(path)) if holds_codes(path)
              else read_reference_audio(path, full) for path in paths]
    recordings = [i for i, item in enumerate(inputs) if isinstance(item, np.ndarray)]  # samples, to be encoded
    kept = {i: codes for i in recordings if (codes := cache.get(inputs[i])) is not None}
    codec = open_encoder() if len(kept) < len(recordings) else None
    for i in recordings:
        samples, what = inputs[i], f"{paths[i]} (encoded)"
        if i in kept:
            inputs[i] = check_codes(kept[i], num_codebooks, size, what=what)
            click.echo(f"{paths[i]}: codes encoded on an earlier run, from the cache", err=True)
            continue
        start = time.perf_counter()
        codes = codec.encode(samples).cpu().numpy()
        elapsed = time.perf_counter() - start
        inputs[i] = check_codes(codes, num_codebooks, size, what=what)
        warning = cache.put(samples, codes)
        click.echo(f"encoded {paths[i]} ({samples.size / codec.config.sample_rate:.1f} s) in {elapsed:.2f} s"
                   + ("; kept in the cache for later runs" if warning is None else f"\nwarning: {warning}"), err=True)
    if codec is not None:
        del codec
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the plan measures free memory next
    return [Reference(codes, text) for codes, text in zip(inputs, texts)]


def _codes_beside(output: Path | None) -> Path:
    """--codes-out by default: beside the audio file, with its name (each take's codes stay with its audio, for
    `voice freeze`, instead of one output.npy that every run overwrites); output.npy without an audio file."""
    return Path("output.npy") if output is None else output.with_suffix(".npy")


def _beside_the_load(open_decoder: Callable[[], Codec]) -> Future[Codec]:
    """The decode-only codec, loaded and warmed up on a thread of its own while the model loads (its bytes are in
    the plan): a GPU's first decode in a process loads libraries and kernels, which otherwise came after the
    frames (0.4-0.8 s on an H100: benchmarks/results/cli-wall-*.md)."""
    def prepare() -> Codec:
        codec = open_decoder()
        codec.warm_up()
        return codec

    pool = ThreadPoolExecutor(1, thread_name_prefix="s2edge-codec")
    future = pool.submit(prepare)
    pool.shutdown(wait=False)  # returns now; the thread ends once the codec is ready
    return future


@main.command()
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=Path("checkpoints/s2-pro"),
              show_default=True, help="Folder with config.json, tokenizer.json and the safetensors shards.")
@click.option("--text", "-t", help="The text to speak.")
@click.option("--text-file", type=click.Path(path_type=Path), help="Read the text to speak from a UTF-8 file.")
@click.option("--each-line", is_flag=True,
              help="Speak each non-empty line of the text as a take of its own, the model loaded once: the outputs "
                   "are numbered (-o takes.mp3 -> takes-0001.mp3 and takes-0001.npy, takes-0002.mp3 ...).")
@click.option("--reference", "--reference-codes", "-r", "reference_paths", type=click.Path(path_type=Path),
              multiple=True,
              help="The voice to clone: a recording (wav, flac, ogg, mp3...; its first 30 s, encoded with --codec) "
                   "or its codes (.npy from `s2edge encode`, or a generated take). Repeat for several speakers.")
@click.option("--reference-text", multiple=True,
              help="Transcript of the matching --reference, word for word, in the same order.")
@click.option("--full-reference", is_flag=True,
              help="Encode whole --reference recordings, up to 10 min, instead of their first 30 s.")
@click.option("--voice", "voices", multiple=True,
              help="A voice from the library (`s2edge voice add`). Repeat for several speakers; voices come before "
                   "--reference in speaker order.")
@voices_dir_option
@click.option("--codes-out", type=click.Path(path_type=Path),
              help="Where to write the generated codes [10, n] (.npy, int64) [default: beside -o's file, named as "
                   "it is (-o hello.wav -> hello.npy); output.npy without one].")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Sampling temperature, in (0, 2).")
@click.option("--top-p", type=float, default=0.8, show_default=True, help="Nucleus mass kept, in (0, 1].")
@click.option("--top-k", type=int, default=30, show_default=True, help="Candidates kept per draw.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible output (random if not given).")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True,
              help="Most frames to generate per text batch (21.5 frames per second of audio).")
@click.option("--chunk-length", type=int, default=200, show_default=True,
              help="Long text is spoken in batches of at most this many UTF-8 bytes, cut at speaker tags and "
                   "sentence ends; each batch hears the ones before it, so the voice carries over.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Also decode the codes to audio here (.wav, .flac, .mp3 or .ogg; 44.1 kHz) with --codec; `-` "
                   "streams WAV to standard output while generating (`-o - | ffplay -nodisp -autoexit -`).")
@click.option("--codec", "codec_path", type=click.Path(path_type=Path),
              help="codec.pth for --output and recordings given to --reference [default: codec.pth in the "
                   "checkpoint folder].")
@click.option("--codec-config", "config_name", default="auto", show_default=True, help=CODEC_CONFIG_HELP)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PLAN_PRECISIONS), default="auto", show_default=True,
              help="Linear-layer precision; auto picks the best that fits the GPU (see `s2edge plan`).")
@click.option("--fast-ar-precision", type=click.Choice(LINEAR_FORMATS), default=None,
              help="Override the fast AR's precision (e.g. keep it bf16 under nf4).")
@click.option("--max-context", type=int, default=4096, show_default=True,
              help="KV-cache tokens the plan reserves (prompt + generated frames).")
@click.option("--vram-budget", default=None, help="Use at most this much GPU memory, e.g. 8GB.")
@click.option("--force", is_flag=True, help="Take a forced --precision even if it is predicted not to fit.")
@cache_dir_option("Where quantized weights, the GPU kernels' timed choices and encoded --reference recordings are "
                  "saved once and reused on later runs; `s2edge cache list` shows them")
@click.option("--no-cuda-graph", is_flag=True,
              help="On a GPU, decode frame by frame eagerly instead of replaying one captured CUDA graph per frame.")
def synthesize(
    checkpoint: Path,
    text: str | None,
    text_file: Path | None,
    each_line: bool,
    reference_paths: tuple[Path, ...],
    reference_text: tuple[str, ...],
    full_reference: bool,
    voices: tuple[str, ...],
    voices_dir: Path,
    codes_out: Path | None,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    max_new_tokens: int,
    chunk_length: int,
    output: Path | None,
    codec_path: Path | None,
    config_name: str,
    device: str,
    precision: str,
    fast_ar_precision: str | None,
    max_context: int,
    vram_budget: str | None,
    force: bool,
    cache_dir: Path,
    no_cuda_graph: bool,
) -> None:
    """Speak the text in the voice of the reference(s); write the codes and, with -o, the audio."""
    text = _read_text(text, text_file)
    streaming = output == STDOUT
    codes_out = codes_out or _codes_beside(None if streaming else output)
    check_output(codes_out, (".npy",))  # both outputs are written after the generation: refuse a bad one first
    if streaming and each_line:
        raise InputError("--each-line writes a file per line: give -o a file name such as takes.wav, not -")
    if streaming and sys.stdout.buffer.isatty():
        raise InputError("-o - writes WAV audio to standard output: pipe it to a player, e.g. "
                         "`| ffplay -nodisp -autoexit -` or `| aplay`")
    if output is not None and not streaming:
        check_audio_output(output)
    remember_in(cache_dir / KERNEL_CHOICES)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, max_context=max_context,
                              cuda_graph=not no_cuda_graph)
    target = resolve_device(device)
    if kernels_supported(target):
        hash_triton_in_background()
    header = open_checkpoint(checkpoint)
    library = VoiceLibrary(voices_dir)
    references = [library.load(name, header.config.num_codebooks, header.config.codebook_size).reference()
                  for name in voices]
    codec_file = codec_path or checkpoint / "codec.pth"
    recordings = not all(holds_codes(path) for path in reference_paths)
    needs_codec = output is not None or recordings
    codec_arch = codec_config(config_name, codec_file) if needs_codec else None  # fails before any work
    references += _read_references(
        reference_paths, reference_text, full_reference, header.config.num_codebooks, header.config.codebook_size,
        lambda: open_codec(codec_file, codec_arch, device, "auto", with_encoder=True),
        EncodedCache.for_codec(cache_dir, codec_file, target, codec_dtype(target, "auto")) if recordings else None,
    )
    request = PlanRequest(precision, fast_ar_precision, max_context,
                          None if vram_budget is None else parse_size(vram_budget), force)
    choice = choose_plan(header.config, detect_device(target), request)
    if choice.warning:
        click.echo(f"warning: {choice.warning}", err=True)
    open_decoder = lambda: open_codec(codec_file, codec_arch, device, "auto", with_encoder=False)  # noqa: E731
    prepared = _beside_the_load(open_decoder) if output is not None and target.type == "cuda" else None
    if kernels_supported(target) and compile_cache_empty():
        click.echo("note: Triton's kernel cache is empty: the GPU kernels compile while the model loads (once per "
                   "machine: that run took 13-31 s on H100 and H200 hosts, later ones 4.5-6.2 s)", err=True)
    loaded = None
    for chosen in (choice.plan, *fallbacks(choice)):
        formats = WeightFormats(chosen.slow_format, chosen.fast_format)
        store = store_path(cache_dir, checkpoint, formats)
        click.echo(f"plan {chosen.name}: predicted {chosen.total / 2**30:.2f} GiB on {target}", err=True)
        try:
            with click.progressbar(length=header.total_bytes(), label="loading", file=sys.stderr) as bar:
                loaded = load_model(checkpoint, target, PRECISIONS.get(chosen.slow_format, torch.bfloat16),
                                    on_tensor=lambda _k, n: bar.update(n), formats=formats, store=store,
                                    embeddings_on_host=chosen.embeddings_on_host, sampling=sampling)
            for warning in loaded.warnings:
                click.echo(f"warning: {warning}", err=True)
            break
        except ResourceError as exc:
            if target.type != "cuda":
                raise
            click.echo(f"warning: {exc}; trying the next plan", err=True)
            torch.cuda.empty_cache()
    if loaded is None:
        raise ResourceError(f"no plan fits {target}: try --max-context smaller or another device")
    # The codec's thread is done before the frame loop captures its CUDA graph: an allocation or a copy from another
    # thread during a capture would invalidate it.
    speaker = Speaker(loaded, references, config, chunk_length, target, open_decoder,
                      None if prepared is None else prepared.result())
    if not each_line:
        speaker.speak(text, codes_out, output, streaming)
        return
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines, 1):
        click.echo(f"take {i} of {len(lines)}: {line[:60]}", err=True)
        speaker.speak(line, numbered(codes_out, i), None if output is None else numbered(output, i), False)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
def inspect(checkpoint: Path) -> None:
    """Summarise CHECKPOINT: configuration, parameter counts, files and dtypes (reads headers only)."""
    ckpt = open_checkpoint(checkpoint)
    validate(ckpt)
    c = ckpt.config
    counts = {key: math.prod(entry.shape) for key, entry in ckpt.tensors.items()}
    total = sum(counts.values())
    slow = sum(n for key, n in counts.items() if not key.startswith("fast_"))
    click.echo(f"checkpoint   {ckpt.folder}")
    click.echo(f"slow AR      {c.slow.n_layer} layers, dim {c.dim}, heads {c.slow.n_head}/{c.slow.n_local_heads} "
               f"x {c.slow.head_dim}, ffn {c.slow.intermediate_size}, qk-norm {c.slow.qk_norm}, vocab {c.vocab_size}")
    click.echo(f"fast AR      {c.fast.n_layer} layers, dim {c.fast.dim}, heads {c.fast.n_head}/{c.fast.n_local_heads} "
               f"x {c.fast.head_dim}, ffn {c.fast.intermediate_size}, qk-norm {c.fast.qk_norm}")
    click.echo(f"codebooks    {c.num_codebooks} x {c.codebook_size}; semantic ids {c.semantic_begin_id}.."
               f"{c.semantic_end_id}; stop id {c.im_end_id}; trained context {c.max_seq_len}")
    click.echo(f"parameters   {total:,} (slow {slow:,}, fast {total - slow:,})")
    for shard in ckpt.shards:
        click.echo(f"file         {shard.name}  {shard.stat().st_size:,} bytes")
    dtypes = Counter(str(e.dtype).removeprefix("torch.") for e in ckpt.tensors.values())
    click.echo("dtypes       " + ", ".join(f"{name} x{count}" for name, count in sorted(dtypes.items())))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--config", "config_name", default="tiny", show_default=True,
              help="'tiny', 's2-pro' (full size, 9.1 GB) or a path to a config.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--shards", type=int, default=2, show_default=True, help="Number of safetensors shards.")
@click.option("--device", default="cpu", show_default=True, help="Where to draw the random numbers (cuda is faster).")
@click.option("--codec/--no-codec", "with_codec", default=True, show_default=True,
              help="Also write OUT/codec.pth: the tiny codec with --config tiny, the full-size one otherwise.")
def synthetic(out: Path, config_name: str, seed: int, shards: int, device: str, with_codec: bool) -> None:
    """Write a random-weight checkpoint in the exact released layout to OUT (for trying and testing s2edge)."""
    config = bundled_config(config_name)
    resolve_device(device)
    with click.progressbar(length=len(expected_shapes(config)), label="writing", file=sys.stderr) as bar:
        write_checkpoint(out, config, seed=seed, shards=shards, device=device, on_tensor=lambda _k: bar.update(1))
    click.echo(f"wrote {out}: {config.parameter_count():,} parameters in {shards} shard(s)")
    if with_codec:
        codec = write_synthetic_codec(Path(out) / "codec.pth",
                                      CodecConfig.load("tiny" if config_name == "tiny" else "s2pro"), seed=seed)
        click.echo(f"wrote {codec}")


main.add_command(encode)
main.add_command(evaluate)
main.add_command(decode)
main.add_command(plan)
main.add_command(voice)
main.add_command(cache)


def _observed() -> bool:
    """Whether a tracer or profiler is attached: sys.settrace / sys.setprofile, or (Python 3.12+) a sys.monitoring
    tool, which cProfile and coverage use there."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def run() -> None:
    """The `s2edge` program: `main`, then the process ends at once with its exit code. A normal interpreter exit
    frees torch's and CUDA's objects one by one: 0.39 s after a model-sized run, against 0.10-0.14 s for ending
    here (H100, benchmarks/results/cli-wall-*.md). By then every output file is written and closed (atomically);
    only the standard streams hold data, flushed first; a thread still running (the codec's warm-up, after an error)
    is not waited for. A traceback (--debug), or a profiler, debugger or coverage tool attached (each writes its
    results at the interpreter's exit), exits normally."""
    try:
        main()
    except SystemExit as done:
        if (done.code is not None and not isinstance(done.code, int)) or _observed():
            raise
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a reader that went away: let Python's own exit deal with it
            raise done from None
        os._exit(done.code or 0)


if __name__ == "__main__":
    run()
