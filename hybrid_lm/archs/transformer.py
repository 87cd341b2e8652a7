"""Transformer: the nanochat-style baseline (RoPE, QK-norm, GQA, SwiGLU, untied embeddings)."""
from __future__ import annotations

from torch import nn

from .config import TransformerConfig
from .layers import Attention
from .model import HybridForCausalLM, HybridModel


class TransformerModel(HybridModel):
    config_class = TransformerConfig
    _is_stateful = False  # K,V only: a cache can be cropped, so assisted decoding works

    def build_mixers(self, config: TransformerConfig) -> list[nn.Module]:
        return [Attention(config, i, window=config.sliding_window) for i in range(config.num_hidden_layers)]


class TransformerForCausalLM(HybridForCausalLM):
    config_class = TransformerConfig
    model_class = TransformerModel
    _is_stateful = False
