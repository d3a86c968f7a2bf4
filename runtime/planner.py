"""Choosing how S2 Pro fits a device: the precision of each part, where the text table lives, and the bytes of all.

Every candidate plan is predicted component by component from the model configuration (shapes from
`checkpoint.expected_shapes`, quantized layers from the formats' real storage), and the best-quality plan that fits
with a safety margin is chosen. Preference order on a GPU: bf16; 8-bit (FP8 on compute capability 8.9+, INT8
below); NF4 with the fast AR in bf16; NF4 everywhere; NF4 with the 155 776-row text table in host RAM (it is read
only at prefill; decode needs just the 4 097 legal head rows, which stay on the GPU).

What is counted, in bytes on the device:
- weights: linears by format, the bf16 embedding tables, the bf16 copy of the 4 097 legal head rows, the norms;
- the KV cache for `max_context` tokens (slow AR, 147 456 B a token for S2 Pro) and the fast AR's 10 slots;
- RoPE tables and the legal-id list;
- the decode side of the codec in bf16 (fp32 on the CPU);
- a workspace: the largest of three peaks that never coincide: prefill activations of a whole-context prompt,
  decoding one codec chunk, and quantizing the largest layer at load (the codec's warm-up beside the load decodes
  one frame: 2 MB for S2 Pro's codec, inside the margin);
- the decode graph pool and library workspaces (a GPU);
- the CUDA context (devices.CUDA_CONTEXT_BYTES for a fresh process; devices.LIBRARY_LOAD_BYTES when the card was
  measured, since measuring created the context).
The margin for fragmentation is 5 % of the card (or of --vram-budget if smaller), at least 0.5 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

from runtime.checkpoint import expected_shapes
from runtime.codec import DECODE_CHUNK_FRAMES, Codec, CodecConfig
from runtime.config import ModelConfig
from runtime.devices import GIB, DeviceInfo
from runtime.errors import InputError, ResourceError
from runtime.meta import meta_device

PRECISIONS = ("auto", "bf16", "fp8", "int8", "nf4", "fp32")
LINEAR_FORMATS = ("bf16", "fp8", "int8", "nf4", "fp32")
QUANTIZED = ("fp8", "int8", "nf4")
FLOAT_BYTES = {"bf16": 2, "fp32": 4}
MIN_CAPABILITY = (7, 5)
# sm_80: where our GEMV kernels run (quant.kernels.kernels_supported; below it every quantized linear
# dequantizes its weight per call) and where SDPA has bf16 flash attention (below it the math backend
# materializes the scores).
AMPERE = (8, 0)

MARGIN_FRACTION = 0.05
MIN_MARGIN_BYTES = GIB // 2
# Host RAM for Python, torch, the tokenizer and the small tensors formats keep on the host (NF4's stored-form
# scales, about 1/64 byte a weight); loading also holds the largest checkpoint tensor in flight.
RUNTIME_HOST_BYTES = GIB
# The decode graph's private pool (one frame's intermediates at batch 1: a few MiB) and the cuBLAS workspaces of
# the default and capture streams.
DECODE_GRAPH_BYTES = 128 << 20
# Scratch bytes per weight element besides the layer's own tensors, measured against quant/*.py by the tests:
# quantizing at load (fp8: w / scale in fp32 then 1-byte codes; int8: the same division, round and clamp, each
# fp32; nf4: bitsandbytes' packed output and fp32 block scales), and multiplying by the dequantized weight, which
# the prefill takes for more than one token (8-bit: fp32 codes, fp32 product; nf4: the bf16 weight and the block
# scales in fp32).
NF4_BLOCK = 64  # quant/nf4.py BLOCKSIZE
QUANTIZE_SCRATCH = {"fp8": 5, "int8": 12, "nf4": 1}
DEQUANT_SCRATCH = {"fp8": 8, "int8": 8, "nf4": 2 + 4 / NF4_BLOCK}


def linear_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Resident bytes of one bias-free linear [out, in] in `fmt`: the sum of the module's buffers.

    - bf16 / fp32: the weight.
    - fp8 / int8 (quant/base.py RowScaledLinear): `weight` 1 byte an element, `scale` fp32 [out, 1].
    - nf4 (quant/nf4.py NF4Linear): `weight` two 4-bit codes a byte, `absmax` one fp16 scale per block of 64 and
      `code` 16 fp32 values. The file's double-quantized scales (1 byte a block plus nested fp32 ones) are expanded
      once at load, so the GPU holds 4.25 bits a weight where the file holds 4.13. (The scales would be fp32 if one
      fell outside fp16's normal range, which trained weights do not.)
    """
    n = out_features * in_features
    if fmt in FLOAT_BYTES:
        return n * FLOAT_BYTES[fmt]
    if fmt in ("fp8", "int8"):
        return n + 4 * out_features
    if fmt == "nf4":
        return (n + 1) // 2 + 2 * -(-n // NF4_BLOCK) + 16 * 4
    raise InputError(f"unknown weight format '{fmt}' (choose one of {', '.join(LINEAR_FORMATS)})")


