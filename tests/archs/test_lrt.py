"""LRT (Latent Recurrent Transformer, docs/models.md "LRT") on the tiny preset, CPU.

The exact recurrence is checked against a float64 token-by-token loop written here from the
definition (plain tensor ops on the model's weights); decoding against that loop seeded with
an interleaved prefill's cache; the interleaved schedule against the recurrence where the two
must agree (S >= T refines one position per pass, in order: the recurrence exactly), against its
own per-pass outputs, and across left padding."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hybrid_lm
from hybrid_lm.archs import lrt as lrt_module
from hybrid_lm.archs.lrt import LRTForCausalLM

ATOL = 1e-5


def build(**overrides) -> LRTForCausalLM:
    """A tiny LRT whose feedback path matters: gates and gamma away from their neutral init."""
    model = hybrid_lm.build(hybrid_lm.config("lrt", eos_token_id=None, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.attn.gate.weight, std=0.5)
            layer.attn.gamma.fill_(0.5)
    return model


def ids(batch: int, length: int, model) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (batch, length))


def slow_recurrence(model, tokens, kv=None, latent=None):
    """Logits [B, T, V] of the exact recurrence in float64, from the definition: token t adds
    gamma_l * m to the residual before layer l and mixes m into that layer's K,V under its gates,
    then QK-norm and RoPE; m of the next token is this token's final normed state. kv: per layer
    (K [B, P, Hkv, Dh] after RoPE, V) of P earlier tokens; latent: m of the first token."""
    c = model.config
    H, Hkv, Dh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    w = {name: p.detach().double() for name, p in model.named_parameters()}
    B, T = tokens.shape
    keys = [[] if kv is None else [kv[i][0].double()] for i in range(c.num_hidden_layers)]
    values = [[] if kv is None else [kv[i][1].double()] for i in range(c.num_hidden_layers)]
    start = 0 if kv is None else kv[0][0].shape[1]
    m = torch.zeros(B, d, dtype=torch.float64) if latent is None else latent.double()

    def rms(x, weight=None):
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps)
        return y if weight is None else y * weight

    def rope(x, pos):  # rotate-half
        half = Dh // 2
        angle = pos * c.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)

    out = []
    for t in range(T):
        h = w["model.embed_tokens.weight"][tokens[:, t]]
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            fb = w[f"model.feedback.{0 if c.lrt_feedback == 'shared' else i}.weight"]
            h = h + w[p + "attn.gamma"] * m
            x = rms(h, w[p + "input_layernorm.weight"])
            q, k, v = (x @ w[p + "attn.Wqkv.weight"].T).split([H * Dh, Hkv * Dh, Hkv * Dh], -1)
            fk, fv = (m @ fb.T).split(Hkv * Dh, -1)
            g = 2 * torch.sigmoid(x[:, :c.lrt_gate_features] @ w[p + "attn.gate.weight"].T)
            g_loc, g_fb = g[:, :Hkv, None], g[:, Hkv:, None]
            k = g_loc * k.view(B, Hkv, Dh) + g_fb * fk.view(B, Hkv, Dh)
            v = g_loc * v.view(B, Hkv, Dh) + g_fb * fv.view(B, Hkv, Dh)
            q, k = rope(rms(q.view(B, H, Dh)), start + t), rope(rms(k), start + t)
            keys[i].append(k[:, None])
            values[i].append(v[:, None])
            K = torch.cat(keys[i], 1).repeat_interleave(H // Hkv, dim=2)  # [B, t+1, H, Dh]
            V = torch.cat(values[i], 1).repeat_interleave(H // Hkv, dim=2)
            a = torch.softmax(torch.einsum("bhd,bshd->bhs", q, K) * Dh ** -0.5, -1)
            h = h + torch.einsum("bhs,bshd->bhd", a, V).flatten(1) @ w[p + "attn.out_proj.weight"].T
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            gate, up = (x @ w[p + "mlp.fc1.weight"].T).chunk(2, -1)
            h = h + (F.silu(gate) * up) @ w[p + "mlp.fc2.weight"].T
        m = rms(h, w["model.final_layernorm.weight"])
        out.append(m @ w["lm_head.weight"].T)
    return torch.stack(out, 1)


@pytest.mark.parametrize("feedback", ["shared", "layerwise"])
def test_exact_recurrence_matches_slow_loop(feedback):
    model = build(lrt_feedback=feedback)
    x = ids(2, 10, model)
    with torch.no_grad():
        got = model(x, exact_recurrence=True).logits
    torch.testing.assert_close(got.double(), slow_recurrence(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("subsets", [2, 3])
def test_decode_after_prefill_is_exact(subsets):
    model = build(lrt_subsets=subsets)
    x = ids(2, 15, model)
    prompt, rest = x[:, :9], x[:, 9:]
    with torch.no_grad():
        cache = model.new_cache(2)
        prefill = model(prompt, past_key_values=cache).logits
        torch.testing.assert_close(prefill, model(prompt).logits, atol=0, rtol=0)  # prefill = eval schedule
        kv = [(layer.k.clone(), layer.v.clone()) for layer in cache.layers]
        latent = cache.latent.clone()
        steps = torch.cat([model(rest[:, t:t + 1], past_key_values=cache).logits for t in range(rest.shape[1])], 1)
    torch.testing.assert_close(steps.double(), slow_recurrence(model, rest, kv, latent), atol=ATOL, rtol=0)
    assert cache.seen == 15 and cache.layers[0].k.shape[1] == 15 and cache.latent.shape == (2, model.config.hidden_size)


def test_greedy_generation_from_one_token_equals_exact_recomputation():
    model = build()
    x = ids(1, 1, model)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=12, do_sample=False)
        for t in range(1, out.shape[1]):
            logits = model(out[:, :t], exact_recurrence=True).logits[:, -1]
            assert logits.argmax(-1).item() == out[0, t].item(), t


@pytest.mark.parametrize("subsets, window, padded", [(12, None, False), (20, None, True), (12, 4, True)])
def test_one_subset_per_position_is_the_exact_recurrence(subsets, window, padded):
    """With S >= T every pass refines one position, in order, from its refined predecessor: the
    schedule is then the recurrence, in one forward and in chunks continuing a cache (its K,V
    prefix, trimmed to the window, and its latent)."""
    model = build(lrt_subsets=subsets, sliding_window=window)
    x = ids(3, 12, model)
    mask = torch.ones_like(x)
    mask[1, :3] = mask[2, :7] = 0
    mask = mask if padded else None
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        exact = model(x, attention_mask=mask, exact_recurrence=True).logits
        torch.testing.assert_close(model(x, attention_mask=mask).logits[real], exact[real], atol=ATOL, rtol=0)
        cache = model.new_cache(3)
        chunks = torch.cat([model(x[:, a:b], attention_mask=None if mask is None else mask[:, :b],
                                  past_key_values=cache).logits for a, b in ((0, 5), (5, 9), (9, 12))], 1)
    torch.testing.assert_close(chunks[real], exact[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_subsets_follow_position_ids(padded):
    model = build(lrt_subsets=3)
    x = ids(2, 11, model)
    mask = torch.ones_like(x)
    if padded:
        mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(x[:, :5], attention_mask=mask[:, :5] if padded else None, past_key_values=cache)
        out = model(x[:, 5:], attention_mask=mask if padded else None, past_key_values=cache, return_passes=True)
    for r, (tokens, _) in enumerate(out.passes[1:]):
        for b in range(2):
            cols = 5 + tokens[b, tokens[b] < 6]
            assert len(cols) and (positions[b, cols] % 3 == r).all()


@pytest.mark.parametrize("subsets", [2, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_eval_logits_are_those_of_the_last_refining_pass(subsets, padded, monkeypatch):
    model = build(lrt_subsets=subsets)
    x = ids(3, 11, model)
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[1, :3] = 0
        mask[2, :6] = 0
    calls = []
    kernel = lrt_module.K.interleaved_attention
    monkeypatch.setattr(lrt_module.K, "interleaved_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.no_grad():
        evaluated = model(x, attention_mask=mask).logits
    model.train()
    out = model(x, attention_mask=mask, labels=x, return_passes=True)
    assert bool(calls) != padded  # the kernel serves unpadded batches; padded ones take the masked path
    assert len(out.passes) == subsets + 1
    torch.testing.assert_close(out.logits, evaluated, atol=0, rtol=0)
    positions = torch.arange(11).expand(3, -1) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    covered = torch.zeros(3, 11, dtype=torch.bool)
    for r, (tokens, logits) in enumerate(out.passes[1:]):
        for b in range(3):
            used = tokens[b] < 11
            cols = tokens[b, used]
            assert (positions[b, cols] % subsets == r).all()
            assert not covered[b, cols].any()
            covered[b, cols] = True
            # the same final states; only the LM head's matmul shape differs (rounding)
            torch.testing.assert_close(logits[b, used], evaluated[b, cols], atol=ATOL, rtol=0)
    real_tokens = torch.ones(3, 11, dtype=torch.bool) if mask is None else mask.bool()
    assert (covered == real_tokens).all()  # every real token is refined exactly once
    # the loss is the mean of the passes' next-token losses over the tokens each pass ran
    targets = F.pad(x[:, 1:], (0, 2), value=-100)
    losses = [F.cross_entropy(logits.flatten(0, 1), targets.gather(1, tokens).flatten(), ignore_index=-100)
              for tokens, logits in out.passes]
    torch.testing.assert_close(out.loss, torch.stack(losses).mean())


@pytest.mark.parametrize("subsets", [2, 3])
def test_left_padding_does_not_leak(subsets):
    model = build(lrt_subsets=subsets)
    prompts = [ids(1, n, model)[0] for n in (9, 4, 6)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, p in enumerate(prompts):
        batch[b, T - len(p):], mask[b, T - len(p):] = p, 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        padded_logits = model(batch, attention_mask=mask).logits
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
            assert torch.equal(together[b, T:], alone[0, len(p):]), b
            torch.testing.assert_close(padded_logits[b, T - len(p):], model(p[None]).logits[0], atol=ATOL, rtol=0)


def test_training_backpropagates_into_the_feedback_path():
    model = hybrid_lm.build(hybrid_lm.config("lrt")).train()
    for layer in model.model.layers:  # the init: gates at 2 * sigmoid(0) = 1, gamma at lrt_gamma_init
        assert not layer.attn.gate.weight.any() and layer.attn.gamma.item() == pytest.approx(0.1)
    x = ids(2, 16, model)
    model(x, labels=x).loss.backward()
    params = {"W_K|W_V": model.model.feedback[0].weight}
    for i, layer in enumerate(model.model.layers):
        params[f"W_g {i}"], params[f"gamma {i}"] = layer.attn.gate.weight, layer.attn.gamma
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(layer.attn.gate.weight.abs().sum() > 0 for layer in model.model.layers)  # the gates moved


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shared_feedback_is_well_under_one_percent_at_d20():
    c = hybrid_lm.config("lrt", "d20")
    with torch.device("meta"):
        base = count(hybrid_lm.build(hybrid_lm.config("transformer", "d20")))
        shared = count(hybrid_lm.build(c))
        layerwise = count(hybrid_lm.build(hybrid_lm.config("lrt", "d20", lrt_feedback="layerwise")))
    print(f"d20 params: transformer {base:,}, LRT shared +{shared - base:,} ({(shared - base) / base:.3%}), "
          f"layerwise +{layerwise - base:,} ({(layerwise - base) / base:.3%})")
    kv_size, L = c.num_key_value_heads * c.head_dim, c.num_hidden_layers
    per_layer = c.lrt_gate_features * 2 * c.num_key_value_heads + 1  # W_g and gamma
    assert shared - base == 2 * c.hidden_size * kv_size + L * per_layer
    assert layerwise - base == L * (2 * c.hidden_size * kv_size + per_layer)
    assert (shared - base) / base < 0.005


@pytest.mark.parametrize("feedback", ["shared", "layerwise"])
def test_save_and_load_round_trip(tmp_path, feedback):
    model = build(lrt_feedback=feedback, lrt_subsets=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LRTForCausalLM) and loaded.config.lrt_subsets == 3
    x = ids(2, 9, model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_generate_with_sampling():
    model = build()
    x = ids(2, 5, model)
    torch.manual_seed(0)
    first = model.generate(x, max_new_tokens=10, do_sample=True, top_k=50, temperature=1.5)
    torch.manual_seed(0)
    again = model.generate(x, max_new_tokens=10, do_sample=True, top_k=50, temperature=1.5)
    assert first.shape == (2, 15) and torch.equal(first[:, :5], x) and torch.equal(first, again)
    assert ((first >= 0) & (first < model.config.vocab_size)).all()
