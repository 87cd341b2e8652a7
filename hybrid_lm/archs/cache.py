"""Generation caches: one object per model holds every layer's state. HybridCache is a
transformers `Cache`, so generate's beam search, assisted decoding and cache utilities apply.

- KVCache: K, V of one attention layer, token-major [B, S, Hkv, Dh]. A sliding-window layer
  keeps only the last window-1 slots (all a later query can see besides itself), so it never
  holds more than `sliding_window` positions; with past recording on (assisted decoding) it
  keeps every slot until the next `crop`, which can then roll back any number of them.
- MambaState: conv [B, Di, W-1] and SSM [B, Di, N] states, fp32, updated in place.
- SambaY's cross-attention layers have no entry: they read the full-attention layer's KVCache.
- LRT keeps its latent (the previous token's final hidden state, [B, d]) in `latent`.

A decode step only concatenates, slices and updates in place: nothing reads a tensor back to the
host. `valid` [B, S] marks the slots that hold real tokens (left padding is False).

Static mode (`max_len` given): every buffer is allocated once and written in place at slots held
on the device (`seen_t`), so a decode step has fixed shapes and addresses and can be captured in
a CUDA graph. Attention K,V live in ring buffers of `capacity` slots (the window for sliding
layers, max_len for full ones) beside the slot id stored in each entry (-1: empty). A static
cache takes one prompt, then single tokens; a beam reorder rewrites its buffers in place.

Batch rows (beam reorder, select, repeat) move together in every state; only attention K,V can
be cropped (rolled back): a Mamba state or LRT's latent has folded the dropped tokens in.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache

Tensor = torch.Tensor


def take_rows(t: Optional[Tensor], rows: Tensor, in_place: bool) -> Optional[Tensor]:
    """Rows `rows` of t's batch (dim 0), in that order; written over t when `in_place` and the
    batch size stays (a static cache keeps its addresses for a captured decode step)."""
    if t is None:
        return None
    picked = t.index_select(0, rows.to(t.device))
    return t.copy_(picked) if in_place and picked.shape == t.shape else picked


class KVCache:
    def __init__(self, window: Optional[int] = None, capacity: Optional[int] = None) -> None:
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.window = window
        self.start = 0  # dynamic: slot of the first stored key
        self.capacity = capacity  # static: ring size
        self.slot_ids: Optional[Tensor] = None  # static: [capacity] slot held by each entry, -1 if none
        self.record_past = False  # keep every slot until the next crop (assisted decoding)

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    def update(self, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append the new tokens' K, V; return all keys a new query may need and their slots."""
        if self.capacity is not None:
            return self._update_static(k, v, slots)
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        k_slots = torch.arange(self.start, self.start + k.shape[1], device=k.device)
        self.k, self.v = k, v
        if not self.record_past:
            self._trim()
        return k, v, k_slots

    def _trim(self) -> None:
        """Keep only the slots a later query can see (a sliding window's last window-1)."""
        keep = self.k.shape[1] if self.window is None else min(self.k.shape[1], self.window - 1)
        if keep < self.k.shape[1]:  # a copy, so the dropped slots' memory is freed
            self.start += self.k.shape[1] - keep
            self.k, self.v = self.k[:, -keep:].clone(), self.v[:, -keep:].clone()

    def _update_static(self, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T = k.shape[1]
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], self.capacity, *k.shape[2:])
            self.v = v.new_zeros(v.shape[0], self.capacity, *v.shape[2:])
            self.slot_ids = torch.full((self.capacity,), -1, dtype=torch.long, device=k.device)
        elif T > 1:
            raise ValueError("a static cache takes one prompt, then one token per step: "
                             "use model.new_cache(batch) without max_len for chunked prefill")
        keep = min(T, self.capacity)  # a prompt longer than a window keeps its last `capacity` tokens
        idx = slots[T - keep:] % self.capacity
        self.k.index_copy_(1, idx, k[:, T - keep:])
        self.v.index_copy_(1, idx, v[:, T - keep:])
        self.slot_ids.index_copy_(0, idx, slots[T - keep:])
        if T > 1:  # the prompt attends over its own keys
            return k, v, slots
        return self.k, self.v, self.slot_ids

    def crop(self, n: int) -> None:
        """Forget the last n slots (dynamic cache); then keep only what the window needs."""
        if n:
            held = 0 if self.k is None else self.k.shape[1]
            if self.window is not None and self.start > 0 and held - n < self.window - 1:
                raise ValueError(f"crop: a sliding-window layer (window {self.window}) has dropped the slots that "
                                 f"{n} removed tokens would uncover; call cache.activate_past_recording() before "
                                 "the forward that is to be rolled back")
            self.k, self.v = self.k[:, :held - n], self.v[:, :held - n]
        if self.k is not None:
            self._trim()

    def select_rows(self, rows: Tensor, in_place: bool) -> None:
        self.k, self.v = take_rows(self.k, rows, in_place), take_rows(self.v, rows, in_place)

    def reset(self) -> None:
        if self.capacity is None:
            self.k = self.v = None
            self.start = 0
        elif self.k is not None:
            self.k.zero_(), self.v.zero_(), self.slot_ids.fill_(-1)

    def nbytes(self, seen: int) -> int:
        """Bytes of the entries that hold tokens (a static ring counts only its filled slots)."""
        if self.k is None:
            return 0
        if self.capacity is None:
            return self.k.nbytes + self.v.nbytes
        return (self.k.nbytes + self.v.nbytes) * min(seen, self.capacity) // self.capacity


