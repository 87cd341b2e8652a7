"""Kernel benchmark: `hybrid-lm bench kernels`, or `python -m hybrid_lm.bench.kernels`.

For every op of hybrid_lm.kernels over a size sweep, times the forward, backward and decode
passes of our Triton kernels side by side with the PyTorch reference (hybrid_lm.kernels.reference,
called directly) and, where they import, mamba-ssm's selective_scan_fn and
selective_state_update, causal-conv1d's causal_conv1d_fn and causal_conv1d_update, and torch's
scaled_dot_product_attention (plain causal attention only). Each row gives the median time, the
achieved GB/s under an explicit bytes-moved model, and that bandwidth as a fraction of the
device's copy bandwidth measured in the same run.

Bytes models (the `*_bytes` functions below; their docstrings are copied into the JSON): the
fewest bytes a pass must move through device memory, each input read once and each output
written once, in the dtypes of our API (activations in --dtype, recurrent SSM states and A, D,
delta/dt bias in fp32). What a kernel re-reads or stores on the side (chunk states, recompute) is
not counted, so GB/s over copy bandwidth says how close a kernel is to the floor. fwd+bwd moves
fwd + bwd. Attention rows also report TFLOP/s: it is matmul-bound, not memory-bound.

Timing: on CUDA, triton.testing.do_bench (CUDA events, L2 flushed before every call, median).
"fwd" runs with autograd recording (the training forward), "bwd" times torch.autograd.grad over
a retained graph, "fwd+bwd" both. "decode" is the per-call time of a sequence of calls over
distinct copies of the inputs, captured in a CUDA graph (see time_decode); the reference's decode
syncs with the host, so its sequence runs eagerly. On a CPU only the references run,
at the quick sizes, timed with perf_counter: the Triton kernels would run interpreted there and
their times would mean nothing.

Layouts: mamba-ssm's scan takes [B, D, T] and [B, N, T]; its inputs are converted once before
timing, so its rows EXCLUDE the layout conversion (its best case). causal-conv1d's channel-last
path takes a transposed view of our [B, T, D] tensors and SDPA a transposed view of
[B, T, H, Dh]: no copy. Every row but the reference's records the relative error of its forward
output (brought back to our layout) against the reference's, where the reference ran at that size.

Output in --out: kernels-<device>.jsonl (a meta line, then each row as it is measured, so a run
cut off by a time limit still leaves results), kernels-<device>.json (meta, the targets met or
missed: TARGETS below, docs/benchmarks.md; all rows) and kernels-<device>.png (GB/s per op, ours
vs baselines, copy bandwidth dashed). The table and the targets are printed last. matplotlib is
optional: without it there is no PNG.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from .common import (add_out_argument, chosen, default_device, free_memory, jsonl_writer, package_version, progress,
                     pyplot, report_failure, results_stem, run_meta, save_figure, write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAIN = ("fwd", "bwd", "fwd+bwd")
DECODE = ("decode",)
IMPL_ORDER = ("ours", "reference", "mamba_ssm", "causal_conv1d", "torch_sdpa")
# the targets (docs/benchmarks.md): the scan's fwd+bwd at least as fast as mamba-ssm's CUDA scan at
# the big size, and both decode updates at batch 256 at 80%+ of the measured copy bandwidth
TARGETS = [("selective_scan", "fwd+bwd", dict(B=8, T=4096, Dm=4096, N=16), "mamba_ssm"),
           ("selective_state_update", "decode", dict(B=256, Dm=4096, N=16), 0.8),
           ("causal_conv1d_update", "decode", dict(B=256, D=4096, W=4), 0.8)]
# the reference builds O(B*T*Dm*N) or O(B*H*Tq*T) fp32 intermediates; past this share of the GPU's
# memory its rows are skipped rather than left to run out of memory
REF_MEM_SHARE = 0.4


# ---------------------------------------------------------------------------------------------
# implementations: `forward` takes the op's keyword arguments after `prepare`
# ---------------------------------------------------------------------------------------------

class Impl(NamedTuple):
    forward: Callable[[dict], torch.Tensor]
    prepare: Callable[[dict], dict] = lambda p: p                     # layout change, not timed
    to_ours: Callable[[torch.Tensor], torch.Tensor] = lambda y: y    # output back to our layout
    note: Optional[str] = None
    graphable: bool = True  # decode runs without host syncs, so it can be captured in a CUDA graph


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A new autograd leaf over `t` (a view or a copy), so gradients stop at the converted tensor."""
    return t.detach().requires_grad_(t.requires_grad)


