"""Training-step benchmark: `hybrid-lm bench train`, or `python -m hybrid_lm.bench.train`.

Tokens/s, step time, peak memory and MFU of one training step (forward + backward + Muon step)
for each architecture at one preset, and each architecture's step time over the Transformer's.
The paper puts LRT's at about 2x (every token runs a refinement pass after pass 0).

Each row: a fresh model (seeded init), random token rows [B, T+1] (the step's cost does not depend
on the tokens), one document per row (cu_seqlens [0, T]), the loss of `pretrain.batch_loss` (so LRT
runs its interleaved passes exactly as in pretraining), the optimizer of `optim.build_optimizer`,
bf16 autocast on a GPU. WARMUP_STEPS untimed steps (kernel compiles, optimizer state allocation),
then --steps timed with perf_counter, synchronizing the GPU at both ends. MFU counts
`pretrain.flops_per_token` (LRT with 2 passes) against `pretrain.peak_flops` (None on a CPU or an
unknown GPU). Peak memory is torch.cuda.max_memory_allocated over the timed steps (None on a CPU).

Output in --out: train-<device>.jsonl (a meta line, then each row as measured), train-<device>.json
(meta, step-time ratios vs the Transformer, rows) and train-<device>.png. A failing architecture
becomes an error row and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

import hybrid_lm
from hybrid_lm.cli import positive_int
from hybrid_lm.train.optim import build_optimizer
from hybrid_lm.train.pretrain import batch_loss, flops_per_token, peak_flops

from .kernels import add_arch_arguments, chosen_archs, device_name, device_slug, free_memory, progress


class Setup(NamedTuple):
    preset: str
    seq_len: int
    batch: int
    steps: int


SETUPS = {"gpu": Setup("d12", 2048, 8, 20), "cpu": Setup("tiny", 128, 4, 5), "quick": Setup("tiny", 32, 2, 2)}
DEFAULT_ARCHS = ("transformer", "samba", "sambay", "lrt")
WARMUP_STEPS = 2
SEED = 0
PAPER = "paper: LRT's training step takes about 2x the Transformer's"
FIELDS = ("arch", "preset", "seq_len", "batch", "steps", "params", "status", "step_ms", "tokens_per_s",
          "peak_bytes", "mfu", "error")


def train_step(model, optimizer, inputs, targets, cu, autocast) -> None:
    with autocast:
        loss = batch_loss(model, inputs, targets, cu)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_arch(arch: str, setup: Setup, vocab_size, device: torch.device) -> dict:
    """One row; any failure (build, out of memory, an arch not written yet) becomes its error."""
    row = {"arch": arch, "preset": setup.preset, "seq_len": setup.seq_len, "batch": setup.batch,
           "steps": setup.steps, "status": "error"}
    on_gpu = device.type == "cuda"
    try:
        torch.manual_seed(SEED)
        overrides = {"max_position_embeddings": max(setup.seq_len + 1, 2048)}  # LRT's rows hold T + 1 tokens
        if vocab_size:
            overrides["vocab_size"] = vocab_size
        with torch.device(device):  # init on the device: a big model's host init is slow
            model = hybrid_lm.build(hybrid_lm.config(arch, setup.preset, **overrides)).train()
        row["params"] = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, "muon")
        B, T = setup.batch, setup.seq_len
        tokens = torch.randint(0, model.config.vocab_size, (B, T + 1),
                               generator=torch.Generator().manual_seed(SEED)).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cu = [torch.tensor([0, T], dtype=torch.int32)] * B  # one document per row
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
        for _ in range(WARMUP_STEPS):
            train_step(model, optimizer, inputs, targets, cu, autocast)
        if on_gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(setup.steps):
            train_step(model, optimizer, inputs, targets, cu, autocast)
        if on_gpu:
            torch.cuda.synchronize(device)  # the host runs ahead of the GPU: wait before reading the clock
        seconds = (time.perf_counter() - start) / setup.steps
        tps = B * T / seconds
        peak = peak_flops(device)
        passes = 2 if arch == "lrt" else 1  # LRT: pass 0 plus one refinement pass per token
        row.update(status="ok", error=None, step_ms=seconds * 1e3, tokens_per_s=tps,
                   peak_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else None,
                   mfu=None if peak is None else tps * flops_per_token(model, T, passes) / peak)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        model = optimizer = None
        free_memory(device)
    return {k: row.get(k) for k in FIELDS}


def ratios(rows: list, base: str = "transformer") -> dict:
    """Each measured arch's step time over the base's (None when either did not run)."""
    ms = {r["arch"]: r["step_ms"] for r in rows if r["status"] == "ok"}
    return {r["arch"]: ms[r["arch"]] / ms[base] if r["arch"] in ms and base in ms else None for r in rows}


def print_table(rows: list, vs: dict) -> None:
    print(f"{'arch':12} {'params':>11} {'ms/step':>9} {'tok/s':>10} {'peak MiB':>9} {'MFU':>6} {'vs tf':>6}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['arch']:12} error: {r['error'][:100]}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        ratio = f"{vs[r['arch']]:.2f}x" if vs.get(r["arch"]) is not None else "-"
        print(f"{r['arch']:12} {r['params']:11,d} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {peak:>9} "
              f"{mfu:>6} {ratio:>6}")


def plot(rows: list, vs: dict, title: str, path: Path) -> bool:
    """Bars: tokens/s, and step time over the Transformer's (the paper's 2x marked)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    names = [r["arch"] for r in ok]
    fig, (speed, ratio) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    speed.bar(names, [r["tokens_per_s"] for r in ok], color=[f"C{i}" for i in range(len(ok))])
    speed.set(ylabel="tokens/s", title="training throughput")
    ratio.bar(names, [vs[n] or 0 for n in names], color=[f"C{i}" for i in range(len(ok))])
    ratio.axhline(2.0, ls="--", color="gray", label="paper: LRT about 2x")
    ratio.set(ylabel="step time / Transformer's", title="step time vs Transformer")
    ratio.legend(fontsize=8)
    for ax in (speed, ratio):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu, cpu = SETUPS["gpu"], SETUPS["cpu"]
    add_arch_arguments(parser, DEFAULT_ARCHS, gpu.preset, cpu.preset)
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help=f"tokens per row (default: {gpu.seq_len} on a GPU, {cpu.seq_len} on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"rows per step (default: {gpu.batch} on a GPU, {cpu.batch} on a CPU)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"timed steps (default: {gpu.steps} on a GPU, {cpu.steps} on a CPU)")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--quick", action="store_true",
                        help="the test setup: " + ", ".join(f"{k} {v}" for k, v in SETUPS["quick"]._asdict().items()))