def prefill_bytes(config: ModelConfig, tokens: int, act_bytes: int, fmt: str, flash: bool = True) -> int:
    """Peak activations of one slow-AR forward over `tokens` prompt positions (the eager model, layer by layer).

    The largest of: the embedding (the 10 codebook rows of every position gathered before their sum); attention
    (block input and its norm, fused qkv, QK-normed q and k, and RoPE of q in fp32: its float copy and the two
    rotated halves); the FFN (block input, residual, norm, and three [L, intermediate] tensors: SiLU(gate), up,
    product); and, for a quantized format, the FFN's inputs and one intermediate while an [intermediate, dim]
    weight is dequantized, or two while it multiplies. With `flash` (CUDA sm_80+, the CPU) SDPA holds no [L, L] scores; without it (bf16 on
    sm_75 has neither flash nor memory-efficient kernels) the math backend adds the scores and their softmax for
    every head, and K and V repeated to all heads.
    """
    s = config.slow
    q, kv = s.n_head * s.head_dim, s.n_local_heads * s.head_dim
    embed = act_bytes * (config.num_codebooks + 2) * config.dim
    attention = act_bytes * (2 * s.dim + s.qkv_rows + q + kv) + 3 * 4 * q
    ffn = act_bytes * (3 * s.dim + 3 * s.intermediate_size)
    peak = max(embed, attention, ffn) * tokens
    if not flash:
        peak = max(peak, attention * tokens + act_bytes * s.n_head * tokens * (2 * tokens + 2 * s.head_dim))
    if fmt in QUANTIZED:
        n = s.intermediate_size * s.dim
        dequantizing = act_bytes * (3 * s.dim + s.intermediate_size) * tokens + int(DEQUANT_SCRATCH[fmt] * n)
        multiplying = act_bytes * (3 * s.dim + 2 * s.intermediate_size) * tokens + act_bytes * n
        peak = max(peak, dequantizing, multiplying)
    return peak


def codec_decode_bytes(codec: CodecConfig, frames: int, dtype_bytes: int) -> int:
    """Peak activations decoding `frames` frames in one piece. The last decoder block runs at the audio rate
    with the narrowest width; four such tensors are alive in its residual units (input, Snake output,
    convolution output, sum), and narrower ones add about 6 % (measured by the tests)."""
    width = codec.decoder_dim >> len(codec.decoder_rates)
    return int(4.25 * frames * codec.frame_length * width * dtype_bytes)


