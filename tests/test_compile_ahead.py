"""Compiling the decode's GEMV candidates while the weights load (runtime/compile_ahead.py): which GEMVs, the
stand-ins they compile on, the threads; on a GPU, that the first calls then find every kernel compiled."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from torch import nn

from quant.base import FloatLinear, QuantizedLinear, format_class, quantize_linear, silu_gated
from quant.kernels import choices, tiles
from runtime import compile_ahead
from runtime.checkpoint import open_checkpoint
from runtime.compile_ahead import AheadCompiles, DecodeGemv, compiling_ahead, decode_gemvs
from runtime.loader import WeightFormats, layer_class, load_model
from runtime.meta import meta_device
from runtime.model import DualAR
from runtime.synthetic import write_fp8_checkpoint

CPU = torch.device("cpu")


def loaded_gemvs(model: nn.Module) -> set[tuple[type, int, int]]:
    """(class, out, in) of every linear a one-token forward runs through a GEMV: all but the embedding tables."""
    return {(type(m), m.out_features, m.in_features) for m in model.modules()
            if isinstance(m, (FloatLinear, QuantizedLinear))}


@pytest.mark.parametrize("formats", [WeightFormats("int8", "bf16"), WeightFormats("bf16", "int8"),
                                     WeightFormats("bf16", "bf16")])
def test_decode_gemvs_are_the_loaded_models_linears(tiny_checkpoint, formats):
    """The GEMVs named from the meta model and the plan are exactly those of the model loading builds: each
    (class, shape) once, the FFN's gate as the gated form (its up layer alike)."""
    checkpoint = open_checkpoint(tiny_checkpoint)
    loaded = load_model(tiny_checkpoint, CPU, torch.bfloat16, formats=formats)
    with meta_device():
        meta = DualAR(loaded.config)
    gemvs = decode_gemvs(meta, functools.partial(layer_class, checkpoint, formats))
    assert {(g.layer, g.out_features, g.in_features) for g in gemvs} == loaded_gemvs(loaded.model)
    ffn = loaded.model.layers[0].feed_forward
    assert DecodeGemv(type(ffn.w1), ffn.w1.out_features, ffn.w1.in_features, gated=True) in gemvs


def test_community_fp8_layers_are_named_fp8(tmp_path, tiny_config):
    folder = write_fp8_checkpoint(tmp_path / "fp8", tiny_config, seed=3)
    loaded = load_model(folder, CPU, torch.bfloat16)
    with meta_device():
        meta = DualAR(loaded.config)
    gemvs = decode_gemvs(meta, functools.partial(layer_class, open_checkpoint(folder), WeightFormats()))
    assert {(g.layer, g.out_features, g.in_features) for g in gemvs} == loaded_gemvs(loaded.model)
    assert sum(g.layer.__name__ == "FP8Linear" for g in gemvs) >= 4


@pytest.mark.parametrize("n, rows", [(1, 1), (2, 2), (16, 16), (17, 17), (31, 31), (32, 16), (33, 17),
                                     (2560, 16), (4097, 17), (9728, 16)])
