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

from typing import Any

from torch import nn

from . import layers as hf_layers
from .config import SambaConfig, SambaYConfig
from .layers import Step
from .model import HybridForCausalLM, HybridModel


def samba_mixers(config: SambaConfig, make: Any = hf_layers, layers: range | None = None) -> list[nn.Module]:
    """Samba's mixers: Mamba on even layers, sliding-window attention on odd ones. `make` provides
    the classes Mamba, Attention and GMU (ours, or vLLM's in hybrid_lm.serve)."""
    layers = range(config.num_hidden_layers) if layers is None else layers
    return [make.Mamba(config, i) if i % 2 == 0 else make.Attention(config, i, window=config.sliding_window)
            for i in layers]


def sambay_mixers(config: SambaYConfig, make: Any = hf_layers) -> list[nn.Module]:
    """SambaY's mixers: a Samba self-decoder, the memory Mamba, the shared full attention, then
    GMU (even) and cross-attention (odd) layers."""
    L = config.num_hidden_layers
    mixers = samba_mixers(config, make, range(L // 2))
    mixers.append(make.Mamba(config, L // 2))
    mixers.append(make.Attention(config, L // 2 + 1, shares_kv=True))
    for i in range(L // 2 + 2, L):
        mixers.append(make.GMU(config) if i % 2 == 0 else make.Attention(config, i, cross=True))
    return mixers


class SambaModel(HybridModel):
    config_class = SambaConfig

    def build_mixers(self, config: SambaConfig) -> list[nn.Module]:
        return samba_mixers(config)


class SambaForCausalLM(HybridForCausalLM):
    config_class = SambaConfig
    model_class = SambaModel


class SambaYLayers:
    """SambaY's layer loop, shared with the vLLM model (both reach the layers through
    `base_model`): the memory layer hands its scan output to the GMUs; in prefill with a cache
    only the last token goes past the shared layer."""

    def run_layers(self, h, step: Step):
        L = self.config.num_hidden_layers
        memory_layer, shared_layer = L // 2, L // 2 + 1
        prefill = step.cache is not None and h.shape[1] > 1
        for i, layer in enumerate(self.base_model.layers):
            if i == memory_layer:
                h, step.memory = layer(h, step, return_memory=True)
            else:
                step.last_only = prefill and i == shared_layer
                h = layer(h, step)
        step.last_only = False
        return h


class SambaYModel(SambaYLayers, HybridModel):
    config_class = SambaYConfig

    def build_mixers(self, config: SambaYConfig) -> list[nn.Module]:
        return sambay_mixers(config)


class SambaYForCausalLM(HybridForCausalLM):
    config_class = SambaYConfig
    model_class = SambaYModel
