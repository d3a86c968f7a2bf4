"""Quality regression, tiers 1 and 2 of spec/quality-protocol.md: each precision mode against bf16.

Tier 1, a tiny trained Dual-AR (CPU).

A random-init model is near-uniform and ranks formats wrongly, so a tiny model in S2's exact architecture is
trained here first (synthetic codec-like sequences: a Markov chain of semantic codes, each residual codebook a
noisy function of the previous one; 300 steps, about half a minute on 2 cores). It is checked plain and with
function-preserving outliers (an RMSNorm gain divided by 30, the consuming columns multiplied by 30), which make
the weights LLM-like. Teacher-forced, every mode's next-token distributions are compared with the bf16 run for
codebook 0 (the slow head) and codebooks 1-9 (the fast head) separately. The gate: the runtime's mean KL is at
most twice that of a reference fake quantization of the same format (the reference quantizers: bitsandbytes for
NF4, the cast rule for FP8, round-to-nearest for INT8), so the runtime is no worse than its format; naive per-row
int4 must fail the NF4 gate on the outlier variant (negative control); bf16 against fp32 stays under 1e-4 mean KL.

Tier 2, the real kernels at S2's real shapes (GPU): a model of S2 Pro's widths with random weights, plain and with
the same outliers, run one token at a time as decode runs it, where every quantized linear takes its GEMV kernel.
Per layer, every kernel is within 1e-2 of x @ the reference dequantization (a corrupted scale fails); end to end,
the same 2x gate against the fake-quant reference run through the same path.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from quant.base import swap_linears
from quant.quality import Agreement, agreement
from runtime.config import bundled_config
from runtime.model import DualAR, KVCache, run_stack
from runtime.replay import Replay, per_codebook, replay

CONFIG = bundled_config("tiny")
TEXT, FRAMES = 8, 48
C, K = CONFIG.codebook_size, CONFIG.num_codebooks
FORMATS = ("fp8", "int8", "nf4")


def codec_like_sequence(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt matrix [11, TEXT + FRAMES] (random text, then frames) and its codes [10, FRAMES]."""
    successors = torch.randint(0, C, (C, 3), generator=torch.Generator().manual_seed(7))  # the same chain always
    c0 = [int(torch.randint(0, C, (1,), generator=gen))]
    for _ in range(FRAMES - 1):
        if torch.rand(1, generator=gen).item() < 0.9:
            c0.append(int(successors[c0[-1], int(torch.randint(0, 3, (1,), generator=gen))]))
        else:
            c0.append(int(torch.randint(0, C, (1,), generator=gen)))
    codes = torch.zeros(K, FRAMES, dtype=torch.int64)
    codes[0] = torch.tensor(c0)
    for k in range(1, K):
        noise = torch.rand(FRAMES, generator=gen) < 0.15
        codes[k] = torch.where(noise, torch.randint(0, C, (FRAMES,), generator=gen), (codes[k - 1] * 5 + codes[0] + k) % C)
    tokens = torch.zeros(1 + K, TEXT + FRAMES, dtype=torch.int64)
    tokens[0, :TEXT] = torch.randint(0, 256, (TEXT,), generator=gen)
    tokens[0, TEXT:] = codes[0] + CONFIG.semantic_begin_id
    tokens[1:, TEXT:] = codes
    return tokens, codes


