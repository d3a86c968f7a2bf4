"""A request's non-GEMV kernels compiled ahead on stand-ins (runtime/stand_in_frame.py): the stand-in stacks, and on a
GPU that a first request after loading compiles no Triton kernel at all, while without the stand-ins it compiles
the norms, RoPE, attentions and sampling."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quant.kernels import choices
from runtime import compile_ahead, stand_in_frame
from runtime.config import bundled_config
from runtime.engine import GenerationConfig, generate
from runtime.loader import WeightFormats, load_model
from runtime.meta import meta_device
from runtime.model import Block, DualAR
from runtime.sampling import SamplingParams
from runtime.stand_in_frame import ZeroLinear, frame_calls, frame_key, stand_in_stack
from test_model import frames_sequence

CPU = torch.device("cpu")


def test_a_stand_in_block_has_zero_linears_and_unit_gains(tiny_config):
    layers, final = stand_in_stack(tiny_config.slow, tiny_config.norm_eps, 16, torch.bfloat16, CPU)
    block = layers[0]
    assert isinstance(block, Block)
    assert not [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]  # every weight replaced
    assert {name for name, m in block.named_modules() if isinstance(m, ZeroLinear)} == set(stand_in_frame.LINEARS)
    gains = [*block.parameters(), *final.parameters()]
    assert gains and all(p.dtype == torch.bfloat16 and bool((p == 1).all()) for p in gains)
    assert sum(p.numel() for p in gains) == 3 * tiny_config.dim + 2 * tiny_config.slow.head_dim
    assert block.attention.kv_cache.k.shape == (1, tiny_config.slow.n_local_heads, 16, tiny_config.slow.head_dim)
    x = torch.randn(1, 3, tiny_config.dim).bfloat16()
    assert block.attention.wqkv(x).shape == (1, 3, tiny_config.slow.qkv_rows) and not block.attention.wqkv(x).any()


def test_the_stand_in_forms_run_on_the_cpu(tiny_config):
    """The model's own code on the stand-ins (torch's path here): the calls' arguments fit it."""
    with meta_device():
        model = DualAR(tiny_config)
    calls = frame_calls(model, torch.bfloat16, CPU, SamplingParams())
    assert len(calls) == 2
    for call in calls:
        call()


def test_the_frame_key_follows_the_model_and_dtype(tiny_config):
    """The mark of the stand-ins (compile_ahead.once_per_machine) is the same for the same model, dtype and top_k
    only."""
    with meta_device():
        tiny, again, full = DualAR(tiny_config), DualAR(tiny_config), DualAR(bundled_config("s2-pro"))
    default = SamplingParams()
    key = frame_key(tiny, torch.bfloat16, default)
    assert key == frame_key(again, torch.bfloat16, SamplingParams(temperature=0.5, top_p=0.6))  # top_k alone counts
    assert key != frame_key(full, torch.bfloat16, default) and key != frame_key(tiny, torch.float32, default)
    assert key != frame_key(tiny, torch.bfloat16, SamplingParams(top_k=50))


# ----- on a GPU --------------------------------------------------------------------------------------------------

