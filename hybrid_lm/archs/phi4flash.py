"""Phi-4-mini-flash-reasoning's released format (model_type "phi4flash"), without remote code.

The release is our sambay-da at the phi4-mini-flash preset: the same module tree, hence the same
tensor names (docs/phi4flash.md). Only config.json differs: one renamed field
(layer_norm_eps), a few fields only the release's own code reads (mb_per_layer, hidden_act,
rope_theta, dropout rates), optional Mamba fields it derives when absent, and no fields at all
for what it fixes (LayerNorm with bias, fused Wqkv with bias, no positional encoding, fp32
residual stream, differential attention).

`Phi4FlashConfig` reads that file into our fields and writes it back as the release wrote it;
`Phi4FlashForCausalLM` is SambaYForCausalLM under it. `release_dict` and `native_config` turn a
config into the other format, for `hybrid-lm convert`. Fields of the release that mean nothing
here, and fields we do not know, are kept verbatim in `phi4flash_fields`, so that a checkpoint
converted to ours and back gets its own config.json again.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import transformers
from transformers import PretrainedConfig
from transformers.generation import GenerationConfig

from .config import TOKEN_IDS, SambaYConfig, preset_fields
from .samba import SambaYForCausalLM, SambaYModel

logger = logging.getLogger(__name__)

ARCHITECTURE = "Phi4FlashForCausalLM"
# fields the release's model reads, under our names; its name for one of them differs
SHARED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "sliding_window", "tie_word_embeddings",
          "mamba_d_state", "mamba_d_conv", "mamba_expand", "initializer_range", "use_cache")
RENAMED = {"layer_norm_eps": "norm_eps"}
# optional in the release's file: derived when absent (dt_rank "auto" = ceil(hidden / 16))
OPTIONAL = {"mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False}
# read by the release's code, no counterpart here: the first two must hold these values (they pick
# the layout and the MLP's activation); rope_theta is ignored by the release too (no positional
# encoding); dropout rates apply to training only and our trainer uses none
RELEASE_ONLY = {"mb_per_layer": 2, "hidden_act": "silu", "rope_theta": 10000.0, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attention_dropout": 0.0}
REQUIRED_VALUES = ("mb_per_layer", "hidden_act")
# what the release fixes, as our fields (sambay-da's phi4-mini-flash preset)
_PRESET = preset_fields("sambay-da", "phi4-mini-flash")
FIXED = {k: _PRESET[k] for k in ("norm_type", "attention_bias", "qk_norm", "rope_theta", "residual_in_fp32",
                                  "differential_attention")}
# transformers' own keys: handled by PretrainedConfig, not by us
_STANDARD = (set(PretrainedConfig().to_dict()) | set(GenerationConfig._get_default_generation_params())
             | {"torch_dtype", "name_or_path", "attn_implementation", "experts_implementation",
                "num_labels", *TOKEN_IDS})
_reported: set[tuple[str, ...]] = set()


def read_release(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a release config.json's fields into our config's fields and the ones kept verbatim
    (release-only, optional ones as written, unknown ones: reported once)."""
    fields = dict(fields)
    fields.pop("model_type", None)
    ours = {k: fields.pop(k) for k in SHARED if k in fields}
    ours.update({our: fields.pop(name) for name, our in RENAMED.items() if name in fields})
    kept = {k: fields.pop(k) for k in (*OPTIONAL, *RELEASE_ONLY, "auto_map") if k in fields}
    for name in REQUIRED_VALUES:
        if kept.get(name, RELEASE_ONLY[name]) != RELEASE_ONLY[name]:
            raise ValueError(f"phi4flash config: {name}={kept[name]!r} is not the released architecture "
                             f"(expected {RELEASE_ONLY[name]!r})")
    dt_rank = kept.get("mamba_dt_rank", "auto")
    ours["mamba_dt_rank"] = None if dt_rank == "auto" else dt_rank
    ours.update({k: kept[k] for k in ("mamba_conv_bias", "mamba_proj_bias") if k in kept})
    window = ours.get("sliding_window")
    if isinstance(window, list):  # the release's config class stores one entry per layer
        ours["sliding_window"] = _window_from_list(window)
    unknown = sorted(k for k in fields if k not in _STANDARD and not k.startswith("_"))
    if unknown and tuple(unknown) not in _reported:
        _reported.add(tuple(unknown))
        logger.warning("phi4flash config: fields hybrid-lm does not use, kept as they are: %s", ", ".join(unknown))
    kept.update({k: fields.pop(k) for k in unknown})
    return {**fields, **ours}, kept


