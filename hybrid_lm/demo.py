"""`make demo` / `hybrid-lm demo`: the whole pipeline on the embedded default, end to end.

1. Pretrain a tiny SambaY and a tiny Transformer of the same size on the embedded corpus (the
   `hybrid-lm pretrain` defaults: the Python standard library's sources, a byte-level BPE trained
   on them). A finished run is reused and an interrupted one resumed, so the demo is safe to rerun.
2. Load each checkpoint in vLLM through hybrid_lm's plugin.
3. Run the rollout workload of `hybrid-lm bench rollout` on each: concurrent multi-turn
   sessions, every turn appending an observation and generating a short action.
4. Print a side-by-side table (training loss, validation loss and bits per byte, rollout and
   action tokens/s, turn latency, serving-state memory) and write demo.json and demo.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

import hybrid_lm

from hybrid_lm.bench import rollout, vllm_engine
from hybrid_lm.bench.common import (default_device, device_name, model_dtype, progress, pyplot, read_jsonl,
                                    save_figure, vllm_version)
from hybrid_lm.cli import positive_int
from hybrid_lm.train import checkpoint, pretrain

ARCHS = ("sambay", "transformer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per model (default: 200)")
    parser.add_argument("--sessions", type=positive_int, default=4, help="concurrent rollout sessions (default: 4)")
    parser.add_argument("--turns", type=positive_int, default=3, help="turns per session (default: 3)")
    parser.add_argument("--obs-tokens", type=positive_int, default=600,
                        help="observation tokens per turn (default: 600)")
    parser.add_argument("--action-tokens", type=positive_int, default=32, help="action tokens per turn (default: 32)")
    parser.add_argument("--eager", action="store_true", help=vllm_engine.EAGER_HELP)


def train(arch: str, out: Path, steps: int) -> dict:
    """Pretrain (or reuse, or resume) one model; its final training loss and last validation row."""
    resume = checkpoint.has_checkpoint(out)
    print(f"\n== {arch}: {'resuming' if resume else 'pretraining'} in {out}", flush=True)
    # the demo owns its folders: a run killed before its first checkpoint starts again
    code = pretrain.main(["--arch", arch, "--out", str(out), "--max-steps", str(steps),
                          "--resume" if resume else "--overwrite"])
    if code:
        raise SystemExit(f"pretraining {arch} failed with exit code {code}")
    rows = read_jsonl(out / "metrics.jsonl")
    val = [r for r in rows if "val_bpb" in r][-1]
    return {"train_loss": rows[-1]["loss"], "val_loss": val["val_loss"], "val_bpb": val["val_bpb"],
            "loss_curve": [(r["step"], r["loss"]) for r in rows]}


def serve_rollout(out: Path, args, dtype: torch.dtype, bar) -> dict:
    """The rollout workload on the checkpoint at `out`, served by vLLM through the plugin."""
    config = AutoConfig.from_pretrained(out)
    max_len = min(args.turns * (args.obs_tokens + args.action_tokens) + 8, config.max_position_embeddings)
    with vllm_engine.serve(out, max_len, dtype, disable_log_stats=False, enforce_eager=args.eager) as llm:
        result = rollout.run_sessions(llm, config, args.sessions, args.turns, args.obs_tokens, args.action_tokens,
                                      dtype, bar)
    with torch.device("meta"):
        result["params"] = sum(p.numel() for p in hybrid_lm.build(config).parameters())
    return result


def print_table(rows: dict) -> None:
    print(f"\n{'arch':<12} {'params':>8} {'train loss':>10} {'val loss':>8} {'val bpb':>7} {'rollout tok/s':>13} "
          f"{'action tok/s':>12} {'p50 turn s':>10} {'state MiB':>9}")
    for arch, r in rows.items():
        print(f"{arch:<12} {r['params'] / 1e6:>7.2f}M {r['train_loss']:>10.3f} {r['val_loss']:>8.3f} "
              f"{r['val_bpb']:>7.3f} {r['rollout_tokens_per_s']:>13.1f} {r['action_tokens_per_s']:>12.1f} "
              f"{r['latency_p50_s']:>10.3f} {r['peak_state_bytes'] / 2**20:>9.2f}")


def plot(rows: dict, title: str, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arch, r in rows.items():
        steps, losses = zip(*r["loss_curve"])
        axes[0].plot(steps, losses, label=f"{arch} (val bpb {r['val_bpb']:.2f})")
        axes[1].plot(range(1, len(r["turn_s"]) + 1), r["turn_s"], marker="o", label=arch)
    axes[0].set(xlabel="step", ylabel="training loss (nats/token)", title="pretraining on the embedded corpus")
    axes[1].set(xlabel="turn", ylabel="seconds per turn (all sessions)", title="rollout turns in vLLM")
    axes[1].set_xticks(range(1, max(len(r["turn_s"]) for r in rows.values()) + 1))
    names = list(rows)
    axes[2].bar(names, [rows[a]["peak_state_bytes"] / 2**20 for a in names])
    axes[2].set(ylabel="MiB", title="serving state at the end of the rollout")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM is imported: keep the demo's output readable
    vllm_engine.require_vllm()
    device = default_device()
    dtype = model_dtype(device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {arch: train(arch, args.out / arch, args.steps) for arch in ARCHS}
    print(f"\n== rollout in vLLM: {args.sessions} sessions x {args.turns} turns, observation {args.obs_tokens} "
          f"+ action {args.action_tokens} tokens", flush=True)
    bar = progress(len(ARCHS) * args.turns)
    for arch in ARCHS:
        bar.set_postfix_str(arch, refresh=False)
        rows[arch].update(serve_rollout(args.out / arch, args, dtype, bar))
    bar.close()
    print_table(rows)
    info = dict(device=device_name(device), dtype=str(dtype).removeprefix("torch."), vllm=vllm_version(),
                torch=torch.__version__, steps=args.steps)
    (args.out / "demo.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
    title = f"hybrid-lm demo: tiny SambaY vs Transformer, {info['device']}, {info['dtype']}, vLLM {info['vllm']}"
    png = args.out / "demo.png"
    print(f"\nwrote {args.out / 'demo.json'}" + (f"\nplot: {png.resolve()}" if plot(rows, title, png) else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-lm demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
