"""transformers' forward API on every arch, checked against what transformers documents:
hidden states (the embeddings, then each layer's output, the last one normed) and attention maps
(one softmax map per attention layer), tuples with return_dict=False, inputs_embeds in forward and
generate, the loss API (shift_labels, num_items_in_batch), padding-free batches through
position_ids (DataCollatorWithFlattening), extra generate kwargs, and loading info."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DataCollatorWithFlattening

import hybrid_lm
from hybrid_lm.archs.layers import Attention

from test_models import ATOL, CASES, left_pad, make_model, rand_ids

ALL = [*CASES, "lrt"]


def layer_outputs(model) -> list[list[torch.Tensor]]:
    """Hooks on every decoder layer: per layer, its output [B, n, d] at each call, in call order."""
    calls = [[] for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(out[0] if isinstance(out, tuple)
                                                                                 else out))
    return calls


@pytest.mark.parametrize("case", ALL)
def test_hidden_states_are_each_layers_output(case):
    model = make_model(case)
    lrt = model.config.arch == "lrt"
    ids, mask = left_pad([rand_ids(11), rand_ids(7)])
    calls = layer_outputs(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, **({"return_passes": True} if lrt else {}))
        plain = model(ids, attention_mask=mask)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    hs = out.hidden_states
    assert len(hs) == L + 1 and all(h.shape == (2, 11, d) for h in hs)
    torch.testing.assert_close(hs[0], model.model.embed(ids, None), rtol=0, atol=0)
    assert torch.equal(model.lm_head(hs[-1]), out.logits)  # the last one is normed: the head's input
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=ATOL)  # asking changes nothing
    for i in range(L - 1):
        if not lrt:
            assert torch.equal(hs[i + 1], calls[i][0]), i
            continue
        # LRT: each token's state comes from the pass that refined it last (pass 0 for padding)
        want = calls[i][0].clone()
        for (tokens, _), got in zip(out.passes[1:], calls[i][1:]):
            for b in range(2):
                keep = tokens[b] < 11  # not the trash column
                want[b, tokens[b][keep]] = got[b][keep]
        assert torch.equal(hs[i + 1], want), i


def expected_attention_layers(config) -> list[int]:
    L = config.num_hidden_layers
    if config.arch in ("transformer", "lrt"):
        return list(range(L))
    if config.arch == "samba":
        return list(range(1, L, 2))
    split = L // 2 + 2  # SambaY: odd self-decoder layers, the shared layer, odd cross-decoder layers
    return [*range(1, L // 2, 2), L // 2 + 1, *range(split + 1, L, 2)]


@pytest.mark.parametrize("case", ALL)
def test_attentions_one_map_per_attention_layer(case):
    model = make_model(case)
    ids, mask = left_pad([rand_ids(11), rand_ids(7)])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    layers = model.model.attention_layers()
    assert layers == expected_attention_layers(model.config)
    assert len(out.attentions) == len(layers)
    q, k = torch.arange(11)[:, None], torch.arange(11)[None]
    for i, a in zip(layers, out.attentions):
        assert a.shape == (2, model.config.num_attention_heads, 11, 11), i
        window = model.model.layers[i].attn.window
        hidden = (k > q) | (mask[:, None, None, :] == 0)  # future keys, padding keys
        if window is not None:
            hidden = hidden | (q - k >= window)
        real = mask[:, None, :, None].bool().expand_as(a)
        assert a[hidden.expand_as(a) & real].abs().max() == 0, i
        torch.testing.assert_close(a.sum(-1)[real[..., 0]], torch.ones_like(a.sum(-1)[real[..., 0]]))


@pytest.mark.parametrize("case", CASES)
def test_attention_maps_are_the_ones_the_output_used(case):
    """Gradients reach each returned map (transformers' retain_grad check): it is the tensor the
    layer's output was computed from. LRT's maps are assembled from its passes afterwards."""
    model = make_model(case)
    out = model(rand_ids(2, 6), output_attentions=True, output_hidden_states=True)
    for a in out.attentions:
        a.retain_grad()
    out.logits.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in out.attentions)


def test_attention_map_is_softmax_of_queries_and_keys():
    """The map itself, from the layer's own q and k, for plain attention (Transformer)."""
    model = make_model("transformer")
    ids, mask = left_pad([rand_ids(9), rand_ids(6)])
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for i, a in enumerate(out.attentions):
        attn = model.model.layers[i].attn
        with torch.no_grad():
            q, (k, _) = attn._q(inputs[i], positions), attn._kv(inputs[i], positions)
        k = k.repeat_interleave(attn.heads // attn.kv_heads, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * attn.head_dim ** -0.5
        visible = torch.ones(9, 9, dtype=torch.bool).tril() & mask[:, None, None, :].bool()
        visible = visible | torch.eye(9, dtype=torch.bool)  # a padded query sees itself
        want = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["sambay", "sambay-da"])
def test_sambay_prefill_with_outputs_covers_every_token_and_keeps_the_cache(case):
    model = make_model(case)
    ids, mask = left_pad([rand_ids(10), rand_ids(6)])
    nxt = rand_ids(2, 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        cached = model(ids, attention_mask=mask, use_cache=True, output_hidden_states=True, output_attentions=True)
        assert cached.logits.shape[1] == 10
        for a, b in zip(full.hidden_states + full.attentions, cached.hidden_states + cached.attentions):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model(nxt, attention_mask=mask2, past_key_values=cached.past_key_values).logits
        plain = model(ids, attention_mask=mask, use_cache=True)
        want = model(nxt, attention_mask=mask2, past_key_values=plain.past_key_values).logits
    torch.testing.assert_close(step, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ALL)
def test_generate_returns_hidden_states_and_attentions(case):
    model = make_model(case)
    ids, mask = left_pad([rand_ids(8), rand_ids(5)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                             output_attentions=True, return_dict_in_generate=True, pad_token_id=0)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, plain)
    L, d, H = model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads
    n_maps = len(model.model.attention_layers())
    assert len(out.hidden_states) == len(out.attentions) == 3
    for step, (hs, maps) in enumerate(zip(out.hidden_states, out.attentions)):
        q = 8 if step == 0 else 1
        assert len(hs) == L + 1 and all(h.shape == (2, q, d) for h in hs)
        assert len(maps) == n_maps and all(a.shape[:3] == (2, H, q) for a in maps)


@pytest.mark.parametrize("case", ALL)
def test_return_dict_false_gives_tuples(case):
    model = make_model(case)
    ids = rand_ids(2, 7)
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        with_cache = model(ids, use_cache=True, return_dict=False)
        base = model.model(ids, return_dict=False)
        model.config.return_dict = False
        by_config = model(ids)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple) and isinstance(by_config, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == 2 and with_cache[1] is not None  # (loss, logits); (logits, the cache)
    torch.testing.assert_close(base[0], model.model(ids, return_dict=True).last_hidden_state, rtol=0, atol=0)
    assert torch.equal(by_config[0], as_dict.logits)


@pytest.mark.parametrize("case", ALL)
def test_inputs_embeds_in_forward_and_generate(case):
    model = make_model(case)
    ids, mask = left_pad([rand_ids(9), rand_ids(6)])
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits, rtol=0, atol=0)
        from_ids = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0)
        both = model.generate(ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(from_embeds, from_ids[:, 9:])  # generate with inputs_embeds returns the new tokens
    assert torch.equal(both, from_ids)  # ... and with the prompt's ids too, the prompt first


@pytest.mark.parametrize("case", ALL)
def test_loss_takes_shift_labels_and_num_items_in_batch(case):
    model = make_model(case)
    ids = rand_ids(4, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        torch.testing.assert_close(model(ids, shift_labels=shift).loss, loss, rtol=1e-6, atol=0)
        count = (shift != -100).sum()
        torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=count).loss, loss, rtol=1e-6, atol=0)
        if model.config.arch == "lrt":
            return  # LRT's loss is a mean over its passes: the count scales each pass (see LRTForCausalLM._loss)
        # Trainer's gradient accumulation: micro-batch losses over the global count sum to the global mean
        halves = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=count).loss for i in (0, 2)]
    torch.testing.assert_close(sum(halves), loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ALL)
