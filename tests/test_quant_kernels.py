"""Our Triton GEMVs against the layer's own dequantized weight.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py
before Triton is imported), with fixed tiles; with CUDA the same tests run compiled, and the `cuda` tests add the
first-call choice, the layers' dispatch and CUDA-graph replay. Everything here skips where Triton is not installed (CI).
Note: the interpreter truncates fp32 -> bf16 instead of rounding, so bf16 outputs there carry about 2x the usual
rounding error (still far inside the 1 % gate); fp32 inputs give a tight check.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")

from conftest import assert_graph_replays_eager  # noqa: E402
from quant.base import error_stats, quantize_linear  # noqa: E402
from quant.kernels.gemv8 import gemv8  # noqa: E402
from quant.kernels import gemv_nf4_ptx  # noqa: E402
from quant.kernels.gemv_nf4 import gemv_nf4  # noqa: E402
from quant.kernels.tiles import Tile, cold_copies, cold_copy_count  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _tile(wide: Tile) -> Tile:
    """Wide tiles in the interpreter (its cost grows with the number of programs, not their size); a real one
    on the GPU, where a wide tile would not fit in registers."""
    return Tile(4, 256, 1) if CUDA else wide


# (out, in, tile): ragged rows and K (neither a multiple of the tile), K a multiple of the tile, then two real
# S2 shapes (the tall-K w2 with a ragged last step; the 4 097-row head with whole steps).
SHAPES = [
    (37, 320, _tile(Tile(8, 256, 1))),
    (130, 1088, _tile(Tile(16, 512, 2))),
    (64, 512, _tile(Tile(8, 256, 1))),
    (2560, 9728, _tile(Tile(128, 2048, 8))),
    (4097, 2560, _tile(Tile(128, 512, 2))),
]
SHAPE_IDS = [f"{n}x{k}" for n, k, _ in SHAPES]


def _layer(fmt: str, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_linear((torch.randn(n, k, generator=gen) * 0.02).bfloat16(), fmt).to(DEVICE)


def _run(layer, x: torch.Tensor, tile: Tile | None, fp8_bits: bool | None = None) -> torch.Tensor:
    if layer.format == "nf4":
        n, k = layer.out_features, layer.in_features
        return gemv_nf4(x, layer.weight.view(n, k // 2), layer.absmax.view(n, k // layer.blocksize), layer.code,
                        layer.blocksize, tile=tile)
    return gemv8(x, layer.weight, layer.scale, fp8_bits=fp8_bits, tile=tile)


VARIANTS = [("nf4", None), ("fp8", False), ("fp8", True), ("int8", None)]
VARIANT_IDS = ["nf4", "fp8-native", "fp8-bits", "int8"]


def _native_fp8() -> bool:
    """The interpreter converts FP8 on any CPU; Triton compiles the conversion for sm_89+ only."""
    return not CUDA or torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("fmt, fp8_bits", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("n, k, tile", SHAPES, ids=SHAPE_IDS)
def test_kernel_matches_dequantized_weight(fmt, fp8_bits, n, k, tile):
    if fmt == "fp8" and fp8_bits is False and not _native_fp8():
        pytest.skip("no native FP8 conversion before sm_89")
    layer = _layer(fmt, n, k)
    w = layer.dequantize(torch.float32)
    x = torch.randn(k, device=DEVICE)
    exact = error_stats(_run(layer, x, tile, fp8_bits), x @ w.T)  # fp32 in, fp32 out: only summation order
    assert exact.rel_fro < 1e-5, exact
    xb = x.bfloat16()
    y = _run(layer, xb, tile, fp8_bits)
    assert y.dtype == torch.bfloat16 and y.shape == (n,)
    stats = error_stats(y, xb.float() @ w.T)
    assert stats.ok(), stats


@pytest.mark.parametrize("fmt, fp8_bits", VARIANTS, ids=VARIANT_IDS)
def test_corrupted_scale_fails(fmt, fp8_bits):
    """Negative control: the kernel reading scales shifted by one row/block no longer passes."""
    if fmt == "fp8" and fp8_bits is False and not _native_fp8():
        pytest.skip("no native FP8 conversion before sm_89")
    n, k, tile = SHAPES[1]
    layer = _layer(fmt, n, k)
    w = layer.dequantize(torch.float32)
    scales = layer.absmax if fmt == "nf4" else layer.scale
    scales.copy_(scales.roll(1, 0))
    x = torch.randn(k, device=DEVICE)
    assert not error_stats(_run(layer, x, tile, fp8_bits), x @ w.T).ok()


def test_fp8_bit_decode_is_exact_for_every_code():
    """All 254 finite e4m3fn codes (subnormals, zero, both signs) through both decoders."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~codes.float().isnan()
    weight = codes[finite].reshape(-1, 1).repeat(1, 16).contiguous().to(DEVICE)  # [254, 16]
    scale = torch.ones(weight.shape[0], 1, device=DEVICE)
    x = torch.zeros(16, device=DEVICE)
    x[3] = 1.0
    for bits in (False, True) if _native_fp8() else (True,):
        y = gemv8(x, weight, scale, fp8_bits=bits, tile=Tile(16, 16, 1))
        assert torch.equal(y.cpu(), codes[finite].float()), f"fp8_bits={bits}"


