"""A static cache (fixed buffers written in place at device-held slots, what a CUDA graph needs)
decodes exactly what the growing cache decodes, for every arch, across sliding windows, with
left padding; its decode step creates no tensor from a host-side counter."""
import pytest
import torch

import hybrid_lm

ARCHS = ["transformer", "samba", "sambay", "sambay-da", "lrt"]


def _decode(model, prompt, mask, steps, cache):
    """Greedy: prefill with the mask, then one token per step without one; returns every step's logits."""
    logits = [model(prompt, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(token, past_key_values=cache, logits_to_keep=1).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_decodes_like_dynamic(arch):
    torch.manual_seed(0)
    cfg = hybrid_lm.config(arch)
    model = hybrid_lm.build(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 11))
    mask = torch.ones_like(prompt)
    mask[0, :4], mask[2, :1] = 0, 0  # left padding of different lengths
    steps = 30  # past the tiny window of 16
    with torch.no_grad():
        dynamic = _decode(model, prompt, mask, steps, model.new_cache(3))
        static_cache = model.new_cache(3, max_len=11 + steps + 1)
        static = _decode(model, prompt, mask, steps, static_cache)
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)
    # sliding-window layers hold a ring of `window` slots, full ones the whole length, allocated once
    for layer, kv in zip(model.model.layers, static_cache.layers):
        if kv is not None and hasattr(kv, "capacity"):
            window = getattr(layer.attn, "window", None)
            assert kv.k.shape[1] == (window or 11 + steps + 1)


def test_static_cache_rejects_overflow_and_second_prompt():
    cfg = hybrid_lm.config("transformer")
    model = hybrid_lm.build(cfg).eval()
    cache = model.new_cache(1, max_len=8)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)), past_key_values=cache)
        with pytest.raises(ValueError, match="static cache"):
            model(torch.randint(0, 100, (1, 2)), past_key_values=cache)
        with pytest.raises(ValueError, match="overflow"):
            model(torch.randint(0, 100, (1, 4)), past_key_values=cache)


def test_static_decode_step_ignores_host_counter():
    """Replaying a captured step runs no Python: the step must read its slot from the device.
    Emulate a replay by rewinding the host counter and checking the result does not change."""
    torch.manual_seed(1)
    cfg = hybrid_lm.config("sambay")
    model = hybrid_lm.build(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        a, b = model.new_cache(2, max_len=20), model.new_cache(2, max_len=20)
        model(prompt, past_key_values=a)
        model(prompt, past_key_values=b)
        token = torch.randint(0, cfg.vocab_size, (2, 1))
        b.seen = 0  # a stale host counter, as after a graph replay
        la = model(token, past_key_values=a).logits
        lb = model(token, past_key_values=b).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