def _window_from_list(windows: list) -> int:
    L, sizes = len(windows), {w for w in windows if w is not None}
    layout = len(sizes) == 1 and all((w is not None) == (i < L // 2 and i % 2 == 1) for i, w in enumerate(windows))
    if not layout:
        raise ValueError(f"phi4flash config: sliding_window per layer must hold one window on the odd layers "
                         f"below {L // 2} and null elsewhere, got {windows}")
    return sizes.pop()


def release_dict(config: SambaYConfig) -> dict[str, Any]:
    """The release's config.json for `config` (a Phi4FlashConfig, or our sambay-da built as the
    release: raises ValueError naming any field the release cannot express)."""
    wrong = {k: getattr(config, k) for k, v in FIXED.items() if getattr(config, k) != v}
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        wrong["head_dim"] = config.head_dim
    if wrong:
        raise ValueError(f"phi4flash format: the release fixes {FIXED} and head_dim = hidden_size / "
                         f"num_attention_heads; this config has {wrong}")
    kept = dict(getattr(config, "phi4flash_fields", None) or {})
    version = kept.pop("transformers_version", None) or config.transformers_version or transformers.__version__
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": "phi4flash"}
    out.update({k: getattr(config, k) for k in SHARED})
    out.update({name: getattr(config, our) for name, our in RENAMED.items()})
    out.update({k: getattr(config, k) for k in TOKEN_IDS if getattr(config, k, None) is not None})
    derived = {**OPTIONAL, "mamba_dt_rank": math.ceil(config.hidden_size / 16)}  # the values when absent
    for name, default in derived.items():
        value, written = getattr(config, name), kept.pop(name, None)
        if written is not None and (written == value or (written == "auto" and value == default)):
            out[name] = written  # as the source wrote it
        elif value != default:
            out[name] = value
    out.update(kept)
    if config.dtype is not None:
        out["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    out["transformers_version"] = version
    return out


class Phi4FlashConfig(SambaYConfig):
    """The release's config (model_type "phi4flash"): takes and writes its config.json fields,
    holds ours. Missing fields take the released model's values, but for the token ids."""

    model_type = "phi4flash"
    attribute_map = dict(RENAMED)  # config.layer_norm_eps reads and writes norm_eps

    def __init__(self, **fields: Any):
        ours, kept = read_release(fields)
        # the release's sizes fill what config.json leaves out; its token ids only where it says so
        defaults = {k: v for k, v in _PRESET.items() if k not in TOKEN_IDS}
        super().__init__(**{**defaults, **ours}, phi4flash_fields=kept)

    def __getattr__(self, name: str) -> Any:
        """The release's own fields (config.hidden_act, config.mb_per_layer, unknown ones) read as
        attributes, as with the release's config class; only reached when `name` is not ours."""
        kept = self.__dict__.get("phi4flash_fields", {})
        if name in kept:
            return kept[name]
        if name in RELEASE_ONLY:
            return RELEASE_ONLY[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return release_dict(self)

    def to_diff_dict(self) -> dict[str, Any]:
        return release_dict(self)  # the release's file lists every field: its code has other defaults


class Phi4FlashModel(SambaYModel):
    config_class = Phi4FlashConfig


class Phi4FlashForCausalLM(SambaYForCausalLM):
    """Phi-4-mini-flash-reasoning: SambaY-DA, loaded from and saved in the released format."""

    config_class = Phi4FlashConfig
    model_class = Phi4FlashModel


def native_config(config: Phi4FlashConfig) -> SambaYConfig:
    """Our sambay-da config for a release config (the same model); the release-only fields stay
    in `phi4flash_fields`, for the way back."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(SambaYConfig)
              if f.name not in ("architectures", "transformers_version")}
    fields.update({k: getattr(config, k) for k in TOKEN_IDS if getattr(config, k, None) is not None})
    kept = dict(config.phi4flash_fields)
    if config.transformers_version:  # the release's, written back by release_dict
        kept.setdefault("transformers_version", config.transformers_version)
    return SambaYConfig(**fields, architectures=["SambaYForCausalLM"], phi4flash_fields=kept)


__all__ = ["Phi4FlashConfig", "Phi4FlashForCausalLM", "Phi4FlashModel", "native_config", "release_dict"]
