"""Dual-AR numerics: cached decoding equals a full forward, an independent spec implementation agrees, the
restricted head equals the constrained full head, and generation stops where it should."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from runtime.engine import GenerationConfig, generate, generate_batches
from runtime.errors import InputError
from runtime.model import apply_rope, rope_table, run_stack
from runtime.prompt import build_prompt
from runtime.sampling import SamplingParams, probabilities


def frames_sequence(config, prompt_len: int, n_frames: int, seed: int = 0) -> torch.Tensor:
    """A prompt of text tokens followed by audio frames: [1, 11, prompt_len + n_frames]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 256, (1, prompt_len), generator=g)
    codes = torch.randint(0, config.codebook_size, (config.num_codebooks, n_frames), generator=g)
    audio = torch.cat([codes[:1] + config.semantic_begin_id, codes])
    prompt = torch.cat([text, torch.zeros(config.num_codebooks, prompt_len, dtype=torch.int64)])
    return torch.cat([prompt, audio], dim=1)[None]


def naive_slow_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Spec sections 2.1-2.3 written independently: copied K/V heads, explicit mask, complex-number RoPE."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    ids, codes = tokens[0, 0], tokens[0, 1:]
    x = sd["embeddings.weight"][ids]
    for t in range(ids.numel()):
        if c.semantic_begin_id <= ids[t] <= c.semantic_end_id:
            rows = [sd["codebook_embeddings.weight"][int(codes[i, t]) + i * c.codebook_size] for i in range(10)]
            x[t] = (x[t] + torch.stack(rows).sum(0)) / math.sqrt(11)
    T, hd, nh, nkv = ids.numel(), c.slow.head_dim, c.slow.n_head, c.slow.n_local_heads
    table = rope_table(T, hd, c.rope_base).double()
    rot = torch.complex(table[..., 0], table[..., 1])  # [T, hd/2]

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def rope(v):  # v [T, H, hd]: pairs (2j, 2j+1) are complex numbers
        z = torch.view_as_complex(v.reshape(T, v.shape[1], hd // 2, 2).contiguous()) * rot[:, None]
        return torch.view_as_real(z).reshape(v.shape)

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.slow.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split([nh * hd, nkv * hd, nkv * hd], -1)
        q = rms(q.view(T, nh, hd), sd[p + "attention.q_norm.weight"])
        k = rms(k.view(T, nkv, hd), sd[p + "attention.k_norm.weight"])
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.view(T, nkv, hd).repeat_interleave(nh // nkv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("hqk,khd->qhd", att, v).reshape(T, nh * hd)
        x = x + y @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["embeddings.weight"].T


@pytest.fixture()
def model(tiny_model):
    m = tiny_model.model
    m.setup_caches(64, torch.float32, "cpu")
    return m


def test_slow_ar_matches_independent_spec_implementation(model):
    tokens = frames_sequence(model.config, 9, 6)
    with torch.inference_mode():
        ours = model.full_logits(model.forward_slow(tokens, 0))[0]
    ref = naive_slow_logits(model, tokens).float()
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_kv_cached_decode_equals_full_forward(model):
    tokens = frames_sequence(model.config, 12, 8, seed=1)
    with torch.inference_mode():
        full = model.full_logits(model.forward_slow(tokens, 0))[0]
        model.setup_caches(64, torch.float32, "cpu")  # fresh, zeroed caches
        steps = [model.forward_slow(tokens[..., :12], 0)[0]]
        steps += [model.forward_slow(tokens[..., t : t + 1], t)[0] for t in range(12, 20)]
        cached = model.full_logits(torch.cat(steps))
        model.setup_caches(64, torch.float32, "cpu")
        chunked = torch.cat([model.forward_slow(tokens[..., :7], 0)[0], model.forward_slow(tokens[..., 7:], 7)[0]])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.full_logits(chunked), full, atol=1e-5, rtol=1e-5)
    assert (cached - full).abs().max() < 1e-4 and full.std() > 1e-3  # logits are not trivially equal


def test_fast_ar_cached_positions_equal_full_sequence(model):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 10, model.config.dim, generator=g) * 0.5
    with torch.inference_mode():
        full = run_stack(model.fast_layers, model.fast_norm, x, model.fast_rope, 0)
        steps = torch.cat([model.forward_fast(x[:, k : k + 1], k) for k in range(10)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_audio_positions_embed_as_scaled_sum(model):
    c = model.config
    tokens = frames_sequence(c, 2, 1)
    x = model.embed(tokens)[0]
    ids, codes = tokens[0, 0], tokens[0, 1:, 2]
    E, C = model.embeddings.weight, model.codebook_embeddings.weight
    expected = (E[ids[2]] + sum(C[int(codes[i]) + i * c.codebook_size] for i in range(10))) / math.sqrt(11)
    torch.testing.assert_close(x[2], expected)
    torch.testing.assert_close(x[0], E[ids[0]])  # text positions: the token row alone


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(1, 3, 2, 8)
    table = rope_table(3, 8, 10000.0)
    out = apply_rope(x, table)
    c, s = table[2, 1].float()
    assert out[0, 2, 1, 2] == pytest.approx(float(x[0, 2, 1, 2] * c - x[0, 2, 1, 3] * s), abs=1e-6)
    assert out[0, 2, 1, 3] == pytest.approx(float(x[0, 2, 1, 3] * c + x[0, 2, 1, 2] * s), abs=1e-6)
    assert table.dtype == torch.bfloat16


def test_restricted_head_equals_constrained_full_head(model):
    hidden = torch.randn(5, model.config.dim)
    with torch.inference_mode():
        restricted = model.head_logits(hidden)
        full = model.full_logits(hidden)
    legal = model.legal_ids
    torch.testing.assert_close(restricted, full[:, legal])
    constrained = torch.full_like(full, float("-inf"))
    constrained[:, legal] = full[:, legal]
    params = SamplingParams(0.8, 0.8, 30)
    for row in range(5):
        p_r, i_r = probabilities(restricted[row], params)
        p_f, i_f = probabilities(constrained[row], params)
        dense_r = torch.zeros(full.shape[1]).scatter(0, legal[i_r], p_r)
        dense_f = torch.zeros(full.shape[1]).scatter(0, i_f, p_f)
        torch.testing.assert_close(dense_r, dense_f)


def test_generation_stops_at_im_end_and_drops_that_frame(tiny_model, monkeypatch):
    model = tiny_model.model
    calls = {"n": 0}
    real_head = model.head_logits

    def head_with_stop(hidden):
        logits = real_head(hidden)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th frame emits <|im_end|>
            logits[..., 0] = 1e4
        else:
            logits[..., 0] = -1e4
        return logits

    monkeypatch.setattr(model, "head_logits", head_with_stop)
    prompt = frames_sequence(model.config, 5, 0)[0]
    result = generate(model, prompt, GenerationConfig(max_new_tokens=50, seed=0))
    assert result.stopped and result.codes.shape == (10, 3)
    assert ((result.codes >= 0) & (result.codes < model.config.codebook_size)).all()


def test_generation_is_seeded_and_budgeted(tiny_model):
    model = tiny_model.model
    prompt = frames_sequence(model.config, 5, 2)[0]
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingParams(1.0, 0.9, 30), seed=5)
    a, b = generate(model, prompt, cfg), generate(model, prompt, cfg)
    other = generate(model, prompt, GenerationConfig(max_new_tokens=12, sampling=cfg.sampling, seed=6))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, other.codes)
    assert a.codes.shape[1] <= 12
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model, prompt, GenerationConfig(max_new_tokens=0))
    too_long = torch.zeros(11, model.config.max_seq_len, dtype=torch.int64)
    with pytest.raises(InputError, match="leaves no room in a context of"):
        generate(model, too_long, cfg)


