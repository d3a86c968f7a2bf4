"""The planner: byte predictions against the real formats, model and codec (CPU), the decision table and its edges,
device facts, size parsing and `s2edge plan`."""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from quant.base import quantize_linear
from runtime.codec import Codec, CodecConfig, DecodeStream
from runtime.config import bundled_config
from runtime.devices import (CUDA_CONTEXT_BYTES, DESKTOP_RESERVE_BYTES, GIB, DeviceInfo, detect_device,
                             device_from_spec, find_gpu, gpu_table, parse_capability, parse_size, simulated_device)
from runtime.errors import InputError, ResourceError
from runtime.model import DualAR
from runtime.plan_cli import plan
from runtime.planner import (DEQUANT_SCRATCH, QUANTIZE_SCRATCH, PlanRequest, choose_plan, codec_decode_bytes, evaluate,
                             fallbacks, linear_bytes, margin_bytes, predict, prefill_bytes)

S2 = bundled_config("s2-pro")
CODEC = CodecConfig.load("s2pro")
HOST = 32 * GIB
S2_LINEAR_SHAPES = [(6144, 2560), (2560, 4096), (9728, 2560), (2560, 9728), (4096, 2560)]


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and still alive (storages counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors referring to it]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.live:
                if key in inputs:  # a view or in-place result of a tensor made outside the block
                    continue
                self.live[key] = [storage.nbytes(), 0]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def gpu(name: str) -> DeviceInfo:
    return device_from_spec(find_gpu(name), host_bytes=HOST)


def chosen(device: DeviceInfo, **request) -> str:
    return choose_plan(S2, device, PlanRequest(**request)).plan.name


# ---------------------------------------------------------------------------------------------------
# Byte predictions


def test_bf16_weights_equal_the_checkpoint_plus_the_head_copy():
    p = predict(S2, gpu("RTX 4090"), "bf16", "bf16", False, 4096, CODEC)
    weights = sum(p.components[k] for k in ("slow_linears", "fast_linears", "text_embeddings", "audio_embeddings",
                                            "norms", "slow_head"))
    assert weights == 9_123_704_832 + 4097 * 2560 * 2


def test_kv_cache_is_147456_bytes_a_token_plus_the_fast_slots():
    def kv(ctx: int) -> int:
        return predict(S2, gpu("RTX 4090"), "bf16", "bf16", False, ctx, CODEC).components["kv_cache"]

    fast = 2 * 4 * 8 * 128 * 2 * 10
    assert kv(4096) == 147_456 * 4096 + fast
    assert kv(8192) - kv(4096) == 147_456 * 4096
    assert kv(1) == 147_456 + fast


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_linear_bytes_match_the_quantized_layers_buffers(fmt):
    for shape in S2_LINEAR_SHAPES:
        layer = quantize_linear(torch.randn(*shape) * 0.02, fmt)
        resident = sum(t.nbytes for t in [*layer.buffers(), *layer.parameters()])
        assert linear_bytes(*shape, fmt) == resident, (fmt, shape)


def test_linear_bytes_of_float_formats_and_unknown():
    assert linear_bytes(9728, 2560, "bf16") == 9728 * 2560 * 2
    assert linear_bytes(9728, 2560, "fp32") == 9728 * 2560 * 4
    with pytest.raises(InputError, match="unknown weight format"):
        linear_bytes(8, 8, "int4")


@pytest.mark.parametrize("fmt", ["fp8", "int8", "nf4"])
def test_quantize_and_dequantize_scratch_cover_the_formats_code(fmt):
    weight = (torch.randn(9728, 2560) * 0.02).bfloat16()
    with PeakBytes() as quantizing:
        layer = quantize_linear(weight, fmt)
    x = torch.randn(1, 16, 2560).bfloat16()
    with PeakBytes() as forward:
        layer(x)
    n = weight.numel()
    output = 16 * 9728 * 2
    for measured, predicted in ((quantizing.peak, QUANTIZE_SCRATCH[fmt] * n), (forward.peak - output,
                                                                               DEQUANT_SCRATCH[fmt] * n)):
        assert measured <= predicted * 1.01 and predicted <= measured * 1.4, (fmt, measured / n, predicted / n)


