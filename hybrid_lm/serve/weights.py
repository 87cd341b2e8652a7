"""Pushing weights into a running vLLM engine (what TRL, verl and OpenRLHF do after each
policy update)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

import torch

Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name of `config`'s model and its shape (built on the meta device)."""
    import hybrid_lm

    with torch.device("meta"):
        model = hybrid_lm.build(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def update_weights(llm, weights: Weights) -> list[str]:
    """Copy `weights` (a state dict or (HF name, tensor) pairs, any subset, e.g. a trainer's
    `model.state_dict()`) into the running `vllm.LLM` in place, then drop cached prefixes
    computed with the old weights. Names and shapes are checked against the served config
    first; the tied lm_head is skipped. Returns the names copied."""
    config = llm.llm_engine.model_config.hf_config
    shapes = expected_shapes(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    pairs = []
    for name, tensor in (weights.items() if isinstance(weights, Mapping) else weights):
        if name in tied:
            continue
        if name not in shapes:
            raise ValueError(f"weights: {name!r} is not a tensor of the served {config.model_type} model")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"weights: {name!r} expected shape {list(shapes[name])}, got {list(tensor.shape)}")
        pairs.append((name, tensor.detach().to("cpu").contiguous()))
    # vLLM's in-place reload; checkpoint names are our parameter names, so no conversion
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=pairs, is_checkpoint_format=False))
    llm.reset_prefix_cache()
    return [name for name, _ in pairs]
