"""hybrid_lm.config checks every argument before any work starts: unknown fields, wrong types and
out-of-range values raise ValueError naming the field."""
import pytest
from transformers import AutoConfig

import hybrid_lm
from hybrid_lm.archs.config import ARCHS, PRESETS, TransformerConfig


def test_unknown_field_names_the_closest_known_one():
    with pytest.raises(ValueError, match=r"unknown field 'hiden_size' for arch 'transformer' \(did you mean 'hidden_size'\?\)"):
        hybrid_lm.config("transformer", hiden_size=10)


def test_unknown_field_without_a_close_one():
    with pytest.raises(ValueError, match=r"unknown field 'zzz' for arch 'lrt'$"):
        hybrid_lm.config("lrt", zzz=1)


def test_inherited_fields_are_accepted():
    cfg = hybrid_lm.config("transformer", bos_token_id=3, eos_token_id=None, pad_token_id=0, tie_word_embeddings=True,
                           output_hidden_states=True, architectures=["TransformerForCausalLM"], torch_dtype="float32")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (3, None, 0)
    assert cfg.tie_word_embeddings and cfg.output_hidden_states
    assert cfg.architectures == ["TransformerForCausalLM"]


@pytest.mark.parametrize("overrides", [dict(rope_theta=500000), dict(norm_eps=1), dict(head_dim=None),
                                       dict(rope_theta=None), dict(sliding_window=None), dict(initializer_range=0.0)])
def test_valid_values_accepted(overrides):
    """An int where a float goes, and None where the annotation allows it."""
    cfg = hybrid_lm.config("transformer", **overrides)
    for name, value in overrides.items():
        if value is not None:
            assert getattr(cfg, name) == value


@pytest.mark.parametrize("arch,overrides,match", [
    ("transformer", dict(intermediate_size=-1), "intermediate_size must be a positive int, got -1"),
    ("samba", dict(mamba_expand=-2), "mamba_expand must be a positive int, got -2"),
    ("lrt", dict(lrt_gate_features=-4), "lrt_gate_features must be a positive int, got -4"),
    ("lrt", dict(lrt_subsets=0), "lrt_subsets must be a positive int, got 0"),
    ("transformer", dict(max_position_embeddings=-5), "max_position_embeddings must be a positive int, got -5"),
    ("sambay", dict(mamba_d_state=0), "mamba_d_state must be a positive int, got 0"),
    ("transformer", dict(hidden_size=64.5), r"hidden_size expects int, got 64\.5 \(float\)"),
    ("transformer", dict(norm_eps=-1), "norm_eps must be > 0, got -1"),
    ("transformer", dict(norm_eps=0), "norm_eps must be > 0, got 0"),
    ("transformer", dict(rope_theta=0.0), r"rope_theta must be > 0 or None, got 0\.0"),
    ("transformer", dict(initializer_range=-0.1), r"initializer_range must be >= 0, got -0\.1"),
    ("transformer", dict(num_hidden_layers=True), r"num_hidden_layers expects int, got True \(bool\)"),
    ("transformer", dict(norm_eps=True), r"norm_eps expects float, got True \(bool\)"),
    ("transformer", dict(qk_norm=1), r"qk_norm expects bool, got 1 \(int\)"),
    ("transformer", dict(norm_type=None), r"norm_type expects str, got None"),
    ("transformer", dict(sliding_window="16"), r"sliding_window expects int \| None, got '16' \(str\)"),
])
def test_bad_values_raise(arch, overrides, match):
    with pytest.raises(ValueError, match="config: " + match):
        hybrid_lm.config(arch, **overrides)


def test_build_checks_a_config_made_any_way():
    """The ranges live in validate_arch: a config built without hybrid_lm.config fails at build,
    before any tensor is made."""
    with pytest.raises(ValueError, match="config: intermediate_size must be a positive int, got -1"):
        hybrid_lm.build(TransformerConfig(intermediate_size=-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_preset_config_builds(arch):
    for preset in PRESETS:
        depth = int(preset[1:]) if preset.startswith("d") else None
        if arch.startswith("sambay") and depth is not None and depth % 4:
            # the only impossible presets: SambaY's layer pattern needs a depth divisible by 4
            with pytest.raises(ValueError, match="divisible by 4"):
                hybrid_lm.config(arch, preset)
        else:
            hybrid_lm.config(arch, preset)


@pytest.mark.parametrize("arch", ARCHS)
def test_autoconfig_round_trip(arch, tmp_path):
    """from_pretrained builds the class with config.json's fields, unchecked by config()."""
    cfg = hybrid_lm.config(arch, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(cfg)
    assert {**loaded.to_dict(), "_name_or_path": ""} == cfg.to_dict()  # loaded records its folder
    loaded.validate_arch()
