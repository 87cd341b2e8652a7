"""Rollout benchmark: `hybrid-lm bench rollout`, the serving workload of online multi-turn RL for
web agents, through one vLLM engine per architecture (hybrid_lm.serve).

C sessions run K turns each. A turn appends an observation of O tokens (an accessibility tree,
here random tokens) to the session's history and generates an action of A tokens (greedy,
ignore_eos), which joins the history too. The sessions advance together: turn k of every session
is one batch of C requests submitted to the engine at once, so vLLM's continuous batching mixes
their prefills and decodes. Each turn is a new request over the whole history, and vLLM's prefix
caching (on by default) serves what an earlier turn computed: attention K,V from cached blocks,
and for Samba and SambaY the Mamba states kept at block boundaries (hybrid_lm.serve.config).
LRT re-prefills the whole history (its interleaved prefill is not chunk- or cache-invariant).

Reported per arch: rollout tokens/s (observation + action tokens processed, over wall time),
action tokens/s, per-turn latency percentiles (p50/p90/p99 over every session's turns: the
engine's queue-to-last-token time of each request), per turn the wall time and the prompt tokens
computed against those served from the prefix cache (vLLM's num_cached_tokens), and peak state
memory: C sessions' serving state at their final length, in hybrid_lm.serve's cache layout
(vllm_engine.state_bytes). Output: rollout-<device>.json / .jsonl and a PNG (time per turn,
tokens/s, prompt tokens computed vs cached, state memory).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hybrid_lm.cli import positive_int

from . import vllm_engine
from .common import (add_arch_arguments, chosen_archs, default_device, jsonl_writer, model_dtype, progress, pyplot,
                     results_stem, run_meta, save_figure, vllm_version, write_json)
from .decode import model_sizes

DEFAULT_ARCHS = ("transformer", "samba", "sambay", "lrt")
# (preset, sessions, turns, observation tokens, action tokens)
DEFAULTS = {"gpu": ("phi4-mini-flash", 32, 8, 3000, 64), "cpu": ("tiny", 8, 4, 2000, 32),
            "quick": ("tiny", 2, 2, 64, 8)}


def request_latency(out, fallback: float) -> float:
    """Queue-to-last-token seconds of one request from vLLM's stats (the call's wall time if absent)."""
    m = getattr(out, "metrics", None)
    if m is not None and getattr(m, "last_token_ts", 0) and getattr(m, "queued_ts", 0):
        return m.last_token_ts - m.queued_ts
    return fallback


def rollout(arch: str, preset: str, sessions: int, turns: int, obs: int, act: int, dtype: torch.dtype, bar,
            eager: bool = False) -> dict:
    """One arch's rollout on a fresh seeded model (see the module docstring): a result row."""
    max_len = turns * (obs + act) + 8
    row = dict(arch=arch, preset=preset)
    with vllm_engine.engine(arch, preset, max_len, dtype, disable_log_stats=False,
                            enforce_eager=eager) as (llm, config):
        row.update(run_sessions(llm, config, sessions, turns, obs, act, dtype, bar))
    return row


def run_sessions(llm, config, sessions: int, turns: int, obs: int, act: int, dtype: torch.dtype, bar) -> dict:
    """The rollout workload on a running engine (started with disable_log_stats=False, for the
    per-request latencies): its measurements."""
    g = torch.Generator().manual_seed(vllm_engine.SEED)
    vllm_engine.generate(llm, [vllm_engine.random_tokens(obs, config.vocab_size, g)], 2)  # warm-up
    histories = [[] for _ in range(sessions)]
    latencies, per_turn = [], []
    start = time.perf_counter()
    for _ in range(turns):
        for h in histories:
            h.extend(vllm_engine.random_tokens(obs, config.vocab_size, g))
        prompt_tokens = sum(len(h) for h in histories)
        seconds, outs = vllm_engine.generate(llm, histories, act)
        cached = sum(out.num_cached_tokens or 0 for out in outs)
        for h, out in zip(histories, outs):
            h.extend(out.outputs[0].token_ids)
            latencies.append(request_latency(out, seconds))
        per_turn.append(dict(seconds=seconds, prompt_tokens=prompt_tokens, cached_tokens=cached,
                             computed_tokens=prompt_tokens - cached))
        bar.update(1)
    wall = time.perf_counter() - start
    dtype_bytes = torch.finfo(dtype).bits // 8
    cached = sum(t["cached_tokens"] for t in per_turn)
    prompt_tokens = sum(t["prompt_tokens"] for t in per_turn)
    return dict(
        sessions=sessions, turns=turns, obs_tokens=obs, action_tokens=act,
        status="ok", prefix_caching=vllm_engine.prefix_caching(llm), fast_prefill=vllm_engine.fast_prefill(llm),
        compiled=not llm.llm_engine.vllm_config.model_config.enforce_eager, wall_s=wall,
        rollout_tokens_per_s=sessions * turns * (obs + act) / wall, action_tokens_per_s=sessions * turns * act / wall,
        latency_p50_s=float(np.percentile(latencies, 50)), latency_p90_s=float(np.percentile(latencies, 90)),
        latency_p99_s=float(np.percentile(latencies, 99)), turn_s=[t["seconds"] for t in per_turn],
        per_turn=per_turn, prompt_tokens=prompt_tokens, cached_prompt_tokens=cached,
        computed_prompt_tokens=prompt_tokens - cached,
        peak_state_bytes=sessions * vllm_engine.state_bytes(config, len(histories[0]), dtype_bytes))


