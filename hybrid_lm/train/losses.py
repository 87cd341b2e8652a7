"""The distillation and masked next-token losses: plain functions over logits, each returning the
mean over the unmasked tokens. They work in chunks of tokens, each chunk recomputed in the
backward pass, so the fp32 copies of [tokens, vocab] logits never exceed one chunk."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # target id of the positions that carry no loss (prompt and padding)


def _chunked(fn: Callable[..., torch.Tensor], chunk_tokens: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over chunks of the leading (token) dimension of tensors, concatenated: per-token values
    [N]. When gradients flow, each chunk is recomputed in the backward pass (activation
    checkpointing), so the fp32 intermediates fn makes live for one chunk at a time."""
    n = tensors[0].shape[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for s in range(0, n, chunk_tokens):
        part = [t[s:s + chunk_tokens] for t in tensors]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    return torch.cat(outs) if outs else tensors[0].new_zeros(0, dtype=torch.float32)


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.reshape(-1).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probs (0 log 0 = 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            kind: str = "kl", beta: float = 0.5, mask: Optional[torch.Tensor] = None,
            chunk_tokens: int = 1024) -> torch.Tensor:
    """Logit distillation loss, mean over tokens (those where mask is true), times temperature^2.

    student_logits, teacher_logits: [..., V] (any float dtype; same shape). p = softmax(teacher /
    T), q = softmax(student / T).
      kind="kl":  forward KL(p || q).
      kind="jsd": generalized JSD (GKD, https://arxiv.org/abs/2306.13649): with
                  m = beta p + (1 - beta) q, beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 gives KL(p || q) and
                  beta = 1 gives KL(q || p) (the limits, up to scale, as in TRL).
    Computed chunk_tokens rows at a time in fp32 (see _chunked)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the vocabularies must match")
    if kind not in ("kl", "jsd"):
        raise ValueError(f"kind: 'kl' or 'jsd', got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {beta}")
    V = student_logits.shape[-1]

    def per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        log_p = F.log_softmax(t.float() / temperature, dim=-1)
        if kind == "kl" or beta == 0.0:
            return _kl_rows(log_p, log_q)
        if beta == 1.0:
            return _kl_rows(log_q, log_p)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)

    values = _chunked(per_token, chunk_tokens, student_logits.reshape(-1, V), teacher_logits.reshape(-1, V))
    return _masked_mean(values, mask) * temperature ** 2


def sparse_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                   chunk_tokens: int = 1024) -> torch.Tensor:
    """KL(teacher || student) from the teacher's top-k log-probs only, mean over tokens, times
    temperature^2.

    student_logits [..., V]; topk_ids (int) and topk_logprobs [..., k]: the teacher's k most likely
    tokens and their log-probs, already at `temperature` (cache_topk stores log_softmax(teacher /
    T)); the student is tempered here. The missing mass is handled explicitly: the teacher's
    remaining mass p_o = 1 - sum_k exp(topk_logprobs) is one "other" bucket, compared with the
    student's mass outside the same k tokens, q_o = sum_{v not in top-k} q_v, so the loss is the
    exact KL between the two (k + 1)-bucket distributions:
        sum_k p_k (log p_k - log q_k) + p_o (log p_o - log q_o).
    It is a lower bound of the full KL, equal to it when k = V or the teacher's other mass is 0.
    A p_o below the rounding noise of summing k fp32 probabilities (k * 2^-23) counts as 0."""
    V, k = student_logits.shape[-1], topk_ids.shape[-1]
    noise = k * 2.0 ** -23

    def per_token(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        lp = lp.float()
        log_q_k = log_q.gather(-1, ids)
        top = (lp.exp() * (lp - log_q_k)).sum(-1)
        p_o = (1 - lp.exp().sum(-1)).clamp_min(0)
        p_o = torch.where(p_o > noise, p_o, torch.zeros_like(p_o))
        outside = torch.ones_like(log_q).scatter_(-1, ids, 0.0)
        q_o = (log_q.exp() * outside).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        other = p_o * (torch.log(p_o.clamp_min(torch.finfo(torch.float32).tiny)) - torch.log(q_o))
        return top + other

    values = _chunked(per_token, chunk_tokens, student_logits.reshape(-1, V), topk_ids.reshape(-1, k).long(),
                      topk_logprobs.reshape(-1, k))
    return _masked_mean(values, mask) * temperature ** 2


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != IGNORE, chunked like kd_loss."""
    V = logits.shape[-1]
    targets = targets.reshape(-1)
    keep = targets != IGNORE

    def per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s.float(), t.clamp_min(0), reduction="none")

    return _masked_mean(_chunked(per_token, chunk_tokens, logits.reshape(-1, V), targets), keep)
