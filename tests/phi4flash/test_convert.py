"""`hybrid-lm convert`: the released format to ours and back, bit for bit; ours to the release
for publishing; every tensor checked first, nothing written on failure."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from release import damaged
from release import release_config, release_tensors, write_release
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hybrid_lm
from hybrid_lm.archs.phi4flash import TOKEN_IDS
from hybrid_lm.cli import main
from hybrid_lm.convert import convert, parse_size


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def small_release_like(**overrides):
    """Our sambay-da with the release's choices (the phi4-mini-flash preset) at a small size."""
    return hybrid_lm.config("sambay-da", "phi4-mini-flash", vocab_size=300, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=2,
                            max_position_embeddings=512, sliding_window=8, **overrides)


def test_release_to_native_and_back_is_bit_identical(tmp_path):
    """The same files come back: shards byte for byte, the index, config.json, the other files."""
    config, tensors = write_release(tmp_path / "release")
    (tmp_path / "release" / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native")]) == 0
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    assert native["model_type"] == "hybrid_sambay" and native["differential_attention"]
    assert (tmp_path / "native" / "tokenizer_config.json").is_file()
    assert same_tensors(read_tensors(tmp_path / "native"), tensors)

    convert(tmp_path / "native", tmp_path / "back")
    release, back = tmp_path / "release", tmp_path / "back"
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in release.iterdir())
    for shard in release.glob("*.safetensors"):
        assert (back / shard.name).read_bytes() == shard.read_bytes(), shard.name
    for name in ("config.json", "model.safetensors.index.json", "tokenizer_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((release / name).read_text()), name
    assert json.loads((back / "config.json").read_text()) == config

    ids = torch.randint(0, 512, (2, 21))
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d)(ids).logits for d in ("release", "native", "back")]
    assert all(torch.equal(logits[0], x) for x in logits[1:])


def test_max_shard_size_reshards(tmp_path):
    _, tensors = write_release(tmp_path / "release")
    convert(tmp_path / "release", tmp_path / "one", max_shard_size=parse_size("1GB"))
    assert sorted(p.name for p in (tmp_path / "one").glob("model*")) == ["model.safetensors"]
    convert(tmp_path / "one", tmp_path / "many", max_shard_size=parse_size("200KB"))
    many = tmp_path / "many"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(f.stat().st_size < 200_000 + 100_000 for f in shards)  # a shard's header adds a little
    assert same_tensors(read_tensors(many), tensors) and same_tensors(read_tensors(tmp_path / "one"), tensors)


def test_a_native_model_publishes_in_the_release_format(tmp_path):
    """Ours (sambay-da with the release's choices, trained in fp32) -> the release's format ->
    loaded as Phi4FlashForCausalLM, same outputs; and back to ours, the same config."""
    cfg = small_release_like(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = hybrid_lm.build(cfg).eval()
    model.save_pretrained(tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "release")
    release = json.loads((tmp_path / "release" / "config.json").read_text())
    assert release["model_type"] == "phi4flash" and release["architectures"] == ["Phi4FlashForCausalLM"]
    assert release["layer_norm_eps"] == cfg.norm_eps and "norm_type" not in release
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "release")
    assert type(loaded).__name__ == "Phi4FlashForCausalLM"
    ids = torch.randint(0, 300, (1, 19))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    convert(tmp_path / "release", tmp_path / "ours_again")
    first, again = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "ours_again"))
    assert {k: v for k, v in again.items() if k != "phi4flash_fields"} == first
    assert same_tensors(read_tensors(tmp_path / "ours_again"), read_tensors(tmp_path / "ours"))


@pytest.mark.parametrize("source", [dict.fromkeys(TOKEN_IDS), dict(bos_token_id=0, eos_token_id=1, pad_token_id=None),
                                    dict.fromkeys(TOKEN_IDS, 199999)], ids=["none", "some", "outside"])
def test_token_ids_are_written_only_inside_the_vocabulary(tmp_path, source):
    """The release's token ids (199999, the phi4-mini-flash preset's) lie outside a small
    vocabulary: neither way adds them, and those the source has outside it are dropped, with a warning."""
    hybrid_lm.build(small_release_like(**source)).save_pretrained(tmp_path / "ours")
    outside = [k for k, v in source.items() if v == 199999]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(tmp_path / "ours", tmp_path / "release")
    assert [str(w.message) for w in caught if "token id" in str(w.message)] == [
        f"{tmp_path / 'ours' / 'config.json'}: {k}=199999 is not a token id of the vocabulary (vocab_size 300); "
        f"not written" for k in outside]
    convert(tmp_path / "release", tmp_path / "back")
    inside = {k: v for k, v in source.items() if v is not None and k not in outside}
    for folder in ("release", "back"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert {k: config[k] for k in TOKEN_IDS if config.get(k) is not None} == inside, folder


@pytest.mark.parametrize("source", ["release", "ours"])
def test_a_truncated_safetensors_file_is_named(tmp_path, source):
    if source == "release":
        write_release(tmp_path / "src")
        damaged_file = tmp_path / "src" / "model-00002-of-00002.safetensors"
    else:
        hybrid_lm.build(small_release_like(**dict.fromkeys(TOKEN_IDS, 0))).save_pretrained(tmp_path / "src")
        damaged_file = tmp_path / "src" / "model.safetensors"
    damaged_file.write_bytes(damaged_file.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{damaged_file}: not a readable safetensors file (")):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_the_release_cannot_express_is_refused(tmp_path):
    hybrid_lm.build(hybrid_lm.config("sambay-da", "tiny")).save_pretrained(tmp_path / "ours")  # RMSNorm, no biases
    with pytest.raises(ValueError, match="norm_type"):
        convert(tmp_path / "ours", tmp_path / "release")
    assert not (tmp_path / "release").exists()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong shape"])
def test_bad_tensors_are_named_and_nothing_is_written(tmp_path, damage):
    # the head is tied: the release's files do not hold lm_head.weight
    name = {"missing": "model.layers.4.attn.dt_proj.bias", "unexpected": "lm_head.weight",
            "wrong shape": "model.layers.6.attn.in_proj.weight"}[damage]
    write_release(tmp_path / "release", tensors=damaged(release_tensors(release_config()), damage, name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        convert(tmp_path / "release", tmp_path / "native")
    assert not (tmp_path / "native").exists() and list(tmp_path.iterdir()) == [tmp_path / "release"]


def test_existing_output_and_missing_input_are_refused(tmp_path):
    write_release(tmp_path / "release")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tmp_path / "release", tmp_path / "taken")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        convert(tmp_path / "release", tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    convert(tmp_path / "release", tmp_path / "native")
    (tmp_path / "native" / "stale.txt").write_text("from the last conversion")
    convert(tmp_path / "release", tmp_path / "native", overwrite=True)  # replaced whole
    assert not (tmp_path / "native" / "stale.txt").exists() and (tmp_path / "native" / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "release" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        convert(tmp_path / "release", tmp_path / "out")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    with pytest.raises(Exception, match="size"):
        parse_size("big")
