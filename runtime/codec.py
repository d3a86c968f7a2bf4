"""The S2 Pro audio codec: 44.1 kHz mono audio <-> codes [10, T] at 21.5 frames/s (2048 samples a frame).

Loads the released `codec.pth` unchanged (weight norm folded at load), runs in fp32, bf16 or fp16, and keeps
memory bounded: windowed attention without [T, T] masks, chunked and streamed decoding that equal the
whole-sequence decode, and decode-only loading (about 0.18 B of the 0.39 B parameters) with the encoder
loaded on demand. Architecture: shared/spec/s2pro-inference.md section 7.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from runtime.audio import write_audio_chunks
from runtime.codec_checkpoint import load_parameters, read_checkpoint
from runtime.codec_layers import (Chain, CausalConv1d, CausalConvTranspose1d, CausalPipeline, ConvNeXtBlock,
                                  ResidualUnit, Snake1d, Tanh, WindowTransformer, causal_leaves, weight_normed)
from runtime.errors import CheckpointError, InputError
from runtime.meta import meta_device

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DECODE_CHUNK_FRAMES = 128  # ~6 s of audio per piece: bounded memory, few re-computed context frames
ENCODE_CHUNK_FRAMES = 256


@dataclass(frozen=True)
class CodecConfig:
    """Codec hyper-parameters (configs/codec-*.json). Names follow fish-speech's modded_dac_vq.yaml."""

    sample_rate: int
    encoder_dim: int
    encoder_rates: tuple[int, ...]
    encoder_transformer_layers: tuple[int, ...]
    encoder_window: int
    decoder_dim: int
    decoder_rates: tuple[int, ...]
    downsample_factor: tuple[int, ...]
    codebook_dim: int
    semantic_codebook_size: int
    codebook_size: int
    residual_codebooks: int
    quantizer_layers: int
    quantizer_window: int
    head_dim: int
    ffn_ratio: int
    rope_base: float
    norm_eps: float

    @property
    def latent_dim(self) -> int:
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Audio samples per code frame (2048 for S2 Pro)."""
        return math.prod(self.encoder_rates) * math.prod(self.downsample_factor)

    @property
    def num_codebooks(self) -> int:
        return 1 + self.residual_codebooks

    @classmethod
    def load(cls, name_or_path: str | Path) -> CodecConfig:
        """Read a config by name ("s2pro", "tiny": configs/codec-NAME.json) or by path."""
        path = Path(name_or_path)
        if path.suffix != ".json":
            path = CONFIG_DIR / f"codec-{name_or_path}.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read codec config {path}: {e}") from e
        names = {f.name for f in dataclasses.fields(cls)}
        if set(raw) != names:
            raise InputError(f"codec config {path}: missing {sorted(names - set(raw))}, "
                              f"unknown {sorted(set(raw) - names)}")
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        if math.prod(config.decoder_rates) * math.prod(config.downsample_factor) != config.frame_length:
            raise InputError(f"codec config {path}: decoder_rates do not undo encoder_rates")
        return config


class VectorQuantizer(nn.Module):
    """One codebook: project to `codebook_dim`, nearest entry by cosine, project the raw entry back."""

    def __init__(self, dim: int, size: int, codebook_dim: int, with_encoder: bool) -> None:
        super().__init__()
        self.register_module("in_proj", None)
        self.out_proj = weight_normed(nn.Conv1d(codebook_dim, dim, 1), "legacy")
        self.codebook = nn.Embedding(size, codebook_dim)
        if with_encoder:
            self.add_in_proj()

    def add_in_proj(self) -> None:
        dim, codebook_dim = self.out_proj.out_channels, self.out_proj.in_channels
        self.in_proj = weight_normed(nn.Conv1d(dim, codebook_dim, 1), "legacy")

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (indices [B, T], quantized [B, dim, T])."""
        latents = nn.functional.normalize(self.in_proj(z).float().transpose(1, 2), dim=-1)  # [B, T, d]
        entries = nn.functional.normalize(self.codebook.weight.float(), dim=-1)  # [K, d]
        indices = (latents @ entries.T).argmax(-1)
        return indices, self.decode(indices)

    def decode(self, indices: Tensor) -> Tensor:  # [B, T] -> [B, dim, T]
        return self.out_proj(self.codebook(indices).transpose(1, 2))


