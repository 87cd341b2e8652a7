"""What every vLLM model file shares: our layers with vLLM's caches underneath.

The vLLM models reuse the transformers models' modules (hybrid_lm.archs), so the math and the
tensor names are the same code: a checkpoint loads name for name, and anything fixed in one is
fixed in both. What changes is where state lives:

- attention K,V go to vLLM's paged cache through its `Attention` layer (`paged`), with
  per-layer sliding windows and, for SambaY's cross layers, KV sharing with the full-attention
  layer;
- Mamba conv/SSM states and LRT's latent are vLLM "Mamba state" slots (`MambaBase`), one per
  request, updated in place by hybrid_lm.kernels (Triton on GPU, the reference on CPU).

vLLM hands a forward a flat batch of N tokens: decode requests first (one token each), then
prefill chunks. Our layers take [B, T, ...], so the batch runs as B = 1, T = N; attention keeps
requests apart through vLLM's metadata, the Mamba layers through cu_seqlens and state slots.

Compiled serving: the layers run inside `DecoderUnit`s that vLLM compiles (`support_torch_compile`)
and, on a GPU, captures as CUDA graphs. vLLM traces a unit once, so whatever depends on the batch
(the prefill/decode split, state slots, query lengths) must sit inside an opaque op that the
graph calls: vLLM's attention op, and our Mamba mixer's `serve_mamba_mixer` (registered as a
graph-splitting op like vLLM's own Mamba ops). Everything else is plain tensor code, traced
through our kernels' custom ops and their fake implementations.

Differential attention (SambaY-DA) attends with values of twice the head size (both halves'
values, [v_even | v_odd]). vLLM's attention kernels take one head size for K and V, so a DA layer
caches keys zero-padded to 2*dh and values duplicated per half: twice the natural KV memory.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention as PagedAttention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from hybrid_lm import kernels as K
from hybrid_lm.archs import layers as arch_layers
from hybrid_lm.archs.config import HybridConfig
from hybrid_lm.archs.layers import Step
from hybrid_lm.archs.model import add_backbone, run_decoder_layers

Tensor = torch.Tensor


def layer_metadata(prefix: str):
    """This layer's attention metadata in the current forward (None in vLLM's profiling run)."""
    metadata = get_forward_context().attn_metadata
    return None if metadata is None else metadata.get(prefix)


def paged_head_size(layer: arch_layers.Attention) -> int:
    """The head size of one paged K,V entry: differential attention stores each head pair's keys
    padded to 2 x head_dim and its values duplicated (vLLM's attention wants one head size)."""
    return layer.head_dim * (2 if layer.differential else 1)


def paged_attention(layer: arch_layers.Attention, prefix: str, kv_source: Optional[str] = None) -> PagedAttention:
    """vLLM's attention (paged KV cache) for one of our attention layers: its heads, its window."""
    cache_config = get_current_vllm_config().cache_config
    if layer.window is None and cache_config.sliding_window is not None:
        # vLLM applies the config's sliding_window to a layer that names none; ours are per layer
        cache_config = copy.copy(cache_config)
        cache_config.sliding_window = None
    return PagedAttention(num_heads=layer.heads, head_size=paged_head_size(layer),
                          scale=layer.head_dim ** -0.5, num_kv_heads=layer.kv_heads, cache_config=cache_config,
                          per_layer_sliding_window=layer.window, prefix=f"{prefix}.paged",
                          kv_sharing_target_layer_name=kv_source)


class Attention(arch_layers.Attention):
    """Our attention (projections, QK-norm, RoPE, differential combination) over vLLM's paged
    KV cache. A cross layer (SambaY) computes queries only and reads `kv_source`'s cache."""

    def __init__(self, config: HybridConfig, layer_idx: int, window: Optional[int] = None, cross: bool = False,
                 shares_kv: bool = False, *, prefix: str, kv_source: Optional[str] = None):
        super().__init__(config, layer_idx, window, cross, shares_kv)
        self.differential = config.differential_attention
        self.paged = paged_attention(self, prefix, kv_source if cross else None)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        q = self._q(x, step.positions)[0]
        k = v = None
        if not self.cross:
            k, v = (t[0] for t in self._kv(x, step.positions))
        return self.out_proj(self.attend(q, k, v)[None])

    def attend(self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
        """q [N, H, dh], k, v [N, Hkv, dh] (None: a cross layer) -> [N, H * dh]; writes k, v to the cache."""
        if not self.differential:
            return self.paged(q.flatten(1), *self.cache_layout(q, k, v))
        dh, half = self.head_dim, self.heads // 2
        # even heads first, then odd: query head i of either half meets its half's KV head i // group
        q2 = F.pad(torch.cat([q[:, 0::2], q[:, 1::2]], 1), (0, dh))
        if k is not None:
            k = F.pad(torch.cat([k[:, 0::2], k[:, 1::2]], 1), (0, dh))
            v12 = torch.cat([v[:, 0::2], v[:, 1::2]], -1)  # [N, Hkv/2, 2 dh]
            v = torch.cat([v12, v12], 1)
        o = self.paged(q2.flatten(1), *self.cache_layout(q2, k, v)).unflatten(-1, (self.heads, 2 * dh))
        return self.inner_cross_attn.combine(o[:, :half], o[:, half:]).flatten(1)

    def cache_layout(self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """K, V as vLLM's attention op takes them, [N, Hkv * head size]. A cross layer brings none
        (it reads the shared cache) but the op's schema wants tensors: empty ones."""
        if k is None:
            k = v = q.new_empty(0, self.paged.num_kv_heads * self.paged.head_size)
        return k.flatten(1), v.flatten(1)


class StateSlots(MambaBase):
    """A layer whose per-request state lives in vLLM's Mamba state slots; `kv_cache` holds one
    tensor per entry of `state_shapes`, each [slots, *shape], all fp32."""

    state_shapes: tuple[tuple[int, ...], ...]

    def register(self, prefix: str) -> None:
        self.prefix = prefix
        self.kv_cache = tuple(torch.tensor([]) for _ in self.state_shapes)
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name: {prefix}")
        context[prefix] = self

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.state_shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) * len(self.state_shapes)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA1  # its metadata (slots, prefill/decode split) is all we read


def mamba_state_shapes(config: HybridConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Conv state [d_inner, d_conv - 1] (oldest input first) and SSM state [d_inner, d_state]."""
    return (config.mamba_d_inner, config.mamba_d_conv - 1), (config.mamba_d_inner, config.mamba_d_state)


class Mamba(arch_layers.Mamba, StateSlots):
    """Our Mamba-1 mixer on vLLM's state slots: decode rows step their slots in place, prefill
    chunks run the varlen conv and scan from their slot (zeros for a new request) and write the
    final states back. With prefix caching (align mode) a request's slot is that of the block
    holding its last scheduled token, into which vLLM has copied the state it continues from (its
    previous block's, or a cache hit's): the same reads and writes serve both modes.

    Between the projections, the conv and scan run inside one opaque op, `serve_mamba_mixer`:
    what they do depends on the batch (which rows decode, which prefill, which slots), and a
    graph that vLLM compiles is traced once, so that part must stay out of it (vLLM splits its
    compiled graph there, as at attention)."""

    def __init__(self, config: HybridConfig, layer_idx: int, *, prefix: str):
        arch_layers.Mamba.__init__(self, config, layer_idx)
        self.state_shapes = mamba_state_shapes(config)
        self.register(prefix)

    def forward(self, x: Tensor, step: Step, return_memory: bool = False):
        xs, z = self.in_proj(x[0]).chunk(2, dim=-1)  # [N, Di] each
        y = torch.empty_like(xs)
        torch.ops.hybrid_lm.serve_mamba_mixer(xs, z, not return_memory, y, self.prefix)
        return self.output(y[None], z[None], return_memory)

    def mix(self, xs: Tensor, gate: Optional[Tensor]) -> Tensor:
        """Conv and scan of the batch's inputs xs [N, Di] (gated by `gate` unless None) -> y [N, Di]."""
        weight = self.conv1d.weight.squeeze(1)
        A, D, bias = self.ssm_constants()
        md = layer_metadata(self.prefix)
        if md is None:  # profiling run: one stateless sequence
            u = K.causal_conv1d(xs[None], weight, self.conv1d.bias, "silu")
            delta, B, C = self.ssm_inputs(u)
            return K.selective_scan(u, delta, A, B, C, D, None if gate is None else gate[None], bias, True)[0]
        conv, ssm = self.kv_cache
        nd, n = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
        y = xs.new_zeros(xs.shape)  # rows past n (padding) stay zero
        if nd:
            idx = md.state_indices_tensor_d[:nd, 0]  # [decodes, 1 + speculative tokens]: no speculation here
            u = K.causal_conv1d_update(xs[:nd], conv, weight, self.conv1d.bias, "silu", idx)
            delta, B, C = self.ssm_inputs(u)
            y[:nd] = K.selective_state_update(ssm, u, delta, A, B, C, D, None if gate is None else gate[:nd],
                                              bias, True, idx)
        if n > nd:
            idx, cu = md.state_indices_tensor_p, md.query_start_loc_p.to(torch.int32)
            keep = md.has_initial_states_p[:, None, None]  # a new request starts from zeros
            u, conv_final = K.causal_conv1d(xs[None, nd:n], weight, self.conv1d.bias, "silu",
                                            conv[idx] * keep, True, cu_seqlens=cu)
            delta, B, C = self.ssm_inputs(u)
            yp, ssm_final = K.selective_scan(u, delta, A, B, C, D, None if gate is None else gate[None, nd:n], bias,
                                             True, ssm[idx] * keep, True, cu_seqlens=cu)
            conv[idx], ssm[idx] = conv_final.to(conv.dtype), ssm_final.to(ssm.dtype)
            y[nd:n] = yp[0]
        return y


@torch.library.custom_op("hybrid_lm::serve_mamba_mixer", mutates_args=("y",))
def serve_mamba_mixer(xs: Tensor, z: Tensor, gated: bool, y: Tensor, layer_name: str) -> None:
    """y = the conv and scan of Mamba layer `layer_name` over vLLM's batch (xs, z [N, Di]; z
    gates the scan when `gated`), the layer found in the current forward context."""
    layer = get_forward_context().no_compile_layers[layer_name]
    y.copy_(layer.mix(xs, z if gated else None))


@serve_mamba_mixer.register_fake
def _(xs: Tensor, z: Tensor, gated: bool, y: Tensor, layer_name: str) -> None:
    return None


class PagedLayerFactory(arch_layers.LayerFactory):
    """The layer classes a family's layout asks for (Mamba, Attention, GMU), built for vLLM
    under `prefix`; SambaY's cross layers share the cache of the layer built with shares_kv."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.kv_source: Optional[str] = None

    def name(self, layer_idx: int) -> str:
        """The vLLM layer name (prefix) of layer `layer_idx`'s mixer."""
        return f"{self.prefix}model.layers.{layer_idx}.attn"

    def Mamba(self, config: HybridConfig, layer_idx: int) -> Mamba:
        return Mamba(config, layer_idx, prefix=self.name(layer_idx))

    def Attention(self, config: HybridConfig, layer_idx: int, window: Optional[int] = None, cross: bool = False,
                  shares_kv: bool = False) -> Attention:
        if shares_kv:
            self.kv_source = f"{self.name(layer_idx)}.paged"
        return Attention(config, layer_idx, window, cross, shares_kv, prefix=self.name(layer_idx),
                         kv_source=self.kv_source)

    GMU = staticmethod(arch_layers.GMU)


class DecoderUnit(nn.Module):
    """Decoder layers (and, for the last unit of a model, the final norm) that vLLM compiles as
    one unit and, on a GPU, captures as CUDA graphs, piecewise: the graph is split at the
    attention and Mamba ops, which read the batch's metadata. The loops over the layers are
    hybrid_lm.archs' own. h [N, d] and positions [N] are vLLM's flat batch.

    Each unit is a subclass with its own `forward`: vLLM keys its cache of compiled graphs by the
    forward function (and the config), so two units sharing one would load each other's graph."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers: nn.ModuleList,
                 final_norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers, self.final_norm = layers, final_norm

    def normed(self, h: Tensor) -> Tensor:
        return self.final_norm(h.to(self.final_norm.weight.dtype))


@support_torch_compile(dynamic_arg_dims={"h": 0, "positions": 0})
class Decoder(DecoderUnit):
    """Every layer, then the final norm."""

    def forward(self, h: Tensor, positions: Tensor) -> Tensor:
        return self.normed(run_decoder_layers(self.layers, h[None], Step.serving(positions))[0])


class CausalLM(nn.Module):
    """The vLLM side of a hybrid_lm checkpoint: the module tree of hybrid_lm.archs (same tensor
    names), `forward` returning final hidden states, `compute_logits`, and `load_weights`.
    A family subclass defines `build_mixers(config, factory)`, one mixer per layer (called in
    __init__), and may override `extra_modules`, `build_decoders` and `hidden_states`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        prefix = f"{prefix}." if prefix else ""
        self.model = nn.Module()  # first: parameter names are those of their first parent, model.*
        mixers = self.build_mixers(config, PagedLayerFactory(prefix))
        add_backbone(self.model, config, mixers, **self.extra_modules(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.build_decoders(vllm_config, prefix)

    def extra_modules(self, config: HybridConfig) -> dict[str, nn.Module]:
        return {}

    def build_decoders(self, vllm_config: VllmConfig, prefix: str) -> None:
        """The compiled unit(s) over the layers: here one, every layer then the final norm."""
        self.decoder = Decoder(vllm_config=vllm_config, prefix=f"{prefix}decoder", layers=self.model.layers,
                               final_norm=self.model.final_layernorm)

    @property
    def base_model(self) -> nn.Module:
        """The module holding embed_tokens, layers and final_layernorm, as in transformers (where it
        is the base model): LRT's shared layer loop (LRTLayers) reaches it this way."""
        return self.model

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[Tensor], positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[Tensor] = None, **kwargs) -> Tensor:
        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.residual_in_fp32:
            h = h.float()
        return self.hidden_states(h, positions)

    def hidden_states(self, h: Tensor, positions: Tensor) -> Tensor:
        """Final normed hidden states [N, d] of the embedded tokens h [N, d] at `positions` [N]."""
        return self.decoder(h, positions)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy (HF name, tensor) pairs into the parameters in place: any subset, any number of
        times (the contract RL trainers use to push new policy weights into a running engine).
        The tied lm_head is skipped; an unknown name or a wrong shape is an error naming it.
        Returns the names loaded (vLLM's loader then reports any parameter left unloaded)."""
        params = dict(self.named_parameters())
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        loaded = set()
        for name, tensor in weights:
            if name in tied:
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r}: not a parameter of {type(self).__name__} "
                                 f"({self.config.model_type}); expected names like {next(iter(params))!r}")
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint tensor {name!r}: expected shape {list(param.shape)}, "
                                 f"got {list(tensor.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        return loaded