def print_table(rows: list) -> None:
    print(f"\n{'arch':<12} {'prefix$':>7} {'rollout tok/s':>13} {'action tok/s':>12} {'p50 s':>7} {'p90 s':>7} "
          f"{'p99 s':>7} {'prompt computed/cached':>22} {'state MiB':>9}  seconds per turn")
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['arch']:<12} error: {r.get('error', '')[:100]}")
            continue
        tokens = f"{r['computed_prompt_tokens']}/{r['cached_prompt_tokens']}"
        print(f"{r['arch']:<12} {str(r['prefix_caching']):>7} {r['rollout_tokens_per_s']:>13.1f} "
              f"{r['action_tokens_per_s']:>12.1f} {r['latency_p50_s']:>7.3f} {r['latency_p90_s']:>7.3f} "
              f"{r['latency_p99_s']:>7.3f} {tokens:>22} {r['peak_state_bytes'] / 2**20:>9.2f}  "
              + " ".join(f"{t:.2f}" for t in r["turn_s"]))


def plot(rows: list, title: str, path: Path) -> bool:
    ok = [r for r in rows if r.get("status") == "ok"]
    plt = pyplot()
    if plt is None or not ok:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for r in ok:
        axes[0].plot(range(1, len(r["turn_s"]) + 1), r["turn_s"], marker="o", label=r["arch"])
    axes[0].set(xlabel="turn", ylabel="seconds per turn (all sessions)", title="turn time as histories grow",
                xticks=range(1, max(len(r["turn_s"]) for r in ok) + 1))
    axes[0].legend()
    names = [r["arch"] for r in ok]
    axes[1].bar(names, [r["rollout_tokens_per_s"] for r in ok])
    axes[1].set(ylabel="tokens/s", title="rollout throughput (obs + action tokens)")
    computed = [r["computed_prompt_tokens"] for r in ok]
    axes[2].bar(names, computed, label="computed")
    axes[2].bar(names, [r["cached_prompt_tokens"] for r in ok], bottom=computed, label="from the prefix cache")
    axes[2].set(ylabel="prompt tokens (all turns)", title="prompt tokens computed vs cached")
    axes[2].legend()
    axes[3].bar(names, [r["peak_state_bytes"] / 2**20 for r in ok])
    axes[3].set(ylabel="MiB", title="peak serving state (all sessions)")
    return save_figure(fig, path, title)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hybrid-lm bench rollout`; a value left out comes from the device's defaults."""
    gpu, cpu = DEFAULTS["gpu"], DEFAULTS["cpu"]
    add_arch_arguments(parser, DEFAULT_ARCHS, gpu[0], cpu[0])
    for flag, i, what in (("--sessions", 1, "concurrent sessions"), ("--turns", 2, "turns per session"),
                          ("--obs-tokens", 3, "observation tokens per turn"),
                          ("--action-tokens", 4, "action tokens per turn")):
        parser.add_argument(flag, type=positive_int, default=None,
                            help=f"{what} (default: {gpu[i]} on a GPU, {cpu[i]} on a CPU)")
    parser.add_argument("--quick", action="store_true", help="the test sizes: " + " ".join(map(str, DEFAULTS["quick"])))
    parser.add_argument("--eager", action="store_true", help=vllm_engine.EAGER_HELP)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every arch ran, 1 when any failed."""
    vllm_engine.require_vllm()
    archs = chosen_archs(args.archs, DEFAULT_ARCHS)
    if archs is None:
        return 2
    device = default_device()
    d = DEFAULTS["quick" if args.quick else "gpu" if device.type == "cuda" else "cpu"]
    preset = args.preset or d[0]
    sessions, turns = args.sessions or d[1], args.turns or d[2]
    obs, act = args.obs_tokens or d[3], args.action_tokens or d[4]
    dtype = model_dtype(device)
    stem = results_stem(args.out, "rollout", device)
    info = run_meta(device, vllm=vllm_version(), dtype=str(dtype).removeprefix("torch."), preset=preset, archs=archs,
                    models={a: model_sizes(a, preset) for a in archs}, sessions=sessions, turns=turns,
                    obs_tokens=obs, action_tokens=act, eager=args.eager,
                    load_avg_1min=os.getloadavg()[0],  # CPU timings on a busy machine mean little
                    workload=__doc__.split("\n\n")[1].replace("\n", " "))
    print(f"{info['device']}, {info['dtype']}, vLLM {info['vllm']}: {preset} models, {sessions} sessions x {turns} "
          f"turns, observation {obs} + action {act} tokens per turn")
    rows = []
    bar = progress(len(archs) * turns)
    with jsonl_writer(stem, info) as write:
        for arch in archs:
            bar.set_postfix_str(arch, refresh=False)
            try:
                row = rollout(arch, preset, sessions, turns, obs, act, dtype, bar, args.eager)
            except Exception as e:  # the other archs still run
                row = dict(arch=arch, status="error", error=f"{type(e).__name__}: {e}")
            rows.append(row)
            write(row)
    bar.close()
    write_json(stem, info, rows)
    print_table(rows)
    title = (f"hybrid-lm rollout, {info['device']}, {info['dtype']}, {preset} models, vLLM {info['vllm']}: "
             f"{sessions} sessions x {turns} turns, obs {obs} + action {act}")
    wrote = plot(rows, title, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, {stem}.jsonl" + (f", {stem}.png" if wrote else ""))
    return int(any(r.get("status") != "ok" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
