"""The forward follows docs/phi4flash.md where the release differs from our default
sambay-da: LayerNorm with bias, fused Wqkv with bias, the even/odd head split of differential
attention, the fp32 residual stream, the tied head (and fc1 as gate|up). Each is pinned against
a direct computation from the checkpoint's own tensors, written from the document, not from our
modules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from release import write_release
from transformers import AutoModelForCausalLM

import hybrid_lm  # noqa: F401
from hybrid_lm.archs.layers import Step

T = 37  # tokens: more than twice the window (16), odd


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(config, tensors as float64, model in fp32) of one tiny release checkpoint."""
    path = tmp_path_factory.mktemp("release")
    config, tensors = write_release(path, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return config, {k: v.double() for k, v in tensors.items()}, model


def step_of(T: int) -> Step:
    return Step(slots=torch.arange(T), valid=None, positions=torch.arange(T)[None])


def close(ours: torch.Tensor, direct: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), direct, rtol=1e-4, atol=1e-4)


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def differential_attention(config, t, prefix, layer, x, kv=None, window=None):
    """docs/phi4flash.md's differential attention, head by head: fused Wqkv rows q | k | v with bias
    (queries only for a cross layer, which reads `kv`); heads split into even (1) and odd (2);
    attn_i = [A(q_i, k_i, v1), A(q_i, k_i, v2)]; lambda from the four vectors and the layer's
    lambda_init; RMSNorm over 2 dh, times (1 - lambda_init); heads re-interleaved; out_proj."""
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    dh = config["hidden_size"] // H
    qkv = x @ t[prefix + "Wqkv.weight"].T + t[prefix + "Wqkv.bias"]
    q = qkv[:, :H * dh].reshape(-1, H, dh)
    if kv is None:
        k = qkv[:, H * dh:(H + Hkv) * dh].reshape(-1, Hkv, dh)
        v = qkv[:, (H + Hkv) * dh:].reshape(-1, Hkv, dh)
    else:
        k, v = kv
    Tq, Tk = q.shape[0], k.shape[0]
    i, j = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None]
    visible = (j <= i) & (True if window is None else (i - j < window))

    def A(qh, kh, vh):
        s = (qh @ kh.T) / math.sqrt(dh)
        return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vh

    c = prefix + "inner_cross_attn."
    lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer)
    lam = (torch.exp((t[c + "lambda_q1"] * t[c + "lambda_k1"]).sum())
           - torch.exp((t[c + "lambda_q2"] * t[c + "lambda_k2"]).sum()) + lambda_init)
    group = (H // 2) // (Hkv // 2)  # query heads per KV head within each half
    heads = []
    for h in range(H // 2):
        g = h // group
        q1, q2 = q[:, 2 * h], q[:, 2 * h + 1]
        k1, k2, v1, v2 = k[:, 2 * g], k[:, 2 * g + 1], v[:, 2 * g], v[:, 2 * g + 1]
        attn1 = torch.cat([A(q1, k1, v1), A(q1, k1, v2)], -1)
        attn2 = torch.cat([A(q2, k2, v1), A(q2, k2, v2)], -1)
        a = attn1 - lam * attn2
        a = a / torch.sqrt((a ** 2).mean(-1, keepdim=True) + 1e-5) * t[c + "subln.weight"] * (1 - lambda_init)
        heads += [a[:, :dh], a[:, dh:]]
    o = torch.stack(heads, 1).reshape(-1, H * dh)
    return o @ t[prefix + "out_proj.weight"].T + t[prefix + "out_proj.bias"], (k, v)


def test_layernorm_has_a_bias(release):
    config, t, model = release
    x = torch.randn(2, T, config["hidden_size"], dtype=torch.float64)
    for i in (0, 5, 7):
        p = f"model.layers.{i}.input_layernorm."
        close(model.model.layers[i].input_layernorm(x.float()), layer_norm(x, t[p + "weight"], t[p + "bias"]))
    close(model.model.final_layernorm(x.float()),
          layer_norm(x, t["model.final_layernorm.weight"], t["model.final_layernorm.bias"]))


def test_mlp_fc1_is_gate_then_up(release):
    config, t, model = release
    x = torch.randn(T, config["hidden_size"], dtype=torch.float64)
    fc1, fc2 = t["model.layers.3.mlp.fc1.weight"], t["model.layers.3.mlp.fc2.weight"]
    gate, up = (x @ fc1.T).chunk(2, -1)
    close(model.model.layers[3].mlp(x.float()), (F.silu(gate) * up) @ fc2.T)


def test_sliding_differential_attention_with_fused_biased_wqkv(release):
    config, t, model = release
    x = torch.randn(T, config["hidden_size"], dtype=torch.float64)
    ours = model.model.layers[1].attn(x[None].float(), step_of(T))[0]
    direct, _ = differential_attention(config, t, "model.layers.1.attn.", 1, x, window=config["sliding_window"])
    close(ours, direct)


def test_full_and_cross_differential_attention(release):
    """Layer L/2+1 attends to everything and hands its K,V to the cross layers, whose fused Wqkv
    holds queries only (with bias)."""
    config, t, model = release
    L = config["num_hidden_layers"]
    full, cross = L // 2 + 1, L - 1
    x, y = (torch.randn(T, config["hidden_size"], dtype=torch.float64) for _ in range(2))
    step = step_of(T)
    ours_full = model.model.layers[full].attn(x[None].float(), step)[0]
    direct_full, kv = differential_attention(config, t, f"model.layers.{full}.attn.", full, x)
    close(ours_full, direct_full)
    ours_cross = model.model.layers[cross].attn(y[None].float(), step)[0]  # reads the K,V `step` holds
    direct_cross, _ = differential_attention(config, t, f"model.layers.{cross}.attn.", cross, y, kv=kv)
    close(ours_cross, direct_cross)


def test_residual_stream_is_fp32_with_bf16_weights(tmp_path):
    """Loaded as stored (bf16), the stream between layers is fp32: the embedding is promoted,
    each norm reads the stream cast to bf16, and each sublayer's output is added in fp32."""
    _, tensors = write_release(tmp_path, seed=6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, T))
    seen = []
    # the memory layer (L/2) also returns the GMU memory: keep its hidden states
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0] if isinstance(out, tuple) else out)))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    assert all(h_in.dtype == torch.float32 and h_out.dtype == torch.float32 for h_in, h_out in seen)
    assert torch.equal(seen[0][0], tensors["model.embed_tokens.weight"][ids].float())
    layer, h = model.model.layers[1], seen[1][0]  # a sliding differential attention layer
    with torch.no_grad():
        mid = h + layer.attn(layer.input_layernorm(h.bfloat16()), step_of(T)).float()
        out = mid + layer.mlp(layer.post_attention_layernorm(mid.bfloat16())).float()
    assert torch.equal(seen[1][1], out)
    assert not torch.equal(out, (h.bfloat16() + layer.attn(layer.input_layernorm(h.bfloat16()), step_of(T))).float())


def test_head_is_tied_to_the_embedding(release):
    config, t, model = release
    ids = torch.randint(0, 512, (2, T))
    final = []
    hook = model.model.final_layernorm.register_forward_hook(lambda m, args, out: final.append(args[0]))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    normed = layer_norm(final[0].double(), t["model.final_layernorm.weight"], t["model.final_layernorm.bias"])
    close(logits, normed @ t["model.embed_tokens.weight"].T)
