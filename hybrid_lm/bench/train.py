"""Training-step benchmark: `hybrid-lm bench train`, or `python -m hybrid_lm.bench.train`.

Tokens/s, step time, peak memory and MFU of one training step (forward + backward + Muon step) for
each architecture at one preset, in each of the --modes: eager; compiled (`model.compile()` in
place, the default inductor backend, as `pretrain --compile`); checkpointed (activation
checkpointing: `model.gradient_checkpointing_enable()`, each decoder layer recomputed in backward,
as `pretrain --activation-checkpointing`); compiled+checkpointed (both). Ratios: each arch's step
time over the Transformer's in the same mode (the LRT paper, https://arxiv.org/abs/2605.26797, puts
LRT's at about 2x: every token runs a refinement pass after pass 0), compiled over eager step time,
and checkpointed over eager step time and peak memory (whole, and above base_bytes: see below).

Each (arch, mode) runs in its own subprocess (this module with a hidden --one option, which
prints the row as one JSON line), so that compiled code, allocator caches and, on a CPU, the
peak RSS of one configuration never carry over to the next; a child that crashes or runs past
--timeout becomes an error row with the end of its stderr, and the others still run. Children
inherit the environment as is (OMP_NUM_THREADS included).

In a child: a fresh model (seeded init), random token rows [B, T+1] (the step's cost does not
depend on the tokens), one document per row (cu_seqlens [0, T]), the loss of `pretrain.batch_loss`
(so LRT runs its interleaved passes exactly as in pretraining), the optimizer of
`optim.build_optimizer`, and pretraining's own step, `pretrain.train_step` (bf16 autocast on a
GPU, backward, gradient clipping, the optimizer's step). WARMUP_STEPS untimed steps (compilation,
kernel compiles, optimizer state allocation; the shapes never change, so nothing recompiles
after the first), then --steps timed with perf_counter, synchronizing the GPU at both ends.
first_step_s is the first warmup step's wall time: in a compiled mode, mostly compilation. MFU
counts `common.flops_per_token` (LRT with 2 passes) against `common.peak_flops` (None on a CPU
or an unknown GPU).

Peak memory (peak_bytes), and the same measure taken just before the first step (base_bytes):
on a GPU, torch.cuda.max_memory_allocated, its peak reset before the timed steps (weights,
gradients, optimizer state, activations); on a CPU, the child's peak RSS (getrusage ru_maxrss),
which never goes down and counts the whole process: the interpreter and the imported libraries
(several hundred MiB), the model, and in a compiled mode the compiler's own memory. There
peak_bytes - base_bytes is what training added on top, where checkpointing shows.

Output in --out: train-<device>.jsonl (a meta line, then each row as measured), train-<device>.json
(meta, the ratios, rows) and train-<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

import hybrid_lm
from hybrid_lm.cli import positive_float, positive_int
from hybrid_lm.train.optim import build_optimizer
from hybrid_lm.train.pretrain import batch_loss, train_step, wrap

from .common import (add_arch_arguments, chosen, chosen_archs, default_device, flops_per_token, jsonl_writer,
                     peak_flops, progress, pyplot, results_stem, run_meta, save_figure, write_json)


class Setup(NamedTuple):
    preset: str
    seq_len: int
    batch: int
    steps: int


SETUPS = {"gpu": Setup("d12", 2048, 8, 20), "cpu": Setup("tiny", 128, 4, 5), "quick": Setup("tiny", 32, 2, 2)}
DEFAULT_ARCHS = ("transformer", "samba", "sambay", "lrt")
MODES = ("eager", "compiled", "checkpointed", "compiled+checkpointed")
DEFAULT_MODES = ("eager", "compiled", "checkpointed")
WARMUP_STEPS = 2
SEED = 0
TIMEOUT_S = 1800.0
STDERR_TAIL = 2000  # characters of a failed child's stderr kept in its error row
PAPER = "paper: LRT's training step takes about 2x the Transformer's"
FIELDS = ("arch", "mode", "preset", "seq_len", "batch", "steps", "params", "status", "step_ms", "tokens_per_s",
          "first_step_s", "peak_bytes", "base_bytes", "mfu", "error")


# ---------------------------------------------------------------------------------------------
# one configuration, in a child process
# ---------------------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA max-allocated on a GPU, this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def failed_row(arch: str, mode: str, setup: Setup, error: Optional[str] = None) -> dict:
    """A row with every field, the configuration filled in, status error."""
    return {**dict.fromkeys(FIELDS), "arch": arch, "mode": mode, **setup._asdict(), "status": "error", "error": error}


def bench_config(arch: str, mode: str, setup: Setup, vocab_size: Optional[int], device: torch.device) -> dict:
    """One row; any failure (a bad config, a build or compile error, out of memory) becomes its error."""
    row = failed_row(arch, mode, setup)
    on_gpu = device.type == "cuda"
    try:
        torch.manual_seed(SEED)
        overrides = {"max_position_embeddings": max(setup.seq_len + 1, 2048)}  # LRT's rows hold T + 1 tokens
        if vocab_size:
            overrides["vocab_size"] = vocab_size
        with torch.device(device):  # init on the device: a big model's host init is slow
            model = hybrid_lm.build(hybrid_lm.config(arch, setup.preset, **overrides))
        row["params"] = sum(p.numel() for p in model.parameters())
        # as `pretrain --activation-checkpointing --compile` sets it up (compiles on the first step)
        wrap(model, argparse.Namespace(activation_checkpointing="checkpointed" in mode, compile="compiled" in mode,
                                       fsdp=False), 1, device)
        optimizer = build_optimizer(model, "muon")
        B, T = setup.batch, setup.seq_len
        tokens = torch.randint(0, model.config.vocab_size, (B, T + 1),
                               generator=torch.Generator().manual_seed(SEED)).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cu = [torch.tensor([0, T], dtype=torch.int32)] * B  # one document per row

        def step() -> None:  # pretraining's own step: autocast, backward, clipping, optimizer
            train_step(model, optimizer, lambda batch: batch_loss(model, *batch), [(inputs, targets, cu)], device)

        row["base_bytes"] = peak_memory(device)
        first = time_steps(step, 1, device)
        time_steps(step, WARMUP_STEPS - 1, device)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(step, setup.steps, device) / setup.steps
        tps = B * T / seconds
        device_flops = peak_flops(device)
        passes = 2 if arch == "lrt" else 1  # LRT: pass 0 plus one refinement pass per token
        row.update(status="ok", error=None, step_ms=seconds * 1e3, tokens_per_s=tps, first_step_s=first,
                   peak_bytes=peak_memory(device),
                   mfu=None if device_flops is None else tps * flops_per_token(model, T, passes) / device_flops)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds n steps take; the host runs ahead of the GPU, so it waits for it at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the parent: one child per configuration
# ---------------------------------------------------------------------------------------------

def child_command(arch: str, mode: str, setup: Setup, vocab_size: Optional[int]) -> list[str]:
    command = [sys.executable, "-m", "hybrid_lm.bench.train", "--one", "--archs", arch, "--modes", mode,
               "--preset", setup.preset, "--seq-len", str(setup.seq_len), "--batch", str(setup.batch),
               "--steps", str(setup.steps)]
    return command + (["--vocab-size", str(vocab_size)] if vocab_size else [])


def run_child(arch: str, mode: str, setup: Setup, vocab_size: Optional[int], timeout: float) -> dict:
    """The row a child prints as its last stdout line, or an error row with the end of its stderr."""
    try:
        proc = subprocess.run(child_command(arch, mode, setup, vocab_size), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode(errors="replace")  # what came before the kill: bytes, even with text=True
        return failed_row(arch, mode, setup, f"timed out after {timeout:g} s; stderr ends: {stderr[-STDERR_TAIL:]}")
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return failed_row(arch, mode, setup, f"child exited with {proc.returncode}, no row; stderr ends: "
                                             f"{proc.stderr[-STDERR_TAIL:]}")


# ---------------------------------------------------------------------------------------------
# ratios, table, plot
# ---------------------------------------------------------------------------------------------

def by_config(rows: list, value: Callable[[dict], float]) -> dict:
    """{(arch, mode): value(row)} of the rows that ran."""
    return {(r["arch"], r["mode"]): value(r) for r in rows if r["status"] == "ok"}


def divide(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def step_ms(r: dict) -> float:
    return r["step_ms"]


def peak_bytes(r: dict) -> int:
    return r["peak_bytes"]


def added_bytes(r: dict) -> int:
    """What training added to the peak: on a CPU, the process's own peak RSS (the libraries) taken out."""
    return r["peak_bytes"] - r["base_bytes"]


