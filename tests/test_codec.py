"""The codec: lengths, chunked/streamed decode against the whole decode, windowed attention against a naive
masked reference, weight-norm folding against torch, checkpoint layout against the official inventory,
loading and its errors, codes validation, precisions, real speech through the full-size architecture, CLI."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import spec_tensors
from runtime.audio import load_reference
from runtime.codec import Codec, CodecConfig, decode_to_file, detect_config, load_codec, validate_codes
from runtime.codec_checkpoint import checkpoint_layout, read_checkpoint
from runtime.codec_cli import decode as decode_command
from runtime.codec_cli import encode as encode_command
from runtime.codec_layers import (CausalPipeline, WindowTransformer, _ConvRun, causal_leaves,
                                  fold_weight_norm, window_attention)
from runtime.errors import CheckpointError, InputError
from runtime.synthetic_codec import build_random_codec, official_state_dict, random_codes, write_synthetic_codec

FIXTURE = "tests/fixtures/librivox_sense_and_sensibility_0870.wav"
S2PRO_CODEC_PARAMETERS = 391_430_530
TINY = CodecConfig.load("tiny")


@pytest.fixture(autouse=True)
def plain_cpu_kernels(monkeypatch):
    """oneDNN builds kernels for every new input shape; with the tiny codec's few channels that setup is
    most of the time of tests that run dozens of chunk shapes."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.fixture(scope="module")
def config() -> CodecConfig:
    return TINY


@pytest.fixture(scope="module")
def codec_path(tmp_path_factory, config):
    return write_synthetic_codec(tmp_path_factory.mktemp("codec") / "codec.pth", config, seed=3, stale_blocks=(32, 16))


@pytest.fixture(scope="module")
def codec(codec_path, config) -> Codec:
    return load_codec(codec_path, config, with_encoder=True)


