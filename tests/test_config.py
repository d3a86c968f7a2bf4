"""config.json parsing: both published forms, dead fields ignored, clear errors for missing fields."""

from __future__ import annotations

import json

import pytest

from runtime.config import CONFIGS_DIR, StackConfig, load_config, parse_config
from runtime.errors import CheckpointError

RELEASED = json.loads((CONFIGS_DIR / "s2-pro.json").read_text())

# The same model in the older flat `dual_ar` form (field names of the reference's DualARModelArgs).
FLAT = {
    "model_type": "dual_ar",
    "vocab_size": 155776,
    "n_layer": 36,
    "n_head": 32,
    "n_local_heads": 8,
    "head_dim": 128,
    "dim": 2560,
    "intermediate_size": 9728,
    "rope_base": 1000000,
    "norm_eps": 1e-6,
    "max_seq_len": 32768,
    "attention_qk_norm": True,
    "codebook_size": 4096,
    "num_codebooks": 10,
    "semantic_begin_id": 151678,
    "semantic_end_id": 155773,
    "n_fast_layer": 4,
    "fast_attention_qk_norm": False,
    "norm_fastlayer_input": True,
    "scale_codebook_embeddings": True,
    "use_moe": False,  # dead field
}


def test_released_nested_form():
    c = parse_config(RELEASED)
    assert c.slow == StackConfig(n_layer=36, dim=2560, n_head=32, n_local_heads=8, head_dim=128,
                                 intermediate_size=9728, qk_norm=True)
    assert c.fast == StackConfig(n_layer=4, dim=2560, n_head=32, n_local_heads=8, head_dim=128,
                                 intermediate_size=9728, qk_norm=False)
    assert (c.vocab_size, c.codebook_size, c.num_codebooks) == (155776, 4096, 10)
    assert (c.semantic_begin_id, c.semantic_end_id, c.im_end_id) == (151678, 155773, 151645)
    assert c.rope_base == 1e6 and c.norm_eps == 1e-6 and c.max_seq_len == 32768
    assert c.slow.qkv_rows == 6144
    assert c.parameter_count() == 4_561_852_416  # index.json total_parameters


def test_flat_form_equals_nested():
    assert parse_config(FLAT) == parse_config(RELEASED)


def test_flat_form_defaults_follow_reference():
    flat = {k: v for k, v in FLAT.items() if k not in ("intermediate_size", "n_local_heads", "head_dim")}
    flat["dim"], flat["n_head"] = 1024, 16
    c = parse_config(flat)
    assert c.slow.intermediate_size == 2816  # find_multiple(int(2*4*1024/3), 256)
    assert c.slow.n_local_heads == 16 and c.slow.head_dim == 64
    assert c.fast.intermediate_size == 2816 and c.fast.qk_norm is False


def test_round_trip_through_writer_form():
    c = parse_config(RELEASED)
    assert parse_config(c.to_json()) == c


@pytest.mark.parametrize(
    "path, field",
    [(("text_config", "n_layer"), "n_layer"), (("audio_decoder_config", "num_codebooks"), "num_codebooks"),
     (("semantic_start_token_id",), "semantic_start_token_id"), (("text_config",), "text_config")],
)
def test_missing_required_field_is_named(path, field):
    raw = json.loads(json.dumps(RELEASED))
    section = raw
    for key in path[:-1]:
        section = section[key]
    del section[path[-1]]
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        parse_config(raw)


def test_unknown_model_type_and_bad_json(tmp_path):
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        parse_config({"model_type": "llama"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_semantic_range_must_match_codebook_size():
    raw = json.loads(json.dumps(RELEASED))
    raw["semantic_end_token_id"] = 155000
    with pytest.raises(CheckpointError, match="codebook_size"):
        parse_config(raw)


def test_unknown_bundled_name_lists_the_known_ones():
    from runtime.config import bundled_config
    from runtime.errors import InputError

    assert bundled_config("tiny").num_codebooks == 10
    with pytest.raises(InputError, match="unknown model config 'huge': use s2-pro, tiny"):
        bundled_config("huge")
