"""Shared plumbing for the kernels: backend dispatch and argument validation.

Every public op validates its arguments with `check` before anything reaches a kernel, so a
bad call fails with a ValueError that names the argument, the expected and the received
shape/dtype/device. Tensor contents are checked for cu_seqlens only (`check_cu_seqlens`): on the
host for CPU tensors, with a device-side assert for CUDA tensors and under torch.compile, so no
op syncs with the host. Decode ops' state_indices are not checked (their values would need a sync).

Launch parameters: optional inputs reach a kernel as None pointers, and `@triton.heuristics`
turns each into a HAS_* constexpr (`has`), so no launch passes those flags by hand; block sizes
and num_warps come from `triton.autotune` over `configs`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# read at import: TRITON_INTERPRET takes effect only when set before triton is imported anyway
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when `x` should run the Triton kernels rather than the PyTorch reference.

    CUDA tensors take Triton; CPU tensors take the reference unless HYBRID_LM_BACKEND=triton
    (which needs TRITON_INTERPRET=1 set before triton is imported). HYBRID_LM_BACKEND=reference
    forces the reference everywhere, which the benchmarks use for side-by-side timings.
    float64 always runs the reference: the kernels compute in fp32.
    """
    if x.dtype == torch.float64:
        return False
    backend = os.environ.get("HYBRID_LM_BACKEND", "auto")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"HYBRID_LM_BACKEND: expected 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference":
        return False
    return backend == "triton" or x.is_cuda


def device_guard(x: torch.Tensor):
    """Make x's GPU the current one for a launch (Triton launches on the current device, so a
    tensor on cuda:1 while cuda:0 is current would be read from the wrong device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def configs(cuda: list, interpreted) -> list:
    """Autotune configs: the `cuda` list on a GPU, the single `interpreted` config under
    TRITON_INTERPRET=1, where nothing can be timed (a multi-config autotune fails there)."""
    return [interpreted] if INTERPRET else list(cuda)


def has(arg: str) -> Callable[[dict], bool]:
    """A `triton.heuristics` value: whether the kernel argument `arg` (an optional input) was given."""
    return lambda args: args[arg] is not None


def contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`t.contiguous()` for an optional input, None passing through."""
    return None if t is None else t.contiguous()


def num_seqs(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    """Sequences (so states) in a batch: its rows, or the packed sequences of cu_seqlens."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fmt(spec: Sequence, dims: dict) -> str:
    return "[" + ", ".join(f"{s}={dims[s]}" if isinstance(s, str) and s in dims else str(s) for s in spec) + "]"


def check(name: str, t, spec: Optional[Sequence] = None, dims: Optional[dict] = None,
          dtypes: Optional[Iterable[torch.dtype]] = None, device: Optional[torch.device] = None,
          optional: bool = False) -> None:
    """Validate one tensor argument.

    spec: the expected shape, each entry an int or a dim name; a name is bound in `dims` on
    first sight and must match afterwards, so shapes are checked against each other.
    """
    if t is None:
        if optional:
            return
        raise ValueError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dims = {} if dims is None else dims
    if spec is not None:
        ok = t.dim() == len(spec)
        if ok:
            for s, n in zip(spec, t.shape):
                want = dims.get(s) if isinstance(s, str) else s
                if want is not None and want != n:
                    ok = False
                    break
        if not ok:
            raise ValueError(f"{name}: expected shape {_fmt(spec, dims)}, got {list(t.shape)}")
        for s, n in zip(spec, t.shape):
            if isinstance(s, str):
                dims.setdefault(s, n)
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def same_dtype(ref: torch.Tensor, *also: torch.dtype) -> tuple[torch.dtype, ...]:
    """`dtypes` for `check` where an argument must share `ref`'s dtype (or be one of `also`)."""
    return tuple(dict.fromkeys((ref.dtype, *also)))


def check_cu_seqlens(cu_seqlens, batch: int, T: int, device: torch.device) -> None:
    """cu_seqlens: int32 [N+1] on the inputs' device, used with batch size 1, holding
    non-decreasing offsets from 0 to T (empty sequences allowed).

    Kernels index memory with these offsets, so bad ones would read out of bounds. CPU tensors
    are checked on the host. A CUDA tensor's values would need a host sync to read, and
    `.tolist()` would break a torch.compile graph, so there a device-side assert checks them.
    """
    check("cu_seqlens", cu_seqlens, ("N+1",), {}, (torch.int32,), device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {list(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed batches need batch size 1, got batch size {batch}")
    expected = "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at T"
    if cu_seqlens.is_cuda or torch.compiler.is_compiling():
        # the message is a constant of the graph under torch.compile, where T may be symbolic
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        torch._assert_async(ok, expected)
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{expected}={T}, got {offsets}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {type(value).__name__}")


def check_slots(name: str, state: torch.Tensor, batch: int, state_indices) -> None:
    """A decode op's state: without state_indices row b uses slot b, so it needs `batch` slots."""
    if state_indices is None and state.shape[0] < batch:
        raise ValueError(f"{name}: expected at least B={batch} slots without state_indices, "
                         f"got shape {list(state.shape)}")


def check_activation(activation) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")


def new_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a kernel output. With HYBRID_LM_POISON=1 (the tests set it) the buffer is filled
    with NaN first, so an element a kernel forgets to write shows up instead of passing by luck."""
    if os.environ.get("HYBRID_LM_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