class ResidualQuantizer(nn.Module):
    """Codebooks applied in turn, each to what the previous ones left."""

    def __init__(self, books: int, dim: int, size: int, codebook_dim: int, with_encoder: bool) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantizer(dim, size, codebook_dim, with_encoder)
                                        for _ in range(books))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (codes [B, books, T], sum of the quantized vectors [B, dim, T])."""
        codes, total, residual = [], torch.zeros_like(z), z
        for vq in self.quantizers:
            indices, quantized = vq.encode(residual)
            codes.append(indices)
            total, residual = total + quantized, residual - quantized
        return torch.stack(codes, dim=1), total

    def decode(self, codes: Tensor) -> Tensor:  # [B, books, T] -> [B, dim, T]
        total = self.quantizers[0].decode(codes[:, 0])
        for i, vq in enumerate(self.quantizers[1:], start=1):
            total = total + vq.decode(codes[:, i])
        return total


def _transformer(config: CodecConfig, dim: int, layers: int, window: int) -> WindowTransformer:
    return WindowTransformer(dim, layers, config.head_dim, config.ffn_ratio * dim, window,
                             config.rope_base, config.norm_eps)


class Quantizer(nn.Module):
    """Latents at 86 Hz -> (downsample x4, pre_module) -> semantic + residual codes at 21.5 Hz, and back
    (codes -> post_module -> upsample x4). Encoder-side parts are None in a decode-only codec."""

    def __init__(self, config: CodecConfig, with_encoder: bool) -> None:
        super().__init__()
        dim, cb = config.latent_dim, config.codebook_dim
        self.semantic_quantizer = ResidualQuantizer(1, dim, config.semantic_codebook_size, cb, with_encoder)
        self.quantizer = ResidualQuantizer(config.residual_codebooks, dim, config.codebook_size, cb, with_encoder)
        self.register_module("downsample", None)
        self.upsample = nn.Sequential(*(nn.Sequential(CausalConvTranspose1d(dim, dim, f, f), ConvNeXtBlock(dim))
                                        for f in reversed(config.downsample_factor)))
        self.register_module("pre_module", None)
        self.post_module = _transformer(config, dim, config.quantizer_layers, config.quantizer_window)
        if with_encoder:
            self.add_encoder_side(config)

    def add_encoder_side(self, config: CodecConfig) -> None:
        dim = config.latent_dim
        self.downsample = nn.Sequential(*(nn.Sequential(CausalConv1d(dim, dim, f, f), ConvNeXtBlock(dim))
                                          for f in config.downsample_factor))
        self.pre_module = _transformer(config, dim, config.quantizer_layers, config.quantizer_window)
        for vq in [*self.semantic_quantizer.quantizers, *self.quantizer.quantizers]:
            vq.add_in_proj()

    def drop_encoder_side(self) -> None:
        self.downsample = self.pre_module = None
        for vq in [*self.semantic_quantizer.quantizers, *self.quantizer.quantizers]:
            vq.in_proj = None

    def quantize(self, z: Tensor) -> Tensor:
        """Latents after pre_module [B, dim, T] -> codes [B, 10, T]."""
        semantic, z_semantic = self.semantic_quantizer.encode(z)
        residual, _ = self.quantizer.encode(z - z_semantic)
        return torch.cat([semantic, residual], dim=1)

    def from_codes(self, codes: Tensor) -> Tensor:
        """Clamped codes [B, 10, T] -> latents before post_module [B, dim, T]."""
        return self.semantic_quantizer.decode(codes[:, :1]) + self.quantizer.decode(codes[:, 1:])


def _encoder(config: CodecConfig) -> Chain:
    d = config.encoder_dim
    layers: list[nn.Module] = [CausalConv1d(1, d, 7, weight_norm="parametrized")]
    for stride, depth in zip(config.encoder_rates, config.encoder_transformer_layers):
        d *= 2
        block = [ResidualUnit(d // 2, 1), ResidualUnit(d // 2, 3), ResidualUnit(d // 2, 9), Snake1d(d // 2),
                 CausalConv1d(d // 2, d, 2 * stride, stride, weight_norm="parametrized")]
        if depth:
            block.append(_transformer(config, d, depth, config.encoder_window))
        layers.append(Chain(*block))
    layers += [Snake1d(d), CausalConv1d(d, config.latent_dim, 3, weight_norm="parametrized")]
    return Chain(*layers)


class Decoder(nn.Module):
    """Latents [B, 1024, 4T] -> audio [B, 1, 2048T]: conv, 4 upsampling blocks, conv, tanh."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        c = config.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(config.latent_dim, c, 7, weight_norm="parametrized")]
        for stride in config.decoder_rates:
            layers.append(Chain(Snake1d(c), CausalConvTranspose1d(c, c // 2, 2 * stride, stride, "parametrized"),
                                ResidualUnit(c // 2, 1), ResidualUnit(c // 2, 3), ResidualUnit(c // 2, 9)))
            c //= 2
        layers += [Snake1d(c), CausalConv1d(c, 1, 7, weight_norm="parametrized"), Tanh()]
        self.model = nn.Sequential(*layers)


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise InputError(f"{name} must be at least 1, got {value}")
    return value


def validate_codes(codes: Tensor | np.ndarray, config: CodecConfig) -> Tensor:
    """Check codes [10, T] and clamp them like the reference (row 0 <= 4095, rows 1..9 <= 1023).
    Returns a new int64 tensor; the caller's is never modified."""
    codes = torch.as_tensor(codes)
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise InputError(f"codes must be integers, got {str(codes.dtype).removeprefix('torch.')}")
    if codes.dim() != 2 or codes.shape[0] != config.num_codebooks or codes.shape[1] == 0:
        raise InputError(f"codes must have shape [{config.num_codebooks}, T] with T >= 1, got {list(codes.shape)}")
    if int(codes.min()) < 0:
        raise InputError(f"codes contain negative values (min {int(codes.min())}); codebook indices start at 0")
    limits = torch.tensor([config.semantic_codebook_size - 1] + [config.codebook_size - 1] * config.residual_codebooks,
                          device=codes.device)
    return torch.minimum(codes.long(), limits[:, None])


class Codec(nn.Module):
    """The whole codec: `encoder`, `quantizer`, `decoder` as in the official checkpoint."""

    def __init__(self, config: CodecConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.register_module("encoder", _encoder(config) if with_encoder else None)
        self.quantizer = Quantizer(config, with_encoder)
        self.decoder = Decoder(config)
        self.source: Path | None = None  # the checkpoint, for loading the encoder on demand

    @property
    def device(self) -> torch.device:
        return self.decoder.model[0].conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.model[0].conv.weight.dtype

    def load_encoder(self) -> None:
        """Load the encoder side (encoder, downsample, pre_module, codebook input projections) if absent."""
        if self.encoder is not None:
            return
        if self.source is None:
            raise CheckpointError("this codec was built without a checkpoint; cannot load its encoder")
        device, dtype = self.device, self.dtype
        with meta_device():
            self.encoder = _encoder(self.config)
            self.quantizer.add_encoder_side(self.config)
        load_parameters(self, read_checkpoint(self.source), self.source, device, dtype)

    def release_encoder(self) -> None:
        """Free the encoder side once references are encoded; `encode` loads it again if needed."""
        self.encoder = None
        self.quantizer.drop_encoder_side()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def encode(self, audio: Tensor | np.ndarray, chunk_frames: int | None = ENCODE_CHUNK_FRAMES) -> Tensor:
        """Mono 44.1 kHz audio [N] -> codes [10, ceil(N / 2048)] (int64, on the codec's device).
        The audio is right-padded with zeros to whole frames; `chunk_frames` bounds memory (None: one pass)."""
        audio = torch.as_tensor(audio)
        if audio.dim() != 1 or audio.numel() == 0 or not audio.is_floating_point():
            raise InputError(f"audio to encode must be a non-empty 1-D float array, got "
                             f"{list(audio.shape)} {str(audio.dtype).removeprefix('torch.')}")
        frame = self.config.frame_length
        frames = -(-audio.numel() // frame)
        step = frame * (frames if chunk_frames is None else _positive(chunk_frames, "chunk_frames"))
        self.load_encoder()
        x = nn.functional.pad(audio.to(self.device, self.dtype), (0, frames * frame - audio.numel()))[None, None]
        layers = [*causal_leaves(self.encoder), *causal_leaves(self.quantizer.downsample), self.quantizer.pre_module]
        pipeline = CausalPipeline(layers)
        with torch.no_grad():
            codes = [self.quantizer.quantize(pipeline.push(x[..., s:s + step])) for s in range(0, x.shape[-1], step)]
        return torch.cat(codes, dim=-1)[0]

    def decode(self, codes: Tensor | np.ndarray, chunk_frames: int | None = DECODE_CHUNK_FRAMES) -> Tensor:
        """Codes [10, T] -> audio [2048 T] (float32, on the codec's device). `chunk_frames` bounds memory;
        None decodes in one pass. Every chunking gives the same audio."""
        return torch.cat(list(self.decode_chunks(codes, chunk_frames)))

    def decode_chunks(self, codes: Tensor | np.ndarray, chunk_frames: int | None = DECODE_CHUNK_FRAMES
                      ) -> Iterator[Tensor]:
        """Decode codes [10, T] in pieces of `chunk_frames` frames, yielding audio as it is made.
        The codes are checked before anything is decoded."""
        codes = validate_codes(codes, self.config)
        step = codes.shape[1] if chunk_frames is None else _positive(chunk_frames, "chunk_frames")
        stream = DecodeStream(self)
        return (stream.push(codes[:, start:start + step]) for start in range(0, codes.shape[1], step))

    def warm_up(self) -> None:
        """Decode one frame of zeros and drop the audio. A process's, and a thread's, first decode on a GPU loads
        libraries, handles and kernels (0.16-0.8 s on an H100), which this pays ahead of the real one."""
        DecodeStream(self).push(torch.zeros(self.config.num_codebooks, 1, dtype=torch.long))

    def decode_stream(self, frames: Iterable[Tensor | np.ndarray], min_frames: int = 1) -> Iterator[Tensor]:
        """Decode frames as they arrive (each [10] or [10, n]); yields audio once `min_frames` are pending.
        The chunks concatenate to `decode` of all frames."""
        min_frames = _positive(min_frames, "min_frames")
        stream, pending, count = DecodeStream(self), [], 0
        for frame in frames:
            frame = torch.as_tensor(frame)
            pending.append(frame[:, None] if frame.dim() == 1 else frame)
            count += pending[-1].shape[-1]
            if count >= min_frames:
                yield stream.push(torch.cat(pending, dim=1))
                pending, count = [], 0
        if pending:
            yield stream.push(torch.cat(pending, dim=1))


class DecodeStream:
    """Decoding state of one sequence: push frames in order, get exactly 2048 samples per frame back."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        q = codec.quantizer
        self.pipeline = CausalPipeline([q.post_module, *causal_leaves(q.upsample), *causal_leaves(codec.decoder.model)])

    def push(self, codes: Tensor | np.ndarray) -> Tensor:
        """codes [10, n] -> audio [2048 n], float32 on the codec's device."""
        codes = validate_codes(codes, self.codec.config).to(self.codec.device)
        with torch.no_grad():
            z = self.codec.quantizer.from_codes(codes[None])
            return self.pipeline.push(z)[0, 0].float()


def decode_to_file(codes: Tensor | np.ndarray, codec: Codec, path: str | Path,
                   chunk_frames: int = DECODE_CHUNK_FRAMES) -> Path:
    """Decode codes [10, T] and write 44.1 kHz audio to `path` (write_audio_chunks' formats) atomically, chunk by
    chunk."""
    chunks = (c.cpu().numpy() for c in codec.decode_chunks(codes, chunk_frames))
    return write_audio_chunks(path, chunks, codec.config.sample_rate)


def load_codec(path: str | Path, config: CodecConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, with_encoder: bool = False) -> Codec:
    """Load `codec.pth` (official layout; tensors the codec does not use, such as the reference's stale
    causal_mask/freqs_cis buffers, are never read). Without `config`, the bundled one the file fits.

    Decode-only by default: the encoder side is loaded by `Codec.load_encoder` or on the first `encode`.
    """
    path = Path(path)
    tensors = read_checkpoint(path)
    with meta_device():
        codec = Codec(config or detect_config(tensors, path), with_encoder=with_encoder)
    load_parameters(codec, tensors, path, torch.device(device), dtype)
    codec.source = path
    return codec.eval()


def check_layout(config: CodecConfig, tensors: dict[str, Tensor], path: Path) -> None:
    """Raise CheckpointError, naming the tensor, unless the checkpoint's tensors fill the decoder of `config` in
    every key and shape (a load onto the meta device: no data read)."""
    with meta_device():
        trial = Codec(config, with_encoder=False)
    load_parameters(trial, tensors, path, torch.device("meta"), torch.float32)


def detect_config(tensors: dict[str, Tensor], path: Path) -> CodecConfig:
    """The bundled codec config (configs/codec-*.json, s2pro first) that the checkpoint's tensors fit; s2pro when
    none does, so that loading names the first tensor that differs."""
    names = sorted((p.name.removeprefix("codec-").removesuffix(".json") for p in CONFIG_DIR.glob("codec-*.json")),
                   key=lambda name: name != "s2pro")
    for name in names:
        config = CodecConfig.load(name)
        try:
            check_layout(config, tensors, path)
        except CheckpointError:
            continue
        return config
    return CodecConfig.load("s2pro")
