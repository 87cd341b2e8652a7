"""Samba and SambaY (SambaY-DA with differential attention), one family.

Samba: Mamba and sliding-window attention alternate (even layers Mamba).
SambaY with L layers (DESIGN.md): layers 0..L/2-1 are a Samba self-decoder; layer L/2 is a Mamba
whose pre-gate scan output is the GMU memory; layer L/2+1 is the only full-attention layer and
its K,V are the shared cache; the cross-decoder L/2+2..L-1 alternates GMU (even) and
cross-attention (odd) layers that read that memory and that K,V and keep no cache of their own.
In prefill with a cache the shared layer answers for the last token only and the cross-decoder
runs on that token alone: the prompt costs one layer's K,V beyond the linear self-decoder.
"""
from __future__ import annotations

from torch import nn
from transformers import GenerationMixin

from .config import SambaConfig, SambaYConfig
from .layers import GMU, Attention, Mamba, Step
from .model import HybridPreTrainedModel


def _self_decoder(config, layers: range) -> list[nn.Module]:
    return [Mamba(config, i) if i % 2 == 0 else Attention(config, i, window=config.sliding_window) for i in layers]


class SambaForCausalLM(HybridPreTrainedModel, GenerationMixin):
    config_class = SambaConfig

    def build_mixers(self, config: SambaConfig) -> list[nn.Module]:
        return _self_decoder(config, range(config.num_hidden_layers))


class SambaYForCausalLM(HybridPreTrainedModel, GenerationMixin):
    config_class = SambaYConfig

    def build_mixers(self, config: SambaYConfig) -> list[nn.Module]:
        L = config.num_hidden_layers
        self.memory_layer, self.shared_layer = L // 2, L // 2 + 1
        mixers = _self_decoder(config, range(L // 2))
        mixers.append(Mamba(config, self.memory_layer))
        mixers.append(Attention(config, self.shared_layer, shares_kv=True))
        for i in range(L // 2 + 2, L):
            mixers.append(GMU(config) if i % 2 == 0 else Attention(config, i, cross=True))
        return mixers

    def run_layers(self, h, step: Step):
        # with a cache and several new tokens (prefill), only the last token goes past the shared layer
        prefill = step.cache is not None and h.shape[1] > 1
        for i, layer in enumerate(self.model.layers):
            if i == self.memory_layer:
                h, step.memory = layer(h, step, return_memory=True)
            else:
                step.last_only = prefill and i == self.shared_layer
                h = layer(h, step)
        step.last_only = False
        return h