def test_nf4_fp32_scales():
    """Scales outside fp16's normal range are kept in fp32; the kernel reads either."""
    gen = torch.Generator().manual_seed(1)
    layer = quantize_linear(torch.randn(64, 512, generator=gen) * 1e-6, "nf4").to(DEVICE)
    assert layer.absmax.dtype == torch.float32
    x = torch.randn(512, device=DEVICE)
    assert error_stats(_run(layer, x, Tile(16, 256, 1)), x @ layer.dequantize().T).rel_fro < 1e-5


_SHUFFLE_TILES = [Tile(1, 256, 1), Tile(2, 128, 1), Tile(4, 256, 1), Tile(2, 512, 2)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n, k, tile", [
    (n, k, tile) for n, k in [(37, 320), (130, 1088), (2560, 9728)] for tile in _SHUFFLE_TILES
    if (k, tile.block_k) != (9728, 128)  # 76 unrolled steps: an 84 s compile on the H100 host, a tile no plan uses
], ids=lambda v: f"{v.block_n}x{v.block_k}w{v.num_warps}" if isinstance(v, Tile) else str(v))
def test_nf4_shuffle_lookup(n, k, tile):
    """The shuffle lookup (inline asm, compiled only) in several thread layouts, ragged shapes included: equal to
    the gather lookup up to summation order, and to the dequantized reference; a shuffled code table fails."""
    layer = _layer("nf4", n, k)
    args = (layer.weight.view(n, k // 2), layer.absmax.view(n, k // layer.blocksize), layer.code, layer.blocksize)
    x = torch.randn(k, device=DEVICE).bfloat16()
    y = gemv_nf4(x, *args, tile=tile, shuffle=True)
    gathered = gemv_nf4(x, *args, tile=tile, shuffle=False)
    assert error_stats(y, gathered).rel_fro < 5e-3
    assert error_stats(y, x.float() @ layer.dequantize().T).ok()
    wrong = gemv_nf4(x, args[0], args[1], layer.code.roll(1), layer.blocksize, tile=tile, shuffle=True)
    assert not error_stats(wrong, x.float() @ layer.dequantize().T).ok()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fmt", ["nf4", "fp8", "int8"])
@pytest.mark.parametrize("n, k", [(6144, 2560), (2560, 4096), (9728, 2560), (2560, 9728), (4096, 2560), (4097, 2560)])
def test_layer_dispatch_choice_and_graph_replay(fmt, n, k):
    """On the GPU: one-token forward takes the kernel, chooses its configuration, then replays correctly in a CUDA
    graph."""
    layer = _layer(fmt, n, k)
    x = torch.randn(1, 1, k, device=DEVICE, dtype=torch.bfloat16)
    assert layer.gemv_applies(x)
    ref = x.float().reshape(1, k) @ layer.dequantize().T
    eager = layer(x)  # the first call chooses the configuration: before capture
    assert eager.shape == (1, 1, n) and error_stats(eager, ref).ok()
    assert_graph_replays_eager(layer, x)
    prefill = torch.randn(7, k, device=DEVICE, dtype=torch.bfloat16)  # more tokens: dequantize + matmul
    assert not layer.gemv_applies(prefill)
    assert error_stats(layer(prefill), prefill.float() @ layer.dequantize().T).ok()


def _random_nf4(n: int, k: int, blocksize: int, scale_dtype: torch.dtype, seed: int = 0):
    """Random packed codes and scales in bitsandbytes' layout, and their dequantized weight [N, K] fp32 (written
    from the layout's definition: the high nibble of byte j is column 2j)."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    absmax = (torch.rand(n, k // blocksize, generator=gen) + 0.5).to(scale_dtype)
    code = _layer("nf4", 16, 64).code.cpu()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(n, k).long()
    weight = code[nibbles] * absmax.float().repeat_interleave(blocksize, dim=1)
    return packed.to(DEVICE), absmax.to(DEVICE), code.to(DEVICE), weight.to(DEVICE)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("plan", [*gemv_nf4_ptx.PLANS, gemv_nf4_ptx.Plan(1, 1, 8), gemv_nf4_ptx.Plan(1, 4, 4),
                                  gemv_nf4_ptx.Plan(2, 2, 8, 2, rows_first=True, loads_by_row=True, max_registers=96)],
                         ids=str)
@pytest.mark.parametrize("n, k, blocksize, scale_dtype", [
    (37, 2048, 64, torch.float16), (4097, 2560, 64, torch.float16), (2560, 4096, 32, torch.float32),
    (130, 9728, 128, torch.float16)])
def test_nf4_ptx_kernel(plan, n, k, blocksize, scale_dtype):
    """The generated-PTX kernel (compiled only) in every plan against the layout's own dequantization, odd row
    counts, other block sizes and fp32 scales included; a rotated code table fails; a graph replay is exact."""
    if not plan.fits(k):
        pytest.skip(f"K {k} is not a multiple of {plan.warps} x 512")
    packed, absmax, code, weight = _random_nf4(n, k, blocksize, scale_dtype)
    words = packed.view(torch.int32)
    x = torch.randn(k, device=DEVICE).bfloat16()
    y = gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code, blocksize, plan)
    assert error_stats(y, x.float() @ weight.T).ok()
    wrong = gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code.roll(1), blocksize, plan)
    assert not error_stats(wrong, x.float() @ weight.T).ok()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code, blocksize, plan)
    x.copy_(torch.randn_like(x))
    expected = gemv_nf4_ptx.gemv_nf4_ptx(x, words, absmax, code, blocksize, plan)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rows, chains, scale_f32", [(2, 1, False), (2, 2, True), (1, 1, False)])
def test_nf4_ptx_orders_only_reorder_the_work(rows, chains, scale_f32):
    """Rows first and loads by row reorder the generated PTX: the same loads (each unit's x once), lookups and sums
    (a dropped or repeated unit changes the multiset); only where x sits and how often it is unpacked differ."""

    def work(ptx: str) -> list[str]:
        kept = [line for line in ptx.splitlines() if not line.startswith((".reg", "{", "}", "shl.b32 xl", "and.b32 xh"))]
        return sorted(re.sub(r"\bp\d+\b", "p", line) for line in kept)  # x registers: p0..p7 per unit or p8i+j

    unit_order = gemv_nf4_ptx.row_slice_ptx(2560, 64, rows, scale_f32, chains)
    assert sum("ld.global.nc.v4.b32" in line for line in unit_order.splitlines()) == 2 * 5
    for rows_first, loads_by_row in [(True, False), (False, True), (True, True)]:
        other = gemv_nf4_ptx.row_slice_ptx(2560, 64, rows, scale_f32, chains, rows_first, loads_by_row)
        assert work(other) == work(unit_order)
        assert (other != unit_order) == (rows > 1 or rows_first)


@pytest.mark.cuda
@requires_cuda
def test_nf4_ptx_preconditions():
    """Misaligned or non-bf16 x, or K not in whole 512-column steps, never reach the PTX kernel."""
    x = torch.randn(4097, device=DEVICE).bfloat16()
    assert gemv_nf4_ptx.accepts(x[:2560], 2560, 64)
    assert not gemv_nf4_ptx.accepts(x[1:2561], 2560, 64)  # 2-byte offset
    assert not gemv_nf4_ptx.accepts(x[:2560].float(), 2560, 64)
    assert not gemv_nf4_ptx.accepts(x[:2560 - 64], 2560 - 64, 64)
    assert not gemv_nf4_ptx.accepts(x[:2560], 2560, 1024)
    layer = _layer("nf4", 64, 2560)
    args = (layer.weight.view(64, 1280), layer.absmax.view(64, 40), layer.code, layer.blocksize)
    shifted = x[1:2561]  # the dispatcher copies it to an aligned buffer and stays correct
    assert error_stats(gemv_nf4(shifted, *args), shifted.float() @ layer.dequantize().T).ok()


def test_cold_copy_count_fills_l2_twice():
    """Enough copies that the timed weights overflow L2 twice; never none, never unbounded."""
    mib = 1 << 20
    assert cold_copy_count(8 * mib, 50 * mib) == 13  # 6144x2560 NF4 on an H100: 13 x 8 MiB >= 100 MiB
    assert cold_copy_count(100 * mib, 50 * mib) == 1  # already larger than twice L2
    assert cold_copy_count(101 * mib, 50 * mib) == 1
    assert cold_copy_count(1024, 50 * mib) == 32  # a tiny weight: capped
    assert cold_copy_count(0, 50 * mib) == 32


@pytest.mark.cuda
@requires_cuda
def test_cold_copies_are_separate_and_equal():
    words = torch.randint(-2**31, 2**31 - 1, (256, 320), dtype=torch.int32, device=DEVICE)
    scales = torch.rand(256, 40, device=DEVICE).half()
    sets = cold_copies((words, scales))
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    assert len(sets) == cold_copy_count(words.nbytes + scales.nbytes, l2) and sets[0][0] is words
    assert len({w.data_ptr() for w, _ in sets}) == len(sets)
    assert all(torch.equal(w, words) and torch.equal(a, scales) for w, a in sets)


def test_fastest_times_every_candidate_cold_then_the_near_ones_again(monkeypatch):
    """The first-call choice without a GPU: each timing is the next value the fake bench holds for the candidate.
    Every candidate runs once before any timing (compiling stays out of it) and is timed over the cold copies in turn;
    those within NEAR of the quickest are timed ROUNDS times in turns and the lowest median wins, the first listed
    (the default) on a tie."""
    from quant.kernels import tiles

    candidates = [None, *gemv_nf4_ptx.PLANS[:3]]
    copies = [(torch.zeros(2),), (torch.ones(2),)]
    monkeypatch.setattr(tiles, "cold_copies", lambda tensors: copies)
    events = []

    def choose(times):
        events.clear()
        queues = {c: list(t) for c, t in times.items()}

        def bench(fn):
            results = fn()
            assert [id(t) for _, t in results] == [id(copies[j % 2][0]) for j in range(tiles.CALLS)]  # copies in turn
            events.append(("timed", results[0][0]))
            return queues[results[0][0]].pop(0)

        def run(candidate, t):
            events.append(candidate)
            return candidate, t

        monkeypatch.setattr(tiles, "graph_bench", bench)
        chosen = tiles.fastest(copies[0], candidates, run, ("test",))
        assert events[0] == candidates[0] and set(events[:4]) == set(candidates)  # each once before any timing
        return chosen

    def timed():
        return [e[1] for e in events if isinstance(e, tuple)]

    none, a, b, c = candidates
    # one clear winner: four timings, no second round
    assert choose({none: [1.0], a: [1.2], b: [0.8], c: [0.9]}) == b
    assert timed() == [none, a, b, c]
    # b's first timing was a fluke: b and c (within 5 %) are timed in turns, c's median wins
    assert choose({none: [1.0], a: [1.2], b: [0.80, 0.86, 0.85], c: [0.82, 0.81, 0.83]}) == c
    assert timed() == [none, a, b, c, b, c, b, c]
    # a tie keeps the first listed; the default keeps its place when nothing beats it
    assert choose({none: [0.5, 0.5, 0.5], a: [1.2], b: [0.8], c: [0.5, 0.5, 0.5]}) is None
    assert choose({none: [0.5], a: [1.2], b: [0.8], c: [0.9]}) is None


def test_first_calls_run_the_default_alone_then_the_others_at_once():
    """The first candidate (the default, which may make first-call choices of its own) runs before any other starts;
    the others run concurrently (their compiles overlap): each waits at a barrier that only opens when both are
    inside, so run one after the other they would time out."""
    import threading

    from quant.kernels import tiles

    barrier = threading.Barrier(2, timeout=10)
    started, finished = [], []

    def run(candidate, t):
        started.append(candidate)
        if candidate != "default":
            barrier.wait()
        finished.append(candidate)

    assert tiles.first_calls((torch.zeros(2),), ["default", "a", "b"], run) == ["default", "a", "b"]
    assert started[0] == "default" and finished[0] == "default" and set(started) == {"default", "a", "b"}


def test_nf4_times_the_triton_shuffle_tile_only_where_no_ptx_plan_applies(monkeypatch):
    """bf16 x where the PTX plans apply: the gather tiles and the plans that fit K; where they do not (or K fits
    none), the shuffle tile instead of them; fp16 x: the gather tiles alone."""
    from quant.kernels import gemv_nf4 as nf4_kernels

    x = torch.zeros(4096, dtype=torch.bfloat16)
    gathers = [choice for choice in nf4_kernels.TRITON_CHOICES if not choice.shuffle]
    shuffles = [choice for choice in nf4_kernels.TRITON_CHOICES if choice.shuffle]
    assert gathers and shuffles
    monkeypatch.setattr(gemv_nf4_ptx, "accepts", lambda x, k, blocksize: x.dtype == torch.bfloat16)
    fitting = [plan for plan in gemv_nf4_ptx.PLANS if plan.fits(2560)]
    assert fitting and len(fitting) < len(gemv_nf4_ptx.PLANS)  # K = 2 560 leaves out the K-split plan
    assert nf4_kernels.candidates(x, 2560, 64) == gathers + fitting
    assert nf4_kernels.candidates(x.half(), 2560, 64) == gathers
    assert nf4_kernels.candidates(x, 2560 + 64, 64) == gathers + shuffles  # no plan fits: the shuffle tile
    monkeypatch.setattr(gemv_nf4_ptx, "accepts", lambda x, k, blocksize: False)
    assert nf4_kernels.candidates(x, 2560, 64) == gathers + shuffles


def test_fastest_leaves_out_a_candidate_this_gpu_cannot_run(monkeypatch):
    """A candidate whose first run fails to compile or launch for lack of resources is not timed; when every one
    fails the error surfaces."""
    from triton.runtime.errors import OutOfResources

    from quant.kernels import tiles

    monkeypatch.setattr(tiles, "cold_copies", lambda tensors: [tensors])
    monkeypatch.setattr(tiles, "graph_bench", lambda fn: {"small": 2.0, "large": 1.0}[fn()[0]])

    def run(candidate, t):
        if candidate == "large":
            raise OutOfResources(200_000, 101_376, "shared memory")
        return candidate

    assert tiles.fastest((torch.zeros(2),), ["small", "large"], run, ("test",)) == "small"
    with pytest.raises(OutOfResources):
        tiles.fastest((torch.zeros(2),), ["large"], run, ("test",))


def test_a_kept_choice_is_taken_without_timing_by_a_later_process(monkeypatch, tmp_path):
    """With choices.remember_in, the first call per key times and writes its choice; a later process (a new
    ChoiceFile on the same file) takes it without running or timing anything: cuBLAS (None) included. Another
    candidate list, another machine identity or a damaged file mean timing again (negative controls)."""
    from quant.kernels import choices, tiles

    monkeypatch.setattr(tiles, "cold_copies", lambda tensors: [tensors])
    monkeypatch.setattr(tiles, "graph_bench", lambda fn: {None: 1.0, "a": 2.0, "b": 0.5, "c": 3.0}[fn()[0]])
    monkeypatch.setattr(choices, "machine_identity", lambda device: identity[0])
    identity, runs, path = ["GPU one"], [], tmp_path / "cache" / "kernel-choices.json"

    def run(candidate, t):
        runs.append(candidate)
        return candidate

    def choose(candidates, key=("gemv", 2560, 4096)):
        runs.clear()
        choices.remember_in(path)  # a new process: nothing read yet
        try:
            return tiles.fastest((torch.zeros(2),), candidates, run, key)
        finally:
            choices.remember_in(None)

    assert choose([None, "a", "b"]) == "b" and runs and path.exists()
    assert choose([None, "a", "b"]) == "b" and runs == []  # recalled: nothing ran
    assert choose([None, "a"], key=("gemv", 1, 1)) is None and runs  # None (cuBLAS) won ...
    assert choose([None, "a"], key=("gemv", 1, 1)) is None and runs == []  # ... and is recalled as a choice
    assert choose([None, "a", "b", "c"]) == "b" and runs  # another candidate list: timed again
    identity[0] = "GPU two"
    assert choose([None, "a", "b"]) == "b" and runs  # another machine: timed again
    identity[0] = "GPU two; torch 3"
    assert choose([None, "a", "b"]) == "b" and runs  # that GPU with other versions: timed again, ...
    kept = json.loads(path.read_text())["machines"]
    assert set(kept) == {"GPU one", "GPU two; torch 3"}  # ... and its entries of the old versions dropped
    path.write_text("{not json")
    assert choose([None, "a", "b"]) == "b" and runs  # a damaged file is timed over and rewritten
    assert choose([None, "a", "b"]) == "b" and runs == []
    assert tiles.fastest((torch.zeros(2),), [None, "a", "b"], run, ("gemv", 2560, 4096)) == "b"  # not remembering
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "kernel-choices.json"  # a cache folder that cannot be: the choice comes, not kept
    assert choose([None, "a", "b"]) == "b" and runs and not path.exists()



@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_a_later_process_takes_the_kept_kernel_choice_on_the_gpu(fmt, tmp_path, monkeypatch):
    """The real choosers keep their choice in the file and take it back in a "new process" (the in-memory choices
    cleared, a new ChoiceFile) without timing: first_calls would fail if called. The output is the same."""
    from quant.kernels import choices, gemv8, tiles
    from quant.kernels import gemv_nf4 as nf4_kernels

    layer, x = _layer(fmt, 1024, 2560), torch.randn(1, 1, 2560, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(nf4_kernels, "_choice", {})
    monkeypatch.setattr(gemv8, "_tiles", {})
    choices.remember_in(tmp_path / choices.KERNEL_CHOICES)
    first = layer(x)
    kept = (tmp_path / choices.KERNEL_CHOICES).read_text()
    assert ("gemv_nf4" if fmt == "nf4" else "gemv8") in kept
    monkeypatch.setattr(nf4_kernels, "_choice", {})
    monkeypatch.setattr(gemv8, "_tiles", {})
    monkeypatch.setattr(tiles, "first_calls", lambda *a: pytest.fail("timed again"))
    choices.remember_in(tmp_path / choices.KERNEL_CHOICES)
    assert torch.equal(layer(x), first)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n, k", [(7, 90), (9728, 2560)])
def test_nf4_prefill_weight_is_bitsandbytes_dequantization_on_the_gpu(n, k):
    """The multi-token forward's weight (quant/kernels/dequant_nf4.py) equals bitsandbytes' GPU dequantize_4bit bit
    for bit in fp32 and bf16; scales 1 % off differ (negative control)."""
    import bitsandbytes.functional as bnbf

    from quant.kernels.dequant_nf4 import dequant_nf4

    layer = _layer("nf4", n, k)
    for dtype in (torch.float32, torch.bfloat16):
        state = bnbf.QuantState(absmax=layer.absmax.float(), shape=torch.Size((n, k)), code=layer.code,
                                blocksize=layer.blocksize, quant_type="nf4", dtype=dtype)
        theirs = bnbf.dequantize_4bit(layer.weight, state)
        assert torch.equal(layer.dequantize(dtype), theirs)
    off = dequant_nf4(layer.weight, layer.absmax * 1.01, layer.code, layer.blocksize, torch.Size((n, k)), dtype)
    assert not torch.equal(off, theirs)