def _one_layer_model(fmt: str | None) -> tuple[DualAR, object]:
    """An S2-shaped model with one slow layer and a small vocabulary (prefill peaks are per layer)."""
    c = replace(S2, slow=replace(S2.slow, n_layer=1), fast=replace(S2.fast, n_layer=1), vocab_size=4200,
                semantic_begin_id=100, semantic_end_id=4195, im_end_id=50)
    with torch.device("meta"):
        model = DualAR(c)
    legal_ids = model.legal_ids  # built on the CPU, which to_empty would overwrite
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.legal_ids = legal_ids
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.build_head()
    if fmt is not None:
        block = model.layers[0]
        for parent, name in ((block.attention, "wqkv"), (block.attention, "wo"), (block.feed_forward, "w1"),
                             (block.feed_forward, "w3"), (block.feed_forward, "w2")):
            setattr(parent, name, quantize_linear(getattr(parent, name).weight.detach(), fmt))
    return model, c


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nf4"])
def test_prefill_activations_match_the_eager_model(fmt):
    model, c = _one_layer_model(None if fmt == "bf16" else fmt)
    tokens = 512
    model.setup_caches(tokens, torch.bfloat16, "cpu")
    prompt = torch.randint(0, 4096, (1, 11, tokens))
    prompt[:, 0] = torch.randint(c.semantic_begin_id, c.semantic_end_id + 1, (1, tokens))
    with torch.inference_mode(), PeakBytes() as peak:
        model.forward_slow(prompt, 0)
    predicted = prefill_bytes(c, tokens, 2, fmt)
    assert abs(predicted - peak.peak) <= 0.05 * peak.peak, (predicted, peak.peak)


def test_codec_decode_activations_match_the_codec():
    with torch.device("meta"):
        codec = Codec(CODEC, with_encoder=False)
    codec = codec.to(torch.bfloat16)
    frames = 64
    with PeakBytes() as peak:
        DecodeStream(codec).push(torch.randint(0, 1024, (10, frames)))
    predicted = codec_decode_bytes(CODEC, frames, 2)
    assert abs(predicted - peak.peak) <= 0.05 * peak.peak, (predicted, peak.peak)


def test_codec_weights_are_the_decode_side_in_bf16():
    p = predict(S2, gpu("RTX 4090"), "bf16", "bf16", False, 4096, CODEC)
    assert p.components["codec"] == 184_381_793 * 2 and p.codec_dtype == "bf16"


def test_text_table_on_host_moves_its_bytes_to_host_ram():
    on_gpu = predict(S2, gpu("RTX 4090"), "nf4", "nf4", False, 4096, CODEC)
    on_host = predict(S2, gpu("RTX 4090"), "nf4", "nf4", True, 4096, CODEC)
    table = 155_776 * 2560 * 2
    assert on_gpu.total - on_host.total == table
    # the table no longer streams through host RAM: the next-largest tensor (codebook embeddings) does
    assert on_host.host_bytes - on_gpu.host_bytes == table + 40960 * 2560 * 2 - table


# ---------------------------------------------------------------------------------------------------
# Decisions