def test_padding_free_batches_through_position_ids(case):
    model = make_model(case)
    docs = [rand_ids(7), rand_ids(5), rand_ids(9)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs])
    assert batch["position_ids"].shape == (1, 21)
    if model.config.arch == "lrt":
        with pytest.raises(ValueError, match="packed documents"):
            model(**batch)
        return
    with torch.no_grad():
        packed = model(**batch)
        alone = [model(d[None], labels=d[None]) for d in docs]
    torch.testing.assert_close(packed.logits, torch.cat([a.logits for a in alone], 1), rtol=0, atol=ATOL)
    counts = [len(d) - 1 for d in docs]
    want = sum(a.loss * n for a, n in zip(alone, counts)) / sum(counts)
    torch.testing.assert_close(packed.loss, want, rtol=1e-5, atol=0)


def test_position_ids_must_agree_with_the_mask():
    model = make_model("transformer")
    ids, mask = left_pad([rand_ids(6), rand_ids(4)])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what transformers makes: fine
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits,
                                   model(ids, attention_mask=mask).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, attention_mask=mask, position_ids=positions + 3)
        with pytest.raises(ValueError, match=r"position_ids: expected shape \[B=2, T=6\]"):
            model(ids, attention_mask=mask, position_ids=positions[:, :4])


def test_prepare_inputs_for_generation_passes_extra_kwargs():
    model = make_model("sambay")
    ids = rand_ids(2, 5)
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                                                 output_hidden_states=True, logits_to_keep=1, token_type_ids=None,
                                                 position_ids=ids, cache_position=torch.arange(5))
    assert inputs["output_attentions"] and inputs["output_hidden_states"] and inputs["logits_to_keep"] == 1
    assert "token_type_ids" in inputs and "position_ids" not in inputs and "cache_position" not in inputs
    assert torch.equal(inputs["input_ids"], ids)


def test_loading_info_instead_of_an_error(tmp_path):
    model = make_model("samba")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    gone = "model.layers.1.mlp.fc2.weight"
    del tensors[gone]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=gone):
        type(model).from_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert gone in info["missing_keys"] and isinstance(loaded, type(model))


@pytest.mark.parametrize("arch, kept", [("transformer", set()), ("samba", {"A_log"}), ("sambay", {"A_log"}),
                                        ("sambay-da", {"A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}),
                                        ("lrt", set())])
def test_keep_in_fp32_names_only_what_the_arch_has(arch, kept):
    model = hybrid_lm.build(hybrid_lm.config(arch))
    assert set(model._keep_in_fp32_modules_strict) == kept == set(model.model._keep_in_fp32_modules_strict)
    assert all(isinstance(model.model.layers[i].attn, Attention) for i in model.model.attention_layers())