def speechlike(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 44100
    tone = 0.3 * torch.sin(2 * math.pi * 180 * t) * torch.sin(2 * math.pi * 3 * t)
    return tone + 0.02 * torch.randn(samples, generator=g)


# ---------------------------------------------------------------------------------------------------
# lengths, chunking, streaming


@pytest.mark.parametrize("n", [1, 2047, 2048, 2049, 10240, 10241, 44100])
def test_code_and_audio_lengths(codec, n):
    codes = codec.encode(speechlike(n))
    frames = math.ceil(n / 2048)
    assert codes.shape == (10, frames) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes[0].max()) < TINY.semantic_codebook_size
    assert int(codes[1:].max()) < TINY.codebook_size
    audio = codec.decode(codes)
    assert audio.shape == (2048 * frames,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()


def test_chunked_decode_equals_whole(codec):
    codes = random_codes(50, TINY)
    whole = codec.decode(codes, chunk_frames=None)
    assert whole.std() > 0.01  # a real signal, not a saturated or silent one
    for chunk in (1, 3, 7, 16, 49):
        assert (codec.decode(codes, chunk_frames=chunk) - whole).abs().max() <= 1e-5, chunk


def test_stream_concatenates_to_whole(codec):
    codes = random_codes(30, TINY, seed=1)
    whole = codec.decode(codes, chunk_frames=None)
    pieces = list(codec.decode_stream((codes[:, i] for i in range(30)), min_frames=4))
    assert [p.shape[0] for p in pieces] == [4 * 2048] * 7 + [2 * 2048]
    assert (torch.cat(pieces) - whole).abs().max() <= 1e-5
    uneven = [codes[:, :1].numpy(), codes[:, 1:12], codes[:, 12:13], codes[:, 13:]]
    assert (torch.cat(list(codec.decode_stream(uneven))) - whole).abs().max() <= 1e-5


def test_chunked_encode_equals_whole(codec):
    audio = speechlike(9 * 2048 + 5, seed=2)
    whole = codec.encode(audio, chunk_frames=None)
    for chunk in (1, 2, 4):
        assert torch.equal(codec.encode(audio, chunk_frames=chunk), whole)


def test_decoder_receptive_field_is_exact(codec):
    """The context carried between chunks is computed from the layers; it must be exactly what the
    network needs: an input frame changes outputs up to `history` frames later and no further."""
    run = _ConvRun([*causal_leaves(codec.quantizer.upsample), *causal_leaves(codec.decoder.model)])
    x = torch.randn(1, 32, 3 * run.history)
    with torch.no_grad():
        base = _ConvRun(run.layers).push(x)
        x[..., 0] += 1.0
        changed = (_ConvRun(run.layers).push(x) - base)[0, 0].abs() > 0
    assert changed.nonzero().max().item() // 2048 == run.history


def test_causality(codec):
    codes = random_codes(12, TINY, seed=4)
    edited = codes.clone()
    edited[:, 7:] = random_codes(5, TINY, seed=5)
    a, b = codec.decode(codes, chunk_frames=None), codec.decode(edited, chunk_frames=None)
    assert torch.equal(a[: 7 * 2048], b[: 7 * 2048]) and not torch.equal(a, b)
    audio = speechlike(12 * 2048, seed=6)
    later = audio.clone()
    later[7 * 2048 + 100:] += 0.5 * torch.randn(later.numel() - 7 * 2048 - 100)
    c, d = codec.encode(audio, chunk_frames=None), codec.encode(later, chunk_frames=None)
    assert torch.equal(c[:, :7], d[:, :7]) and not torch.equal(c, d)


def test_quantizer_picks_nearest_entries_residually(codec):
    """Against the reference's formula: squared distance between L2-normalised vectors, in float64;
    the semantic book sees the latents, residual book k sees what books 0..k-1 left."""
    q = codec.quantizer
    z = torch.randn(1, 32, 24, generator=torch.Generator().manual_seed(11))

    def nearest(vq, x):
        e = F.normalize(vq.in_proj(x).double().transpose(1, 2)[0], dim=-1)
        c = F.normalize(vq.codebook.weight.double(), dim=-1)
        return (e.pow(2).sum(1, keepdim=True) - 2 * e @ c.T + c.pow(2).sum(1)[None]).argmin(-1)

    with torch.no_grad():
        semantic = q.semantic_quantizer.quantizers[0]
        expected = [nearest(semantic, z)]
        residual = z - semantic.decode(expected[0][None])
        for vq in q.quantizer.quantizers:
            expected.append(nearest(vq, residual))
            residual = residual - vq.decode(expected[-1][None])
        assert torch.equal(q.quantize(z)[0], torch.stack(expected))


# ---------------------------------------------------------------------------------------------------
# windowed attention


def naive_window_attention(q, k, v, window):
    """Reference: the whole [T, C+T] sliding-window mask, built the way the official code builds it."""
    t, total = q.shape[2], k.shape[2]
    cached = total - t
    i = torch.arange(t)[:, None] + cached  # absolute position of each query, keys counted from 0
    j = torch.arange(total)[None, :]
    mask = (j <= i) & (j > i - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("t,window,cached", [(1, 4, 0), (5, 4, 0), (8, 4, 3), (13, 4, 2), (33, 8, 7), (6, 1, 0),
                                             (40, 128, 0), (17, 16, 15)])
def test_window_attention_matches_naive_mask(t, window, cached):
    g = torch.Generator().manual_seed(t * 100 + window)
    q = torch.randn(2, 3, t, 8, generator=g)
    k, v = torch.randn(2, 3, cached + t, 8, generator=g), torch.randn(2, 3, cached + t, 8, generator=g)
    torch.testing.assert_close(window_attention(q, k, v, window), naive_window_attention(q, k, v, window),
                               rtol=1e-5, atol=1e-6)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE as a complex product: (x0 + i x1)(cos + i sin). x: [B, T, H, D]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.view_as_complex(table.float().contiguous())[None, :, None, :]
    return torch.view_as_real(pairs * turn).flatten(-2).type_as(x)


def reference_transformer(module: WindowTransformer, x: torch.Tensor) -> torch.Tensor:
    """The official computation written out: a precomputed bf16 RoPE table (torch.polar), a full T x T
    window-limited mask, SDPA over the whole sequence. x: [B, dim, T]."""
    h = x.transpose(1, 2)
    b, t, dim = h.shape
    d = module.head_dim
    freqs = 1.0 / (module.rope_base ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = torch.outer(torch.arange(t), freqs)
    polar = torch.polar(torch.ones_like(angles), angles)
    table = torch.stack([polar.real, polar.imag], dim=-1).to(torch.bfloat16)
    rows = torch.arange(t)[:, None]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool)) & (torch.arange(t)[None, :] >= (rows - module.window + 1))
    for layer in module.layers:
        n = layer.attention_norm(h)
        q, k, v = layer.attention.wqkv(n).split(dim, dim=-1)
        q, k, v = (z.view(b, t, dim // d, d) for z in (q, k, v))
        q, k = rotate(q, table), rotate(k, table)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        h = h + layer.attention_layer_scale(layer.attention.wo(y.transpose(1, 2).reshape(b, t, dim)))
        h = h + layer.ffn_layer_scale(layer.feed_forward(layer.ffn_norm(h)))
    return module.norm(h).transpose(1, 2)


def test_window_transformer_matches_reference_and_streams(codec):
    module = codec.quantizer.post_module  # window 4, 2 layers
    x = torch.randn(1, 32, 23)
    with torch.no_grad():
        whole = module(x)
        torch.testing.assert_close(whole, reference_transformer(module, x), rtol=1e-5, atol=1e-5)
        pipeline = CausalPipeline([module])
        pieces = [pipeline.push(x[..., a:b]) for a, b in [(0, 1), (1, 6), (6, 7), (7, 19), (19, 23)]]
    torch.testing.assert_close(torch.cat(pieces, dim=-1), whole, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# weights: folding, layout, loading


def test_fold_weight_norm_matches_torch():
    g = torch.Generator().manual_seed(0)
    for conv in (torch.nn.Conv1d(6, 5, 7), torch.nn.ConvTranspose1d(6, 5, 4, stride=2)):
        param = torch.nn.utils.parametrizations.weight_norm(conv, dim=0)
        with torch.no_grad():
            param.parametrizations.weight.original0.copy_(torch.rand(6 if conv.transposed else 5, 1, 1, generator=g))
            param.parametrizations.weight.original1.normal_(generator=g)
        pw = param.parametrizations.weight
        torch.testing.assert_close(fold_weight_norm(pw.original0, pw.original1), param.weight, rtol=1e-6, atol=1e-7)
    legacy = torch.nn.Conv1d(16, 8, 1)
    with pytest.warns(FutureWarning):
        legacy = torch.nn.utils.weight_norm(legacy)
    with torch.no_grad():
        legacy.weight_g.uniform_(0.5, 2.0, generator=g)
        legacy(torch.zeros(1, 16, 1))  # recomputes .weight from g and v
    torch.testing.assert_close(fold_weight_norm(legacy.weight_g, legacy.weight_v), legacy.weight, rtol=1e-6, atol=1e-7)


def test_full_size_layout_matches_official_inventory():
    config = CodecConfig.load("s2pro")
    with torch.device("meta"):
        full, decode_only = Codec(config), Codec(config, with_encoder=False)
    layout = checkpoint_layout(full)
    rows = spec_tensors("codec")
    assert len(rows) == 535
    assert list(layout.items()) == [(key, torch.Size(shape)) for key, _, shape in rows]
    assert sum(s.numel() for s in layout.values()) == S2PRO_CODEC_PARAMETERS
    decoding = checkpoint_layout(decode_only)
    assert set(decoding) < set(layout)
    assert not any(k.startswith(("encoder.", "quantizer.downsample", "quantizer.pre_module")) or ".in_proj." in k
                   for k in decoding)
    assert 0.18e9 < sum(s.numel() for s in decoding.values()) < 0.19e9


def test_synthetic_file_holds_official_keys(codec_path, codec):
    tensors = read_checkpoint(codec_path)
    stale = {k for k in tensors if k.endswith((".causal_mask", ".freqs_cis"))}
    assert len(stale) == 6
    assert sorted(set(tensors) - stale) == sorted(checkpoint_layout(build_random_codec(codec.config)))
    assert "quantizer.quantizer.quantizers.0.in_proj.weight_g" in tensors
    assert "decoder.model.0.conv.parametrizations.weight.original1" in tensors


@pytest.mark.parametrize("variant", ["legacy", "parametrized", "wrapped"])
def test_loads_any_weight_norm_style_and_wrapping(tmp_path, config, variant):
    reference = build_random_codec(config, seed=5)
    codes = random_codes(9, TINY, seed=7)
    expected = reference.decode(codes, chunk_frames=None)
    style = None if variant == "wrapped" else variant
    state = official_state_dict(build_random_codec(config, seed=5), seed=5, style=style, stale_blocks=(8, 8))
    if variant == "wrapped":
        state = {"state_dict": {f"generator.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "codec.pth")
    loaded = load_codec(tmp_path / "codec.pth", config)
    torch.testing.assert_close(loaded.decode(codes, chunk_frames=None), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_errors_name_the_tensor(tmp_path, config):
    state = official_state_dict(build_random_codec(config), seed=0)
    missing = dict(state)
    del missing["quantizer.post_module.layers.1.attention.wo.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"lacks tensor 'quantizer\.post_module\.layers\.1\.attention\.wo\."):
        load_codec(tmp_path / "missing.pth", config)
    wrong = dict(state)
    key = "decoder.model.0.conv.parametrizations.weight.original1"
    wrong[key] = wrong[key][..., :5]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=rf"'{re.escape(key)}' is \[32, 32, 5\] float32, expected \[32, 32, 7\]"):
        load_codec(tmp_path / "wrong.pth", config)
    with pytest.raises(CheckpointError, match="not found"):
        load_codec(tmp_path / "absent.pth", config)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read codec checkpoint"):
        load_codec(tmp_path / "junk.pth", config)
    # the full-size config against a tiny file: a clear shape error, not a crash
    with pytest.raises(CheckpointError, match="expected"):
        load_codec(tmp_path / "missing.pth", CodecConfig.load("s2pro"))


def test_codec_config_detected_from_shapes(tmp_path, config):
    """load_codec without a config takes the bundled one the file fits, in any weight-norm style; a file that fits
    none falls to s2pro, whose load names the tensor."""
    s2pro = CodecConfig.load("s2pro")
    with torch.device("meta"):
        layout = checkpoint_layout(Codec(s2pro))
    assert detect_config({k: torch.empty(shape, device="meta") for k, shape in layout.items()}, tmp_path) == s2pro
    for style in ("legacy", "parametrized"):
        state = official_state_dict(build_random_codec(config, seed=5), seed=5, style=style)
        assert detect_config(state, tmp_path) == config
    key = "decoder.model.0.conv.parametrizations.weight.original1"
    state = official_state_dict(build_random_codec(config), seed=0)
    state[key] = state[key][..., :5]
    assert detect_config(state, tmp_path) == s2pro
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="expected"):
        load_codec(tmp_path / "odd.pth")


def test_decode_only_load_then_encoder_on_demand(codec_path, config, codec):
    lean = load_codec(codec_path, config)
    assert lean.encoder is None and lean.quantizer.pre_module is None
    names = {name for name, _ in lean.named_parameters()}
    assert names < {name for name, _ in codec.named_parameters()}
    assert not any(n.startswith(("encoder.", "quantizer.downsample.", "quantizer.pre_module.")) or ".in_proj." in n
                   for n in names)
    audio = speechlike(5 * 2048)
    codes = lean.encode(audio)  # loads the encoder side from the file
    assert lean.encoder is not None and torch.equal(codes, codec.encode(audio))
    lean.release_encoder()
    assert lean.encoder is None and lean.quantizer.quantizer.quantizers[0].in_proj is None
    torch.testing.assert_close(lean.decode(codes), codec.decode(codes))


# ---------------------------------------------------------------------------------------------------
# codes


def test_decode_clamps_without_touching_the_callers_codes(codec):
    codes = random_codes(6, TINY, seed=8)
    codes[0, 2], codes[3, 4], codes[9, 0] = 9999, 5000, TINY.codebook_size
    original = codes.clone()
    clamped = codes.clone()
    clamped[0, 2], clamped[3, 4], clamped[9, 0] = TINY.semantic_codebook_size - 1, TINY.codebook_size - 1, \
        TINY.codebook_size - 1
    torch.testing.assert_close(codec.decode(codes), codec.decode(clamped), rtol=0, atol=0)
    assert torch.equal(codes, original)


@pytest.mark.parametrize("codes,message", [
    (torch.full((10, 4), -1), "negative"),
    (torch.zeros(9, 4, dtype=torch.long), r"shape \[10, T\]"),
    (torch.zeros(1, 10, 4, dtype=torch.long), r"shape \[10, T\]"),
    (torch.zeros(10, 0, dtype=torch.long), r"shape \[10, T\]"),
    (torch.zeros(10, 4), "integers, got float32"),
    (np.zeros((10, 4), dtype=np.float64), "integers, got float64"),
    (torch.zeros(10, 4, dtype=torch.bool), "integers, got bool"),
])
def test_bad_codes_are_refused(codec, codes, message):
    with pytest.raises(InputError, match=message):
        codec.decode(codes)
    assert validate_codes(np.ones((10, 3), dtype=np.int16), codec.config).dtype == torch.int64


def test_bad_audio_to_encode_is_refused(codec):
    for audio in (torch.zeros(0), torch.zeros(2, 100), torch.zeros(100, dtype=torch.int16)):
        with pytest.raises(InputError, match="1-D float"):
            codec.encode(audio)
    with pytest.raises(InputError, match="chunk_frames must be at least 1"):
        codec.encode(torch.zeros(100), chunk_frames=0)
    with pytest.raises(InputError, match="chunk_frames must be at least 1"):
        codec.decode(random_codes(3, TINY), chunk_frames=0)
    with pytest.raises(InputError, match="negative"):
        codec.decode_chunks(-random_codes(3, TINY) - 1)  # checked before the first chunk is asked for


# ---------------------------------------------------------------------------------------------------
# precisions, real speech, files, CLI


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_track_fp32(codec_path, config, codec, dtype):
    half = load_codec(codec_path, config, dtype=dtype)
    codes = random_codes(8, TINY, seed=9)
    reference, audio = codec.decode(codes), half.decode(codes)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()
    assert (audio - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_real_speech_round_trip_full_size(tmp_path, monkeypatch):
    """A LibriVox recording through the S2 Pro architecture (random weights): read, resample, encode,
    decode, write, read back. The first 2.5 s keep it near 15 s on two cores; the CLI test below and
    benchmarks/codec_decode.py take the whole clip."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    reference = load_reference(FIXTURE)
    assert any("16000 Hz" in w for w in reference.warnings)
    samples = reference.samples[: int(2.5 * 44100)]
    codec = build_random_codec(CodecConfig.load("s2pro"), seed=0)
    codes = codec.encode(samples)
    frames = math.ceil(samples.size / 2048)
    assert codes.shape == (10, frames) and int(codes[0].max()) < 4096 and int(codes[1:].max()) < 1024
    out = decode_to_file(codes, codec, tmp_path / "round.wav", chunk_frames=32)
    audio, rate = sf.read(out)
    assert rate == 44100 and audio.shape == (2048 * frames,) and np.abs(audio).max() > 0


def test_cli_encode_then_decode(tmp_path, codec_path):
    runner = CliRunner()
    codes_path, wav = tmp_path / "ref.npy", tmp_path / "out.flac"
    result = runner.invoke(encode_command, [FIXTURE, "-o", str(codes_path), "--codec", str(codec_path),
                                            "--codec-config", "tiny", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "codes [10, 153]" in result.output
    codes = np.load(codes_path)
    assert codes.shape == (10, 153) and codes.dtype == np.int64
    result = runner.invoke(decode_command, [str(codes_path), "-o", str(wav), "--codec", str(codec_path),
                                            "--codec-config", "tiny", "--chunk-frames", "40"])
    assert result.exit_code == 0, result.output
    assert sf.info(str(wav)).frames == 153 * 2048 and sf.info(str(wav)).samplerate == 44100
    np.save(tmp_path / "bad.npy", -codes)
    result = runner.invoke(decode_command, [str(tmp_path / "bad.npy"), "-o", str(wav), "--codec", str(codec_path)])
    assert isinstance(result.exception, InputError) and "negative" in str(result.exception)
    assert "Encode the reference recording" in runner.invoke(encode_command, ["--help"]).output
    assert "--chunk-frames" in runner.invoke(decode_command, ["--help"]).output


def test_benchmark_runs_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("codec_decode", "benchmarks/codec_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    status = bench.main(["--device", "cpu", "--config", "tiny", "--seconds", "2", "--chunk-frames", "16",
                         "--workdir", str(tmp_path), "--out", str(tmp_path / "results")])
    assert status == 0
    (table,) = (tmp_path / "results").glob("codec-decode-cpu-tiny-*.md")
    text = table.read_text()
    assert "(ok, tolerance 0.0001)" in text and "codes [10, 153]" in text and "| decode 2.0 s, chunks of 16" in text
