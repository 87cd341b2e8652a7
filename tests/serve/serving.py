"""Helpers of the vLLM tests: tiny checkpoints, greedy decoding on both sides."""
from __future__ import annotations

import torch

import hybrid_lm

# fp32 on both sides, so greedy decoding must agree token for token
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=512, seed=0)


def tiny_checkpoint(path, arch: str, seed: int = 0, tokenizer=None, **overrides):
    """A random tiny model of `arch` saved at `path`; its lm_head is scaled up so greedy choices
    have clear margins (float noise between two engines must not flip them)."""
    torch.manual_seed(seed)
    model = hybrid_lm.build(hybrid_lm.config(arch, "tiny", **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def hf_greedy(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """model.generate greedy continuation of each prompt (no EOS stop). The attention mask is
    explicit: without one generate would mask every prompt token equal to pad_token_id."""
    outs = []
    for prompt, n in zip(prompts, max_tokens):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs


def vllm_greedy(llm, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def count_rows(model) -> None:
    """Run inside an engine's worker (llm.apply_model; an eager engine, where the units' Python
    runs every step): count the rows SambaY's self-decoder, its cross-decoder and the LM head
    see from now on, in model.rows_seen."""
    counts = model.rows_seen = {"self_decoder": 0, "cross_decoder": 0, "logits": 0}

    def counting(fn, key):
        def wrapped(h, *args, **kwargs):
            counts[key] += h.shape[0]
            return fn(h, *args, **kwargs)
        return wrapped

    model.self_decoder.forward = counting(model.self_decoder.forward, "self_decoder")
    model.cross_decoder.forward = counting(model.cross_decoder.forward, "cross_decoder")
    model.compute_logits = counting(model.compute_logits, "logits")


def rows_seen(model) -> dict:
    return dict(model.rows_seen)
