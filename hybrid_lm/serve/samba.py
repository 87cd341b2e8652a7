"""vLLM models: Samba and SambaY (SambaY-DA with differential attention) on vLLM's V1 hybrid
machinery. Mamba layers keep conv and SSM states in vLLM's state slots; attention layers use the
paged KV cache with their sliding windows; SambaY's cross-attention layers own no cache and
read the full-attention layer's through KV sharing, and the memory Mamba hands its scan output
to the GMUs. Layouts and layer loop are the transformers models' own (hybrid_lm.archs.samba).

Prefix caching works as for any vLLM model: attention layers (sliding, full, and the shared K,V
the cross layers read) through vLLM's block cache, Mamba states through its "align" mode
(`SupportsMambaPrefixCaching`; hybrid_lm.serve.config says how), so a multi-turn session
prefills only what is new since its last cached block.

Not done here: the transformers model's last-token prefill (the cross-decoder runs on every
prompt token in vLLM, so prefill costs the cross layers' attention over the prompt too).
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching

from hybrid_lm.archs.config import SambaConfig, SambaYConfig
from hybrid_lm.archs.samba import SambaYLayers, samba_mixers, sambay_mixers

from .layers import CausalLM, LayerFactory, mamba_state_shapes


class MambaHybrid(CausalLM, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """What vLLM asks of a model with Mamba state slots: their shapes, dtypes and the functions
    that copy a state from one block's slot to another's (align mode's prefix caching)."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        return mamba_state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        return torch.float32, torch.float32

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.mamba1_state_copy_func()


class SambaForCausalLM(MambaHybrid):
    def build_mixers(self, config: SambaConfig, factory: LayerFactory) -> list[nn.Module]:
        return samba_mixers(config, factory)


class SambaYForCausalLM(SambaYLayers, MambaHybrid):
    def build_mixers(self, config: SambaYConfig, factory: LayerFactory) -> list[nn.Module]:
        return sambay_mixers(config, factory)