class MambaState:
    is_sliding = False

    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, device) -> None:
        self.conv = torch.zeros(batch, d_inner, d_conv - 1, dtype=torch.float32, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=device)

    def select_rows(self, rows: Tensor, in_place: bool) -> None:
        self.conv, self.ssm = take_rows(self.conv, rows, in_place), take_rows(self.ssm, rows, in_place)

    def reset(self) -> None:
        self.conv.zero_(), self.ssm.zero_()

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


class HybridCache(Cache):
    """The cache of one model for one batch. `kinds[i]` is "kv", "mamba" or None per layer;
    `windows[i]` the layer's sliding window (static mode sizes its ring by it)."""

    def __init__(self, kinds: Sequence[Optional[str]], batch: int, d_inner: int = 0, d_conv: int = 4,
                 d_state: int = 16, device=None, max_len: Optional[int] = None,
                 windows: Optional[Sequence[Optional[int]]] = None) -> None:
        windows = windows or [None] * len(kinds)
        layers: list = []
        for kind, window in zip(kinds, windows):
            if kind == "kv":
                capacity = None if max_len is None else min(max_len, window or max_len)
                layers.append(KVCache(window, capacity))
            elif kind == "mamba":
                layers.append(MambaState(batch, d_inner, d_conv, d_state, device))
            elif kind is None:
                layers.append(None)
            else:
                raise ValueError(f"kinds: expected 'kv', 'mamba' or None per layer, got {kind!r}")
        super().__init__(layers=layers)
        self.batch = batch
        self.seen = 0  # slots fed so far (host int: known without reading the device)
        self.valid: Optional[Tensor] = None  # [B, seen] bool, or None while nothing was padded
        self.latent: Optional[Tensor] = None  # LRT
        self.max_len = max_len
        if max_len is not None:  # static: the step's slots, validity and positions live on the device
            self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
            self.seen_t = torch.zeros(1, dtype=torch.long, device=device)
            self.num_real = torch.zeros(batch, dtype=torch.long, device=device)

    def _states(self) -> list:
        return [layer for layer in self.layers if layer is not None]

    # -- transformers' Cache API -------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1 if self.max_len is None else self.max_len

    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def is_compileable(self) -> bool:
        return self.max_len is not None

    @property
    def is_initialized(self) -> bool:
        return self.seen > 0

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can roll tokens back: attention K,V only, in a dynamic cache."""
        return self.max_len is None and self.latent is None and not any(
            isinstance(layer, MambaState) for layer in self.layers)

    def _select_rows(self, rows: Tensor) -> None:
        """Keep batch rows `rows` (int64, in order) of every state: K,V, Mamba states, LRT's latent
        and the validity mask. A static cache rewrites its buffers in place while the batch size
        stays, so a captured decode step stays valid across beam reorders."""
        in_place = self.max_len is not None
        for layer in self._states():
            layer.select_rows(rows, in_place)
        self.latent = take_rows(self.latent, rows, in_place)
        self.valid = take_rows(self.valid, rows, in_place)
        if self.max_len is not None:
            self.num_real = take_rows(self.num_real, rows, in_place)
        self.batch = rows.numel()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i becomes the old row beam_idx[i]."""
        self._select_rows(beam_idx.long())

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (int indices or a bool mask over the batch)."""
        self._select_rows(torch.arange(self.batch)[torch.as_tensor(indices, device="cpu")])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row `repeats` times in place of it (one row per beam or returned sequence)."""
        self._select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (transformers' convention; a positive value is
        the older form, the length to keep). Only attention K,V can be rolled back: a Mamba state
        or LRT's latent has already folded the tokens in, so those caches (and static ones) refuse."""
        n = -tokens_to_remove if tokens_to_remove <= 0 else max(self.seen - tokens_to_remove, 0)
        if n > self.seen:
            raise ValueError(f"crop: cannot remove {n} tokens from a cache holding {self.seen}")
        if n and not self.is_croppable:
            held = "a static cache" if self.max_len is not None else \
                "Mamba states" if any(isinstance(x, MambaState) for x in self.layers) else "LRT's latent state"
            raise ValueError(f"crop: this cache holds {held}, which cannot be rolled back by {n} tokens "
                             "(only attention K,V in a dynamic cache can)")
        for layer in self._states():
            if isinstance(layer, KVCache) and layer.capacity is None:
                layer.crop(n)
        self.seen -= n
        if self.valid is not None and self.max_len is None:
            self.valid = self.valid[:, :self.seen]

    def activate_past_recording(self) -> None:
        """Sliding-window layers keep every slot until the next `crop`, so it can roll back any
        number of tokens (assisted decoding verifies several at once)."""
        for layer in self._states():
            if isinstance(layer, KVCache):
                layer.record_past = True

    def reset(self) -> None:
        """Empty, as new (a static cache's buffers are zeroed in place)."""
        for layer in self._states():
            layer.reset()
        self.seen, self.latent = 0, None
        if self.max_len is None:
            self.valid = None
        else:
            self.valid.zero_(), self.seen_t.zero_(), self.num_real.zero_()

    # -- ours --------------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of the state the cache holds for the tokens seen so far (a static cache's buffers
        are allocated to max_len up front; only their filled part counts)."""
        total = sum(layer.nbytes(self.seen) if isinstance(layer, KVCache) else layer.nbytes()
                    for layer in self._states())
        if self.valid is not None:
            total += self.valid.nbytes if self.max_len is None else self.valid[:, :self.seen].nbytes
        return total + (0 if self.latent is None else self.latent.nbytes)