def test_stand_in_rows_keep_what_triton_specializes_on(n, rows):
    got = tiles.stand_in_rows(n)
    assert got == rows and got % 16 == n % 16 and (got == 1) == (n == 1) and got <= n


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 1040, 2560, 4096, 4097, 6144, 9728, 155_776])
def test_stand_in_rows_specialize_as_the_rows_do(n):
    """What Triton itself makes of an integer argument (where this Triton exposes its specializer): the stand-in's
    row count and the real one give the same type and divisibility, so the same compiled kernel."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    backends = pytest.importorskip("triton.backends.compiler")
    specialize = getattr(libtriton, "native_specialize_impl", None)
    if specialize is None:
        pytest.skip("this Triton does not expose native_specialize_impl")
    key = (lambda value: specialize(backends.BaseBackend, value, False, True, True))
    assert key(tiles.stand_in_rows(n)) == key(n)
    assert key(16) != key(17) and key(1) != key(2) and key(2**31 + 16) != key(32)  # it tells them apart


def test_ahead_runs_our_candidates_and_nothing_where_a_choice_is_kept(tmp_path, monkeypatch):
    ran = []
    tensors = (torch.zeros(3), torch.ones(2))
    calls = tiles.ahead(("k", 1), tensors, [None, "a", "b"], lambda c, *t: ran.append((c, t)))
    assert len(calls) == 2 and ran == []  # None (the library's path) compiles nothing of ours
    for call in calls:
        call()
    assert [c for c, _ in ran] == ["a", "b"] and all(t[0] is tensors[0] and t[1] is tensors[1] for _, t in ran)

    monkeypatch.setattr(choices, "machine_identity", lambda device: "this machine")
    choices.remember_in(tmp_path / "choices.json")
    choices.current().keep(CPU, ("k", 1), [None, "a", "b"], "b")
    assert tiles.ahead(("k", 1), tensors, [None, "a", "b"], lambda *a: None) == []
    assert len(tiles.ahead(("k", 2), tensors, [None, "a", "b"], lambda *a: None)) == 2  # another key: timed


class _Recorded(FloatLinear):
    """A layer class whose ahead calls record themselves; the one for 13 rows raises, as a failed compile would."""

    ran: list[tuple[int, int, bool]] = []

    @classmethod
    def ahead_calls(cls, out_features, in_features, x_dtype, device, gated=False):
        def call():
            if out_features == 13:
                raise RuntimeError("no such kernel")
            cls.ran.append((out_features, in_features, gated))

        return [call, call]


def test_ahead_compiles_run_every_call_and_outlive_failures(monkeypatch):
    monkeypatch.setattr(_Recorded, "ran", [])
    compiles = AheadCompiles([DecodeGemv(_Recorded, 8, 4), DecodeGemv(_Recorded, 13, 4),
                              DecodeGemv(_Recorded, 8, 4, gated=True)], torch.bfloat16, CPU, workers=2)
    compiles.finish()
    assert sorted(_Recorded.ran) == [(8, 4, False)] * 2 + [(8, 4, True)] * 2


def test_an_error_while_loading_drops_the_compiles_not_started(monkeypatch):
    """The load's error comes out at once, while a compile still runs; the compiles not started never run; the
    next load (the next plan) ends only after that compile has."""
    started, release, ran, firsts = threading.Event(), threading.Event(), [], iter(range(10))

    class Slow(FloatLinear):
        @classmethod
        def ahead_calls(cls, out_features, in_features, x_dtype, device, gated=False):
            def first():
                if next(firsts) == 0:  # the first load's: still running when that load fails
                    started.set()
                    release.wait(5)
                ran.append("first")

            return [first, *(functools.partial(ran.append, i) for i in range(5))]

    monkeypatch.setattr(compile_ahead, "kernels_supported", lambda device: True)
    monkeypatch.setattr(compile_ahead, "decode_gemvs", lambda model, layer_class: [DecodeGemv(Slow, 8, 4)])
    monkeypatch.setattr(compile_ahead, "stand_in_calls", lambda *args: [])
    monkeypatch.setattr(compile_ahead, "WORKERS", 1)
    with pytest.raises(KeyError, match="loading failed"):
        with compiling_ahead(None, None, torch.bfloat16, CPU):
            assert started.wait(5)
            raise KeyError("loading failed")
    assert ran == []  # not waited for
    next_load_done = threading.Event()

    def next_load():
        with compiling_ahead(None, None, torch.bfloat16, CPU):
            pass
        next_load_done.set()

    threading.Thread(target=next_load).start()
    assert not next_load_done.wait(0.3)  # held back by the abandoned compile
    release.set()
    assert next_load_done.wait(5)
    assert sorted(map(str, ran)) == ["0", "1", "2", "3", "4", "first", "first"]  # the first load's 0-4: never


def test_prefill_calls_come_once_per_quantized_class():
    """NF4's dequantization (the prefill's kernel) once for all its shapes, nothing for float or 8-bit layers; the
    call dequantizes a stand-in layer (on the CPU through bitsandbytes)."""
    nf4, int8 = format_class("nf4"), format_class("int8")
    gemvs = [DecodeGemv(nf4, 8, 128), DecodeGemv(nf4, 16, 64, gated=True), DecodeGemv(FloatLinear, 8, 128),
             DecodeGemv(int8, 8, 128)]
    calls = compile_ahead.prefill_calls(gemvs, torch.bfloat16, CPU)
    assert len(calls) == 1
    weight = calls[0]()
    assert weight.shape == (1, 128) and weight.dtype == torch.bfloat16 and bool((weight == weight[0, 0]).all())
    assert compile_ahead.prefill_calls(gemvs[2:], torch.bfloat16, CPU) == []


def test_stand_in_calls_run_once_per_machine(tmp_path, monkeypatch):
    """With a kernel-choices file, each call keeps its mark once it has run; a later process (a new file object)
    runs none of them when all are kept, all of them when one is missing; a call that raised keeps nothing. Without
    a file every call runs every time."""
    monkeypatch.setattr(choices, "machine_identity", lambda device: "this machine")
    monkeypatch.setattr(choices, "_file", choices.current())  # restored however the test ends
    ran = []
    calls = [functools.partial(ran.append, "a"), functools.partial(ran.append, "b")]
    choices.remember_in(None)
    assert compile_ahead.once_per_machine(calls, ("k",), CPU) == calls
    path = tmp_path / "choices.json"
    choices.remember_in(path)
    for call in compile_ahead.once_per_machine(calls, ("k",), CPU):
        call()
    assert ran == ["a", "b"]
    choices.remember_in(path)
    assert compile_ahead.once_per_machine(calls, ("k",), CPU) == []
    assert len(compile_ahead.once_per_machine(calls, ("other",), CPU)) == 2
    assert len(compile_ahead.once_per_machine([*calls, calls[0]], ("k",), CPU)) == 3  # one more: all run again

    def fails():
        raise RuntimeError("no such kernel")

    with pytest.raises(RuntimeError):
        compile_ahead.once_per_machine([fails], ("failing",), CPU)[0]()
    choices.remember_in(path)
    assert len(compile_ahead.once_per_machine([fails], ("failing",), CPU)) == 1


def test_nothing_compiles_ahead_on_the_cpu(monkeypatch):
    monkeypatch.setattr(AheadCompiles, "__init__", lambda *a, **k: pytest.fail("compiling for a CPU"))
    with compiling_ahead(None, None, torch.float32, CPU):
        pass


# ----- on a GPU --------------------------------------------------------------------------------------------------

def _gemv_kernels():
    from quant.kernels import gemv8, gemv_nf4, gemv_nf4_ptx

    return gemv8._gemv8_kernel, gemv_nf4._gemv_nf4_kernel, gemv_nf4_ptx._gemv_nf4_ptx_kernel


def _compiled() -> int:
    """Kernels the GEMV kernels hold compiled in this process (Triton's in-memory cache, all devices)."""
    return sum(len(entry[0]) for kernel in _gemv_kernels() for entry in kernel.device_caches.values())


@pytest.fixture
def fresh_kernels(monkeypatch):
    """No first-call choices made and no kernels compiled in this process yet (Triton's disk cache may hold them:
    what is counted is what the calls had to get)."""
    from quant.kernels import gemv8, gemv_nf4

    monkeypatch.setattr(gemv8, "_tiles", {})
    monkeypatch.setattr(gemv_nf4, "_choice", {})
    monkeypatch.setattr(gemv_nf4, "_gated_plan", {})
    for kernel in _gemv_kernels():
        kernel.device_caches.clear()
    choices.remember_in(None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt, n, k", [("nf4", 4097, 2560), ("nf4", 1024, 4096), ("fp8", 4097, 1024),
                                       ("int8", 1040, 512), ("bf16", 4097, 1024)])