# Defaults (4 096-token context), GiB: bf16 10.36, 8-bit 6.61, nf4/fast-bf16 5.39, nf4 4.82, nf4+host-embed 4.08
# (0.5 CUDA context included); a simulated card has its memory minus 0.5 GiB free; margin max(5 %, 0.5 GiB).
EXPECTED = {
    "RTX 3060 12GB": ("bf16", "10.36 + 0.60 margin <= 11.50 usable"),
    "RTX 3080 10GB": ("int8", "bf16 needs 10.86 > 9.50; no FP8 on 8.6; 8-bit 7.11 fits"),
    "RTX 3080 12GB": ("bf16", "as the 3060 12GB"),
    "RTX 3090": ("bf16", "24 GiB: 10.36 + 1.20 <= 23.50"),
    "RTX 4060 Ti 16GB": ("bf16", "10.36 + 0.80 <= 15.50"),
    "RTX 4070": ("bf16", "12 GiB: 10.96 <= 11.50"),
    "RTX 4080": ("bf16", "16 GiB"),
    "RTX 4090": ("bf16", "24 GiB"),
    "RTX 5090": ("bf16", "32 GiB"),
    "RTX 5080": ("bf16", "16 GiB"),
    "RTX 5070 Ti": ("bf16", "16 GiB"),
    "RTX 5070": ("bf16", "12 GiB, as the 4070"),
    "RTX 5060 Ti 16GB": ("bf16", "16 GiB"),
    "RTX 5060 Ti 8GB": ("fp8", "8 GiB, 12.0: as the 4060"),
    "RTX 5060": ("fp8", "8 GiB, 12.0: as the 4060"),
    "RTX 3070": ("int8", "8 GiB, 8.6: bf16 10.86 > 7.50; 8-bit 7.11 <= 7.50"),
    "RTX 4060": ("fp8", "8 GiB, 8.9: 8-bit 7.10 <= 7.50"),
    "RTX 2060": (None, "6 GiB, 7.5: bf16 math attention holds [32, L, L] scores (2.0 GiB at 4k): nf4+host-embed 6.75"),
    "RTX 4070 Ti Super": ("bf16", "16 GiB"),
    "RTX 4080 Super": ("bf16", "16 GiB"),
    "RTX A4000": ("bf16", "16 GiB"),
    "RTX A5000": ("bf16", "24 GiB"),
    "RTX A6000": ("bf16", "48 GiB"),
    "T4": ("bf16", "15 GiB after ECC; no flash attention on 7.5: prefill scores 2.38, 12.49 + 0.75 <= 14.50"),
    "L4": ("bf16", "22.5 GiB after ECC"),
    "A100 40GB": ("bf16", "40 GiB"),
    "A100 80GB": ("bf16", "80 GiB"),
    "H100 80GB": ("bf16", "80 GiB"),
    "H200": ("bf16", "141 GiB"),
    "GTX 1080 Ti": (None, "compute capability 6.1 < 7.5: unsupported"),
}


def mode(device: DeviceInfo, **request) -> str | None:
    try:
        return chosen(device, **request)
    except ResourceError:
        return None


def test_expected_mode_for_every_known_card():
    assert {spec.name for spec in gpu_table()} == set(EXPECTED)
    got = {name: mode(gpu(name)) for name in EXPECTED}
    assert got == {name: expected for name, (expected, _) in EXPECTED.items()}
    # a shorter context shrinks the scores quadratically: at 2 048 nf4 fits the 2060 (5.00 + 0.50 <= 5.50)
    assert mode(gpu("RTX 2060"), max_context=2048) == "nf4"


def test_cli_gives_the_expected_mode():
    for name in ("RTX 3080 10GB", "RTX 4060", "RTX 3090"):
        result = CliRunner().invoke(plan, ["--gpu", name, "--host-ram-gb", "32"])
        assert result.exit_code == 0, result.output
        assert f"chosen    {EXPECTED[name][0]}\n" in result.output


def test_exact_fit_and_one_byte_short():
    base = gpu("RTX 4090")
    bf16 = evaluate(S2, base, PlanRequest())[0].plan
    margin = margin_bytes(base, PlanRequest())
    exact = replace(base, free_bytes=bf16.total + margin)
    assert chosen(exact) == "bf16"
    assert chosen(replace(exact, free_bytes=exact.free_bytes - 1)) == "fp8"