def test_max_context_caps_frames_and_kv_cache(tiny_model):
    """A memory plan reserves KV for max_context tokens: generation must not allocate or decode past it."""
    model = tiny_model.model
    prompt = frames_sequence(model.config, 5, 2)[0]  # [11, L]
    length = prompt.shape[1]
    model.setup_caches(1, torch.float32, "cpu")  # start small, so generate() sizes the cache itself
    cfg = GenerationConfig(max_new_tokens=500, seed=0, max_context=length + 7)
    result = generate(model, prompt, cfg)
    assert result.codes.shape[1] <= 7 and model.capacity == length + 7  # not rounded up to a 256 bucket
    uncapped = generate(model, prompt, GenerationConfig(max_new_tokens=9, seed=0))
    assert model.capacity > length + 7  # without a plan the bucket rounds up (negative control)
    assert uncapped.codes.shape[1] <= 9
    with pytest.raises(InputError, match="raise --max-context"):
        generate(model, prompt, GenerationConfig(max_context=length))


def test_batches_replay_history_and_trim_it_to_the_context(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    texts = ["first part.", "second part.", "third part."]
    config = GenerationConfig(max_new_tokens=6, seed=1)
    long = generate_batches(model, tokenizer, texts, [], config)
    assert long.history_kept == [0, 1, 2]
    assert torch.equal(long.codes, torch.cat([r.codes for r in long.batches], dim=1))
    first, second = long.batches[0], long.batches[1]
    assert second.prompt_tokens > first.prompt_tokens + first.codes.shape[1]  # replays batch 0's text and codes
    alone = generate(model, build_prompt(tokenizer, texts[0], [], model.config.num_codebooks), config)
    assert torch.equal(alone.codes, first.codes)  # the first batch is a plain request

    limit = second.prompt_tokens + config.max_new_tokens - 1  # too small to replay batch 0 for batch 1
    tight = generate_batches(model, tokenizer, texts, [], GenerationConfig(max_new_tokens=6, seed=1, max_context=limit))
    assert tight.history_kept[1] < 1 and all(r.prompt_tokens + r.codes.shape[1] <= limit for r in tight.batches)
