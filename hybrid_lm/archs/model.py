"""What every architecture shares: the decoder layer, the causal-LM wrapper with its loss,
cache handling and `generate` plumbing, and weight initialisation.

A family (transformer.py, samba.py, lrt.py) lists its layers' mixers and, where needed,
overrides `run_layers` (SambaY's memory and last-token prefill, LRT's interleaved passes).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, ModelOutput

from .cache import HybridCache
from .config import HybridConfig
from .layers import MLP, Attention, DifferentialCore, Mamba, Step, norm

Tensor = torch.Tensor


def next_token_loss(loss_function, logits: Tensor, labels: Optional[Tensor], shift_labels: Optional[Tensor] = None,
                    num_items_in_batch: Optional[Tensor] = None) -> Tensor:
    """transformers' causal-LM loss of logits [B, n, V], which may cover only the last n
    positions (logits_to_keep, SambaY's cached prefill): each against the label one position
    later (-100 ignored), or against shift_labels, already shifted (sequence and context
    parallel training). With num_items_in_batch the sum is divided by it (Trainer's gradient
    accumulation), else the mean over kept labels."""
    n = logits.shape[1]
    if shift_labels is not None:
        shift_labels = shift_labels[:, shift_labels.shape[1] - n:]
    elif n < 2:
        raise ValueError(f"labels: a loss needs logits for at least 2 positions, got {n} "
                         "(drop logits_to_keep, or the cache in SambaY's prefill)")
    else:
        labels = labels[:, labels.shape[1] - n:]
    return loss_function(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch,
                         shift_labels=shift_labels)


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm mixer + residual, then pre-norm SwiGLU MLP + residual; the unit that gradient
    checkpointing recomputes."""

    def __init__(self, config: HybridConfig, mixer: nn.Module):
        super().__init__()
        self.input_layernorm = norm(config, config.hidden_size)
        self.attn = mixer
        self.post_attention_layernorm = norm(config, config.hidden_size)
        self.mlp = MLP(config)

    def _norm(self, layer: nn.Module, h: Tensor) -> Tensor:
        # the residual may be fp32 (phi4-mini-flash); each norm reads it in its own dtype
        return layer(h.to(layer.weight.dtype))

    def forward(self, h: Tensor, step: Step, **mixer_kwargs):
        out = self.attn(self._norm(self.input_layernorm, h), step, **mixer_kwargs)
        extra = None
        if isinstance(out, tuple):
            out, extra = out
        h = h[:, h.shape[1] - out.shape[1]:] + out  # a mixer may answer for the last token only
        h = h + self.mlp(self._norm(self.post_attention_layernorm, h))
        if step.hidden_states is not None:
            step.hidden_states.append(h)
        return h if extra is None else (h, extra)


def run_decoder_layers(layers: Sequence[nn.Module], h: Tensor, step: Step) -> Tensor:
    """Decoder layers one after the other (every family's loop, or part of it: SambaY's
    cross-decoder reads the memory and the shared K,V that its self-decoder left in `step`)."""
    for layer in layers:
        h = layer(h, step)
    return h


def add_backbone(module: nn.Module, config: HybridConfig, mixers: list[nn.Module], **extra: nn.Module) -> None:
    """Give `module` embed_tokens, one DecoderLayer per mixer, final_layernorm and any `extra`
    modules: the module tree, and so the tensor names under `model.`, of every checkpoint (the
    base model here, the vLLM model in hybrid_lm.serve)."""
    module.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    module.layers = nn.ModuleList(DecoderLayer(config, m) for m in mixers)
    module.final_layernorm = norm(config, config.hidden_size)
    for name, child in extra.items():
        module.add_module(name, child)


@contextlib.contextmanager
def open_tensors(file: Path) -> Iterator:
    """safe_open(file), raising ValueError naming the file for a truncated or corrupt one
    (safetensors' own errors do not name it)."""
    try:
        with safe_open(file, "pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); it may be truncated or corrupt, "
                         f"copy or download it again") from e


class HybridPreTrainedModel(PreTrainedModel):
    """What the base models and the causal LMs share: config, strict loading, gradient
    checkpointing (one DecoderLayer at a time) and weight initialisation."""

    config_class = HybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    # loaded in bf16/fp16, these stay fp32 as stored (Mamba's decay rates, differential attention's lambdas)
    _keep_in_fp32_modules_strict = ["A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"]
    # Mamba states and LRT's latent fold every token in and cannot be rolled back, so generate
    # refuses assisted decoding, as for transformers' own hybrids; the Transformer sets False
    _is_stateful = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, strict: a missing tensor, one the model lacks or one of
        the wrong shape is a ValueError naming each (transformers would only warn, or not name it).
        With output_loading_info=True it returns (model, loading info) and leaves the judging to
        the caller, as transformers does."""
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
        except SafetensorError:  # safetensors does not say which file: find it and name it
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path", "")
            for file in sorted(Path(source).glob("*.safetensors")):
                with open_tensors(file):
                    pass
            raise
        problems = [f"missing: {name}" for name in sorted(info.get("missing_keys", ()))]
        problems += [f"unexpected: {name}" for name in sorted(info.get("unexpected_keys", ()))]
        if not allow_mismatch:
            problems += [f"{name}: expected shape {list(want)}, found {list(got)}"
                         for name, got, want in sorted(info.get("mismatched_keys", ()))]
        if want_info:  # the caller inspects what matched: transformers' contract, no strict error
            return model, info
        if problems:
            raise ValueError(f"checkpoint {args[0] if args else ''}: tensors do not match a {model.config.model_type} "
                             f"model:\n  " + "\n  ".join(problems))
        return model

    def as_requested(self, output: ModelOutput, return_dict: Optional[bool]) -> ModelOutput | tuple:
        """`output`, or its tuple when return_dict (else the config's) is False, as transformers does."""
        wanted = return_dict if return_dict is not None else self.config.return_dict
        return output if wanted else output.to_tuple()

    def post_init(self) -> None:
        """transformers' post_init; then `_keep_in_fp32_modules_strict` names only parameters
        this arch has (a Transformer has no A_log, only sambay-da has lambdas)."""
        super().post_init()
        own = {name.rsplit(".", 1)[-1] for name, _ in self.named_parameters()}
        self._keep_in_fp32_modules_strict = self._keep_in_fp32_modules_strict & own

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      **options) -> None:
        """transformers' gradient checkpointing (its options, e.g. every_n_layers, pass through):
        each DecoderLayer's activations are recomputed in backward. Non-reentrant only: layers read
        tensors held by the Step (SambaY's memory and shared K,V), which reentrant checkpointing
        would cut from the graph."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.setdefault("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs: expected use_reentrant=False (layers read tensors "
                             "through the Step object, which reentrant checkpointing does not differentiate)")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)


    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, Mamba):
            # S4D-real A = -(1..N); dt in [1e-3, 1e-1] log-uniform through the softplus in the scan
            n = torch.arange(1, module.d_state + 1, dtype=torch.float32)
            init.copy_(module.A_log, torch.log(n).expand(module.d_inner, -1))
            init.ones_(module.D)
            dt = torch.exp(torch.rand(module.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif isinstance(module, DifferentialCore):
            for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(p, mean=0.0, std=0.1)
            init.ones_(module.subln.weight)


class HybridModel(HybridPreTrainedModel):
    """The backbone, `model` in every checkpoint: embeddings, the decoder layers and the final
    norm. Its forward returns the final normed hidden states (the LM head's input), which is what
    trainers with a fused LM head (TRL) ask of `model.base_model`. Loading a causal LM's
    checkpoint drops its lm_head."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        add_backbone(self, config, self.build_mixers(config), **self.extra_modules(config))
        self.post_init()

    # -- what a family provides: build_mixers(config) -> one mixer per layer; and may override these

    def extra_modules(self, config: HybridConfig) -> dict[str, nn.Module]:
        """Modules besides the layers (LRT's feedback projections)."""
        return {}

    def cache_kinds(self) -> list[Optional[str]]:
        """Per layer: "kv" (attention with its own K,V), "mamba", or None (keeps nothing)."""
        kinds = []
        for layer in self.layers:
            mixer = layer.attn
            kinds.append("mamba" if isinstance(mixer, Mamba) else
                         "kv" if isinstance(mixer, Attention) and not mixer.cross else None)
        return kinds

    def run_layers(self, h: Tensor, step: Step) -> Tensor:
        return run_decoder_layers(self.layers, h, step)

    def attention_layers(self) -> list[int]:
        """The layers whose attention maps output_attentions returns, in this order: every
        attention mixer (full, sliding-window, differential, SambaY's shared full attention and
        its cross-attention layers). Mamba and GMU layers have no map. Transformer and LRT: every
        layer; Samba: the odd layers; SambaY: the odd self-decoder layers, the shared layer
        (L/2 + 1) and the odd cross-decoder layers."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer.attn, Attention)]

    # -- shared ----------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> HybridCache:
        """An empty cache; with max_len a static one (fixed buffers, CUDA-graph capturable decode)."""
        c = self.config
        windows = [getattr(layer.attn, "window", None) for layer in self.layers]
        return HybridCache(self.cache_kinds(), batch, c.mamba_d_inner, c.mamba_d_conv, c.mamba_d_state,
                           self.embed_tokens.weight.device, max_len, windows)

    def make_step(self, h: Tensor, attention_mask: Optional[Tensor], cache: Optional[HybridCache],
                  cu_seqlens: Optional[Tensor] = None) -> Step:
        """Slots, validity and position ids of the new tokens h [B, T, ...]; records validity in the cache."""
        B, T = h.shape[:2]
        if cu_seqlens is not None:
            return self._packed_step(h, attention_mask, cache, cu_seqlens)
        seen = 0 if cache is None else cache.seen
        dev = h.device
        bad_mask = ValueError(f"attention_mask: expected shape [B={B}, {seen + T}] (cached + new tokens) "
                              f"or [B={B}, T={T}], got {None if attention_mask is None else list(attention_mask.shape)}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
            raise bad_mask
        if cache is not None and cache.max_len is not None:
            return self._static_step(T, attention_mask, cache)
        slots = torch.arange(seen, seen + T, device=dev)
        prev = None if cache is None else cache.valid
        if attention_mask is not None:
            valid = attention_mask.to(device=dev, dtype=torch.bool)
            if valid.shape[1] == T and seen:  # a mask for the new tokens only
                before = prev if prev is not None else torch.ones(B, seen, dtype=torch.bool, device=dev)
                valid = torch.cat([before, valid], dim=1)
            if valid.shape != (B, seen + T):
                raise bad_mask
        else:
            valid = None if prev is None else torch.cat([prev, torch.ones(B, T, dtype=torch.bool, device=dev)], 1)
        if valid is None:
            positions = slots[None].expand(B, T)
        else:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, seen:]
        if cache is not None:
            cache.valid = valid
        return Step(slots=slots, valid=valid, positions=positions, cache=cache)

    @staticmethod
    def _packed_step(h: Tensor, attention_mask: Optional[Tensor], cache: Optional[HybridCache],
                     cu_seqlens: Tensor) -> Step:
        """make_step for a packed batch of documents (training): position ids restart at each."""
        B, T = h.shape[:2]
        if cache is not None or attention_mask is not None or B != 1:
            raise ValueError(f"cu_seqlens: a packed batch has batch size 1, no attention_mask and no cache; "
                             f"got input_ids {list(h.shape[:2])}, attention_mask "
                             f"{None if attention_mask is None else list(attention_mask.shape)}, "
                             f"cache {'given' if cache is not None else None}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected int32 [N+1] document offsets into T={T}, "
                             f"got {cu_seqlens.dtype} {list(cu_seqlens.shape)}")
        slots = torch.arange(T, device=h.device)
        cu = cu_seqlens.to(h.device)
        docs = torch.searchsorted(cu, slots.to(cu.dtype), right=True) - 1  # [T] document of each token
        positions = slots - cu[docs.clamp(min=0)].long()
        return Step(slots=slots, valid=None, positions=positions[None], cu_seqlens=cu, docs=docs[None])

    @staticmethod
    def _static_step(T: int, attention_mask: Optional[Tensor], cache: HybridCache) -> Step:
        """make_step for a static cache: every value comes from device tensors updated in place, so a
        captured decode step replays correctly (no Python int turns into a tensor here)."""
        if cache.seen + T > cache.max_len:
            raise ValueError(f"input_ids: {T} new tokens overflow the static cache "
                             f"(max_len={cache.max_len}, {cache.seen} cached)")
        dev = cache.valid.device
        slots = cache.seen_t + torch.arange(T, device=dev)
        if attention_mask is None:
            new_valid = torch.ones(cache.batch, T, dtype=torch.bool, device=dev)
        else:
            new_valid = attention_mask[:, attention_mask.shape[1] - T:].to(device=dev, dtype=torch.bool)
        cache.valid.index_copy_(1, slots, new_valid)
        positions = (cache.num_real[:, None] + new_valid.long().cumsum(-1) - 1).clamp(min=0)
        cache.num_real += new_valid.sum(-1)
        cache.seen_t += T
        return Step(slots=slots, valid=cache.valid, positions=positions, cache=cache)

    def embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """The residual stream's input [B, T, d] (fp32 if the config keeps the residual in fp32)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, T], got {list(input_ids.shape)}")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size):
            raise ValueError(f"inputs_embeds: expected shape [B, T, d={self.config.hidden_size}], "
                             f"got {list(inputs_embeds.shape)}")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return h.float() if self.config.residual_in_fp32 else h

    def cache_for(self, batch: int, past_key_values: Optional[HybridCache], use_cache: Optional[bool]
                  ) -> Optional[HybridCache]:
        """The cache a forward fills: the one given, a new one if use_cache, else None. Training with
        gradient checkpointing takes none: the recompute in backward would write it twice."""
        if self.is_gradient_checkpointing and self.training:
            if past_key_values is not None:
                raise ValueError("past_key_values: gradient checkpointing recomputes each layer in backward and "
                                 "would write the cache twice; call model.eval() or gradient_checkpointing_disable()")
            return None
        if past_key_values is None and use_cache:
            return self.new_cache(batch)
        return past_key_values

    def start_recording(self, step: Step, h: Tensor, output_attentions: Optional[bool],
                        output_hidden_states: Optional[bool]) -> None:
        """Give `step` the lists the layers append to, for what is asked (or the config's default)."""
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            step.hidden_states = [h]  # the embeddings first, as in transformers
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            step.attentions = []

    output_class = BaseModelOutputWithPast

    def outputs(self, h: Tensor, step: Optional[Step], cache: Optional[HybridCache], return_dict: Optional[bool],
                **extra) -> BaseModelOutputWithPast:
        """The base model's output: final normed states h, and what `step` recorded (None: nothing).
        As in transformers the last hidden state is the normed one (the LM head's input)."""
        hidden = attentions = None
        if step is not None and step.hidden_states is not None:
            hidden = (*step.hidden_states[:-1], h)
        if step is not None and step.attentions is not None:
            attentions = tuple(step.attentions)
        out = self.output_class(last_hidden_state=h, past_key_values=cache, hidden_states=hidden,
                                attentions=attentions, **extra)
        return self.as_requested(out, return_dict)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[HybridCache] = None, use_cache: Optional[bool] = None,
                cu_seqlens: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, position_ids: Optional[Tensor] = None,
                **kwargs) -> BaseModelOutputWithPast:
        """Final normed hidden states [B, T, d] of the new tokens (SambaY's cached prefill: of the
        last token only, unless hidden states or attentions are asked for). With a cache (or
        use_cache=True) they continue the cached sequence. cu_seqlens (int32 [N+1], input_ids
        [1, T]): a packed batch of documents that do not see each other (training); position_ids
        restarting at 0 in one row (transformers' DataCollatorWithFlattening) say the same.
        output_hidden_states: the embeddings and each layer's output; output_attentions: the
        softmax map [B, H, Tq, Tk] of each attention layer, in layer order (Mamba and GMU layers
        have none). return_dict=False: a tuple."""
        h = self.embed(input_ids, inputs_embeds)
        cache = self.cache_for(h.shape[0], past_key_values, use_cache)
        if position_ids is not None and cu_seqlens is None:
            cu_seqlens = packed_documents(position_ids, h.shape[:2], attention_mask, cache)
        step = self.make_step(h, attention_mask, cache, cu_seqlens)
        if position_ids is not None:
            check_positions(position_ids, step)
        self.start_recording(step, h, output_attentions, output_hidden_states)
        T = h.shape[1]
        h = self.run_layers(h, step)
        if cache is not None:
            cache.seen += T
        h = self.final_layernorm(h.to(self.final_layernorm.weight.dtype))
        return self.outputs(h, step, cache, return_dict)


def packed_documents(position_ids: Tensor, shape: tuple[int, int], attention_mask: Optional[Tensor],
                     cache: Optional[HybridCache]) -> Optional[Tensor]:
    """cu_seqlens (int32 [N+1]) of a padding-free batch given as position ids: one row, no mask,
    no cache, positions restarting at 0 at each document (transformers'
    DataCollatorWithFlattening). None for anything else (check_positions checks those)."""
    B, T = shape
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids: expected shape [B={B}, T={T}], got {list(position_ids.shape)}")
    if B != 1 or attention_mask is not None or cache is not None:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)