def _our_kernels() -> list:
    """Every Triton kernel of quant/kernels."""
    from triton.runtime.jit import JITFunction

    import quant.kernels as package

    modules = [importlib.import_module(f"quant.kernels.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    return [value for module in modules for value in vars(module).values() if isinstance(value, JITFunction)]


def _compiles_of_a_first_request(checkpoint, precision: str, monkeypatch) -> list[str]:
    """Load (compiling ahead) with no kernel compiled in this process and no choice kept, then run one request (the
    prefill, the eager first frame, captured frames): the kernels it had to compile, as Triton names them."""
    from quant.kernels import gemv8, gemv_nf4

    monkeypatch.setattr(gemv8, "_tiles", {})
    monkeypatch.setattr(gemv_nf4, "_choice", {})
    monkeypatch.setattr(gemv_nf4, "_gated_plan", {})
    choices.remember_in(None)
    for kernel in _our_kernels():
        kernel.device_caches.clear()
    loaded = load_model(checkpoint, torch.device("cuda"), torch.bfloat16, formats=WeightFormats(precision, "bf16"))
    compiled = []

    def hook(**kwargs) -> bool:
        compiled.append(kwargs["repr"])
        return False  # compile as usual

    import triton

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", hook)
    prompt = frames_sequence(loaded.config, 7, 3, seed=1)[0]
    generate(loaded.model, prompt, GenerationConfig(max_new_tokens=6, seed=0))
    torch.cuda.synchronize()
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    return compiled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "nf4", "int8", "fp8"])
def test_a_first_request_compiles_nothing_after_the_loading(tiny_checkpoint, precision, monkeypatch):
    assert _compiles_of_a_first_request(tiny_checkpoint, precision, monkeypatch) == []
    monkeypatch.setattr(compile_ahead, "frame_calls", lambda *args: [])  # the GEMVs only, as before
    monkeypatch.setattr(compile_ahead, "prefill_calls", lambda *args: [])
    names = " ".join(_compiles_of_a_first_request(tiny_checkpoint, precision, monkeypatch))
    expected = ["_rms_norm_kernel", "_norm_rope_kernel", "_silu_mul_kernel", "_short_attention_kernel",
                "_decode_attention_split_kernel", "_decode_attention_combine_kernel", "_sample_kernel",
                *(["_dequant_nf4_kernel"] if precision == "nf4" else [])]
    assert [name for name in expected if name not in names] == []


# ----- without a GPU: what Triton would compile --------------------------------------------------------------------

_RECORD = """
import json, sys, torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from runtime import model as model_code
from runtime.config import bundled_config
from runtime.loader import load_model
from runtime.stand_in_frame import run_stack_forms
from test_model import frames_sequence


class TargetOnly:  # a driver that knows an sm_90 target and nothing else: Triton specializes, nothing launches
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(TargetOnly())
keys = []
triton.knobs.runtime.jit_cache_hook = lambda **kw: keys.append(f"{kw['fn'].name} {kw['key']}") or True  # skip
model_code.fused_kernels = lambda x: x.dtype == torch.bfloat16 and not torch.is_grad_enabled()  # our kernels
cpu = torch.device("cpu")
recorded = {}
for config in ("tiny", "s2-pro"):
    keys.clear()
    run_stack_forms(bundled_config(config), torch.bfloat16, cpu)
    recorded[config] = sorted(set(keys))
keys.clear()
model = load_model(sys.argv[1], cpu, torch.bfloat16).model
prompt = frames_sequence(model.config, 30, 7, seed=1)  # [1, 11, 37]
with torch.inference_mode():
    model.setup_caches(2048, torch.bfloat16, cpu)  # 16 splits, divisible by 16 unlike the stand-in's 2
    model.forward_slow(prompt, 0)
    model.forward_slow(prompt[..., -1:], torch.tensor([37]))
    hidden = torch.zeros(1, 1, model.config.fast.dim, dtype=torch.bfloat16)
    for position in range(3):
        model.forward_fast(hidden, position)
recorded["request"] = sorted(set(keys))
print(json.dumps(recorded))
"""


def test_the_stand_ins_specialize_as_a_request_does(tiny_checkpoint):
    """What Triton would compile (its JIT hook, under a driver that only names an sm_90 target; run in a process of
    its own): the tiny model's prefill of 37 tokens, a decode step at a position on the device over a 2048-slot
    cache and three fast-AR positions ask for no kernel the stand-in forms of its config do not, and for all nine
    (the norm with and without the residual add, RoPE in three forms, SiLU x up, the short attention, the split
    attention and its combine); the stand-ins of another config (S2 Pro's) cover none but SiLU x up."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _RECORD, str(tiny_checkpoint)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads(done.stdout.splitlines()[-1])
    request, stand_ins = set(recorded["request"]), set(recorded["tiny"])
    assert sorted(request - stand_ins) == []
    names = {key.split(" ", 1)[0] for key in request}
    assert names == {"_rms_norm_kernel", "_norm_rope_kernel", "_silu_mul_kernel", "_short_attention_kernel",
                     "_decode_attention_split_kernel", "_decode_attention_combine_kernel"}
    assert len(request) == 9
    other = {key.split(" ", 1)[0] for key in request - set(recorded["s2-pro"])}
    assert other == names - {"_silu_mul_kernel"}  # one SiLU x up serves both: both widths are multiples of 16
