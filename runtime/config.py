"""Model configuration parsed from a checkpoint's config.json.

Two published forms exist: the released nested `fish_qwen3_omni` file (a `text_config` for the slow AR and an
`audio_decoder_config` for the fast AR) and the older flat `dual_ar` file. Both become one `ModelConfig`; the
dead fields of the release (MoE settings, training flags) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime.errors import CheckpointError, InputError


@dataclass(frozen=True)
class StackConfig:
    """One transformer stack (the slow AR over time or the fast AR over codebooks)."""

    n_layer: int
    dim: int
    n_head: int
    n_local_heads: int  # KV heads (GQA)
    head_dim: int
    intermediate_size: int
    qk_norm: bool

    @property
    def qkv_rows(self) -> int:
        return (self.n_head + 2 * self.n_local_heads) * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one block: wqkv, wo, w1/w2/w3, two norms and (slow AR only) the QK-norm gains."""
        attn = self.qkv_rows * self.dim + self.dim * self.n_head * self.head_dim
        ffn = 3 * self.dim * self.intermediate_size
        norms = 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)
        return attn + ffn + norms


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Dual-AR needs. Token ids come from config.json and are cross-checked with the tokenizer."""

    slow: StackConfig
    fast: StackConfig
    vocab_size: int
    codebook_size: int  # 4096: what the LLM treats every codebook as
    num_codebooks: int  # 10
    rope_base: float
    norm_eps: float
    max_seq_len: int  # the model's trained limit; our KV cache is sized per request, not to this
    semantic_begin_id: int
    semantic_end_id: int
    im_end_id: int  # <|im_end|>: the stop token

    @property
    def dim(self) -> int:
        return self.slow.dim

    @property
    def num_semantic(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    def parameter_count(self) -> int:
        """Parameters of the released checkpoint (tied head counted once)."""
        slow = self.slow.n_layer * self.slow.layer_params()
        slow += self.vocab_size * self.dim + self.codebook_size * self.num_codebooks * self.dim + self.dim
        fast = self.fast.n_layer * self.fast.layer_params()
        fast += 2 * self.codebook_size * self.fast.dim + self.fast.dim
        return slow + fast

    def with_semantic_ids(self, begin: int, end: int) -> ModelConfig:
        return replace(self, semantic_begin_id=begin, semantic_end_id=end)

    def to_json(self) -> dict[str, Any]:
        """The released nested form, as the synthetic checkpoint writer stores it."""
        return _to_omni_json(self)


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise CheckpointError(f"config.json: required field '{key}' is missing from {where}")
    return section[key]


def _stack(section: dict[str, Any], where: str, prefix: str = "", qk_norm_default: bool = False) -> StackConfig:
    """Read one stack's shape; `prefix` is "fast_" for the flat dual_ar form's fast-AR fields."""
    dim = int(_require(section, f"{prefix}dim", where))
    n_head = int(_require(section, f"{prefix}n_head", where))
    n_local = section.get(f"{prefix}n_local_heads")
    head_dim = section.get(f"{prefix}head_dim")
    inter = section.get(f"{prefix}intermediate_size")
    layer_key = "n_fast_layer" if prefix == "fast_" else "n_layer"
    qk = section.get(f"{prefix}attention_qk_norm")
    for bias in ("attention_qkv_bias", "attention_o_bias"):
        if section.get(f"{prefix}{bias}"):
            raise CheckpointError(f"config.json: {where} sets {prefix}{bias}=true, which S2 Pro never uses")
    return StackConfig(
        n_layer=int(_require(section, layer_key, where)),
        dim=dim,
        n_head=n_head,
        n_local_heads=n_head if n_local in (None, -1) else int(n_local),
        head_dim=dim // n_head if head_dim is None else int(head_dim),
        intermediate_size=_find_multiple(int(2 * 4 * dim / 3), 256) if inter is None else int(inter),
        qk_norm=qk_norm_default if qk is None else bool(qk),
    )


def _from_omni(raw: dict[str, Any]) -> ModelConfig:
    text = _require(raw, "text_config", "config.json")
    audio = _require(raw, "audio_decoder_config", "config.json")
    slow = _stack(text, "text_config")
    fast = _stack(audio, "audio_decoder_config")
    return ModelConfig(
        slow=slow,
        fast=fast,
        vocab_size=int(_require(text, "vocab_size", "text_config")),
        codebook_size=int(_require(audio, "vocab_size", "audio_decoder_config")),
        num_codebooks=int(_require(audio, "num_codebooks", "audio_decoder_config")),
        rope_base=float(text.get("rope_base", 10000.0)),
        norm_eps=float(text.get("norm_eps", 1e-5)),
        max_seq_len=int(text.get("max_seq_len", 2048)),
        semantic_begin_id=int(_require(raw, "semantic_start_token_id", "config.json")),
        semantic_end_id=int(_require(raw, "semantic_end_token_id", "config.json")),
        im_end_id=int(_require(raw, "eos_token_id", "config.json")),
    )


def _from_dual_ar(raw: dict[str, Any]) -> ModelConfig:
    slow = _stack(raw, "config.json")
    fast_fields = {k: raw[k] for k in raw if k.startswith("fast_") or k == "n_fast_layer"}
    # Fast-AR fields default to the slow value, except QK-norm which the release turns off explicitly.
    for field in ("dim", "n_head", "n_local_heads", "head_dim", "intermediate_size", "attention_qk_norm"):
        fast_fields.setdefault(f"fast_{field}", raw.get(field))
    fast_fields.setdefault("n_fast_layer", 4)
    fast = _stack(fast_fields, "config.json (fast AR)", prefix="fast_")
    return ModelConfig(
        slow=slow,
        fast=fast,
        vocab_size=int(_require(raw, "vocab_size", "config.json")),
        codebook_size=int(_require(raw, "codebook_size", "config.json")),
        num_codebooks=int(_require(raw, "num_codebooks", "config.json")),
        rope_base=float(raw.get("rope_base", 10000.0)),
        norm_eps=float(raw.get("norm_eps", 1e-5)),
        max_seq_len=int(raw.get("max_seq_len", 2048)),
        semantic_begin_id=int(_require(raw, "semantic_begin_id", "config.json")),
        semantic_end_id=int(_require(raw, "semantic_end_id", "config.json")),
        im_end_id=int(raw.get("eos_token_id", 151645)),
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Dispatch on `model_type` like the reference loader; anything else is refused with its name."""
    kind = raw.get("model_type")
    if kind == "fish_qwen3_omni":
        config = _from_omni(raw)
    elif kind == "dual_ar":
        config = _from_dual_ar(raw)
    else:
        raise CheckpointError(
            f"config.json: model_type '{kind}' is not an S2 Pro Dual-AR (expected 'fish_qwen3_omni' or 'dual_ar')"
        )
    if config.fast.dim != config.slow.dim:
        raise CheckpointError("config.json: a fast AR narrower than the slow AR (fast_project_in) is not supported")
    if config.semantic_end_id - config.semantic_begin_id + 1 != config.codebook_size:
        raise CheckpointError(
            f"config.json: semantic ids {config.semantic_begin_id}..{config.semantic_end_id} do not span "
            f"codebook_size={config.codebook_size}"
        )
    return config


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return parse_config(raw)


