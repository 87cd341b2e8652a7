"""vLLM models: Samba and SambaY (SambaY-DA with differential attention) on vLLM's V1 hybrid
machinery. Mamba layers keep conv and SSM states in vLLM's state slots; attention layers use the
paged KV cache with their sliding windows; SambaY's cross-attention layers own no cache and
read the full-attention layer's through KV sharing, and the memory Mamba hands its scan output
to the GMUs. Layouts and layer loop are the transformers models' own (hybrid_lm.archs.samba).

Prefix caching works as for any vLLM model: attention layers (sliding, full, and the shared K,V
the cross layers read) through vLLM's block cache, Mamba states through its "align" mode
(`SupportsMambaPrefixCaching`; hybrid_lm.serve.config says how), so a multi-turn session
prefills only what is new since its last cached block.

SambaY's last-token prefill. The transformers model runs the cross-decoder only on the last
token of a prompt; here the same happens under vLLM's fast prefill (`kv_sharing_fast_prefill`,
which hybrid-lm's engines turn on for SambaY). The model runs as two compiled units: the
self-decoder over every token of the batch (it fills the Mamba states, the GMU memory and the
shared K,V), then the cross-decoder (GMUs and cross-attention) over the rows vLLM will sample
from: the last token of each request's chunk, one per decode. vLLM names those rows in the
cross-attention layers' metadata (they are the trailing layers that share another layer's K,V,
which vLLM's fast prefill builds metadata for on those rows alone). The shared layer itself still
answers every row here, as a self-decoder layer: its queries run over vLLM's full metadata. So a
prompt of T tokens costs the self-decoder's T rows and the cross-decoder's one: about half the
layers of the transformers model's full forward. Without fast prefill every row goes through both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching

from hybrid_lm.archs.config import SambaConfig, SambaYConfig
from hybrid_lm.archs.layers import Step
from hybrid_lm.archs.model import run_decoder_layers
from hybrid_lm.archs.samba import cross_decoder_start, run_self_decoder, samba_mixers, sambay_mixers

from .layers import CausalLM, DecoderUnit, PagedLayerFactory, layer_metadata, mamba_state_shapes

Tensor = torch.Tensor


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
    def build_mixers(self, config: SambaConfig, factory: PagedLayerFactory) -> list[nn.Module]:
        return samba_mixers(config, factory)


@support_torch_compile(dynamic_arg_dims={"h": 0, "positions": 0})
class SelfDecoder(DecoderUnit):
    """SambaY's self-decoder over every token: (h, GMU memory), and the shared K,V in the cache."""

    def forward(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        step = Step.serving(positions)
        h = run_self_decoder(self.layers, h[None], step)
        return h[0], step.memory[0]


@support_torch_compile(dynamic_arg_dims={"h": 0, "positions": 0, "memory": 0})
class CrossDecoder(DecoderUnit):
    """SambaY's cross-decoder (GMUs, cross-attention) and the final norm, over the rows given."""

    def forward(self, h: Tensor, positions: Tensor, memory: Tensor) -> Tensor:
        step = Step.serving(positions)
        step.memory = memory[None]
        return self.normed(run_decoder_layers(self.layers, h[None], step)[0])


class SambaYForCausalLM(MambaHybrid):
    """SambaY in two compiled units: the self-decoder over every token of the batch, then the
    cross-decoder over the rows whose hidden states are needed. Without fast prefill that is
    every row; with it, vLLM tells the cross-attention layers which rows will be sampled
    (`logits_indices_padded` in their metadata) and builds their metadata for those rows alone."""

    def build_mixers(self, config: SambaYConfig, factory: PagedLayerFactory) -> list[nn.Module]:
        return sambay_mixers(config, factory)

    def build_decoders(self, vllm_config, prefix: str) -> None:
        from vllm.compilation.backends import set_model_tag

        layers, split = self.model.layers, cross_decoder_start(self.config)
        with set_model_tag("self_decoder"):  # each unit gets its own compiled-graph cache
            self.self_decoder = SelfDecoder(vllm_config=vllm_config, prefix=f"{prefix}self_decoder",
                                            layers=layers[:split])
        with set_model_tag("cross_decoder"):
            self.cross_decoder = CrossDecoder(vllm_config=vllm_config, prefix=f"{prefix}cross_decoder",
                                              layers=layers[split:], final_norm=self.model.final_layernorm)
        # vLLM's fast prefill narrows the metadata of the trailing layers that share another's K,V
        # (our cross-attention layers, all after the shared one) and hands them the rows to keep
        cross = [layer.attn.paged.layer_name for layer in layers[split:] if hasattr(layer.attn, "paged")]
        self.fast_prefill_layer = cross[-1] if cross else None

    def logits_rows(self) -> tuple[Optional[Tensor], int]:
        """(the rows vLLM will sample from, padded past n with copies of the last, and n), or (None, 0)
        when it named none: fast prefill off, the profiling run, or no cross-attention layer."""
        md = None if self.fast_prefill_layer is None else layer_metadata(self.fast_prefill_layer)
        rows = getattr(md, "logits_indices_padded", None)
        return (None, 0) if rows is None else (rows.long(), md.num_logits_indices)

    def hidden_states(self, h: Tensor, positions: Tensor) -> Tensor:
        rows, n = self.logits_rows()
        h, memory = self.self_decoder(h, positions)
        if rows is None:  # every row; gathered all the same, so the units never share a buffer
            rows = torch.arange(h.shape[0], device=h.device)
        out = self.cross_decoder(h[rows], positions[rows], memory[rows])
        # rows not sampled keep the self-decoder's output: nobody reads them
        return out if n == 0 else h.index_copy(0, rows[:n], out[:n])