def vs_transformer(rows: list, base: str = "transformer") -> dict:
    """{mode: {arch: its step time over the base's in the same mode}} (None when either did not run)."""
    ms = by_config(rows, step_ms)
    archs, modes = dict.fromkeys(r["arch"] for r in rows), dict.fromkeys(r["mode"] for r in rows)
    return {m: {a: divide(ms.get((a, m)), ms.get((base, m))) for a in archs} for m in modes}


def vs_eager(rows: list, mode: str, value: Callable[[dict], float]) -> dict:
    """{arch: value of its row in `mode` over the same in eager} (None when either did not run)."""
    got = by_config(rows, value)
    return {a: divide(got.get((a, mode)), got.get((a, "eager"))) for a in dict.fromkeys(r["arch"] for r in rows)}


def all_ratios(rows: list) -> dict:
    """The ratios of the JSON: vs the Transformer per mode, compiled vs eager, checkpointed vs eager."""
    vs = vs_transformer(rows)
    time_, peak, added = (vs_eager(rows, "checkpointed", value) for value in (step_ms, peak_bytes, added_bytes))
    return {"step_time_vs_transformer": vs,
            "lrt_vs_transformer": {m: per_arch.get("lrt") for m, per_arch in vs.items()},
            "compiled_vs_eager": vs_eager(rows, "compiled", step_ms),
            "checkpointed_vs_eager": {a: {"step_time": time_[a], "peak_memory": peak[a], "peak_above_base": added[a]}
                                      for a in time_}}


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list, ratios: dict) -> None:
    """A line per row (+MiB: peak_bytes - base_bytes), then the ratios over eager per arch."""
    vs = ratios["step_time_vs_transformer"]
    print(f"{'arch':12} {'mode':21} {'params':>11} {'ms/step':>9} {'tok/s':>10} {'1st step s':>10} "
          f"{'peak MiB':>9} {'+MiB':>7} {'MFU':>6} {'vs tf':>6}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['arch']:12} {r['mode']:21} error: {r['error'][:100]}")
            continue
        print(f"{r['arch']:12} {r['mode']:21} {r['params']:11,d} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['first_step_s']:10.1f} {peak_bytes(r) / 2**20:9.0f} {added_bytes(r) / 2**20:7.1f} "
              f"{fmt(r['mfu'], '.1%'):>6} {fmt(vs[r['mode']][r['arch']], '.2f'):>6}")
    print(f"\n{'arch':12} {'compiled/eager time':>20} {'ckpt/eager time':>16} {'ckpt/eager peak':>16} "
          f"{'ckpt/eager +peak':>17}")
    for arch, ckpt in ratios["checkpointed_vs_eager"].items():
        print(f"{arch:12} {fmt(ratios['compiled_vs_eager'][arch], '.2f'):>20} {fmt(ckpt['step_time'], '.2f'):>16} "
              f"{fmt(ckpt['peak_memory'], '.3f'):>16} {fmt(ckpt['peak_above_base'], '.2f'):>17}")


