"""LRT: Latent Recurrent Transformer (https://arxiv.org/abs/2605.26797) on the Transformer backbone.

The memory m_t of token t is the final normed hidden state (the LM head's input) of token t-1,
m_0 = 0. Every layer l adds gamma_l * m to the residual stream before its block and mixes m into
its own K and V (no extra tokens):

    [g_loc, g_fb] = 2 * sigmoid(W_g x[..., :32])        per KV head, x = the layer's normed input
    k = g_loc * k + g_fb * (W_K m),  v = g_loc * v + g_fb * (W_V m),  then QK-norm and RoPE

W_K | W_V is one fused projection, `model.feedback.0` for all layers ("shared") or
`model.feedback.{l}` per layer ("layerwise"); W_g is `attn.gate` and gamma_l is `attn.gamma`.

Training and prefill run the interleaved schedule: pass 0 runs every token with m = 0 and keeps
every layer's K,V in a buffer; pass i = 1..S runs the tokens at positions p = i-1 (mod S) with
m = the latest final states shifted right, writes their fresh K,V into the buffer and their
final states back, and its queries attend over the whole buffer causally. A position's output
is that of the pass that refined it last; the loss is the mean of the passes' losses. Decoding
(one new token per sequence with a cache) is the exact recurrence: m = the cache's latent.
`exact_recurrence=True` runs the whole input that way, one token at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hybrid_lm import kernels as K

from .cache import HybridCache
from .config import LRTConfig
from .layers import Attention, Step, apply_map, attend, attention_map
from .model import HybridForCausalLM, HybridModel, check_positions, packed_documents

Tensor = torch.Tensor


def _index(index: Tensor, like: Tensor) -> Tensor:
    """index [B, n] broadcast over the trailing dims of `like` [B, N, ...], for gather/scatter on dim 1."""
    return index.view(*index.shape, *(1,) * (like.dim() - 2)).expand(*index.shape, *like.shape[2:])


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for x [B, N, ...] and index [B, n]."""
    return x.gather(1, _index(index, x))


