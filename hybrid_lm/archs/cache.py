"""Generation caches: one object per model holds every layer's state.

- KVCache: K, V of one attention layer, token-major [B, S, Hkv, Dh]. A sliding-window layer
  keeps only the last window-1 slots (all a later query can see besides itself), so it never
  holds more than `sliding_window` positions.
- MambaState: conv [B, Di, W-1] and SSM [B, Di, N] states, fp32, updated in place.
- SambaY's cross-attention layers have no entry: they read the full-attention layer's KVCache.
- LRT keeps its latent (the previous token's final hidden state, [B, d]) in `latent`.

A decode step only concatenates, slices and updates in place: nothing reads a tensor back to the
host. `valid` [B, S] marks the slots that hold real tokens (left padding is False).

Static mode (`max_len` given): every buffer is allocated once and written in place at slots held
on the device (`seen_t`), so a decode step has fixed shapes and addresses and can be captured in
a CUDA graph. Attention K,V live in ring buffers of `capacity` slots (the window for sliding
layers, max_len for full ones) beside the slot id stored in each entry (-1: empty). A static
cache takes one prompt, then single tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


class KVCache:
    def __init__(self, capacity: Optional[int] = None) -> None:
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.start = 0  # dynamic: slot of the first stored key
        self.capacity = capacity  # static: ring size
        self.slot_ids: Optional[Tensor] = None  # static: [capacity] slot held by each entry, -1 if none

    def update(self, k: Tensor, v: Tensor, slots: Tensor, window: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Append the new tokens' K, V; return all keys a new query may need and their slots."""
        if self.capacity is not None:
            return self._update_static(k, v, slots)
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        k_slots = torch.arange(self.start, self.start + k.shape[1], device=k.device)
        keep = k.shape[1] if window is None else min(k.shape[1], window - 1)
        if keep < k.shape[1]:  # a copy, so the dropped slots' memory is freed
            self.k, self.v = k[:, k.shape[1] - keep:].clone(), v[:, v.shape[1] - keep:].clone()
        else:
            self.k, self.v = k, v
        self.start += k.shape[1] - keep
        return k, v, k_slots

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

    def nbytes(self, seen: int) -> int:
        """Bytes of the entries that hold tokens (a static ring counts only its filled slots)."""
        if self.k is None:
            return 0
        if self.capacity is None:
            return self.k.nbytes + self.v.nbytes
        return (self.k.nbytes + self.v.nbytes) * min(seen, self.capacity) // self.capacity


class MambaState:
    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, device) -> None:
        self.conv = torch.zeros(batch, d_inner, d_conv - 1, dtype=torch.float32, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


class HybridCache:
    """The cache of one model for one batch. `kinds[i]` is "kv", "mamba" or None per layer;
    `windows[i]` the layer's sliding window (static mode sizes its ring by it)."""

    def __init__(self, kinds: Sequence[Optional[str]], batch: int, d_inner: int = 0, d_conv: int = 4,
                 d_state: int = 16, device=None, max_len: Optional[int] = None,
                 windows: Optional[Sequence[Optional[int]]] = None) -> None:
        windows = windows or [None] * len(kinds)
        self.layers: list = []
        for kind, window in zip(kinds, windows):
            if kind == "kv":
                capacity = None if max_len is None else min(max_len, window or max_len)
                self.layers.append(KVCache(capacity))
            elif kind == "mamba":
                self.layers.append(MambaState(batch, d_inner, d_conv, d_state, device))
            elif kind is None:
                self.layers.append(None)
            else:
                raise ValueError(f"kinds: expected 'kv', 'mamba' or None per layer, got {kind!r}")
        self.batch = batch
        self.seen = 0  # slots fed so far (host int: known without reading the device)
        self.valid: Optional[Tensor] = None  # [B, seen] bool, or None while nothing was padded
        self.latent: Optional[Tensor] = None  # LRT
        self.max_len = max_len
        if max_len is not None:  # static: the step's slots, validity and positions live on the device
            self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
            self.seen_t = torch.zeros(1, dtype=torch.long, device=device)
            self.num_real = torch.zeros(batch, dtype=torch.long, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def nbytes(self) -> int:
        """Bytes of the state the cache holds for the tokens seen so far (a static cache's buffers
        are allocated to max_len up front; only their filled part counts)."""
        total = sum(layer.nbytes(self.seen) if isinstance(layer, KVCache) else layer.nbytes()
                    for layer in self.layers if layer is not None)
        if self.valid is not None:
            total += self.valid.nbytes if self.max_len is None else self.valid[:, :self.seen].nbytes
        return total + (0 if self.latent is None else self.latent.nbytes)