@cache
def codec_decode_parameters(codec: CodecConfig) -> int:
    """Parameters of the decode-only codec (post_module, upsample, codebooks and output projections, decoder)."""
    with meta_device():
        model = Codec(codec, with_encoder=False)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class PlanRequest:
    """What the caller asks for. `vram_budget`: use at most this many bytes (to share the card, or to behave
    like a smaller one); on the CPU it limits host RAM. `force`: take a forced precision even if it is predicted
    not to fit."""

    precision: str = "auto"
    fast_precision: str | None = None
    max_context: int = 4096
    vram_budget: int | None = None
    force: bool = False


@dataclass(frozen=True)
class Plan:
    """One way to run the model, with its predicted memory."""

    name: str
    slow_format: str
    fast_format: str  # fast AR linears and its 4096-row head
    embeddings_on_host: bool  # the text embedding table in host RAM (prefill only)
    max_context: int  # KV-cache tokens: prompt + generated frames
    device_kind: str  # "cuda" or "cpu": where `components` live
    codec_dtype: str
    components: dict[str, int] = field(compare=False)  # bytes on the device, by component
    transients: dict[str, int] = field(compare=False)  # time-disjoint peaks; the largest is components["workspace"]
    host_bytes: int = 0  # host RAM a GPU plan needs (a CPU plan's is its total)

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    reason: str | None  # why it was rejected; None if it fits

    @property
    def fits(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    candidates: tuple[Candidate, ...]  # in preference order, the chosen one included
    device: DeviceInfo
    usable_bytes: int
    margin_bytes: int
    warning: str | None = None  # set when a forced plan was taken although predicted not to fit


def plan_name(slow: str, fast: str, on_host: bool) -> str:
    name = slow if fast == slow else f"{slow}/fast-{fast}"
    return name + ("+host-embed" if on_host else "")


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def margin_bytes(device: DeviceInfo, request: PlanRequest) -> int:
    capacity = device.total_bytes if request.vram_budget is None else min(device.total_bytes, request.vram_budget)
    return max(int(MARGIN_FRACTION * capacity), MIN_MARGIN_BYTES)


def usable_bytes(device: DeviceInfo, request: PlanRequest) -> int:
    return device.free_bytes if request.vram_budget is None else min(device.free_bytes, request.vram_budget)


def _check_format(fmt: str, device: DeviceInfo, what: str) -> None:
    if not device.is_cuda:
        if fmt not in FLOAT_BYTES:
            raise ResourceError(f"{what} {fmt} needs a CUDA GPU (bitsandbytes and our kernels); on the CPU use bf16 "
                                "or fp32")
    elif fmt == "fp32":
        raise InputError(f"{what} fp32 is for the CPU; on a GPU use bf16")
    elif fmt == "fp8" and not device.has_fp8:
        major, minor = device.compute_capability
        raise ResourceError(f"{what} fp8 needs compute capability 8.9 or newer (FP8 tensor cores); {device.name} "
                            f"has {major}.{minor}: use int8, the 8-bit mode for this card")


def formats(device: DeviceInfo, request: PlanRequest) -> list[tuple[str, str, bool]]:
    """(slow format, fast format, text table on host) for every candidate, best quality first."""
    if request.precision not in PRECISIONS:
        raise InputError(f"unknown precision '{request.precision}' (choose one of {', '.join(PRECISIONS)})")
    if request.fast_precision is not None and request.fast_precision not in LINEAR_FORMATS:
        raise InputError(f"unknown fast-AR precision '{request.fast_precision}' "
                         f"(choose one of {', '.join(LINEAR_FORMATS)})")
    if device.is_cuda:
        if device.compute_capability < MIN_CAPABILITY:
            major, minor = device.compute_capability
            raise ResourceError(f"{device.name} has compute capability {major}.{minor}; s2edge needs 7.5 or newer "
                                "(Turing, RTX 20xx / T4, and later)")
        eight = "fp8" if device.has_fp8 else "int8"
        order = [("bf16", "bf16", False), (eight, eight, False), ("nf4", "bf16", False), ("nf4", "nf4", False),
                 ("nf4", "nf4", True)]
    else:
        order = [("bf16", "bf16", False)]
    if request.precision != "auto":
        _check_format(request.precision, device, "precision")
        order = [o for o in order if o[0] == request.precision] or [(request.precision, request.precision, False)]
    if request.fast_precision is not None:
        _check_format(request.fast_precision, device, "fast-AR precision")
        order = list(dict.fromkeys((slow, request.fast_precision, host) for slow, _, host in order))
    return order


def _weights(config: ModelConfig, slow: str, fast: str, on_host: bool, act: int
             ) -> tuple[dict[str, int], list[tuple[int, str]], int]:
    """Weight bytes on the device by component, (elements, format) of every linear, and the elements of the
    largest checkpoint tensor that loading streams through host RAM without keeping it there."""
    weights = dict.fromkeys(("slow_linears", "fast_linears", "text_embeddings", "audio_embeddings", "norms"), 0)
    linears: list[tuple[int, str]] = []
    largest_read = 0
    for key, shape in expected_shapes(config).items():
        n = shape[0] * (shape[1] if len(shape) == 2 else 1)
        if key == "embeddings.weight":
            weights["text_embeddings"] = 0 if on_host else n * act
            largest_read = max(largest_read, 0 if on_host else n)
            continue
        largest_read = max(largest_read, n)
        if len(shape) == 1:
            weights["norms"] += n * act
        elif key.startswith("layers."):
            weights["slow_linears"] += linear_bytes(*shape, slow)
            linears.append((n, slow))
        elif key.startswith("fast_layers.") or key == "fast_output.weight":
            weights["fast_linears"] += linear_bytes(*shape, fast)
            linears.append((n, fast))
        else:
            weights["audio_embeddings"] += n * act
    return weights, linears, largest_read


def predict(config: ModelConfig, device: DeviceInfo, slow: str, fast: str, on_host: bool, max_context: int,
            codec: CodecConfig) -> Plan:
    """The bytes of every component of one plan."""
    act = FLOAT_BYTES["fp32" if slow == "fp32" else "bf16"]  # activations, KV cache and float weights
    gpu = device.is_cuda
    ampere = not gpu or device.compute_capability >= AMPERE
    codec_bytes = 2 if gpu else 4
    weights, linears, largest_read = _weights(config, slow, fast, on_host, act)
    s, f = config.slow, config.fast
    legal_rows = 1 + config.num_semantic
    kv = 2 * act * (s.n_layer * s.n_local_heads * s.head_dim * max_context
                    + f.n_layer * f.n_local_heads * f.head_dim * config.num_codebooks)
    buffers = 2 * (s.head_dim * max_context + f.head_dim * config.num_codebooks) + 8 * legal_rows
    quantized = [(n, fmt) for n, fmt in linears if fmt in QUANTIZED]
    transients = {
        "prefill": prefill_bytes(config, max_context, act, slow, flash=ampere),
        "codec_decode": codec_decode_bytes(codec, DECODE_CHUNK_FRAMES, codec_bytes),
        # quantizing at load: the bf16 layer and its scratch; fp32 on the CPU: the bf16 tensor as read
        "load": max([(2 + QUANTIZE_SCRATCH[fmt]) * n for n, fmt in quantized]
                    + [2 * largest_read if slow == "fp32" else 0]),
    }
    components = {
        **weights,
        "slow_head": legal_rows * config.dim * act,
        "kv_cache": kv,
        "buffers": buffers,
        "codec": codec_decode_parameters(codec) * codec_bytes,
        "workspace": max(transients.values()),
    }
    if gpu:
        # Before sm_80 a decode step dequantizes each quantized weight and repeats a layer's K and V to all heads.
        per_call = 0 if ampere else (max([int(DEQUANT_SCRATCH[fmt] * n) for n, fmt in quantized], default=0)
                                     + 2 * act * s.n_head * s.head_dim * max_context)
        components["decode_graphs"] = DECODE_GRAPH_BYTES + per_call
        components["cuda_context"] = device.context_bytes
        host = RUNTIME_HOST_BYTES + 2 * largest_read + (2 * config.vocab_size * config.dim if on_host else 0)
    else:
        components["runtime"] = RUNTIME_HOST_BYTES
        host = 0
    return Plan(
        name=plan_name(slow, fast, on_host),
        slow_format=slow,
        fast_format=fast,
        embeddings_on_host=on_host,
        max_context=max_context,
        device_kind=device.kind,
        codec_dtype="bf16" if gpu else "fp32",
        components=components,
        transients=transients,
        host_bytes=host,
    )


def _reject(plan: Plan, device: DeviceInfo, usable: int, margin: int) -> str | None:
    need = plan.total + margin
    where = "" if device.is_cuda else " of host RAM"
    if need > usable:
        return f"needs {gib(need)} GiB{where} with the {gib(margin)} GiB margin, {gib(usable)} GiB usable"
    if plan.host_bytes > device.host_available_bytes:
        return f"needs {gib(plan.host_bytes)} GiB of host RAM, {gib(device.host_available_bytes)} GiB available"
    return None


def evaluate(config: ModelConfig, device: DeviceInfo, request: PlanRequest,
             codec: CodecConfig | None = None) -> tuple[Candidate, ...]:
    """Every candidate for the request, best quality first, each with the reason it does not fit (or None)."""
    if not 1 <= request.max_context <= config.max_seq_len:
        raise InputError(f"max context {request.max_context} must be between 1 and the model's {config.max_seq_len}")
    if request.vram_budget is not None and request.vram_budget <= 0:
        raise InputError("the memory budget must be positive")
    codec = codec or CodecConfig.load("s2pro")
    usable, margin = usable_bytes(device, request), margin_bytes(device, request)
    candidates = []
    for slow, fast, on_host in formats(device, request):
        plan = predict(config, device, slow, fast, on_host, request.max_context, codec)
        candidates.append(Candidate(plan, _reject(plan, device, usable, margin)))
    return tuple(candidates)


def choose_plan(config: ModelConfig, device: DeviceInfo, request: PlanRequest = PlanRequest(),
                codec: CodecConfig | None = None) -> PlanChoice:
    """The best-quality plan that fits the device (see `pick`)."""
    return pick(evaluate(config, device, request, codec), device, request)


def pick(candidates: tuple[Candidate, ...], device: DeviceInfo, request: PlanRequest) -> PlanChoice:
    """The first candidate that fits. If none does: a forced precision with `request.force` is taken with a
    warning; otherwise ResourceError names the shortfall of the smallest candidate."""
    fitting = [c for c in candidates if c.fits]
    best = candidates[0]
    choice = PlanChoice((fitting[0] if fitting else best).plan, candidates, device, usable_bytes(device, request),
                        margin_bytes(device, request))
    if fitting:
        return choice
    smallest = candidates[-1]
    if request.precision == "auto":
        raise ResourceError(f"nothing fits {device.name}: the smallest plan, {smallest.plan.name}, "
                            f"{smallest.reason}; lower --max-context or free memory")
    if request.force:
        return replace(choice, warning=f"{best.plan.name} {best.reason}: forced, it may run out of memory")
    raise ResourceError(f"--precision {request.precision} does not fit {device.name}: {smallest.plan.name} "
                        f"{smallest.reason}; use --precision auto, a smaller --max-context, or --force to try anyway")


def fallbacks(choice: PlanChoice) -> tuple[Plan, ...]:
    """The plans to try, in order, if the chosen one runs out of memory while loading: the smaller ones that are
    predicted to fit."""
    plans = [c.plan for c in choice.candidates]
    later = choice.candidates[plans.index(choice.plan) + 1:]
    return tuple(c.plan for c in later if c.fits)
