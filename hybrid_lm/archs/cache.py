"""Generation caches: one object per model holds every layer's state.

- KVCache: K, V of one attention layer, token-major [B, S, Hkv, Dh]. A sliding-window layer
  keeps only the last window-1 slots (all a later query can see besides itself), so it never
  holds more than `sliding_window` positions.
- MambaState: conv [B, Di, W-1] and SSM [B, Di, N] states, fp32, updated in place.
- SambaY's cross-attention layers have no entry: they read the full-attention layer's KVCache.
- LRT keeps its latent (the previous token's final hidden state, [B, d]) in `latent`.

A decode step only concatenates, slices and updates in place: nothing reads a tensor back to the
host. `valid` [B, S] marks the slots that hold real tokens (left padding is False).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


class KVCache:
    def __init__(self) -> None:
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.start = 0  # slot of the first stored key

    def update(self, k: Tensor, v: Tensor, slots: Tensor, window: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Append the new tokens' K, V; return all keys a new query may need and their slots."""
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

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class MambaState:
    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, device) -> None:
        self.conv = torch.zeros(batch, d_inner, d_conv - 1, dtype=torch.float32, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


class HybridCache:
    """The cache of one model for one batch. `kinds[i]` is "kv", "mamba" or None per layer."""

    def __init__(self, kinds: Sequence[Optional[str]], batch: int, d_inner: int = 0, d_conv: int = 4,
                 d_state: int = 16, device=None) -> None:
        self.layers: list = []
        for kind in kinds:
            if kind == "kv":
                self.layers.append(KVCache())
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

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        total = sum(layer.nbytes() for layer in self.layers if layer is not None)
        for t in (self.valid, self.latent):
            total += 0 if t is None else t.nbytes
        return total