def grouped_bars(ax, rows: list, value, ylabel: str, title: str) -> None:
    """One group of bars per arch, one bar per mode."""
    archs, modes = list(dict.fromkeys(r["arch"] for r in rows)), list(dict.fromkeys(r["mode"] for r in rows))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        got = {r["arch"]: value(r) for r in rows if r["mode"] == mode}
        xs = [i for i, a in enumerate(archs) if got.get(a) is not None]
        ax.bar([x - 0.4 + (j + 0.5) * width for x in xs], [got[archs[x]] for x in xs], width, label=mode)
    ax.set_xticks(range(len(archs)), archs)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)


def plot(rows: list, ratios: dict, peak_label: str, title: str, path: Path) -> bool:
    """Grouped bars per arch, one bar per mode: tokens/s, peak memory, step time over the
    Transformer's (the paper's 2x marked)."""
    ok = [r for r in rows if r["status"] == "ok"]
    plt = pyplot()
    if plt is None or not ok:
        return False
    vs = ratios["step_time_vs_transformer"]
    fig, (speed, memory, ratio) = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    grouped_bars(speed, ok, lambda r: r["tokens_per_s"], "tokens/s", "training throughput")
    grouped_bars(memory, ok, lambda r: peak_bytes(r) / 2**20, f"{peak_label}, MiB", "peak memory")
    grouped_bars(ratio, ok, lambda r: vs[r["mode"]][r["arch"]], "step time / Transformer's", "step time vs Transformer")
    ratio.axhline(2.0, ls="--", color="gray", label="paper: LRT about 2x")
    for ax in (speed, memory, ratio):
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu, cpu = SETUPS["gpu"], SETUPS["cpu"]
    add_arch_arguments(parser, DEFAULT_ARCHS, gpu.preset, cpu.preset)
    parser.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                        help=f"configurations, space or comma separated, from {', '.join(MODES)} "
                             f"(default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help=f"tokens per row (default: {gpu.seq_len} on a GPU, {cpu.seq_len} on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"rows per step (default: {gpu.batch} on a GPU, {cpu.batch} on a CPU)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"timed steps (default: {gpu.steps} on a GPU, {cpu.steps} on a CPU)")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--timeout", type=positive_float, default=TIMEOUT_S,
                        help=f"seconds one (arch, mode) may take, compilation included (default: {TIMEOUT_S:g})")
    parser.add_argument("--quick", action="store_true",
                        help="the test setup: " + ", ".join(f"{k} {v}" for k, v in SETUPS["quick"]._asdict().items()))
    # a child: measure the first arch in the first mode and print its row as one JSON line
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """0 when every configuration ran, 1 when any failed, 2 on an unknown arch or mode."""
    archs, modes = chosen_archs(args.archs, DEFAULT_ARCHS), chosen("--modes", args.modes, DEFAULT_MODES, MODES)
    if archs is None or modes is None:
        return 2
    device = default_device()
    default = SETUPS["quick" if args.quick else "gpu" if device.type == "cuda" else "cpu"]
    setup = Setup(args.preset or default.preset, args.seq_len or default.seq_len, args.batch or default.batch,
                  args.steps or default.steps)
    if args.one:
        print(json.dumps(bench_config(archs[0], modes[0], setup, args.vocab_size, device)), flush=True)
        return 0
    stem = results_stem(args.out, "train", device)
    peak_kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
    info = run_meta(device, cpu_threads=torch.get_num_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                    load_avg_1min=os.getloadavg()[0], dtype="bf16 autocast" if device.type == "cuda" else "fp32",
                    optimizer="muon", warmup_steps=WARMUP_STEPS, archs=archs, modes=modes, seed=SEED,
                    quick=args.quick, **setup._asdict(), vocab_size=args.vocab_size,
                    process="one subprocess per (arch, mode)", peak_kind=peak_kind,
                    timing="perf_counter over the timed steps"
                    + (", CUDA synchronize at both ends" if device.type == "cuda" else ""))
    print(f"{info['device']}, {info['dtype']}: {setup.preset} models, batch {setup.batch} x {setup.seq_len} "
          f"tokens, {setup.steps} timed steps; modes {', '.join(modes)}")
    rows = []
    bar = progress(len(archs) * len(modes))
    with jsonl_writer(stem, info) as write:
        for arch in archs:
            for mode in modes:
                bar.set_postfix_str(f"{arch} {mode}", refresh=False)
                row = run_child(arch, mode, setup, args.vocab_size, args.timeout)
                rows.append(row)
                write(row)
                if row["status"] == "error":
                    bar.write(f"error: {arch} {mode}: {row['error'][-300:]}")
                bar.update(1)
    bar.close()

    ratios = all_ratios(rows)
    write_json(stem, info, rows, **ratios)
    print_table(rows, ratios)
    title = f"hybrid-lm training step, {info['device']}, {info['dtype']}, {setup.preset}, {setup.batch}x{setup.seq_len}"
    peak_label = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the process"
    wrote_png = plot(rows, ratios, peak_label, title, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, {stem}.jsonl" + (f", {stem}.png" if wrote_png else " (no PNG)"))
    lrt = ", ".join(f"{m} {r:.2f}x" for m, r in ratios["lrt_vs_transformer"].items() if r is not None)
    print(f"LRT / Transformer step time: {lrt or 'not measured'} ({PAPER})")
    return int(any(r["status"] == "error" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
