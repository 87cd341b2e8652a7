"""The released format in transformers, without remote code: every tensor maps as stored, the
config's fields are read, unknown ones kept, and a damaged checkpoint fails naming what is wrong."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from release import damaged
from release import release_config, release_tensors, write_release
from transformers import AutoConfig, AutoModelForCausalLM

import hybrid_lm  # noqa: F401  (registers phi4flash with transformers)
from hybrid_lm.archs.phi4flash import Phi4FlashConfig, Phi4FlashForCausalLM


def test_every_tensor_maps_as_stored(tmp_path):
    """bf16 weights stay bf16, A_log and the lambdas stay fp32, each tensor bit for bit; the
    head is the embedding (tied, absent from the files)."""
    _, tensors = write_release(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code, auto_map present
    assert type(model) is Phi4FlashForCausalLM
    state = model.state_dict()
    assert set(state) - set(tensors) == {"lm_head.weight"}
    assert set(tensors) - set(state) == set()
    for name, stored in tensors.items():
        assert state[name].dtype == stored.dtype, name
        assert torch.equal(state[name], stored), name
    assert model.model.layers[0].attn.A_log.dtype == torch.float32
    assert model.model.layers[1].attn.inner_cross_attn.lambda_q1.dtype == torch.float32
    assert model.model.layers[1].attn.Wqkv.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_config_fields_are_read(tmp_path):
    write_release(tmp_path, layer_norm_eps=1e-6, sliding_window=8, mamba_d_conv=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    c = model.config
    assert (c.norm_eps, c.sliding_window, c.mamba_d_conv, c.mamba_dt_rank, c.head_dim) == (1e-6, 8, 3, 8, 32)
    assert (c.norm_type, c.attention_bias, c.rope_theta, c.residual_in_fp32, c.differential_attention) == (
        "layernorm", True, None, True, True)
    assert (c.layer_norm_eps, c.hidden_act, c.mb_per_layer) == (1e-6, "silu", 2)  # the release's names read too
    layers = model.model.layers
    assert layers[0].input_layernorm.eps == 1e-6 and layers[0].attn.conv1d.weight.shape[-1] == 3
    assert [getattr(layer.attn, "window", None) for layer in layers] == [None, 8, None, 8, None, None, None, None]
    assert layers[5].attn.shares_kv and layers[7].attn.cross


def test_a_per_layer_window_list_is_read():
    """The release's own config class stores sliding_window per layer; that form loads too."""
    windows = [None, 16, None, 16, None, None, None, None]
    assert Phi4FlashConfig(**release_config(sliding_window=windows)).sliding_window == 16
    with pytest.raises(ValueError, match="sliding_window"):
        Phi4FlashConfig(**release_config(sliding_window=[None, 16, None, 16, None, 16, None, None]))


@pytest.mark.parametrize("field, value", [("mb_per_layer", 3), ("hidden_act", "gelu")])
def test_fields_that_change_the_architecture_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        Phi4FlashConfig(**release_config(**{field: value}))


def test_unknown_fields_are_kept_and_reported_once(tmp_path, caplog):
    write_release(tmp_path, zz_release_note="kept", zz_other=[1, 2])
    with caplog.at_level(logging.WARNING, logger="hybrid_lm.archs.phi4flash"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
        AutoConfig.from_pretrained(tmp_path)
    reports = [r.getMessage() for r in caplog.records if "zz_release_note" in r.getMessage()]
    assert len(reports) == 1 and "zz_other" in reports[0]
    assert model.config.zz_release_note == "kept"
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["zz_release_note"] == "kept" and saved["zz_other"] == [1, 2]


@pytest.mark.parametrize("optional", [{}, {"mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False},
                                      {"mamba_dt_rank": 4}])
def test_save_pretrained_writes_the_release_config(tmp_path, optional):
    """A loaded model saves config.json as the release wrote it (its field names, every field,
    the optional Mamba fields only where the source had them)."""
    config, tensors = write_release(tmp_path / "release", **optional)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "release")
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 512, (1, 20))
    assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong shape"])
def test_damaged_checkpoints_fail_naming_the_tensor(tmp_path, damage):
    name = {"missing": "model.layers.2.attn.A_log", "unexpected": "model.layers.0.attn.extra",
            "wrong shape": "model.layers.1.attn.Wqkv.bias"}[damage]
    write_release(tmp_path, tensors=damaged(release_tensors(release_config()), damage, name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)