def _transposed(p: dict, names: tuple) -> dict:
    """p with the tensors in `names` as new leaves over transpose(1, 2) views (no copy)."""
    return {k: _leaf(v.transpose(1, 2)) if k in names else v for k, v in p.items()}


def _transposed_copy(p: dict, names: tuple) -> dict:
    with torch.no_grad():
        return {k: _leaf(v.transpose(1, 2).contiguous()) if k in names else v for k, v in p.items()}


def _t12(y: torch.Tensor) -> torch.Tensor:
    return y.transpose(1, 2)


def ours(op: str) -> Impl:
    return Impl(lambda p: getattr(importlib.import_module("hybrid_lm.kernels"), op)(**p))


def reference(op: str) -> Impl:
    # its decode ops write the state through boolean indexing, a host sync: no CUDA graph
    return Impl(lambda p: getattr(importlib.import_module("hybrid_lm.kernels.reference"), op)(**p), graphable=False)


@functools.cache
def optional_module(name: str) -> tuple[Optional[types.ModuleType], str]:
    """(module, version) of an optional baseline, or (None, why it is unavailable)."""
    top = name.split(".")[0]
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or whatever a half-working install raises
        why = f"{type(e).__name__}: {e}"
        try:
            mod = _import_skipping_init(name, top)
        except Exception as e2:
            return None, f"{why}; with its package __init__ skipped: {type(e2).__name__}: {e2}"
    return mod, package_version(top) or "unknown"


def _import_skipping_init(name: str, top: str) -> types.ModuleType:
    """mamba-ssm's package __init__ imports its models (transformers, Mamba-3's extra kernels),
    which can fail where the compiled scan works: import the submodule under an empty package."""
    if top in sys.modules:
        raise ImportError(f"{top} itself imported: the failure is in {name}")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"no package {top}")
    package = types.ModuleType(top)
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules[top] = package
    try:
        return importlib.import_module(name)
    except Exception:
        del sys.modules[top]
        raise


def _baseline(module: str, fn: str, **impl) -> dict:
    mod, _ = optional_module(module)
    if mod is None:
        return {}
    name = module.split(".")[0]
    return {name: Impl(lambda p: getattr(mod, fn)(**p), **impl)}


# ---------------------------------------------------------------------------------------------
# ops: size sweeps, inputs (the op's keyword arguments), bytes models
# ---------------------------------------------------------------------------------------------

def _randn(shape, device, dtype, grad=False, scale=1.0) -> torch.Tensor:
    # random data, never zeros: zeros hide unwritten outputs and can run faster than real data
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


