"""The base models (`...Model`, AutoModel) and gradient checkpointing, on every arch.

The base model is the backbone a trainer with a fused LM head calls (TRL:
`model.base_model(input_ids=..., attention_mask=..., use_cache=False).last_hidden_state`), so its
states must be exactly what the causal LM's head reads. Gradient checkpointing recomputes each
decoder layer in backward; gradients must not change (SambaY's layers read the memory and shared
K,V through the Step, LRT's passes read and refresh a K,V buffer: both must survive the recompute).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast

import hybrid_lm
from hybrid_lm.archs.model import HybridModel

from test_models import CASES, left_pad, make_model, rand_ids

ALL = [*CASES, "lrt"]


@pytest.mark.parametrize("case", ALL)
def test_base_model_is_the_head_input(case, tmp_path):
    model = make_model(case)
    assert isinstance(model.model, HybridModel) and model.base_model is model.model
    assert type(model.model).__name__ == type(model).__name__.replace("ForCausalLM", "Model")
    ids, mask = left_pad([rand_ids(13), rand_ids(9)])
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=False)  # TRL's call
        logits = model(ids, attention_mask=mask).logits
    assert isinstance(out, BaseModelOutputWithPast) and out.last_hidden_state.shape == (2, 13, model.config.hidden_size)
    assert torch.equal(model.lm_head(out.last_hidden_state), logits)

    model.save_pretrained(tmp_path)  # a causal LM's checkpoint loads as its base model (the head dropped)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is type(model.model)
    with torch.no_grad():
        assert torch.equal(base(ids, attention_mask=mask).last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("arch", ["transformer", "sambay"])
def test_base_model_takes_inputs_embeds(arch):
    model = make_model(arch)
    ids = rand_ids(2, 11)
    with torch.no_grad():
        want = model.model(ids).last_hidden_state
        got = model.model(inputs_embeds=model.model.embed_tokens(ids)).last_hidden_state
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="exactly one of them"):
        model.model(ids, inputs_embeds=model.model.embed_tokens(ids))


def grads(model, ids, mask, labels) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("case", ALL)
def test_gradient_checkpointing_keeps_gradients(case, padded):
    model = make_model(case).train()
    if padded:
        ids, mask = left_pad([rand_ids(17), rand_ids(12), rand_ids(15)])
        labels = ids.masked_fill(mask == 0, -100)
    else:
        ids, mask = rand_ids(3, 17), None
        labels = ids
    want = grads(model, ids, mask, labels)

    calls = []
    # a pre-hook: the recompute stops early once it has what backward needs, before any post-hook
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    got = grads(model, ids, mask, labels)
    forwards = len(calls)
    model.gradient_checkpointing_disable()
    for hook in hooks:
        hook.remove()
    assert not model.is_gradient_checkpointing

    passes = 1 + model.config.lrt_subsets if case == "lrt" else 1  # LRT runs every layer once per pass
    assert forwards == 2 * passes * len(model.model.layers), "each layer should run again in backward"
    assert got.keys() == want.keys() and len(want) == sum(1 for _ in model.parameters())
    for name, g in want.items():
        err = (got[name] - g).abs().max() / g.abs().max().clamp(min=1e-30)
        assert err <= 1e-6, f"{name}: gradient differs by {err:.2e} (relative) under checkpointing"


def test_gradient_checkpointing_refuses_what_it_cannot_do():
    model = make_model("sambay").train()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.gradient_checkpointing_enable()
    ids = rand_ids(1, 5)
    with pytest.raises(ValueError, match="write the cache twice"):
        model(ids, past_key_values=model.new_cache(1))
    out = model(ids, use_cache=True)  # as transformers' models do: no cache while checkpointing
    assert out.past_key_values is None
    model.eval()
    assert model(ids, use_cache=True).past_key_values is not None


def test_auto_model_registered_for_every_arch():
    for arch in ("transformer", "samba", "sambay", "sambay-da", "lrt"):
        cfg = hybrid_lm.config(arch)
        base = AutoModel.from_config(cfg)
        assert type(base) is type(AutoModelForCausalLM.from_config(cfg).model)
