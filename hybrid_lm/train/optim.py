"""Optimizers and learning-rate schedule for pretraining.

Default ("muon", nanochat's split): Muon for the weight matrices of the linear layers, AdamW for
the token embedding, the output head and every other parameter (norm weights and biases, Mamba's
A_log, D and conv1d weight, LRT gammas, differential-attention lambdas). `kind="adamw"` is a single
AdamW over everything. `build_optimizer` returns one `Optimizers` object that the trainer steps,
zeroes, schedules and checkpoints as if it were a single optimizer.

Works with plain, DDP-wrapped and FSDP2-sharded models. Under FSDP2 a parameter is a DTensor
holding one shard of the matrix, but Newton-Schulz needs the whole matrix: Muon all-gathers each
momentum-smoothed gradient, every rank orthogonalises the full matrix, and each keeps its own
shard of the result. Cost per Muon matrix and step: one all-gather of it (the traffic of FSDP2's
forward all-gather of that parameter) and the whole NS on every rank, redundantly (as under DDP,
where every rank orthogonalises every matrix too). NS on an m x n matrix (m <= n) is about
30 m^2 n FLOPs, i.e. 5 m / T of that matrix's forward+backward over T tokens per rank and step:
a few percent at m = 1024 and T = 128k, more for wide models on small batches (nanochat instead
spreads the matrices over the ranks; not worth the complexity here).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): chosen so that x -> a x + b x^3 + c x^5
# pushes every singular value in (0, 1] quickly into roughly [0.7, 1.2] rather than exactly to 1;
# the inexactness does not hurt training and the steep slope at 0 makes 5 steps enough.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Default learning rates at lr_mult=1 (nanochat's, see build_optimizer for the reasoning).
MUON_LR = 0.02  # scale-free: the orthogonalised update has unit spectral norm whatever the width
HEAD_LR = 0.004
EMBED_LR = 0.04
VECTOR_LR = 0.004
ADAMW_LR = 0.001  # kind="adamw", every parameter
REFERENCE_WIDTH = 768  # the AdamW lrs above are for hidden size 768 and scale as width**-0.5


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of a 2-D matrix G = U S V^T.

    Runs `steps` quintic Newton-Schulz iterations, in bfloat16 on an accelerator (fast, and the
    iteration is robust to its rounding) and in float32 on the CPU (so CPU runs are exact and
    deterministic). The result keeps G's singular vectors; its singular values land roughly in
    [0.7, 1.2] instead of exactly 1 (tiny ones of a near-singular G grow but may stay below).
    Returned in G's dtype.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz expects a matrix, got shape {tuple(g.shape)}")
    x = g.to(torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    # Iterate on the wide orientation: the Gram matrix x x^T is then the smaller of the two.
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1], where the
    # iteration converges; eps keeps an all-zero gradient at zero instead of NaN.
    x = x / (x.norm() + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


def _orthogonalize(update: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz for plain tensors and for sharded DTensors (FSDP2), on the full matrix."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps)
    # Orthogonalising shard by shard would be a different (wrong) update: gather the full
    # matrix, orthogonalise it on every rank, then slice each rank's shard back out (going from
    # Replicate to the original placements is local slicing, no communication).
    full = newton_schulz(update.full_tensor(), steps)
    mesh = update.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices only.

    Per step: momentum buffer m <- beta m + (1 - beta) g; the update direction is the Nesterov
    look-ahead g + beta (m - g) (or m without Nesterov); it is replaced by its orthogonalised
    version (newton_schulz) and applied as p <- p - lr * max(1, rows / cols)**0.5 * O. That shape
    factor is Keller Jordan's (also nanochat's): it gives tall matrices (rows > cols, e.g. an MLP
    up-projection stored [out, in]) a per-element RMS update comparable to square ones. Weight
    decay is decoupled and, as in AdamW, scaled by lr: p <- p * (1 - lr * weight_decay).

    Parameters may be plain tensors (single process or DDP, whose gradients are already
    all-reduced) or FSDP2 DTensor shards (see `_orthogonalize`). State is one momentum buffer
    per parameter, so state_dict() holds only tensors, numbers and strings.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = MUON_LR,
                 momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
                 ns_steps: int = 5) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"invalid Muon hyperparameters: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon update of every parameter that has a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)
                update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
                update = _orthogonalize(update, group["ns_steps"])
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
        return loss


class Optimizers:
    """Several optimizers driven as one: step, zero_grad, schedule and checkpoint together.

    Every param group remembers its base learning rate as "initial_lr" (the key torch's own
    schedulers use); `lr_scale(f)` sets each group's lr to f times it. The individual optimizers
    are in `.optimizers` (a name -> optimizer dict), e.g. for
    torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, list(...values())).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        """All param groups of all optimizers (each has a "name" key: embed, head, ...)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        """Step every optimizer."""
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (by default drop) every gradient."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def lr_scale(self, factor: float) -> None:
        """Set every group's lr to factor * its base lr (e.g. factor = wsd_schedule(step, ...))."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def state_dict(self) -> dict:
        """{optimizer name: its state_dict()}: tensors, numbers, strings, lists, dicts only."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() taken from an Optimizers built the same way (same kind)."""
        if state_dict.keys() != self.optimizers.keys():
            raise ValueError(f"optimizer state holds {sorted(state_dict)}, "
                             f"this run has {sorted(self.optimizers)} (different --optimizer?)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Sort the trainable parameters into the groups "matrix", "embed", "head" and "vector".

    matrix: the 2-D weight of every nn.Linear except the output head: attention, MLP and Mamba
    projections in the blocks, and LRT's feedback projection. embed: the input embedding. head:
    the output head; a head tied to the embedding is one tensor, put here once (the head is the
    more sensitive role, so the tied tensor gets the smaller head lr). vector: everything else,
    whatever its shape: norm weights and biases, linear biases, A_log (2-D but not a linear map),
    D, conv1d weights (3-D), gammas and lambdas. Shared tensors appear once; each parameter is in
    exactly one group.
    """
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    head_ids = {id(head.weight)} if head is not None else set()
    embed_ids, matrix_ids = set(), set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embed_ids.add(id(module.weight))
        elif isinstance(module, nn.Linear) and module.weight.ndim == 2:
            matrix_ids.add(id(module.weight))
    groups = {"matrix": [], "embed": [], "head": [], "vector": []}
    for p in model.parameters():  # deduplicates shared (tied) tensors
        if not p.requires_grad:
            continue
        name = ("head" if id(p) in head_ids else "embed" if id(p) in embed_ids
                else "matrix" if id(p) in matrix_ids else "vector")
        groups[name].append(p)
    return groups


def build_optimizer(model: nn.Module, kind: str = "muon", lr_mult: float = 1.0,
                    weight_decay: float = 0.0) -> Optimizers:
    """The pretraining optimizer for `model` (plain, DDP-wrapped or FSDP2-sharded, after sharding).

    kind="muon" (default, nanochat's recipe): Muon (lr 0.02, momentum 0.95, Nesterov) on the
    "matrix" group of `split_params`, and AdamW (betas (0.8, 0.95), eps 1e-10) on the others
    with lr head 0.004, embed 0.04, vector 0.004, each times (hidden_size / 768)**-0.5 (AdamW's
    step size is per element, so wider models need smaller lrs; Muon's spectrally normalised
    update needs no such factor). nanochat's head lr is kept as is; its embedding lr (0.2) is for
    embeddings initialised with std 1, ours start at std 0.02 like every HF model, so it is
    lowered to 0.04; the vector group (which nanochat lacks: no norm weights, no Mamba) gets the
    conservative head lr. kind="adamw": one AdamW, lr 0.001 * (hidden_size / 768)**-0.5 for every
    parameter, betas (0.9, 0.95), eps 1e-8.

    lr_mult multiplies every default lr. weight_decay (decoupled) applies to the matrix group
    only; embeddings, head and vectors are never decayed. Each param group carries a "name".
    """
    groups = split_params(model)
    width = unwrap(model).get_input_embeddings().weight.shape[-1]
    adam_scale = lr_mult * (width / REFERENCE_WIDTH) ** -0.5

    def adam_group(name: str, lr: float, wd: float = 0.0) -> dict:
        return dict(params=groups[name], lr=lr * adam_scale, weight_decay=wd, name=name)

    if kind == "muon":
        adam = [adam_group("embed", EMBED_LR), adam_group("head", HEAD_LR),
                adam_group("vector", VECTOR_LR)]
        muon = [dict(params=groups["matrix"], lr=MUON_LR * lr_mult, name="matrix")]
        return Optimizers({
            "muon": Muon(muon, weight_decay=weight_decay),
            "adamw": torch.optim.AdamW([g for g in adam if g["params"]], betas=(0.8, 0.95),
                                       eps=1e-10),
        })
    if kind == "adamw":
        adam = [adam_group("matrix", ADAMW_LR, weight_decay)]
        adam += [adam_group(name, ADAMW_LR) for name in ("embed", "head", "vector")]
        return Optimizers({"adamw": torch.optim.AdamW([g for g in adam if g["params"]],
                                                      betas=(0.9, 0.95), eps=1e-8)})
    raise ValueError(f"unknown optimizer kind {kind!r}: expected 'muon' or 'adamw'")


def wsd_schedule(step: int, total: int, warmup: int, decay_fraction: float = 0.2,
                 floor: float = 0.0) -> float:
    """Warmup-stable-decay lr multiplier for 0-based `step` of `total` steps.

    Linear warmup (step + 1) / warmup, so the first step already moves; then 1; over the last
    round(decay_fraction * total) steps a linear decay that would reach `floor` at step == total
    (nanochat's warmdown: the last step still gets a small nonzero lr). floor defaults to 0.0 as in
    nanochat. When warmup and decay overlap (very short runs) the smaller of the two ramps wins.
    """
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    decay = round(decay_fraction * total)
    if decay > 0 and step >= total - decay:
        progress = max(total - step, 0) / decay  # 1 at the start of the decay, 0 at `total`
        factor = min(factor, floor + (1.0 - floor) * progress)
    return factor