def _ssm_params(Dm: int, N: int, device, grad: bool) -> dict:
    """Mamba-1's initialisation: A = -(1..N) per channel (S4D-real), dt in [1e-3, 0.1] through the
    softplus of delta + bias, D around 1. All fp32, as Mamba keeps them."""
    A = -torch.arange(1, N + 1, dtype=torch.float32, device=device).repeat(Dm, 1)
    dt = torch.exp(torch.rand(Dm, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    D = 1.0 + 0.1 * torch.randn(Dm, device=device)
    return {"A": A.requires_grad_(grad), "D": D.requires_grad_(grad), "bias": bias.requires_grad_(grad)}


def gmu_sizes(quick: bool) -> list:
    return [dict(B=2, T=64, D=64)] if quick else [dict(B=1, T=4096, D=4096), dict(B=8, T=4096, D=4096)]


def gmu_inputs(s: dict, device, dtype) -> dict:
    shape = (s["B"], s["T"], s["D"])
    return dict(gate=_randn(shape, device, dtype, True), memory=_randn(shape, device, dtype, True))


def gmu_bytes(s: dict, e: int) -> dict:
    """n = B*T*D. fwd reads gate, memory, writes out: 3*n*e. bwd reads gate, memory, dout, writes
    dgate, dmemory: 5*n*e."""
    n = s["B"] * s["T"] * s["D"]
    return {"fwd": 3 * n * e, "bwd": 5 * n * e}


def conv_sizes(quick: bool) -> list:
    return [dict(B=2, T=64, D=64, W=4)] if quick else [dict(B=1, T=4096, D=4096, W=4), dict(B=8, T=4096, D=4096, W=4)]


def conv_inputs(s: dict, device, dtype) -> dict:
    return dict(x=_randn((s["B"], s["T"], s["D"]), device, dtype, True),
                weight=_randn((s["D"], s["W"]), device, dtype, True, scale=0.5),
                bias=_randn((s["D"],), device, dtype, True, scale=0.1), activation="silu")


def conv_bytes(s: dict, e: int) -> dict:
    """x [B,T,D] read, y written, weight [D,W] and bias [D] read: fwd = e*(2*B*T*D + D*(W+1)).
    bwd reads x, dy, weight, bias and writes dx, dweight, dbias: e*(3*B*T*D + 2*D*(W+1))."""
    act, params = s["B"] * s["T"] * s["D"], s["D"] * (s["W"] + 1)
    return {"fwd": e * (2 * act + params), "bwd": e * (3 * act + 2 * params)}


def conv_baselines(s: dict) -> dict:
    return _baseline("causal_conv1d", "causal_conv1d_fn", prepare=lambda p: _transposed(p, ("x",)), to_ours=_t12,
                     note="channel-last [B,D,T] view of our [B,T,D] tensors: no layout conversion")


def conv_update_sizes(quick: bool) -> list:
    return [dict(B=4, D=64, W=4)] if quick else [dict(B=b, D=4096, W=4) for b in (1, 16, 64, 256)]


def conv_update_inputs(s: dict, device, dtype) -> dict:
    return dict(x=_randn((s["B"], s["D"]), device, dtype),
                conv_state=_randn((s["B"], s["D"], s["W"] - 1), device, dtype),
                weight=_randn((s["D"], s["W"]), device, dtype, scale=0.5),
                bias=_randn((s["D"],), device, dtype, scale=0.1), activation="silu")


def conv_update_bytes(s: dict, e: int) -> dict:
    """conv_state [B,D,W-1] (in --dtype, as causal-conv1d requires) read and written:
    2*e*B*D*(W-1); x read, y written: 2*e*B*D; weight, bias read: e*D*(W+1)."""
    B, D, W = s["B"], s["D"], s["W"]
    return {"decode": e * (2 * B * D * (W - 1) + 2 * B * D + D * (W + 1))}


def conv_update_baselines(s: dict) -> dict:
    return _baseline("causal_conv1d", "causal_conv1d_update")


def scan_sizes(quick: bool) -> list:
    if quick:
        return [dict(B=2, T=64, Dm=64, N=16)]
    # the last one is the target: fwd+bwd at least as fast as mamba-ssm's CUDA scan
    return [dict(B=1, T=2048, Dm=4096, N=16), dict(B=4, T=4096, Dm=4096, N=16), dict(B=8, T=4096, Dm=4096, N=16)]


def scan_inputs(s: dict, device, dtype) -> dict:
    B, T, Dm, N = s["B"], s["T"], s["Dm"], s["N"]
    ssm = _ssm_params(Dm, N, device, grad=True)
    return dict(u=_randn((B, T, Dm), device, dtype, True), delta=_randn((B, T, Dm), device, dtype, True, scale=0.5),
                A=ssm["A"], B=_randn((B, T, N), device, dtype, True), C=_randn((B, T, N), device, dtype, True),
                D=ssm["D"], z=_randn((B, T, Dm), device, dtype, True), delta_bias=ssm["bias"], delta_softplus=True)


def scan_bytes(s: dict, e: int) -> dict:
    """X = B*T*Dm, S = B*T*N, P = 4*(Dm*N + 2*Dm) bytes of fp32 A, D, delta_bias. fwd reads u,
    delta, z, B, C, P and writes y: e*(4X + 2S) + P. bwd reads u, delta, z, B, C, dy, P and writes
    du, ddelta, dz, dB, dC and the fp32 dA, dD, ddelta_bias: e*(7X + 4S) + 2P."""
    X, S = s["B"] * s["T"] * s["Dm"], s["B"] * s["T"] * s["N"]
    P = 4 * (s["Dm"] * s["N"] + 2 * s["Dm"])
    return {"fwd": e * (4 * X + 2 * S) + P, "bwd": e * (7 * X + 4 * S) + 2 * P}


def scan_ref_mem(s: dict) -> float:
    # about 16 live fp32 tensors of [B, T, Dm, N] with autograd (see reference.selective_scan)
    return 16 * 4 * s["B"] * s["T"] * s["Dm"] * s["N"]


def scan_baselines(s: dict) -> dict:
    return _baseline("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn",
                     prepare=lambda p: _transposed_copy(p, ("u", "delta", "z", "B", "C")), to_ours=_t12,
                     note="inputs converted to [B,D,T] / [B,N,T] before timing: conversion excluded")


def ssu_sizes(quick: bool) -> list:
    return [dict(B=4, Dm=64, N=16)] if quick else [dict(B=b, Dm=4096, N=16) for b in (1, 16, 64, 256)]


def ssu_inputs(s: dict, device, dtype) -> dict:
    B, Dm, N = s["B"], s["Dm"], s["N"]
    ssm = _ssm_params(Dm, N, device, grad=False)
    return dict(state=_randn((B, Dm, N), device, torch.float32), x=_randn((B, Dm), device, dtype),
                dt=_randn((B, Dm), device, dtype, scale=0.5), A=ssm["A"], B=_randn((B, N), device, dtype),
                C=_randn((B, N), device, dtype), D=ssm["D"], z=_randn((B, Dm), device, dtype),
                dt_bias=ssm["bias"], dt_softplus=True)


def ssu_bytes(s: dict, e: int) -> dict:
    """fp32 state [B,Dm,N] read and written: 8*B*Dm*N; x, dt, z read, y written: 4*e*B*Dm;
    B, C read: 2*e*B*N; fp32 A, D, dt_bias read: 4*(Dm*N + 2*Dm)."""
    B, Dm, N = s["B"], s["Dm"], s["N"]
    return {"decode": 8 * B * Dm * N + 4 * e * B * Dm + 2 * e * B * N + 4 * (Dm * N + 2 * Dm)}


def ssu_baselines(s: dict) -> dict:
    return _baseline("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")


def attn_sizes(quick: bool) -> list:
    if quick:
        return [dict(B=2, T=64, H=4, Hkv=2, Dh=32, q_stride=2, window=None)]
    # LRT on a nanochat-like backbone (2:1 GQA): pass 0 is plain causal over every position, an
    # interleaved pass (S=2) queries every 2nd position against all keys. Then SambaY's
    # sliding-window attention at Phi-4-mini-flash's head layout.
    return [dict(B=8, T=2048, H=16, Hkv=8, Dh=128, q_stride=1, window=None),
            dict(B=8, T=2048, H=16, Hkv=8, Dh=128, q_stride=2, window=None),
            dict(B=4, T=4096, H=40, Hkv=20, Dh=64, q_stride=1, window=512)]


def _q_pos(s: dict) -> range:
    """The positions of the last interleaved pass: p with p mod S = S-1 (every position if S=1)."""
    return range(s["q_stride"] - 1, s["T"], s["q_stride"])


def attn_inputs(s: dict, device, dtype) -> dict:
    B, T, H, Hkv, Dh = s["B"], s["T"], s["H"], s["Hkv"], s["Dh"]
    q_pos = torch.tensor(_q_pos(s), dtype=torch.int32, device=device)
    return dict(q=_randn((B, len(q_pos), H, Dh), device, dtype, True), k=_randn((B, T, Hkv, Dh), device, dtype, True),
                v=_randn((B, T, Hkv, Dh), device, dtype, True), q_pos=q_pos, window=s["window"])


def attn_bytes(s: dict, e: int) -> dict:
    """Q = B*Tq*H*Dh, KV = B*T*Hkv*Dh. fwd reads q, k, v and writes o: e*(2Q + 2KV). bwd reads q,
    o, do (o and do for the softmax row sums, as FlashAttention does), k, v and writes dq, dk, dv:
    e*(4Q + 4KV). The fp32 log-sum-exp per row is left out."""
    Q = s["B"] * len(_q_pos(s)) * s["H"] * s["Dh"]
    KV = s["B"] * s["T"] * s["Hkv"] * s["Dh"]
    return {"fwd": e * (2 * Q + 2 * KV), "bwd": e * (4 * Q + 4 * KV)}


def attn_flops(s: dict) -> dict:
    """4*B*H*Dh per visible (query, key) pair forward (QK^T and PV); backward 2.5x that (five
    matmuls to the forward's two, QK^T recomputed)."""
    w = s["window"] or s["T"]
    pairs = sum(min(p + 1, w) for p in _q_pos(s))
    fwd = 4 * s["B"] * s["H"] * s["Dh"] * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd}


def attn_ref_mem(s: dict) -> float:
    # about 8 live fp32 [B, H, Tq, T] score-sized tensors with autograd
    return 8 * 4 * s["B"] * s["H"] * len(_q_pos(s)) * s["T"]


def attn_baselines(s: dict) -> dict:
    if s["q_stride"] != 1 or s["window"] is not None:
        return {}  # SDPA has no mask for these short of a dense one, which would not be its fast path
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"torch_sdpa": Impl(lambda p: sdpa(p["q"], p["k"], p["v"], is_causal=True, enable_gqa=True),
                               prepare=lambda p: _transposed(p, ("q", "k", "v")), to_ours=_t12,
                               note="[B,H,T,Dh] views of our tensors, is_causal=True: no copy")}