def teacher_forced(model: DualAR, tokens: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting frames 1..FRAMES-1: slow head [FRAMES-1, 1 + C] and fast head [FRAMES-1, K-1, C]."""
    dtype = model.embeddings.weight.dtype
    model.setup_caches(TEXT + FRAMES, dtype, "cpu")
    hidden = model.forward_slow(tokens[None], 0)[0, TEXT:TEXT + FRAMES - 1]  # [FRAMES-1, D]
    slow = model.head_logits(hidden) if model.head is not None else F.linear(
        hidden, model.embeddings.weight[model.legal_ids])  # the tied, constrained head while training
    fast = []
    for t in range(1, FRAMES):
        for layer in model.fast_layers:  # a fresh cache per frame: nothing is overwritten that autograd needs
            layer.attention.kv_cache = KVCache(CONFIG.fast.n_local_heads, K, CONFIG.fast.head_dim, dtype, "cpu")
        x = torch.cat([hidden[t - 1:t], model.fast_embeddings(codes[:K - 1, t])])[None]  # [1, K, D]: all 10 at once
        x = run_stack(model.fast_layers, model.fast_norm, x, model.fast_rope[:K], 0)
        fast.append(model.fast_logits(x)[0, 1:])  # position k predicts codebook k
    return slow, torch.stack(fast)


@pytest.fixture(scope="module")
def trained() -> DualAR:
    torch.manual_seed(0)
    model = DualAR(CONFIG)
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        tokens, codes = codec_like_sequence(gen)
        slow, fast = teacher_forced(model, tokens, codes)
        loss = F.cross_entropy(slow, 1 + codes[0, 1:]) + F.cross_entropy(fast.reshape(-1, C), codes[1:, 1:].T.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75 * 2 * torch.log(torch.tensor(float(C))).item()  # it learned something
    model.build_head()
    return model.eval()


def inject_outliers(model: DualAR) -> DualAR:
    """Same function, LLM-like weights: one input channel per norm made 30x larger in the weights reading it."""
    model = copy.deepcopy(model)
    channel = 17
    for layer in [*model.layers, *model.fast_layers]:
        for norm, consumers in ((layer.attention_norm, [layer.attention.wqkv]),
                                (layer.ffn_norm, [layer.feed_forward.w1, layer.feed_forward.w3])):
            norm.weight.data[channel] /= 30
            for linear in consumers:
                linear.weight.data[:, channel] *= 30
    return model


def fake_quant(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The reference quantize-dequantize of each format, independent of quant/."""
    w = weight.float()
    if fmt == "nf4":
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state)
    if fmt == "naive-int4":  # one scale per row, 16 uniform levels: the negative control
        scale = w.abs().amax(dim=1, keepdim=True) / 7
        return (w / scale).round().clamp(-8, 7) * scale
    if fmt == "fp8":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        return (w / scale).to(torch.float8_e4m3fn).float() * scale
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def quantized(model: DualAR, fmt: str, runtime: bool) -> DualAR:
    """bf16 model with every linear but the slow head in `fmt`: our modules (runtime) or a fake-quant reference."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    if runtime:
        swap_linears(model, lambda name, _linear: None if name == "head" else fmt)
    else:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "head":
                module.weight.data = fake_quant(module.weight.data, fmt).to(torch.bfloat16)
    return model


@torch.no_grad()
def logits(model: DualAR) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)  # held-out sequences
    runs = [teacher_forced(model, *codec_like_sequence(gen)) for _ in range(4)]
    return torch.cat([r[0] for r in runs]), torch.cat([r[1] for r in runs])


def compare(reference, test) -> tuple[Agreement, Agreement]:
    """(codebook 0, codebooks 1-9)"""
    return agreement(reference[0], test[0]), agreement(reference[1], test[1])


@pytest.mark.parametrize("variant", ["plain", "outliers"])
def test_every_mode_is_no_worse_than_its_format(trained, variant):
    base = trained if variant == "plain" else inject_outliers(trained)
    fp32 = logits(base)
    bf16 = logits(copy.deepcopy(base).to(torch.bfloat16))
    for head in compare(fp32, bf16):
        assert head.mean_kl <= 1e-4, f"bf16 vs fp32: {head}"

    reference_kl = {}
    for fmt in FORMATS:
        ours = compare(bf16, logits(quantized(base, fmt, runtime=True)))
        ref = compare(bf16, logits(quantized(base, fmt, runtime=False)))
        for head, mine, theirs in zip(("codebook 0", "codebooks 1-9"), ours, ref):
            assert mine.mean_kl <= 2 * theirs.mean_kl + 1e-6, f"{variant} {fmt} {head}: ours {mine}, reference {theirs}"
        reference_kl[fmt] = ref[0].mean_kl

    assert reference_kl["int8"] < reference_kl["nf4"] and reference_kl["fp8"] < reference_kl["nf4"]  # 8-bit beats 4-bit
    if variant == "outliers":
        # Negative control. Only here: at the tiny width (64) an NF4 block is a whole row, as naive int4's scale
        # is, so on plain weights the two differ only in where their 16 levels lie (about 1.5x in KL).
        naive = compare(bf16, logits(quantized(base, "naive-int4", runtime=False)))[0]
        assert naive.mean_kl > 2 * reference_kl["nf4"], f"negative control passed the NF4 gate: {naive}"


def test_replay_one_token_at_a_time_equals_the_whole_sequence_forward(trained):
    """runtime/replay.py (decode's path: a device position, the fast positions one by one) gives the logits of the
    whole-sequence teacher-forced forward above, and per_codebook compares them codebook by codebook."""
    tokens, codes = codec_like_sequence(torch.Generator().manual_seed(4))
    slow, fast = teacher_forced(trained, tokens, codes)  # frames 1.. from positions TEXT..
    replayed = replay(trained, tokens[:, :TEXT + 1], codes[:, 1:])
    torch.testing.assert_close(replayed.slow, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed.fast, fast, rtol=1e-4, atol=1e-4)
    same = per_codebook([replayed], [replayed])
    assert len(same) == K and all(a.mean_kl == 0 and a.same_top == 1 for a in same)
    shifted = Replay(replayed.slow, replayed.fast.clone())
    shifted.fast[:, 4] = shifted.fast[:, 4].roll(1, dims=-1)  # codebook 5 only
    moved = per_codebook([replayed], [shifted])
    assert moved[5].mean_kl > 0.1 and all(a.mean_kl == 0 for i, a in enumerate(moved) if i != 5)


def test_agreement_metric():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    same = agreement(ref, ref)
    assert same.mean_kl == pytest.approx(0, abs=1e-7) and same.same_top == 1.0
    flipped = agreement(ref, ref.flip(-1))
    assert flipped.mean_kl > 0.5 and flipped.same_top == 0.5
    with pytest.raises(ValueError, match="cannot be compared"):
        agreement(ref, ref[:1])


# ---------------------------------------------------------------------------------------------------
# Tier 2: the real kernels at the real shapes (GPU)

PROMPT, STEPS = 16, 12  # text positions, then teacher-forced frames


def real_shapes_model(outliers: bool) -> DualAR:
    """S2 Pro's widths (every linear at its real shape, the 4 097-row head, 10 codebooks of 4 096) with 2 slow and
    2 fast layers, weights N(0, 0.02) (head logits of std about 1), fp32 on the GPU."""
    s2 = bundled_config("s2-pro")
    config = dataclasses.replace(s2, slow=dataclasses.replace(s2.slow, n_layer=2),
                                 fast=dataclasses.replace(s2.fast, n_layer=2))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DualAR(config)
    model.to("cuda")  # the buffers built on the CPU
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.02)
    model = inject_outliers(model) if outliers else model
    model.build_head()
    return model.eval()


def s2_sequence(config, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random text prompt [11, PROMPT] and random frames after it, codes [10, STEPS]."""
    prompt = torch.zeros(1 + config.num_codebooks, PROMPT, dtype=torch.int64)
    prompt[0] = torch.randint(0, config.semantic_begin_id, (PROMPT,), generator=gen)
    return prompt, torch.randint(0, config.codebook_size, (config.num_codebooks, STEPS), generator=gen)


def decoded_logits(model: DualAR) -> tuple[torch.Tensor, torch.Tensor]:
    """Two held-out sequences replayed one token at a time as decode runs a frame (runtime/replay.py): slow logits
    [2 STEPS, 4 097], fast [2 STEPS, 9, 4 096]."""
    gen = torch.Generator().manual_seed(99)
    runs = [replay(model, *s2_sequence(model.config, gen)) for _ in range(2)]
    return torch.cat([r.slow for r in runs]), torch.cat([r.fast for r in runs])


def layer_errors(model: DualAR, float_model: DualAR, fmt: str) -> dict[str, float]:
    """Every quantized linear of `model` on one token (its GEMV kernel) against x @ the reference dequantization of
    the same layer's weight in `float_model`: relative Frobenius error per layer. x has one outlier feature, as
    the normed activations of LLM-like models do."""
    from quant.base import QuantizedLinear

    errors = {}
    gen = torch.Generator(device="cuda").manual_seed(5)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        x = torch.randn(1, 1, module.in_features, generator=gen, device="cuda")
        x[..., 17] *= 30
        x = x.to(torch.bfloat16)
        assert module.gemv_applies(x), f"{name}: the kernel path does not apply"
        reference = x.float() @ fake_quant(float_model.get_submodule(name).weight, fmt).T
        errors[name] = ((module(x).float() - reference).norm() / reference.norm()).item()
    return errors


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["plain", "outliers"])
def test_real_kernels_at_real_shapes_are_no_worse_than_their_format(variant):
    base = real_shapes_model(outliers=variant == "outliers")
    float_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    bf16 = decoded_logits(float_bf16)
    reference_kl = {}
    for fmt in FORMATS:
        ours_model = quantized(base, fmt, runtime=True)
        errors = layer_errors(ours_model, float_bf16, fmt)
        assert len(errors) == 4 * 5 + 1 and max(errors.values()) <= 1e-2, f"{variant} {fmt}: {errors}"
        ours = compare(bf16, decoded_logits(ours_model))
        del ours_model
        ref = compare(bf16, decoded_logits(quantized(base, fmt, runtime=False)))
        for head, mine, theirs in zip(("codebook 0", "codebooks 1-9"), ours, ref):
            assert theirs.mean_kl > 1e-4, f"{variant} {fmt} {head}: the format barely moves the logits: {theirs}"
            assert mine.mean_kl <= 2 * theirs.mean_kl, f"{variant} {fmt} {head}: ours {mine}, reference {theirs}"
        reference_kl[fmt] = ref[0].mean_kl
    assert reference_kl["int8"] < reference_kl["nf4"] and reference_kl["fp8"] < reference_kl["nf4"]
    if variant == "outliers":  # negative control of the end-to-end gate, as in tier 1
        naive = compare(bf16, decoded_logits(quantized(base, "naive-int4", runtime=False)))[0]
        assert naive.mean_kl > 2 * reference_kl["nf4"], f"negative control passed the NF4 gate: {naive}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
def test_per_layer_gate_catches_a_wrong_scale(fmt):
    """Negative control of the per-layer gate: one layer's scales 3 % off (a kernel reading the wrong block's
    scale errs by more) fails it, the others pass."""
    base = real_shapes_model(outliers=False)
    float_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    model = quantized(base, fmt, runtime=True)
    wo = model.layers[1].attention.wo
    (wo.absmax if fmt == "nf4" else wo.scale).mul_(1.03)
    errors = layer_errors(model, float_bf16, fmt)
    assert errors.pop("layers.1.attention.wo") > 1e-2
    assert max(errors.values()) <= 1e-2