def _put(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """x with x[b, index[b, j]] = src[b, j]; out of place, so every pass stays in the autograd graph."""
    return x.scatter(1, _index(index, src), src)


@dataclass
class Pass:
    """One pass of the interleaved schedule: which new tokens it runs and what their queries see.

    tokens [B, n]: each query's column among the T new tokens (T: an unused column, padding only);
    positions [B, n]: their position ids; q_pos [n]: their buffer index shared by the batch
    (no padding: for interleaved_attention), or mask [B, 1, n, N]: visibility of the buffer's
    keys (padding: for attend())."""
    schedule: "Schedule"
    tokens: Tensor
    positions: Tensor
    q_pos: Optional[Tensor] = None
    mask: Optional[Tensor] = None

    def visible(self, N: int) -> Tensor:
        """[B|1, 1, n, N] bool: the buffer keys each query sees (what interleaved_attention applies
        without padding: causal in buffer order, within the window)."""
        if self.mask is not None:
            return self.mask
        diff = self.q_pos[:, None] - torch.arange(N, device=self.q_pos.device)  # [n, N]
        seen = diff >= 0
        if self.schedule.window is not None:
            seen = seen & (diff < self.schedule.window)
        return seen[None, None]


class Schedule:
    """The K,V buffer of one interleaved forward and the passes that read and write it.

    Buffer index j holds slot start + j: the cached prefix (a prefill continuing a cache), then
    the T new tokens and, with padding, one trash slot. Without padding a pass's tokens are the
    same for every row (positions are slots), so its queries go to interleaved_attention with
    q_pos = their buffer index. With left padding, positions are slot - pad, so each row's subset
    sits at different slots: a pass gathers each row's tokens into ceil(T/S) query columns (the
    most any row can have, since positions of real tokens are consecutive) and fills the rest with
    the trash column T. Trash queries write their K,V to the trash slot, which lies after every
    real slot, so no real query sees it; their outputs are dropped. This keeps a padded batch at
    the same ~2x cost as an unpadded one (rather than running every pass over every slot), at
    the price of an explicit per-row mask and attend() instead of interleaved_attention.
    """

    def __init__(self, step: Step, T: int, subsets: int, window: Optional[int], layers: int):
        self.step, self.T, self.subsets, self.window = step, T, subsets, window
        cache = step.cache
        self.seen = 0 if cache is None else cache.seen
        self.prefix = 0 if cache is None or cache.layers[0].k is None else cache.layers[0].k.shape[1]
        self.start = self.seen - self.prefix  # slot of buffer index 0 (a sliding-window cache drops old slots)
        self.padded = step.valid is not None
        self.k: list[Optional[Tensor]] = [None] * layers
        self.v: list[Optional[Tensor]] = [None] * layers
        if self.padded:
            valid = step.valid[:, self.start:self.seen + T]  # a static cache's mask runs on to max_len
            self.key_valid = torch.cat([valid, valid.new_zeros(valid.shape[0], 1)], dim=1)  # [B, N], trash False

    def _pass(self, tokens: Tensor, positions: Tensor) -> Pass:
        if not self.padded:
            return Pass(self, tokens, positions, q_pos=self.prefix + tokens[0])
        q_slots = self.seen + tokens  # [B, n]; the trash column sits at the trash slot
        k_slots = self.start + torch.arange(self.key_valid.shape[1], device=tokens.device)
        diff = q_slots[:, :, None] - k_slots  # [B, n, N]
        mask = (diff >= 0) & self.key_valid[:, None]
        if self.window is not None:
            mask = mask & (diff < self.window)
        return Pass(self, tokens, positions, mask=(mask | (diff == 0))[:, None])  # a query always sees itself

    def first(self) -> Pass:
        """Pass 0: every new token, in order."""
        B = self.step.positions.shape[0]
        tokens = torch.arange(self.T, device=self.step.positions.device).expand(B, -1)
        return self._pass(tokens, self.step.positions)

    def subset(self, r: int) -> Optional[Pass]:
        """The pass over the new tokens at positions p with p % S == r (None if there are none)."""
        positions, S = self.step.positions, self.subsets
        B, dev = positions.shape[0], positions.device
        if not self.padded:  # position = slot
            first = (r - self.seen) % S
            if first >= self.T:
                return None
            tokens = torch.arange(first, self.T, S, device=dev).expand(B, -1)
            return self._pass(tokens, _take(positions, tokens))
        member = self.step.new_valid() & (positions % S == r)  # [B, T]
        most = -(-self.T // S)  # ceil(T / S): real positions are consecutive, so no row has more
        order = torch.sort((~member).int(), dim=1, stable=True).indices[:, :most]  # members first, in order
        tokens = torch.where(member.gather(1, order), order, self.T)
        return self._pass(tokens, positions.gather(1, order))

    def buffer(self, layer: int) -> Optional[tuple[Tensor, Tensor]]:
        """`layer`'s K,V buffer as the passes so far left it (None before pass 0)."""
        return None if self.k[layer] is None else (self.k[layer], self.v[layer])

    def store(self, layer: int, kv: tuple[Tensor, Tensor]) -> None:
        self.k[layer], self.v[layer] = kv

    def merge(self, tokens: Tensor, k: Tensor, v: Tensor, kv: Optional[tuple[Tensor, Tensor]],
              cached: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """The buffer `kv` with a pass's fresh K,V at its tokens, out of place: a layer that gradient
        checkpointing recomputes must see the buffer it saw the first time, so layers never write
        the schedule (run_layers stores what they return). kv None (pass 0) lays the buffer out:
        the cached prefix (`cached`, the layer's cache K,V), the new tokens, the trash slot."""
        if kv is None:
            ks, vs = [k], [v]
            if self.prefix:
                ks.insert(0, cached[0])
                vs.insert(0, cached[1])
            if self.padded:
                ks.append(k.new_zeros(k.shape[0], 1, *k.shape[2:]))
                vs.append(v.new_zeros(v.shape[0], 1, *v.shape[2:]))
            return torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        return _put(kv[0], self.prefix + tokens, k), _put(kv[1], self.prefix + tokens, v)

    def commit(self) -> None:
        """Append the new tokens' final K,V to the cache."""
        new = slice(self.prefix, self.prefix + self.T)
        for layer, kv in enumerate(self.step.cache.layers):
            kv.update(self.k[layer][:, new], self.v[layer][:, new], self.step.slots)


class FinalPassRecord:
    """output_hidden_states / output_attentions of the interleaved schedule: for each token, every
    layer's output and attention row from the pass that refined it last (pass 0 for padding).
    Each pass's layers append to fresh lists in the step; `add` writes that pass's rows over
    those of its tokens, and `finish` leaves the assembled lists in the step: hidden states
    [B, T, d] after the embeddings, maps [B, H, T, N] over the K,V buffer (the cached prefix,
    then the T new tokens)."""

    def __init__(self, step: Step):
        self.step = step
        self.embeddings = step.hidden_states  # [embeddings] or None
        self.hidden: Optional[list[Tensor]] = None  # per layer [B, T(+1), d]
        self.maps: Optional[list[Tensor]] = None  # per layer [B, T(+1), H, N] (query rows on dim 1 for _put)
        self._fresh()

    def _fresh(self) -> None:
        if self.step.hidden_states is not None:
            self.step.hidden_states = []
        if self.step.attentions is not None:
            self.step.attentions = []

    def add(self, tokens: Tensor, trash_row: bool = False) -> None:
        """After a pass over `tokens` [B, n]; the first pass (every token) may add the trash row."""
        step = self.step
        if step.hidden_states is not None:
            got = step.hidden_states
            if self.hidden is None:
                self.hidden = [F.pad(x, (0, 0, 0, int(trash_row))) for x in got]
            else:
                self.hidden = [_put(x, tokens, y) for x, y in zip(self.hidden, got)]
        if step.attentions is not None:
            got = [m.transpose(1, 2) for m in step.attentions]
            if self.maps is None:
                self.maps = [F.pad(m, (0, 0, 0, 0, 0, int(trash_row))) for m in got]
            else:
                self.maps = [_put(m, tokens, y) for m, y in zip(self.maps, got)]
        self._fresh()

    def finish(self, T: int) -> None:
        if self.hidden is not None:
            self.step.hidden_states = [*self.embeddings, *(x[:, :T] for x in self.hidden)]
        if self.maps is not None:
            N = self.maps[0].shape[-1] - (self.maps[0].shape[1] - T)  # without the trash slot
            self.step.attentions = [m[:, :T].transpose(1, 2)[..., :N] for m in self.maps]


class LRTAttention(Attention):
    """Self-attention whose K,V mix in the memory's feedback projection under per-KV-head gates."""

    def __init__(self, config: LRTConfig, layer_idx: int):
        super().__init__(config, layer_idx, window=config.sliding_window)
        self.gate_features = config.lrt_gate_features
        self.gate = nn.Linear(self.gate_features, 2 * self.kv_heads, bias=False)  # [g_loc heads | g_fb heads]
        self.gamma = nn.Parameter(torch.empty(()))  # weight of the memory added to the residual stream

    def _kv(self, x: Tensor, positions: Tensor, feedback: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """K,V of x mixed with feedback = (W_K m | W_V m) [B, T, 2 * kv_size] (None: m = 0)."""
        w, b = self.Wqkv.weight[self.q_size:], None if self.Wqkv.bias is None else self.Wqkv.bias[self.q_size:]
        kv = F.linear(x, w, b).unflatten(-1, (2, self.kv_heads, self.head_dim))  # [B, T, k|v, Hkv, Dh]
        g = 2 * torch.sigmoid(self.gate(x[..., :self.gate_features])).unflatten(-1, (2, self.kv_heads))[..., None]
        kv = g[:, :, :1] * kv
        if feedback is not None:
            kv = kv + g[:, :, 1:] * feedback.unflatten(-1, (2, self.kv_heads, self.head_dim))
        k, v = kv.unbind(2)
        return self._pos(k, positions), v

    def forward(self, x: Tensor, step: Step, feedback: Optional[Tensor] = None, pass_: Optional[Pass] = None,
                kv: Optional[tuple[Tensor, Tensor]] = None):
        """Decoding (pass_ None): the new token against the cache. A pass of the schedule: its
        queries over the buffer `kv` (Schedule.buffer) refreshed with its K,V; returns
        (output, the new buffer)."""
        positions = step.positions if pass_ is None else pass_.positions
        k, v = self._kv(x, positions, feedback)
        q = self._q(x, positions)
        if pass_ is None:
            k, v, k_slots = step.cache.layers[self.layer_idx].update(k, v, step.slots)
            return self.out_proj(self.core(q, k, v, step.slots, k_slots, step.valid, self.window,
                                           maps=step.attentions))
        cached = None
        if kv is None and pass_.schedule.prefix:
            layer_cache = step.cache.layers[self.layer_idx]
            cached = (layer_cache.k, layer_cache.v)
        k, v = pass_.schedule.merge(pass_.tokens, k, v, kv, cached)
        if step.attentions is not None:  # the map asked for: over the whole buffer [B, H, n, N]
            step.attentions.append(attention_map(q, k, pass_.visible(k.shape[1])))
            o = apply_map(step.attentions[-1], v).flatten(2)
        elif pass_.mask is None:
            o = K.interleaved_attention(q, k, v, pass_.q_pos, self.window).flatten(2)
        else:
            o = attend(q, k, v, pass_.mask).flatten(2)
        return self.out_proj(o), (k, v)


@dataclass
class LRTModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus, with `return_passes=True`, every pass's final normed states
    in schedule order: passes[i] = (tokens [B, n], states [B, n, d]), as in LRTOutput."""
    passes: Optional[list[tuple[Tensor, Tensor]]] = None


@dataclass
class LRTOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus, with `return_passes=True`, every pass's logits in schedule
    order: passes[i] = (tokens [B, n], logits [B, n, V]), logits[b, j] being those of input
    column tokens[b, j] (T, the input length, marks an unused column of a padded batch).
    passes[0] covers every column; decoding and exact_recurrence have a single pass."""
    passes: Optional[list[tuple[Tensor, Tensor]]] = None


def feedback_projections(config: LRTConfig) -> nn.ModuleList:
    """W_K | W_V of the memory: one for all layers ("shared") or one per layer ("layerwise")."""
    kv_size = config.num_key_value_heads * config.head_dim
    n = 1 if config.lrt_feedback == "shared" else config.num_hidden_layers
    return nn.ModuleList(nn.Linear(config.hidden_size, 2 * kv_size, bias=False) for _ in range(n))


class LRTLayers:
    """LRT's layer loop and final norm, shared with the vLLM model (both reach the layers through
    `base_model`)."""

    def run_layers(self, h: Tensor, step: Step, memory: Optional[Tensor] = None,
                   pass_: Optional[Pass] = None) -> Tensor:
        """Every layer over the tokens h [B, n, d] with memory [B, n, d] (None: m = 0), as one pass
        of the schedule, or (pass_ None) as a decode step against the cache."""
        base = self.base_model
        shared = self.config.lrt_feedback == "shared"
        feedback = None
        if memory is not None and shared:  # one projection serves every layer
            feedback = base.feedback[0](memory)
        for i, layer in enumerate(base.layers):
            if memory is not None:
                h = h + layer.attn.gamma * memory
                if not shared:
                    feedback = base.feedback[i](memory)
            if pass_ is None:
                h = layer(h, step, feedback=feedback)
            else:
                h, kv = layer(h, step, feedback=feedback, pass_=pass_, kv=pass_.schedule.buffer(i))
                pass_.schedule.store(i, kv)
        return h

    def final_state(self, h: Tensor) -> Tensor:
        norm = self.base_model.final_layernorm
        return norm(h.to(norm.weight.dtype))


class LRTModel(LRTLayers, HybridModel):
    """LRT's base model: the final normed states of the interleaved schedule (each token's from
    the pass that refined it last), or of the exact recurrence."""

    config_class = LRTConfig

    def build_mixers(self, config: LRTConfig) -> list[nn.Module]:
        if config.differential_attention:
            raise ValueError("config: LRT sits on the Transformer backbone; differential_attention is not supported")
        return [LRTAttention(config, i) for i in range(config.num_hidden_layers)]

    def extra_modules(self, config: LRTConfig) -> dict[str, nn.Module]:
        return {"feedback": feedback_projections(config)}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LRTAttention):  # visited after its gate Linear: this init wins
            init.zeros_(module.gate.weight)  # gates start at 2 * sigmoid(0) = 1
            init.constant_(module.gamma, self.config.lrt_gamma_init)

    def _memory(self, step: Step, latest: Optional[Tensor] = None) -> Tensor:
        """The memory of every new token: the latest final state of the slot before it (the cache's
        latent for the first new token), zero where that slot is padding or there is none.
        latest [B, T(+1 trash row), d]: the latest final states of the new tokens; None when
        decoding one token, whose memory is the latent alone."""
        B, d, cache = step.positions.shape[0], self.config.hidden_size, step.cache
        if cache is None or cache.latent is None:
            first = self.final_layernorm.weight.new_zeros(B, 1, d)
        else:
            first = cache.latent[:, None]
        m = first if latest is None else torch.cat([first.to(latest.dtype), latest[:, :-1]], dim=1)
        if step.valid is None:
            return m
        T = len(step.slots)
        before = step.slots - 1  # valid of slot s - 1, read at device-held slots (a static cache's decode)
        prev = step.valid[:, before.clamp(min=0)] & (before >= 0)
        if m.shape[1] > T:  # the trash row
            prev = torch.cat([prev, prev.new_zeros(B, m.shape[1] - T)], dim=1)
        return m * prev[..., None].to(m.dtype)

    def _interleaved(self, h: Tensor, step: Step) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The schedule over the new tokens h [B, T, d]: returns the final states of every token
        (each from the pass that refined it last) and each pass's (tokens, final states)."""
        c = self.config
        T = h.shape[1]
        schedule = Schedule(step, T, c.lrt_subsets, c.sliding_window, c.num_hidden_layers)
        record = FinalPassRecord(step)
        first = schedule.first()
        z = self.final_state(self.run_layers(h, step, None, first))
        record.add(first.tokens, schedule.padded)
        passes = [(first.tokens, z)]
        if schedule.padded:  # a row for the trash column, so every pass gathers and scatters in range
            z = torch.cat([z, z.new_zeros(z.shape[0], 1, z.shape[2])], dim=1)
            h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
        for r in range(c.lrt_subsets):
            pass_ = schedule.subset(r)
            if pass_ is None:
                continue
            memory = _take(self._memory(step, z), pass_.tokens)
            zi = self.final_state(self.run_layers(_take(h, pass_.tokens), step, memory, pass_))
            record.add(pass_.tokens)
            z = _put(z, pass_.tokens, zi)
            passes.append((pass_.tokens, zi))
        if step.cache is not None:
            schedule.commit()
        record.finish(T)
        return z[:, :T], passes

    def _states(self, h: Tensor, attention_mask: Optional[Tensor], cache: Optional[HybridCache],
                output_attentions: Optional[bool] = False, output_hidden_states: Optional[bool] = False,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Step]:
        """Final normed states of the new tokens (embedded: h [B, T, d]), each pass's (tokens,
        final states), and the step (with what it recorded)."""
        B, T = h.shape[:2]
        step = self.make_step(h, attention_mask, cache)
        if position_ids is not None:
            check_positions(position_ids, step)
        self.start_recording(step, h, output_attentions, output_hidden_states)
        if cache is not None and T == 1:  # decoding: m = the latent, exact token by token
            z = self.final_state(self.run_layers(h, step, self._memory(step)))
            passes = [(step.positions.new_zeros(B, 1), z)]
        else:
            z, passes = self._interleaved(h, step)
        if cache is not None:
            if cache.latent is None:
                cache.latent = z[:, -1].clone()
            else:  # in place: a captured decode step must write where it read
                cache.latent.copy_(z[:, -1])
            cache.seen += T
        return z, passes, step

    def _recurrence(self, h: Tensor, attention_mask: Optional[Tensor], cache: HybridCache) -> Tensor:
        """Final normed states of the exact recurrence: the input (embedded: h [B, T, d]) fed one
        token at a time."""
        seen, T = cache.seen, h.shape[1]
        whole = attention_mask is not None and attention_mask.shape[1] == seen + T  # else the new tokens' mask
        z = []
        for t in range(T):
            mask = None if attention_mask is None else \
                attention_mask[:, :seen + t + 1] if whole else attention_mask[:, t:t + 1]
            z.append(self._states(h[:, t:t + 1], mask, cache)[0])  # records nothing
        return torch.cat(z, dim=1)

    output_class = LRTModelOutput

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[HybridCache] = None, use_cache: Optional[bool] = None,
                cu_seqlens: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, position_ids: Optional[Tensor] = None,
                exact_recurrence: bool = False, return_passes: bool = False, **kwargs) -> LRTModelOutput:
        """As HybridModel.forward, with the interleaved schedule (decoding with a cache: the exact
        recurrence). Hidden states and attention maps are each token's from the pass that refined
        it last (see FinalPassRecord). exact_recurrence=True runs the exact recurrence one token at
        a time over the whole input (continuing `past_key_values` if given); return_passes=True
        adds every pass's final states (LRTModelOutput.passes)."""
        h = self.embed(input_ids, inputs_embeds)
        B, T = h.shape[:2]
        cache = self.cache_for(B, past_key_values, use_cache or exact_recurrence)
        if position_ids is not None and cu_seqlens is None:
            cu_seqlens = packed_documents(position_ids, (B, T), attention_mask, cache)
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: LRT's interleaved schedule does not take packed documents yet: "
                             "pass one document per row (attention_mask for padding)")
        if exact_recurrence:
            if cache is None:
                raise ValueError("exact_recurrence: runs token by token through a cache, which training with "
                                 "gradient checkpointing cannot keep; call model.eval()")
            if output_attentions or output_hidden_states:
                raise ValueError("output_attentions, output_hidden_states: not recorded by exact_recurrence (one "
                                 "forward per token); decode token by token with a cache to read them per step")
            z = self._recurrence(h, attention_mask, cache)
            passes, step = [(torch.arange(T, device=z.device).expand(B, -1), z)], None
        else:
            z, passes, step = self._states(h, attention_mask, cache, output_attentions, output_hidden_states,
                                           position_ids)
        return self.outputs(z, step, cache if past_key_values is not None or use_cache else None, return_dict,
                            passes=passes if return_passes else None)


class LRTForCausalLM(HybridForCausalLM):
    config_class = LRTConfig
    model_class = LRTModel

    def _loss(self, passes: list[tuple[Tensor, Tensor]], labels: Optional[Tensor], shift_labels: Optional[Tensor],
              num_items_in_batch: Optional[Tensor]) -> Tensor:
        """Mean over the passes of each pass's next-token loss over the tokens it ran. Targets are
        labels shifted left, or shift_labels as given. With num_items_in_batch (Trainer's count of
        targets over its accumulated micro-batches) a pass's summed loss is divided by its share
        of that count (num_items_in_batch x its targets / pass 0's targets), which is its own
        count when the micro-batch is the whole batch."""
        if shift_labels is None:  # the last token and the trash column predict nothing
            targets = F.pad(labels[:, 1:], (0, 2), value=-100)
        else:  # the trash column predicts nothing
            targets = F.pad(shift_labels, (0, 1), value=-100)
        total = (targets != -100).sum()  # pass 0 runs every token
        losses, counted = [], []
        for tokens, logits in passes:
            t = _take(targets, tokens)
            n = (t != -100).sum()
            ce = F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=-100, reduction="sum")
            share = n if num_items_in_batch is None else num_items_in_batch * n / total.clamp(min=1)
            losses.append(ce / share.clamp(min=1e-9) if num_items_in_batch is not None else ce / n.clamp(min=1))
            counted.append(n > 0)
        counted = torch.stack(counted)  # a pass with no target (a short input) does not count
        return (torch.stack(losses) * counted).sum() / counted.sum()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, past_key_values: Optional[HybridCache] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, exact_recurrence: bool = False,
                return_passes: bool = False, cu_seqlens: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                position_ids: Optional[Tensor] = None, shift_labels: Optional[Tensor] = None,
                num_items_in_batch: Optional[Tensor] = None, **kwargs) -> LRTOutput:
        """As HybridForCausalLM.forward, with the interleaved schedule (decoding with a cache: the
        exact recurrence); with labels (or shift_labels) the loss is the mean of the passes' losses.

        exact_recurrence=True runs the exact recurrence one token at a time over the whole input
        (continuing `past_key_values` if given); return_passes=True adds every pass's logits
        (LRTOutput.passes)."""
        want_loss = labels is not None or shift_labels is not None
        want_passes = want_loss or return_passes
        out = self.model(input_ids, attention_mask, past_key_values, use_cache, cu_seqlens, inputs_embeds,
                         output_attentions, output_hidden_states, True, position_ids,
                         exact_recurrence=exact_recurrence, return_passes=want_passes)
        z = out.last_hidden_state
        logits = self.lm_head(z[:, -logits_to_keep:] if logits_to_keep else z)
        passes = None if not want_passes else [(tokens, self.lm_head(zi)) for tokens, zi in out.passes]
        loss = self._loss(passes, labels, shift_labels, num_items_in_batch) if want_loss else None
        result = LRTOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions,
                           passes=passes if return_passes else None)
        return self.as_requested(result, return_dict)
