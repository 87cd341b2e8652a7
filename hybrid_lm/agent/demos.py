"""`hybrid-lm agent demos`: demonstrations from the scripted experts.

The experts play --episodes episodes of every task on training seeds (0, 1, ...: disjoint from the
evaluation seeds) in a pool of headless browsers. Each successful episode becomes one JSONL line:
task, seed, reward and its steps (the page as MiniWoB reported it, any note, the action taken), so
that behaviour cloning renders them exactly as evaluation will. The file is written to a temporary
name and renamed at the end: an interrupted run leaves no half file. A table gives each expert's
success rate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hybrid_lm.cli import positive_int

from .env import EVAL_SEED, MAX_STEPS
from .experts import DEFAULT_TASKS, EXPERTS, expert_policy


def task_list(text: str | None, default=DEFAULT_TASKS) -> list[str]:
    """--tasks as a list (comma-separated MiniWoB names; None: the default set)."""
    if text is None:
        return list(default)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    return tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None, help="comma-separated MiniWoB tasks with an expert "
                        f"(default: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--episodes", type=positive_int, default=40, help="episodes per task (default: 40)")
    parser.add_argument("--out", type=Path, default=Path("runs/agent/demos.jsonl"), help="JSONL file to write "
                        "(an existing one is replaced only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--pool", type=positive_int, default=4, help="browsers in flight (default: 4)")
    parser.add_argument("--step-cap", type=positive_int, default=MAX_STEPS, help="steps per episode (default: 8)")


def progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="episode")


def success_table(episodes, tasks: list[str]) -> tuple[str, dict]:
    """A printed table of success per task, and the same as a dict task -> {episodes, successes, success}."""
    rows = {}
    for task in tasks:
        mine = [ep for ep in episodes if ep.task == task]
        wins = sum(ep.reward >= 1.0 for ep in mine)
        rows[task] = {"episodes": len(mine), "successes": wins, "success": wins / max(len(mine), 1),
                      "mean_steps": sum(len(ep.steps) for ep in mine) / max(len(mine), 1),
                      "browser_errors": sum(ep.error is not None for ep in mine)}
    width = max(len(t) for t in tasks + ["all"])
    lines = [f"{'task':<{width}}  episodes  success  steps  errors"]
    for task, r in rows.items():
        lines.append(f"{task:<{width}}  {r['episodes']:>8}  {r['success']:>7.1%}  {r['mean_steps']:>5.1f}  {r['browser_errors']:>6}")
    n, wins = sum(r["episodes"] for r in rows.values()), sum(r["successes"] for r in rows.values())
    lines.append(f"{'all':<{width}}  {n:>8}  {wins / max(n, 1):>7.1%}")
    return "\n".join(lines), rows


def run(args: argparse.Namespace) -> int:
    from .env import check_tasks
    from .episodes import browsers, play

    tasks = check_tasks(task_list(args.tasks))
    no_expert = [t for t in tasks if t not in EXPERTS]
    if no_expert:
        raise SystemExit(f"--tasks: no expert for {', '.join(no_expert)}; experts: {', '.join(EXPERTS)}")
    if args.episodes > EVAL_SEED:
        raise SystemExit(f"--episodes: at most {EVAL_SEED} (training seeds stay below the evaluation seeds)")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out}: already exists; pass --overwrite to replace it, or choose "
                              "another file")
    jobs = [(task, seed) for task in tasks for seed in range(args.episodes)]
    with browsers(min(args.pool, len(jobs)), args.step_cap) as envs, progress_bar(len(jobs), "demos") as bar:
        episodes = play(jobs, expert_policy, envs, bar)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    kept = [ep for ep in episodes if ep.reward >= 1.0]
    with tmp.open("w") as f:
        for ep in kept:
            f.write(json.dumps(ep.to_dict()) + "\n")
    os.replace(tmp, args.out)
    table, _ = success_table(episodes, tasks)
    print(table)
    print(f"{len(kept)} successful trajectories of {len(episodes)} episodes -> {args.out}", file=sys.stderr)
    return 0
