"""Configs and presets for every architecture: `config(arch, preset, **overrides)`.

One dial sets the size, as in nanochat: `depth` layers of width 128 * depth, head dim 128,
2:1 GQA, SwiGLU of 4x width (the SambaY scaling study ties width to depth this way; at d20 the
LRT's shared feedback projections are about 0.3% of the parameters, see docs/models.md).
`phi4-mini-flash` is the released Phi-4-mini-flash-reasoning size; for `sambay-da` it is that
architecture exactly (see docs/phi4flash.md), for the other archs the same dimensions.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from transformers import PretrainedConfig

ARCHS = ("transformer", "samba", "sambay", "sambay-da", "lrt")
DEPTH_PRESETS = {f"d{d}": d for d in range(8, 25, 2)}
PRESETS = ("tiny", *DEPTH_PRESETS, "phi4-mini-flash")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# sizes: each must be >= 1 (checked in this order, so a bad hidden_size is named before the
# mamba_dt_rank derived from it)
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "mamba_d_state", "mamba_expand",
                   "mamba_dt_rank", "lrt_gate_features", "lrt_subsets")


class HybridConfig(PretrainedConfig):
    """Fields shared by every architecture (transformers naming); subclasses fix `model_type`.
    A transformers config is a dataclass: fields are annotated class attributes."""

    model_type = "hybrid_lm"
    arch = ""
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    norm_type: str = "rmsnorm"  # or "layernorm" (with bias, as phi4-mini-flash)
    norm_eps: float = 1e-5
    attention_bias: bool = False
    qk_norm: bool = True
    rope_theta: float | None = 10000.0  # None: no positional encoding (SambaY)
    sliding_window: int | None = None
    differential_attention: bool = False
    residual_in_fp32: bool = False
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | None = None  # None: ceil(hidden_size / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    lrt_subsets: int = 2
    lrt_feedback: str = "shared"  # or "layerwise"
    lrt_gamma_init: float = 0.1
    lrt_gate_features: int = 32
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(f"config: num_attention_heads={self.num_attention_heads} must divide "
                                 f"hidden_size={self.hidden_size} (or set head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_dt_rank is None:
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    def validate_arch(self) -> None:
        """Raise ValueError if this config cannot be built."""
        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be a positive int, got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"config: norm_eps must be > 0, got {self.norm_eps!r}")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ValueError(f"config: rope_theta must be > 0 or None, got {self.rope_theta!r}")
        if not self.initializer_range >= 0:
            raise ValueError(f"config: initializer_range must be >= 0, got {self.initializer_range!r}")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h % kv:
            raise ValueError(f"config: num_key_value_heads={kv} must divide num_attention_heads={h}")
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"config: norm_type must be 'rmsnorm' or 'layernorm', got {self.norm_type!r}")
        if self.differential_attention and (h % 2 or kv % 2):
            raise ValueError(f"config: differential attention pairs heads: heads={h} and kv heads={kv} must be even")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"config: sliding_window must be a positive int or None, got {self.sliding_window}")
        if not 2 <= self.mamba_d_conv <= 8:
            raise ValueError(f"config: mamba_d_conv must be in 2..8, got {self.mamba_d_conv}")


class TransformerConfig(HybridConfig):
    model_type = "hybrid_transformer"
    arch = "transformer"


class SambaConfig(HybridConfig):
    model_type = "hybrid_samba"
    arch = "samba"

    def validate_arch(self) -> None:
        super().validate_arch()
        if self.sliding_window is None:
            raise ValueError("config: samba needs a sliding_window for its attention layers")


class SambaYConfig(HybridConfig):
    """SambaY, and SambaY-DA when differential_attention is set."""
    model_type = "hybrid_sambay"

    @property
    def arch(self) -> str:  # type: ignore[override]
        return "sambay-da" if self.differential_attention else "sambay"

    def validate_arch(self) -> None:
        if self.num_hidden_layers % 4:
            raise ValueError(f"config: SambaY needs num_hidden_layers divisible by 4 (self-decoder halves of "
                             f"alternating Mamba/attention), got {self.num_hidden_layers}")
        if self.sliding_window is None:
            raise ValueError("config: sambay needs a sliding_window for its self-decoder attention layers")
        super().validate_arch()


class LRTConfig(HybridConfig):
    model_type = "hybrid_lrt"
    arch = "lrt"

    def validate_arch(self) -> None:
        super().validate_arch()
        if self.lrt_feedback not in ("shared", "layerwise"):
            raise ValueError(f"config: lrt_feedback must be 'shared' or 'layerwise', got {self.lrt_feedback!r}")
        if self.lrt_gate_features > self.hidden_size:
            raise ValueError(f"config: lrt_gate_features={self.lrt_gate_features} exceeds hidden_size")


CONFIG_CLASSES = {"transformer": TransformerConfig, "samba": SambaConfig, "sambay": SambaYConfig,
                  "sambay-da": SambaYConfig, "lrt": LRTConfig}


def preset_fields(arch: str, preset: str) -> dict:
    """The config fields of `arch` at `preset` size, before overrides."""
    fields = _size_fields(arch, preset)
    if arch in ("sambay", "sambay-da"):
        # SambaY needs no positional encoding: its Mamba layers carry position
        fields.update(rope_theta=None, qk_norm=False)
    if arch == "sambay-da":
        fields["differential_attention"] = True
    return fields


def _size_fields(arch: str, preset: str) -> dict:
    hybrid = arch in ("samba", "sambay", "sambay-da")
    if preset == "tiny":
        # 8 layers: SambaY's cross-decoder then holds GMU and cross-attention layers, and every
        # arch has the same depth, so tiny comparisons are like for like. Heads of 32: the
        # smallest head size vLLM's CPU attention serves.
        fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)
        if hybrid:
            fields["sliding_window"] = 16
        return fields
    if preset == "phi4-mini-flash":
        fields = dict(vocab_size=200064, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                      num_attention_heads=40, num_key_value_heads=20, max_position_embeddings=262144,
                      tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999)
        if hybrid:
            # the release: LayerNorm with bias, fused Wqkv with bias, fp32 residual stream, no RoPE
            fields.update(sliding_window=512, norm_type="layernorm", attention_bias=True, qk_norm=False,
                          rope_theta=None, residual_in_fp32=True)
        return fields
    depth = DEPTH_PRESETS[preset]
    width = 128 * depth
    fields = dict(vocab_size=32768, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                  num_attention_heads=depth, num_key_value_heads=max(1, depth // 2), head_dim=128,
                  max_position_embeddings=4096)
    if hybrid:
        fields["sliding_window"] = 512
    return fields


# Keywords transformers' PretrainedConfig takes besides its dataclass fields: the special token ids
# (no longer declared fields in transformers 5, but generate reads them from the config) and the
# ones its __post_init__ consumes
TRANSFORMERS_KWARGS = frozenset({*TOKEN_IDS, "torch_dtype", "num_labels", "name_or_path", "output_attentions",
                                 "attn_implementation", "experts_implementation"})
# The Python types each part of a field's annotation admits (annotations are strings: postponed
# evaluation); bool is an int subclass, so an int field refuses it unless "bool" is listed
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _check_override(arch: str, name: str, value: Any, annotations: dict[str, str]) -> None:
    if name not in annotations and name not in TRANSFORMERS_KWARGS:
        close = difflib.get_close_matches(name, [*annotations, *TRANSFORMERS_KWARGS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"config: unknown field {name!r} for arch {arch!r}{hint}")
    parts = [p.strip() for p in annotations.get(name, "").split("|")]
    if not all(p in _TYPES for p in parts):
        return  # transformers' own richer annotations (list[str] | None, torch.dtype, ...): left unchecked
    allowed = tuple(t for p in parts for t in _TYPES[p])
    if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in parts):
        raise ValueError(f"config: {name} expects {annotations[name]}, got {value!r} ({type(value).__name__})")


def config(arch: str, preset: str = "tiny", **overrides: Any) -> HybridConfig:
    """Build the config of `arch` at `preset` size; overrides apply verbatim (None included).
    Every override is checked before any work starts: an unknown name or a value of the wrong type
    raises ValueError, and so does an out-of-range one (validate_arch)."""
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of tiny, d8..d24 (even), phi4-mini-flash, got {preset!r}")
    # here, not in the config classes: transformers builds those bare and from any config.json
    annotations = {f.name: f.type for f in dataclasses.fields(CONFIG_CLASSES[arch])}
    for name, value in overrides.items():
        _check_override(arch, name, value, annotations)
    fields = preset_fields(arch, preset)
    fields.update(overrides)
    for name in TOKEN_IDS:  # the release's ids, past a smaller vocabulary
        if name not in overrides and fields.get(name) is not None and fields[name] >= fields["vocab_size"]:
            del fields[name]
    cfg = CONFIG_CLASSES[arch](**fields)
    cfg.validate_arch()
    return cfg