def test_the_first_calls_find_their_kernels_compiled_ahead(fresh_kernels, fmt, n, k):
    """After a layer class's ahead calls for an N x K GEMV and its gated form, the first one-token forward of real
    layers of that shape (which times every candidate) compiles nothing more; a shape not compiled ahead does
    (the counting can fail)."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)

    def layer(rows: int, cols: int) -> nn.Module:
        weight = torch.randn(rows, cols, generator=gen).to(device, torch.bfloat16) * 0.02
        if fmt == "bf16":
            float_layer = FloatLinear(cols, rows, bias=False, device="meta")
            float_layer.weight = nn.Parameter(weight, requires_grad=False)
            return float_layer
        return quantize_linear(weight, fmt)

    cls = FloatLinear if fmt == "bf16" else format_class(fmt)
    for gated in (False, True):
        for call in cls.ahead_calls(n, k, torch.bfloat16, device, gated):
            call()
    compiled = _compiled()
    assert compiled > 0
    gate, up = layer(n, k), layer(n, k)
    x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
    gate(x)
    silu_gated(gate, up, x)
    torch.cuda.synchronize()
    assert _compiled() == compiled
    layer(64, 2 * k)(torch.randn(1, 1, 2 * k, device=device, dtype=torch.bfloat16))  # K not compiled ahead
    assert _compiled() > compiled
