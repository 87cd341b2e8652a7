"""Samba and SambaY (SambaY-DA with differential attention), one family. Papers: Samba,
https://arxiv.org/abs/2406.07522; SambaY, https://arxiv.org/abs/2507.06607; Differential
Transformer, https://arxiv.org/abs/2410.05258.

Samba: Mamba and sliding-window attention alternate (even layers Mamba).
SambaY with L layers (docs/models.md): layers 0..L/2-1 are a Samba self-decoder; layer L/2 is a Mamba
whose pre-gate scan output is the GMU memory; layer L/2+1 is the only full-attention layer and
its K,V are the shared cache; the cross-decoder L/2+2..L-1 alternates GMU (even) and
cross-attention (odd) layers that read that memory and that K,V and keep no cache of their own.
In prefill with a cache the shared layer answers for the last token only and the cross-decoder
runs on that token alone: the prompt costs one layer's K,V beyond the linear self-decoder.
"""
from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import nn

from . import layers as arch_layers
from .config import SambaConfig, SambaYConfig
from .layers import LayerFactory, Step
from .model import HybridForCausalLM, HybridModel, run_decoder_layers

Tensor = torch.Tensor


def samba_mixers(config: SambaConfig, make: LayerFactory = arch_layers, layers: range | None = None
                 ) -> list[nn.Module]:
    """Samba's mixers: Mamba on even layers, sliding-window attention on odd ones. `make` provides
    the classes Mamba, Attention and GMU (ours, or vLLM's in hybrid_lm.serve)."""
    layers = range(config.num_hidden_layers) if layers is None else layers
    return [make.Mamba(config, i) if i % 2 == 0 else make.Attention(config, i, window=config.sliding_window)
            for i in layers]


def sambay_mixers(config: SambaYConfig, make: LayerFactory = arch_layers) -> list[nn.Module]:
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


def run_self_decoder(layers: Sequence[nn.Module], h: Tensor, step: Step) -> Tensor:
    """SambaY's self-decoder: its first L/2+2 layers, ending with the memory layer (its scan
    output goes to step.memory, for the GMUs) and the shared full-attention layer (its K,V, for
    the cross-attention layers). In prefill with a cache the shared layer answers for the last
    token only, so the cross-decoder after it runs on that token alone (every token, when hidden
    states or attention maps are asked for)."""
    memory_layer, shared_layer = len(layers) - 2, len(layers) - 1
    prefill = step.cache is not None and h.shape[1] > 1 and not step.recording
    for i, layer in enumerate(layers):
        if i == memory_layer:
            h, step.memory = layer(h, step, return_memory=True)
        else:
            step.last_only = prefill and i == shared_layer
            h = layer(h, step)
    step.last_only = False
    return h


def cross_decoder_start(config: SambaYConfig) -> int:
    """Index of SambaY's first cross-decoder layer (the layer after the shared full attention)."""
    return config.num_hidden_layers // 2 + 2


class SambaYLayers:
    """SambaY's layer loop, self-decoder then cross-decoder; the vLLM model runs the same two
    functions (there as two compiled units, with only the rows that need logits in between)."""

    def run_layers(self, h: Tensor, step: Step) -> Tensor:
        layers, split = self.base_model.layers, cross_decoder_start(self.config)
        return run_decoder_layers(layers[split:], run_self_decoder(layers[:split], h, step), step)


class SambaYModel(SambaYLayers, HybridModel):
    config_class = SambaYConfig

    def build_mixers(self, config: SambaYConfig) -> list[nn.Module]:
        return sambay_mixers(config)


class SambaYForCausalLM(HybridForCausalLM):
    config_class = SambaYConfig
    model_class = SambaYModel