def test_margin_is_five_percent_or_half_a_gib():
    assert margin_bytes(gpu("RTX 3070"), PlanRequest()) == GIB // 2
    assert margin_bytes(gpu("RTX 4090"), PlanRequest()) == int(0.05 * 24 * GIB)
    assert margin_bytes(gpu("RTX 4090"), PlanRequest(vram_budget=12 * GIB)) == int(0.05 * 12 * GIB)


def test_vram_budget_caps_usable_memory():
    card = gpu("RTX 4090")
    assert chosen(card, vram_budget=12 * GIB) == "bf16"
    assert chosen(card, vram_budget=8 * GIB) == "fp8"
    assert chosen(card, vram_budget=6 * GIB) == "nf4/fast-bf16"
    assert chosen(card, vram_budget=5 * GIB) == "nf4+host-embed"
    with pytest.raises(ResourceError, match="nothing fits RTX 4090.*nf4\\+host-embed"):
        chosen(card, vram_budget=4 * GIB)
    small = gpu("RTX 3070")
    assert chosen(small, vram_budget=64 * GIB) == chosen(small)  # a budget never adds memory


def test_fast_ar_in_bf16_variant():
    choice = choose_plan(S2, gpu("RTX 4090"), PlanRequest(vram_budget=6 * GIB))
    p = choice.plan
    assert (p.slow_format, p.fast_format, p.embeddings_on_host) == ("nf4", "bf16", False)
    bf16 = predict(S2, gpu("RTX 4090"), "bf16", "bf16", False, 4096, CODEC)
    assert p.components["fast_linears"] == bf16.components["fast_linears"]
    assert [q.name for q in fallbacks(choice)] == ["nf4", "nf4+host-embed"]


def test_fast_ar_precision_overrides_every_candidate():
    names = [c.plan.name for c in evaluate(S2, gpu("RTX 4090"), PlanRequest(fast_precision="nf4"))]
    assert names == ["bf16/fast-nf4", "fp8/fast-nf4", "nf4", "nf4+host-embed"]
    names = [c.plan.name for c in evaluate(S2, gpu("RTX 4090"), PlanRequest(precision="fp8", fast_precision="bf16"))]
    assert names == ["fp8/fast-bf16"]


def test_max_context_scales_the_plan():
    card = gpu("RTX 4070")
    assert chosen(card, max_context=4096) == "bf16"
    assert chosen(card, max_context=8192) == "fp8"  # +0.56 KV cache, +0.31 prefill activations
    for bad in (0, S2.max_seq_len + 1):
        with pytest.raises(InputError, match="max context"):
            chosen(card, max_context=bad)


def test_forced_precision_that_does_not_fit():
    card = gpu("RTX 3070")
    with pytest.raises(ResourceError, match="--precision bf16 does not fit RTX 3070: bf16 needs 10.86 GiB"):
        chosen(card, precision="bf16")
    forced = choose_plan(S2, card, PlanRequest(precision="bf16", force=True))
    assert forced.plan.name == "bf16" and "forced" in forced.warning
    assert chosen(card, precision="nf4") == "nf4/fast-bf16"


def test_capability_limits():
    with pytest.raises(ResourceError, match="fp8 needs compute capability 8.9.*has 8.6: use int8"):
        chosen(gpu("RTX 3090"), precision="fp8")
    with pytest.raises(ResourceError, match="fp8 needs compute capability 8.9"):
        chosen(gpu("RTX 3090"), fast_precision="fp8")
    t4 = gpu("T4")
    assert [c.plan.name for c in evaluate(S2, t4, PlanRequest())][1] == "int8"
    with pytest.raises(ResourceError, match="compute capability 6.1; s2edge needs 7.5"):
        chosen(gpu("GTX 1080 Ti"))
    with pytest.raises(InputError, match="fp32 is for the CPU"):
        chosen(gpu("RTX 4090"), precision="fp32")