class Op(NamedTuple):
    sizes: Callable[[bool], list]                        # quick -> the sweep, one dict of sizes per case
    inputs: Callable[..., dict]                          # (sizes, device, dtype) -> the op's keyword arguments
    bytes: Callable[[dict, int], dict]                   # (sizes, element size) -> bytes per pass
    passes: tuple
    baselines: Callable[[dict], dict] = lambda s: {}     # sizes -> {name: Impl} of what is installed
    ref_mem: Callable[[dict], float] = lambda s: 0.0     # rough peak bytes of the reference with autograd
    flops: Optional[Callable[[dict], dict]] = None       # sizes -> FLOPs per pass, where matmuls dominate


OPS = {
    "gmu": Op(gmu_sizes, gmu_inputs, gmu_bytes, TRAIN),
    "causal_conv1d": Op(conv_sizes, conv_inputs, conv_bytes, TRAIN, conv_baselines),
    "causal_conv1d_update": Op(conv_update_sizes, conv_update_inputs, conv_update_bytes, DECODE, conv_update_baselines),
    "selective_scan": Op(scan_sizes, scan_inputs, scan_bytes, TRAIN, scan_baselines, scan_ref_mem),
    "selective_state_update": Op(ssu_sizes, ssu_inputs, ssu_bytes, DECODE, ssu_baselines),
    "interleaved_attention": Op(attn_sizes, attn_inputs, attn_bytes, TRAIN, attn_baselines, attn_ref_mem, attn_flops),
}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    while len(times) < 3 or (sum(times) < 0.1 and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read plus the bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return 2 * n / (time_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9


def time_pass(impl: Impl, p: dict, pass_: str, nbytes: int, device: torch.device) -> tuple[float, Optional[str]]:
    """Median ms of one pass, and a note on how it was timed where that is not the plain way."""
    if pass_ == "decode":
        return time_decode(impl, p, nbytes, device)
    q = impl.prepare(p)
    fwd = lambda: impl.forward(q)  # noqa: E731
    if pass_ == "fwd":
        return time_ms(fwd, device), None
    leaves = [v for v in q.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    out = fwd()
    dout = torch.randn_like(out)
    if pass_ == "bwd":
        # autograd.grad returns fresh gradients: no .grad accumulation kernel in the timing
        return time_ms(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), device), None
    return time_ms(lambda: torch.autograd.grad(fwd(), leaves, dout), device), None


def time_decode(impl: Impl, p: dict, nbytes: int, device: torch.device) -> tuple[float, Optional[str]]:
    """Per-call ms of a decode op called in sequence over k distinct copies of its inputs, as the
    layers of a model are in one decode step. k makes the copies twice the L2 cache, so no call
    finds its state still cached, and the sequence runs from a CUDA graph, as vLLM runs decode:
    one call per event pair would time the launch latency of these microsecond kernels instead."""
    if device.type != "cuda":
        with torch.no_grad():
            return time_ms(lambda: impl.forward(impl.prepare(p)), device), None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    k = max(2, min(1024, math.ceil(2 * l2 / nbytes)))
    sets = [impl.prepare({n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in p.items()}) for _ in range(k)]

    def step() -> None:
        for q in sets:
            impl.forward(q)

    with torch.no_grad():
        step()  # compile and warm up outside the capture
        run, how = step, f"{k} calls over distinct inputs, eager"
        if impl.graphable:
            try:
                graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
                    step()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    step()
                run, how = graph.replay, f"CUDA graph of {k} calls over distinct inputs"
            except Exception as e:
                how += f" (CUDA graph capture failed: {type(e).__name__}: {e})"
        return time_ms(run, device) / k, how


def forward_output(impl: Impl, p: dict) -> torch.Tensor:
    """One forward on copies of the inputs (decode ops update their state in place), in our layout."""
    with torch.no_grad():
        q = impl.prepare({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in p.items()})
        return impl.to_ours(impl.forward(q))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def sizes_str(s: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in s.items() if v is not None)


def impls_for(op: str, s: dict, on_gpu: bool) -> dict:
    """Implementations to time at sizes s: the reference first (the others are checked against its
    output), ours and the installed baselines only on a GPU."""
    impls = {"reference": reference(op)}
    if on_gpu:
        impls["ours"] = ours(op)
        impls.update(OPS[op].baselines(s))
    return impls


def meta(device: torch.device, dtype: str, copy_gbps: float, ops: list, quick: bool) -> dict:
    baselines = {}
    for name, module in (("mamba_ssm", "mamba_ssm.ops.selective_scan_interface"), ("causal_conv1d", "causal_conv1d")):
        mod, info = optional_module(module)
        baselines[name] = {"version": info, "error": None} if mod else {"version": None, "error": info}
    return run_meta(
        device, packages=("triton",), device_type=device.type, baselines=baselines, copy_gbps=copy_gbps, dtype=dtype,
        quick=quick, ops=ops, HYBRID_LM_BACKEND=os.environ.get("HYBRID_LM_BACKEND"),
        timing=("triton.testing.do_bench, median, L2 flushed before each call" if device.type == "cuda"
                else "CPU perf_counter median; references only"),
        bytes_models={op: " ".join(OPS[op].bytes.__doc__.split()) for op in ops})


def measure_case(op: str, s: dict, impls: dict, device: torch.device, dtype: str, copy_gbps: float,
                 emit: Callable[[dict], None], bar) -> None:
    """Time every pass of every implementation at sizes s; a failure becomes that row's error."""
    spec = OPS[op]
    torch_dtype = DTYPES[dtype]
    nbytes = spec.bytes(s, torch.finfo(torch_dtype).bits // 8)
    flops = spec.flops(s) if spec.flops else {}
    for per_pass in (nbytes, flops):
        if "fwd" in per_pass:
            per_pass["fwd+bwd"] = per_pass["fwd"] + per_pass["bwd"]
    p = spec.inputs(s, device, torch_dtype)
    budget = REF_MEM_SHARE * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    # first one forward of each implementation on copies of the inputs, before any timing updates
    # the decode states in place: it compiles the kernels and checks each output against the reference
    checked, ref_out = {}, None  # impl -> (status, error, rel_err)
    for name, impl in impls.items():
        if name == "reference" and budget is not None and spec.ref_mem(s) > budget:
            checked[name] = ("skipped", f"reference needs about {spec.ref_mem(s) / 1e9:.0f} GB, "
                                        f"over {REF_MEM_SHARE:.0%} of the GPU's memory", None)
            continue
        try:
            out = forward_output(impl, p)
            if name == "reference":
                ref_out = out
            checked[name] = ("ok", None, rel_err(out, ref_out) if ref_out is not None and name != "reference" else None)
            del out
        except Exception as e:
            checked[name] = ("error", f"{type(e).__name__}: {e}", None)
        free_memory(device)
    del ref_out

    for name, impl in impls.items():
        status, error, err = checked[name]
        for pass_ in spec.passes:
            bar.set_postfix_str(f"{op} {pass_} {name} {sizes_str(s)}", refresh=False)
            row = {"op": op, "pass": pass_, "impl": name, "sizes": s, "dtype": dtype, "status": status,
                   "time_ms": None, "bytes": nbytes[pass_], "gbps": None, "frac_copy_bw": None, "tflops": None,
                   "rel_err": err, "error": error, "note": impl.note}
            if status == "ok":
                try:
                    ms, how = time_pass(impl, p, pass_, nbytes[pass_], device)
                    gbps = nbytes[pass_] / (ms * 1e-3) / 1e9
                    row.update(time_ms=ms, gbps=gbps, frac_copy_bw=gbps / copy_gbps,
                               note="; ".join(n for n in (impl.note, how) if n) or None)
                    if pass_ in flops:
                        row["tflops"] = flops[pass_] / (ms * 1e-3) / 1e12
                except Exception as e:
                    row.update(status="error", error=f"{type(e).__name__}: {e}")
            if row["status"] == "error":
                bar.write(f"error: {op} {pass_} {name} {sizes_str(s)}: {row['error'][:300]}")
            emit(row)
            free_memory(device)
            bar.update(1)
    del p
    free_memory(device)


def print_table(rows: list) -> None:
    """One line per row, grouped by case and pass, ours first; t/ours is the row's time over ours
    (above 1: ours is faster)."""
    def key(r: dict) -> tuple:
        return r["op"], sizes_str(r["sizes"]), r["pass"]

    ours_ms = {key(r): r["time_ms"] for r in rows if r["impl"] == "ours"}
    cases = list(dict.fromkeys(key(r)[:2] for r in rows))
    rows = sorted(rows, key=lambda r: (cases.index(key(r)[:2]), (TRAIN + DECODE).index(r["pass"]),
                                       IMPL_ORDER.index(r["impl"])))
    print(f"{'op':22} {'pass':8} {'sizes':38} {'impl':14} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>7} "
          f"{'t/ours':>7} {'rel_err':>8}")
    for r in rows:
        line = f"{r['op']:22} {r['pass']:8} {sizes_str(r['sizes']):38} {r['impl']:14}"
        if report_failure(line, r, width=80):
            continue
        mine = ours_ms.get(key(r))
        vs = f"{r['time_ms'] / mine:.2f}x" if mine and r["impl"] != "ours" else ""
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else ""
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        print(f"{line} {r['time_ms']:9.4f} {r['gbps']:8.1f} {r['frac_copy_bw']:6.1%} {tf:>7} {vs:>7} {err:>8}")


def check_targets(rows: list) -> list:
    """One line per target: met, missed, or not measured in this run."""
    ok = {(r["op"], r["pass"], sizes_str(r["sizes"]), r["impl"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for op, pass_, s, goal in TARGETS:
        key = (op, pass_, sizes_str(s))
        mine = ok.get(key + ("ours",))
        if isinstance(goal, str):
            base = ok.get(key + (goal,))
            what = f"ours at least as fast as {goal}"
            got = mine and base and f"ours {mine['time_ms']:.3f} ms, {goal} {base['time_ms']:.3f} ms"
            met = mine and base and mine["time_ms"] <= base["time_ms"]
        else:
            what = f"ours at {goal:.0%}+ of copy bandwidth"
            got = mine and f"ours {mine['frac_copy_bw']:.1%} of copy bandwidth, {mine['time_ms'] * 1e3:.1f} us"
            met = mine and mine["frac_copy_bw"] >= goal
        verdict = "MET" if met else "MISSED" if got else "not measured"
        lines.append(f"{op} {pass_} {sizes_str(s)}: {what}: {verdict}" + (f" ({got})" if got else ""))
    return lines


def plot(rows: list, copy_gbps: float, title: str, path: Path) -> bool:
    """Bar chart per op: GB/s of each implementation per (pass, sizes), copy bandwidth dashed."""
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    ops = [op for op in OPS if any(r["op"] == op for r in ok)]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 1, figsize=(13, 3.6 * len(ops)), squeeze=False, layout="constrained")
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in ok if r["op"] == op]
        groups = list(dict.fromkeys((r["pass"], sizes_str(r["sizes"])) for r in mine))
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in mine)]
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = {(r["pass"], sizes_str(r["sizes"])): r["gbps"] for r in mine if r["impl"] == impl}
            xs = [i for i, g in enumerate(groups) if g in vals]
            ax.bar([x - 0.4 + (j + 0.5) * width for x in xs], [vals[groups[x]] for x in xs], width, label=impl)
        ax.axhline(copy_gbps, ls="--", c="k", lw=1, label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (bytes model)")
        ax.set_title(op, fontsize=10)
        ax.set_xticks(range(len(groups)), [f"{p_}\n{s_}" for p_, s_ in groups], fontsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, title)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hybrid-lm bench kernels`."""
    add_out_argument(parser)
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help=f"ops to run, space or comma separated (default: all of {', '.join(OPS)})")
    parser.add_argument("--quick", action="store_true", help="the tiny sweep (always the case on a CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="activation dtype (default: bf16)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every row ran (skips included), 1 when any row failed."""
    ops = chosen("--ops", args.ops, list(OPS), list(OPS))
    if ops is None:
        return 2
    device = default_device()
    on_gpu = device.type == "cuda"
    quick = args.quick or not on_gpu
    if not on_gpu:
        print("CPU run: only the PyTorch references run, at the quick sizes. The Triton kernels would run "
              "interpreted on a CPU and their times would mean nothing.")
    if os.environ.get("HYBRID_LM_BACKEND", "auto") != "auto":
        print(f"warning: HYBRID_LM_BACKEND={os.environ['HYBRID_LM_BACKEND']} changes what 'ours' runs")
    stem = results_stem(args.out, "kernels", device)

    copy_gbps = copy_bandwidth(device)
    info = meta(device, args.dtype, copy_gbps, ops, quick)
    print(f"{info['device']}: copy bandwidth {copy_gbps:.1f} GB/s; torch {info['torch']}, triton {info['triton']}; "
          + ", ".join(f"{k} {v['version'] or 'unavailable'}" for k, v in info["baselines"].items()))
    plan = [(op, s, impls_for(op, s, on_gpu)) for op in ops for s in OPS[op].sizes(quick)]
    rows = []
    with jsonl_writer(stem, info) as write:
        def emit(row: dict) -> None:
            rows.append(row)
            write(row)

        bar = progress(sum(len(impls) * len(OPS[op].passes) for op, _, impls in plan))
        for op, s, impls in plan:
            measure_case(op, s, impls, device, args.dtype, copy_gbps, emit, bar)
        bar.close()

    goals = check_targets(rows)
    write_json(stem, info, rows, targets=goals)
    print_table(rows)
    title = f"hybrid-lm kernels, {info['device']}, {args.dtype}" + (" (CPU: references only)" if not on_gpu else "")
    wrote_png = plot(rows, copy_gbps, title, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, {stem}.jsonl"
          + (f", {stem}.png" if wrote_png else " (no PNG: matplotlib missing, or no row ran)"))
    print("targets:\n  " + "\n  ".join(goals))
    return int(any(r["status"] == "error" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
