"""Pushing weights into a running vLLM engine (what TRL, verl and OpenRLHF do after each
policy update).

`update_weights(llm, weights)` checks names and shapes against the served config, packs the
tensors with safetensors and calls `hybrid_lm_load_weights` on every worker: a method of the
`WeightSync` worker extension that our config hook gives each engine serving a hybrid_lm
checkpoint. There the model's own `load_weights` copies them in place.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from hybrid_lm.archs import expected_shapes

Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def update_weights(llm, weights: Weights) -> list[str]:
    """Copy `weights` (a state dict or (HF name, tensor) pairs, any subset, e.g. a trainer's
    `model.state_dict()`) into the running `vllm.LLM` in place, then drop cached prefixes
    computed with the old weights. Names and shapes are checked against the served config
    first; the tied lm_head is skipped. Returns the names copied."""
    config = llm.llm_engine.model_config.hf_config
    shapes = expected_shapes(config)
    tensors = {}
    for name, tensor in (weights.items() if isinstance(weights, Mapping) else weights):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in shapes:
            raise ValueError(f"weights: {name!r} is not a tensor of the served {config.model_type} model")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"weights: {name!r} expected shape {list(shapes[name])}, got {list(tensor.shape)}")
        tensors[name] = tensor.detach().to("cpu").contiguous()
    try:
        llm.collective_rpc("hybrid_lm_load_weights", args=(save_bytes(tensors),))
    except Exception as e:
        if "hybrid_lm_load_weights" in str(e):
            raise RuntimeError("update_weights: this engine has another worker extension; add "
                               "hybrid_lm.serve.weights.WeightSync's method to it") from e
        raise
    llm.reset_prefix_cache()
    return list(tensors)


class WeightSync:
    """Worker extension (vLLM's `worker_extension_cls`): methods callable by collective_rpc."""

    def hybrid_lm_load_weights(self, blob: bytes) -> list[str]:
        model = self.model_runner.model
        device = next(model.parameters()).device
        loaded = model.load_weights((k, v.to(device)) for k, v in load_bytes(blob).items())
        return sorted(loaded)