def _stack_json(stack: StackConfig) -> dict[str, Any]:
    return {
        "n_layer": stack.n_layer,
        "dim": stack.dim,
        "n_head": stack.n_head,
        "n_local_heads": stack.n_local_heads,
        "head_dim": stack.head_dim,
        "intermediate_size": stack.intermediate_size,
        "attention_qk_norm": stack.qk_norm,
        "attention_qkv_bias": False,
        "attention_o_bias": False,
        "dropout": 0.0,
    }


def _to_omni_json(config: ModelConfig) -> dict[str, Any]:
    text = _stack_json(config.slow) | {
        "model_type": "fish_qwen3",
        "vocab_size": config.vocab_size,
        "max_seq_len": config.max_seq_len,
        "rope_base": config.rope_base,
        "norm_eps": config.norm_eps,
        "tie_word_embeddings": True,
    }
    audio = _stack_json(config.fast) | {
        "model_type": "fish_qwen3_audio_decoder",
        "vocab_size": config.codebook_size,
        "max_seq_len": config.num_codebooks + 1,
        "rope_base": config.rope_base,
        "norm_eps": config.norm_eps,
        "tie_word_embeddings": False,
        "num_codebooks": config.num_codebooks,
        "text_dim": config.dim,
    }
    return {
        "model_type": "fish_qwen3_omni",
        "dtype": "bfloat16",
        "eos_token_id": config.im_end_id,
        "pad_token_id": config.im_end_id + 24,
        "audio_pad_token_id": config.semantic_begin_id - 1,
        "semantic_start_token_id": config.semantic_begin_id,
        "semantic_end_token_id": config.semantic_end_id,
        "text_config": text,
        "audio_decoder_config": audio,
    }


CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def bundled_config(name_or_path: str) -> ModelConfig:
    """A model config by name from configs/ ('s2-pro', 'tiny') or by path to a config.json."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise InputError(f"unknown model config '{name_or_path}': use s2-pro, tiny or the path of a config.json")
    return load_config(path)