def check_positions(position_ids: Tensor, step: Step) -> None:
    """position_ids must agree with the positions the model derives (from the attention mask,
    the cache, or the packed documents) at every real token: they are not an independent input."""
    derived = step.positions
    given = position_ids.to(derived.device, derived.dtype)
    real = step.new_valid()
    agree = (given == derived) if real is None else ((given == derived) | ~real)
    if not bool(agree.all()):
        raise ValueError("position_ids: these models derive position ids from attention_mask (left padding), the "
                         "cache and packed documents (position ids restarting at 0 in one row); the position_ids "
                         f"given differ from those: got {position_ids.tolist()[:2]}, expected "
                         f"{derived.tolist()[:2]} (first rows)")


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Causal LM: `model` (the family's base model) and `lm_head`. A family sets `model_class`."""

    model_class: type[HybridModel]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # tied only if the config says so

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> HybridCache:
        """An empty cache; with max_len a static one (fixed buffers, CUDA-graph capturable decode)."""
        return self.model.new_cache(batch, max_len)

    def cache_kinds(self) -> list[Optional[str]]:
        return self.model.cache_kinds()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, past_key_values: Optional[HybridCache] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, cu_seqlens: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                position_ids: Optional[Tensor] = None, shift_labels: Optional[Tensor] = None,
                num_items_in_batch: Optional[Tensor] = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits for every position (the last `logits_to_keep` if given) and, with labels (or
        shift_labels), transformers' next-token loss (see `next_token_loss`). With a cache (or
        use_cache=True) the new tokens continue the cached sequence. cu_seqlens (int32 [N+1],
        input_ids [1, T]), or position_ids restarting at 0 in one row: a packed batch of
        documents that do not see each other (training). Hidden states, attentions and
        return_dict as in the base model's forward."""
        out = self.model(input_ids, attention_mask, past_key_values, use_cache, cu_seqlens, inputs_embeds,
                         output_attentions, output_hidden_states, True, position_ids)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = next_token_loss(self.loss_function, logits, labels, shift_labels, num_items_in_batch)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return self.as_requested(result, return_dict)

    # -- generate plumbing -------------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache cannot hold our states: _prepare_cache_for_generation makes ours

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict,
                                      generation_mode: GenerationMode, batch_size: int, max_cache_length: int) -> None:
        """generate's cache (transformers' hook): unless the caller gave one, a HybridCache with a row
        per beam or returned sequence. Assisted decoding rolls back rejected draft tokens with
        `crop`, so its caches record their past (sliding windows keep every slot until the crop)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)
        if model_kwargs.get("past_key_values") is not None or not generation_config.use_cache:
            return
        rows = max(generation_config.num_beams, generation_config.num_return_sequences)
        cache = self.new_cache(batch_size * rows)
        if generation_mode == GenerationMode.ASSISTED_GENERATION or generation_config.is_assistant:
            cache.activate_past_recording()
        model_kwargs["past_key_values"] = cache

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Optional[HybridCache] = None,
                                      attention_mask: Optional[Tensor] = None, use_cache: bool = True,
                                      inputs_embeds: Optional[Tensor] = None, **kwargs):
        """The next forward's inputs: the tokens the cache has not seen, or on the first call with
        inputs_embeds the prompt's embeddings. Other keyword arguments (output_attentions,
        output_hidden_states, logits_to_keep, ...) pass through; positions come from the
        attention mask and the cache, so transformers' position_ids and cache_position are not
        needed."""
        seen = 0 if past_key_values is None else past_key_values.seen
        inputs = {"attention_mask": attention_mask, "past_key_values": past_key_values, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        elif past_key_values is None:
            inputs["input_ids"] = input_ids
        else:
            # after a prompt given as embeddings, input_ids may or may not hold the prompt's ids
            # (transformers passes them when the caller gave both): count from the mask instead
            total = attention_mask.shape[1] if inputs_embeds is not None and attention_mask is not None \
                else input_ids.shape[1] if inputs_embeds is None else seen + 1
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - (total - seen):]
        for name in ("position_ids", "cache_position"):
            kwargs.pop(name, None)
        return {**kwargs, **inputs}
