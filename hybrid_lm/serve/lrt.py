"""vLLM model: LRT. Each request's latent (the final normed state of its last token, the next
token's memory) lives in a vLLM state slot beside the paged KV cache.

A forward over vLLM's flat batch runs the interleaved schedule of hybrid_lm.archs.lrt:
- pass 0 runs every token: prefill tokens with m = 0, decode tokens with m = their latent (a
  decode token's only pass: decoding is the exact recurrence);
- pass i = 1..S runs the prefill tokens at positions p = i-1 (mod S) with m = the latest final
  state of token p-1 (0 for a prompt's first token).
A prefill is always a whole prompt: the config hook (hybrid_lm.serve.config) turns prefix caching
and chunked prefill off for LRT, since a chunk or a cached prefix refined on its own would give
other outputs than the transformers model's forward over the whole prompt.
Every pass calls vLLM's attention over all N tokens of the batch: each layer keeps the batch's
latest K,V in a buffer, the pass overwrites its tokens' rows and writes the whole buffer to the
cache again (same slots), and only its own tokens' outputs are kept. So a pass's queries see the
prompt's latest K,V, and the cache ends holding the final K,V of every token, with vLLM's
metadata untouched. A prompt costs S+1 attention passes, as in training.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

from hybrid_lm.archs import lrt as arch_lrt
from hybrid_lm.archs.config import LRTConfig
from hybrid_lm.archs.layers import Step

from .layers import CausalLM, PagedLayerFactory, StateSlots, layer_metadata, paged_attention

Tensor = torch.Tensor


def latent_state_shapes(config: LRTConfig) -> tuple[tuple[int]]:
    """LRT's per-request state: the latent [d] (the last token's final normed hidden state), fp32."""
    return ((config.hidden_size,),)


class LatentState(nn.Module, StateSlots):
    """One [d] fp32 latent per request slot."""

    def __init__(self, config: LRTConfig, *, prefix: str):
        super().__init__()
        self.state_shapes = latent_state_shapes(config)
        self.register(prefix)


class LRTAttention(arch_lrt.LRTAttention):
    """LRT's attention (memory feedback into K,V) over vLLM's paged cache, one pass at a time:
    step.rows are the pass's tokens among the batch's N, step.kv[layer] the batch's latest K,V."""

    def __init__(self, config: LRTConfig, layer_idx: int, *, prefix: str):
        super().__init__(config, layer_idx)
        self.paged = paged_attention(self, prefix)

    def forward(self, x: Tensor, step: Step, feedback: Optional[Tensor] = None) -> Tensor:
        k, v = (t[0] for t in self._kv(x, step.positions, feedback))
        q = self._q(x, step.positions)[0]
        rows, kv = step.rows, step.kv[self.layer_idx]
        if kv is not None:  # a later pass: refresh its rows of the buffer, query at its rows only
            k, v = kv[0].index_copy(0, rows, k), kv[1].index_copy(0, rows, v)
            q = q.new_zeros(k.shape[0], *q.shape[1:]).index_copy(0, rows, q)
        step.kv[self.layer_idx] = (k, v)
        o = self.paged(q.flatten(1), k.flatten(1), v.flatten(1))
        return self.out_proj((o if kv is None else o[rows])[None])


class LRTForCausalLM(arch_lrt.LRTLayers, CausalLM, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM orders state layers by the one integer in their name: the latent comes after the last layer
        L = self.config.num_hidden_layers
        self.latent = LatentState(self.config,
                                  prefix=f"{prefix}.model.layers.{L}.latent" if prefix else f"model.layers.{L}.latent")

    def build_mixers(self, config: LRTConfig, factory: PagedLayerFactory) -> list[nn.Module]:
        return [LRTAttention(config, i, prefix=factory.name(i)) for i in range(config.num_hidden_layers)]

    def extra_modules(self, config: LRTConfig) -> dict[str, nn.Module]:
        return {"feedback": arch_lrt.feedback_projections(config)}

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        return latent_state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        return (torch.float32,)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    def _pass(self, h: Tensor, step: Step, positions: Tensor, rows: Tensor, memory: Optional[Tensor]) -> Tensor:
        """Final states [n, d] of the tokens at `rows` (embeddings h [N, d]) with their memory."""
        step.rows, step.positions = rows, positions[rows][None]
        return self.final_state(self.run_layers(h[None, rows], step, None if memory is None else memory[None]))[0]

    def build_decoders(self, vllm_config, prefix: str) -> None:
        """None: LRT is served eagerly (the config hook sets enforce_eager). Its passes are picked by
        the batch's positions and split into prefill and decode rows, and a graph compiled once
        would keep the passes of the batch it was traced on."""

    def hidden_states(self, h: Tensor, positions: Tensor) -> Tensor:
        step = Step.serving(positions)
        N, L = h.shape[0], self.config.num_hidden_layers
        step.kv = [None] * L
        everything = torch.arange(N, device=h.device)
        md = layer_metadata(self.latent.prefix)
        if md is None:  # profiling run: one pass, m = 0
            return self._pass(h, step, positions, everything, None)
        latent = self.latent.kv_cache[0]
        nd, n = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
        dtype = self.model.final_layernorm.weight.dtype
        memory = None
        if nd:  # decode tokens: m = their latent; prefill tokens: m = 0 in pass 0
            idx_d = md.state_indices_tensor_d[:nd, 0]
            memory = h.new_zeros(N, h.shape[1], dtype=dtype)
            memory[:nd] = latent[idx_d].to(dtype)
        z = self._pass(h, step, positions, everything, memory)
        if n > nd:
            z = self._subset_passes(h, step, positions, z, md, latent, nd, n)
        if nd:
            latent[idx_d] = z[:nd].float()
        return z

    def _subset_passes(self, h, step, positions, z, md, latent, nd, n) -> Tensor:
        """Passes 1..S over the prefill tokens; writes each prefill request's latent."""
        S = self.config.lrt_subsets
        starts = nd + md.query_start_loc_p[:-1].long()  # each prompt's first row
        ends = nd + md.query_start_loc_p[1:].long() - 1
        prefill = torch.arange(nd, n, device=h.device)
        for r in range(S):
            rows = prefill[positions[nd:n] % S == r]
            if rows.numel() == 0:
                continue
            # the latest state of token p-1; a prompt's first token has m = 0
            previous = z.roll(1, 0).index_fill(0, starts, 0)
            z = z.index_copy(0, rows, self._pass(h, step, positions, rows, previous[rows]))
        latent[md.state_indices_tensor_p] = z[ends].float()
        return z
