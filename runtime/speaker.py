"""One synthesize command's takes: generate a text (in batches if long), write its codes and its audio.

The model, the references, the settings and the decode-only codec are shared by every take of a command, so
`--each-line` loads them once (a warm run of one short take is mostly start-up:
benchmarks/results/cli-wall-*.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import torch

from runtime.audio import FRAME_RATE, WavPipe
from runtime.codec import Codec, decode_to_file
from runtime.codec_cli import save_codes
from runtime.engine import Generation, GenerationConfig, frame_budget, generate_batches
from runtime.loader import LoadedModel
from runtime.prompt import Reference, build_prompt, text_batches
from runtime.stream_out import BackgroundDecoder


def numbered(path: Path, i: int) -> Path:
    """The i-th take's file for --each-line: takes.mp3 -> takes-0001.mp3."""
    return path.with_name(f"{path.stem}-{i:04d}{path.suffix}")


@dataclass
class Speaker:
    """What the takes of one synthesize command share: the loaded model, the references, the generation settings,
    and the decode-only codec (loaded at its first use, then kept)."""

    loaded: LoadedModel
    references: list[Reference]
    config: GenerationConfig
    chunk_length: int
    target: torch.device
    open_decoder: Callable[[], Codec]
    decoder: Codec | None = None

    def codec(self) -> Codec:
        if self.decoder is None:
            self.decoder = self.open_decoder()
        return self.decoder

    def speak(self, text: str, codes_out: Path, output: Path | None, streaming: bool) -> None:
        """Generate `text` (in batches, long text), write its codes and, with `output`, its audio (`-` streams)."""
        model, tokenizer, config, target = self.loaded.model, self.loaded.tokenizer, self.config, self.target
        batches = text_batches(text, self.chunk_length)
        prompt = build_prompt(tokenizer, batches[0], self.references, model.config.num_codebooks)
        frames = frame_budget(model, prompt.shape[1], config)
        if frames < config.max_new_tokens:
            click.echo(f"note: at most {frames} frames fit in --max-context {config.max_context} beside the "
                       f"{prompt.shape[1]}-token prompt", err=True)
        streamer = None
        if streaming:  # the codec loads before the generation, so that audio comes out while it runs
            codec = self.codec()
            streamer = BackgroundDecoder(codec, WavPipe(sys.stdout.buffer, codec.config.sample_rate).write)
        start = time.perf_counter()
        finished: list[Generation] = []
        try:
            with click.progressbar(length=frames * len(batches), label="generating", file=sys.stderr) as bar:
                long = generate_batches(model, tokenizer, batches, self.references, config,
                                        on_frame=lambda _i: bar.update(1), on_batch=finished.append,
                                        on_codes=None if streamer is None else streamer.push)
            if streamer is not None:
                streamer.close()  # the last pieces' audio
        except BaseException:  # Ctrl-C, out of memory, anything: keep the batches of a long text already spoken
            if finished:
                partial = torch.cat([g.codes for g in finished], dim=1)
                save_codes(codes_out, partial.numpy())
                click.echo(f"stopped in text batch {len(finished) + 1} of {len(batches)}: the {len(finished)} before "
                           f"it ({partial.shape[1]} frames) are in {codes_out}", err=True)
            raise
        elapsed = time.perf_counter() - start
        result = long.batches[0]
        codes = long.codes
        save_codes(codes_out, codes.numpy())
        n = codes.shape[1]
        budget_hit = sum(not r.stopped for r in long.batches)
        ending = ("stopped at <|im_end|>" if not budget_hit
                  else f"frame budget reached in {budget_hit} of {len(batches)}")
        if len(batches) > 1:
            ending += f"; {len(batches)} text batches"
        if output is not None and not streaming:
            decode_to_file(codes, self.codec(), output)
            click.echo(f"wrote {output}")
        click.echo(
            f"wrote {codes_out}: codes [{codes.shape[0]}, {n}] = {n / FRAME_RATE:.2f} s of audio; "
            f"{ending}; prompt {result.prompt_tokens} tokens; {n / max(elapsed, 1e-9):.1f} frames/s on {target}",
            err=streaming,  # standard output carries the audio
        )
