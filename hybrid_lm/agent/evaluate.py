"""`hybrid-lm agent eval`: task success of a policy checkpoint, served by vLLM, in real browsers.

The policy plays --episodes episodes of every task on held-out seeds (from EVAL_SEED on, never used
for demonstrations), all browsers of the pool in flight at once, each round one batched vLLM call
(hybrid_lm.agent.episodes.LMPolicy; greedy unless --temperature). Any MiniWoB task can be evaluated,
with or without an expert. The engine runs the checkpoint's own dtype on a CPU (fp32 from our
trainers: vLLM would otherwise pick bf16) and bf16 on a GPU.

Output (--out DIR): eval.json (success, successes, mean steps and browser errors per task and
overall; the policy, seeds, settings, device and versions), episodes.jsonl (every episode's pages and
actions, to read what the policy did) and success.png; a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hybrid_lm.bench.common import default_device, device_name, pyplot, save_figure, vllm_version
from hybrid_lm.cli import non_negative_float, positive_int

from .demos import progress_bar, success_table, task_list
from .env import EVAL_SEED, MAX_STEPS
from .episodes import MAX_ACTION_TOKENS, MAX_OBS_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="checkpoint folder (e.g. `hybrid-lm agent sft`'s --out)")
    parser.add_argument("--tasks", default=None, help="comma-separated MiniWoB tasks (default: the default set)")
    parser.add_argument("--episodes", type=positive_int, default=20, help="episodes per task (default: 20)")
    parser.add_argument("--out", type=Path, default=Path("runs/agent/eval"), help="output folder")
    parser.add_argument("--pool", type=positive_int, default=8, help="browsers in flight (default: 8)")
    parser.add_argument("--step-cap", type=positive_int, default=MAX_STEPS, help="steps per episode (default: 8)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--max-obs-tokens", type=positive_int, default=MAX_OBS_TOKENS)
    parser.add_argument("--max-action-tokens", type=positive_int, default=MAX_ACTION_TOKENS)


def evaluate(policy: str, tasks: list[str], episodes: int, pool: int = 8, step_cap: int = MAX_STEPS,
             temperature: float = 0.0, max_obs_tokens: int = MAX_OBS_TOKENS,
             max_action_tokens: int = MAX_ACTION_TOKENS, bar=None) -> list:
    """The episodes of `policy` on `episodes` held-out seeds of every task, in task order."""
    from transformers import AutoConfig

    from hybrid_lm.bench.vllm_engine import serve
    from hybrid_lm.train.data import load_tokenizer

    from .episodes import LMPolicy, browsers, max_model_len, play

    config = AutoConfig.from_pretrained(policy)
    tokenizer = load_tokenizer(policy)
    dtype = torch.bfloat16 if torch.cuda.is_available() else (config.dtype or torch.float32)
    max_len = max_model_len(step_cap, max_obs_tokens, max_action_tokens, config.max_position_embeddings)
    jobs = [(task, EVAL_SEED + i) for task in tasks for i in range(episodes)]
    with serve(policy, max_len, dtype) as llm, browsers(min(pool, len(jobs)), step_cap) as envs:
        lm = LMPolicy(llm, tokenizer, max_obs_tokens, max_action_tokens, temperature)
        return play(jobs, lm, envs, bar)


def run(args: argparse.Namespace) -> int:
    from hybrid_lm.bench.vllm_engine import require_vllm

    from .env import check_tasks

    require_vllm()
    if not Path(args.policy, "config.json").is_file():
        raise SystemExit(f"--policy: {args.policy} is not a checkpoint folder (no config.json)")
    tasks = check_tasks(task_list(args.tasks))
    start = time.perf_counter()
    with progress_bar(len(tasks) * args.episodes, "eval") as bar:
        episodes = evaluate(args.policy, tasks, args.episodes, args.pool, args.step_cap, args.temperature,
                            args.max_obs_tokens, args.max_action_tokens, bar)
    seconds = time.perf_counter() - start
    table, per_task = success_table(episodes, tasks)
    wins = sum(r["successes"] for r in per_task.values())
    result = {"policy": str(args.policy), "tasks": per_task, "success": wins / len(episodes),
              "episodes_per_task": args.episodes, "seeds": [EVAL_SEED, EVAL_SEED + args.episodes - 1],
              "step_cap": args.step_cap, "temperature": args.temperature, "max_obs_tokens": args.max_obs_tokens,
              "max_action_tokens": args.max_action_tokens, "seconds": round(seconds, 1),
              "device": device_name(default_device()),
              "versions": {"torch": torch.__version__, "vllm": vllm_version(), "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with (args.out / "episodes.jsonl").open("w") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_dict()) + "\n")
    plot(per_task, args.out / "success.png", str(args.policy))
    print(table)
    print(f"-> {args.out / 'eval.json'} ({seconds:.0f} s)")
    return 0


def plot(per_task: dict, path: Path, title: str) -> None:
    """Success per task as bars; skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(per_task)), 3.5))
    ax.bar(range(len(per_task)), [r["success"] for r in per_task.values()])
    ax.set_xticks(range(len(per_task)), list(per_task), rotation=40, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("success")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
