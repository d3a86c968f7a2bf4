"""The decode profile script's CPU-side part: which family a kernel's name falls in (names as CUPTI reports them
for one graph-replayed frame on an H100)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_profile.py"


@pytest.fixture(scope="module")
def profile():
    spec = importlib.util.spec_from_file_location("decode_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel, family", [
    ("_gemv_nf4_ptx_kernel", "our NF4 GEMV"),
    ("_gemv8_kernel", "our 8-bit / bf16 GEMV"),
    ("_norm_rope_kernel", "our norm / RoPE / SwiGLU"),
    ("_rms_norm_kernel", "our norm / RoPE / SwiGLU"),
    ("_silu_mul_kernel", "our norm / RoPE / SwiGLU"),
    ("_sample_kernel", "our sampling"),
    ("_decode_attention_split_kernel", "our decode attention"),
    ("_decode_attention_combine_kernel", "our decode attention"),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "cuBLAS GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "cuBLAS GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35", "attention"),
    ("void cudnn::fusion::lean_reduction_kernel<false, false, false>", "attention"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 1, false>", "sort / top-k"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reductions"),
    ("void at::native::index_elementwise_kernel<128, 4, index_copy_kernel_impl>", "copies and indexing"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::silu_kernel>", "elementwise"),
    ("some_new_kernel", "other"),
])
def test_kernel_families(profile, kernel, family):
    assert profile.family(kernel) == family