def run(args: argparse.Namespace) -> int:
    """0 when every arch ran, 1 when any failed, 2 on an unknown arch."""
    archs = chosen_archs(args.archs, DEFAULT_ARCHS)
    if archs is None:
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = SETUPS["quick" if args.quick else "gpu" if device.type == "cuda" else "cpu"]
    setup = Setup(args.preset or default.preset, args.seq_len or default.seq_len, args.batch or default.batch,
                  args.steps or default.steps)
    slug = device_slug(device)
    out = args.out or Path("benchmarks/results") / slug
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train-{slug}"
    info = {"device": device_name(device), "device_slug": slug, "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0], "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            "optimizer": "muon", "warmup_steps": WARMUP_STEPS, "archs": archs, "seed": SEED, "quick": args.quick,
            **setup._asdict(), "vocab_size": args.vocab_size, "timing": "perf_counter over the timed steps"
            + (", CUDA synchronize at both ends" if device.type == "cuda" else ""),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
    print(f"{info['device']}, {info['dtype']}: {setup.preset} models, batch {setup.batch} x {setup.seq_len} "
          f"tokens, {setup.steps} timed steps")
    rows = []
    bar = progress(len(archs))
    with open(f"{stem}.jsonl", "w") as jsonl:
        jsonl.write(json.dumps({"meta": info}) + "\n")
        for arch in archs:
            bar.set_postfix_str(arch, refresh=False)
            row = bench_arch(arch, setup, args.vocab_size, device)
            rows.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            if row["status"] == "error":
                bar.write(f"error: {arch}: {row['error'][:300]}")
            bar.update(1)
    bar.close()

    vs = ratios(rows)
    Path(f"{stem}.json").write_text(json.dumps(
        {"meta": info, "step_time_vs_transformer": vs, "lrt_vs_transformer": vs.get("lrt"), "rows": rows},
        indent=1) + "\n")
    print_table(rows, vs)
    title = f"hybrid-lm training step, {info['device']}, {info['dtype']}, {setup.preset}, {setup.batch}x{setup.seq_len}"
    wrote_png = plot(rows, vs, title, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, {stem}.jsonl" + (f", {stem}.png" if wrote_png else " (no PNG)"))
    lrt = vs.get("lrt")
    print(f"LRT / Transformer step time: {f'{lrt:.2f}x' if lrt is not None else 'not measured'} ({PAPER})")
    return int(any(r["status"] == "error" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
