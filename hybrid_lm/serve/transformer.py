"""vLLM model: the Transformer baseline (full or sliding-window attention in every layer)."""
from __future__ import annotations

from torch import nn

from hybrid_lm.archs.config import TransformerConfig

from .layers import CausalLM, PagedLayerFactory


class TransformerForCausalLM(CausalLM):
    def build_mixers(self, config: TransformerConfig, factory: PagedLayerFactory) -> list[nn.Module]:
        return [factory.Attention(config, i, window=config.sliding_window) for i in range(config.num_hidden_layers)]