def test_pre_ampere_cards_pay_for_the_math_attention_backend():
    t4 = evaluate(S2, gpu("T4"), PlanRequest())[0].plan
    a4000 = evaluate(S2, gpu("RTX A4000"), PlanRequest())[0].plan
    scores = 2 * 32 * 4096 * 4096 * 2
    assert t4.transients["prefill"] > a4000.transients["prefill"] + scores


def test_host_ram_limits():
    card = gpu("RTX 4090")
    need = evaluate(S2, card, PlanRequest())[0].plan.host_bytes
    assert need == GIB + 155_776 * 2560 * 2  # the runtime and the largest tensor in flight
    assert chosen(replace(card, host_available_bytes=need)) == "bf16"
    short = evaluate(S2, replace(card, host_available_bytes=need - 1), PlanRequest())
    assert [c.reason for c in short[:-1]] == ["needs 1.74 GiB of host RAM, 1.74 GiB available"] * 4
    assert short[-1].reason == "needs 1.94 GiB of host RAM, 1.74 GiB available"  # the table stays in host RAM
    # only the host-table plan fits the card, and it needs the table in host RAM as well
    small = replace(card, free_bytes=int(5.4 * GIB), host_available_bytes=int(1.8 * GIB))
    with pytest.raises(ResourceError, match="nf4\\+host-embed, needs 1.94 GiB of host RAM"):
        chosen(small)


def test_cpu_plans_live_in_host_ram():
    cpu = DeviceInfo("CPU", "cpu", 64 * GIB, 48 * GIB, None, 48 * GIB, context_bytes=0)
    choice = choose_plan(S2, cpu, PlanRequest())
    assert (choice.plan.name, choice.plan.codec_dtype) == ("bf16", "fp32")
    assert "cuda_context" not in choice.plan.components
    assert chosen(cpu, precision="fp32") == "fp32"
    with pytest.raises(ResourceError, match="nf4 needs a CUDA GPU"):
        chosen(cpu, precision="nf4")
    with pytest.raises(ResourceError, match="bf16, needs .* GiB of host RAM with the"):
        chosen(replace(cpu, free_bytes=8 * GIB))


# ---------------------------------------------------------------------------------------------------
# Devices, sizes, CLI


SECTION_2 = {  # quantization.md section 2: VRAM GB, bandwidth GB/s, compute capability, FP8
    "RTX 3060 12GB": (12, 360, (8, 6), False),
    "RTX 3080 10GB": (10, 760, (8, 6), False),
    "RTX 3080 12GB": (12, 912, (8, 6), False),
    "RTX 3090": (24, 936, (8, 6), False),
    "RTX 4060 Ti 16GB": (16, 288, (8, 9), True),
    "RTX 4070": (12, 504, (8, 9), True),
    "RTX 4080": (16, 717, (8, 9), True),
    "RTX 4090": (24, 1008, (8, 9), True),
    "RTX 5090": (32, 1792, (12, 0), True),
}


def test_gpu_table_holds_the_consumer_cards():
    for name, (vram, bandwidth, capability, fp8) in SECTION_2.items():
        spec = find_gpu(name)
        assert (spec.vram_bytes, spec.bandwidth_gbs, spec.compute_capability, spec.fp8) == (
            vram * GIB, bandwidth, capability, fp8)
    assert all(spec.fp8 == (spec.compute_capability >= (8, 9)) for spec in gpu_table())


