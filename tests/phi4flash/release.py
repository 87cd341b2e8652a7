"""Tiny checkpoints in the released Phi-4-mini-flash-reasoning format, written from
docs/phi4flash.md alone (names, shapes, dtypes, two shards with an index), not from our
model code: what a test loads here is what the release looks like, only smaller."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

# the tiny size: heads of 32 (the smallest vLLM's CPU attention serves), L = 8 so the
# cross-decoder has both GMU and cross-attention layers, a window the prompts cross
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, sliding_window=16)


def release_config(**overrides) -> dict:
    """config.json as the release writes it (its fields and values), at the tiny size."""
    config = {
        "architectures": ["Phi4FlashForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
                     "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM"},
        "model_type": "phi4flash", "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "embd_pdrop": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "layer_norm_eps": 1e-5, "mb_per_layer": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
        "resid_pdrop": 0.0, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1", "use_cache": True, **TINY,
    }
    config.update(overrides)
    return config


def release_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the release's names and shapes: bf16, A_log and lambdas fp32."""
    g = torch.Generator().manual_seed(seed)
    d, L = config["hidden_size"], config["num_hidden_layers"]
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    dh, di, ff = d // H, config["mamba_expand"] * d, config["intermediate_size"]
    N, W, r = config["mamba_d_state"], config["mamba_d_conv"], config.get("mamba_dt_rank", "auto")
    r = math.ceil(d / 16) if r == "auto" else r  # the release derives it when absent

    def rnd(*shape, scale=None, dtype=torch.bfloat16):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t = {"model.embed_tokens.weight": rnd(config["vocab_size"], d, scale=1.0),
         "model.final_layernorm.weight": 1 + rnd(d, scale=0.1), "model.final_layernorm.bias": rnd(d, scale=0.1)}
    for i in range(L):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[p + norm + ".weight"], t[p + norm + ".bias"] = 1 + rnd(d, scale=0.1), rnd(d, scale=0.1)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc2.weight"] = rnd(2 * ff, d), rnd(d, ff)
        a = p + "attn."
        if i % 2 == 0 and i <= L // 2:  # Mamba (L/2 also emits the memory)
            t.update({a + "in_proj.weight": rnd(2 * di, d), a + "conv1d.weight": rnd(di, 1, W, scale=0.5),
                      a + "conv1d.bias": rnd(di, scale=0.1), a + "x_proj.weight": rnd(r + 2 * N, di),
                      a + "dt_proj.weight": rnd(di, r), a + "dt_proj.bias": rnd(di, scale=1.0) - 3,
                      a + "A_log": torch.log(torch.rand(di, N, generator=g) * 15 + 1),
                      a + "D": rnd(di, scale=1.0), a + "out_proj.weight": rnd(d, di)})
        elif i % 2 == 0:  # GMU
            t.update({a + "in_proj.weight": rnd(di, d), a + "out_proj.weight": rnd(d, di)})
        else:  # differential attention: self (sliding, or full at L/2+1) or cross (queries only)
            rows = H * dh if i > L // 2 + 1 else (H + 2 * Hkv) * dh
            t.update({a + "Wqkv.weight": rnd(rows, d), a + "Wqkv.bias": rnd(rows, scale=0.1),
                      a + "out_proj.weight": rnd(d, H * dh), a + "out_proj.bias": rnd(d, scale=0.1),
                      a + "inner_cross_attn.subln.weight": 1 + rnd(2 * dh, scale=0.1)})
            for lam in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                t[a + "inner_cross_attn." + lam] = torch.randn(dh, generator=g) * 0.1
    return t


def write_release(path, seed: int = 0, tensors: dict | None = None, **overrides) -> tuple[dict, dict]:
    """A release-format checkpoint at `path`: config.json, two safetensors shards (layers split
    in half, embeddings in the first) and model.safetensors.index.json. Returns (config, tensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = release_config(**overrides)
    tensors = release_tensors(config, seed) if tensors is None else tensors
    half = config["num_hidden_layers"] // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    second = lambda n: n.startswith("model.final") or (n.startswith("model.layers.") and int(n.split(".")[2]) >= half)
    weight_map = {n: names[second(n)] for n in tensors}
    for file in names:
        save_file({n: x for n, x in tensors.items() if weight_map[n] == file}, path / file, metadata={"format": "pt"})
    total = sum(x.numel() * x.element_size() for x in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config, tensors


def damaged(tensors: dict[str, torch.Tensor], kind: str, name: str) -> dict[str, torch.Tensor]:
    """`tensors` with `name` "missing", added as "unexpected", or of the "wrong shape" (one row short)."""
    tensors = dict(tensors)
    if kind == "missing":
        del tensors[name]
    elif kind == "unexpected":
        tensors[name] = torch.zeros(3, dtype=torch.bfloat16)
    else:
        tensors[name] = tensors[name][:-1].clone()
    return tensors