def test_find_gpu_by_loose_names():
    assert find_gpu("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert find_gpu("rtx-4060-ti-16gb").name == "RTX 4060 Ti 16GB"
    assert find_gpu("H100").name == "H100 80GB"
    with pytest.raises(InputError, match="matches several cards: RTX 3080 10GB, RTX 3080 12GB"):
        find_gpu("3080")
    assert find_gpu("RTX 5060").name == "RTX 5060"  # an exact name wins over the Ti cards it is part of
    with pytest.raises(InputError, match="matches several cards: RTX 5060 Ti 16GB, RTX 5060 Ti 8GB"):
        find_gpu("5060 Ti")
    with pytest.raises(InputError, match="unknown GPU 'RTX 4090 Mega'; did you mean RTX 4090"):
        find_gpu("RTX 4090 Mega")
    with pytest.raises(InputError, match="unknown GPU 'Radeon VII' \\(known cards"):
        find_gpu("Radeon VII")


def test_simulated_card_assumptions():
    card = gpu("RTX 4070")
    assert card.free_bytes == 12 * GIB - DESKTOP_RESERVE_BYTES and card.simulated
    assert card.context_bytes == CUDA_CONTEXT_BYTES and card.host_available_bytes == HOST
    assert gpu("T4").total_bytes == 15 * GIB  # ECC takes 1/16
    custom = simulated_device(int(9.5 * GIB), (8, 9))
    assert custom.name == "a 9.5 GiB GPU" and custom.has_fp8


def test_detect_cpu():
    cpu = detect_device(torch.device("cpu"))
    assert cpu.kind == "cpu" and cpu.free_bytes > 0 and cpu.context_bytes == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_detect_cuda_without_a_gpu():
    with pytest.raises(ResourceError, match="no CUDA GPU"):
        detect_device(torch.device("cuda"))


@pytest.mark.parametrize("text, size", [("8GB", 8 * GIB), ("8 GiB", 8 * GIB), ("7.5G", int(7.5 * GIB)),
                                        ("8000MB", 8000 << 20), ("12", 12 * GIB), (" 1.5 tb ", int(1.5 * (1 << 40)))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "8 bytes", "8B", "-1GB", "0", "8 GB 2", "1e9"])
def test_parse_size_garbage(text):
    with pytest.raises(InputError, match="size"):
        parse_size(text)


def test_parse_capability():
    assert parse_capability("8.9") == (8, 9) and parse_capability("12.0") == (12, 0)
    assert parse_capability("sm_86") == (8, 6)
    with pytest.raises(InputError, match="compute capability 'ampere'"):
        parse_capability("ampere")


def test_cli_table_reasons_and_fallbacks():
    result = CliRunner().invoke(plan, ["--gpu", "RTX 3080 10GB", "--host-ram-gb", "32"])
    out = result.output
    assert "RTX 3080 10GB (simulated): 10.00 GiB, compute capability 8.6" in out
    assert "rejected  bf16: needs 10.86 GiB with the 0.50 GiB margin, 9.50 GiB usable" in out
    assert "fallbacks nf4/fast-bf16, nf4, nf4+host-embed" in out
    header = next(line for line in out.splitlines() if line.startswith("GiB"))
    assert header.split() == ["GiB", "bf16", "*", "int8", "nf4/fast-bf16", "nf4", "nf4+host-embed"]
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:3] == ["10.36", "6.61"]


def test_cli_simulated_card_budget_and_errors():
    run = CliRunner().invoke
    result = run(plan, ["--vram-gb", "12", "--compute-capability", "8.9", "--vram-budget", "6 GiB",
                        "--host-ram-gb", "32"])
    assert result.exit_code == 0 and "chosen    nf4/fast-bf16" in result.output
    result = run(plan, ["--vram-gb", "3", "--compute-capability", "8.9", "--host-ram-gb", "32"])
    assert isinstance(result.exception, ResourceError) and "rejected  nf4+host-embed" in result.output
    for args, message in ((["--vram-gb", "12"], "go together"), (["--gpu", "RTX 4090", "--vram-gb", "8"], "one of"),
                          (["--gpu", "RTX 4090", "--vram-budget", "lots"], "size 'lots'"),
                          (["--gpu", "RTX 3090", "--precision", "fp8"], "use int8")):
        result = run(plan, args)
        assert result.exit_code != 0 and message in str(result.exception), (args, result.output)


def test_cli_help_reads_like_a_manual():
    result = CliRunner().invoke(plan, ["--help"])
    assert result.exit_code == 0
    for words in ("best quality first", "--vram-budget", "--max-context", "--fast-ar-precision", "2^30"):
        assert words in result.output
