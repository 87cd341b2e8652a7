"""The `hybrid-lm` command line: pretrain, distill, convert, demo, bench and agent."""
from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

import hybrid_lm

# Each command's module provides add_arguments(parser) and run(args) -> exit code.
COMMANDS = {"pretrain": ("hybrid_lm.train.pretrain", "pretrain a model (default: a tiny SambaY on the embedded corpus)"),
            "distill": ("hybrid_lm.train.distill", "distill a teacher causal LM into a student (logit KD, top-k KD, "
                        "sequence-level KD)"),
            "convert": ("hybrid_lm.convert", "convert a checkpoint between the released Phi-4-mini-flash format and "
                        "ours (sambay-da)"),
            "demo": ("hybrid_lm.demo", "the pipeline end to end: pretrain a tiny SambaY and Transformer, serve both "
                     "in vLLM, run the rollout workload, compare")}
# `hybrid-lm bench NAME` runs module hybrid_lm.bench.NAME
BENCHMARKS = {
    "kernels": "time every kernel against the PyTorch reference and installed baselines",
    "decode": "tokens per second and cache bytes versus generation length, per architecture",
    "train": "training step time, tokens/s, peak memory and MFU per architecture, vs the Transformer",
    "rollout": "a web-agent RL rollout (concurrent multi-turn sessions) through vLLM, per architecture",
}

# `hybrid-lm agent NAME`: the web-agent loop (hybrid_lm.agent)
AGENT_COMMANDS = {
    "demos": ("hybrid_lm.agent.demos", "scripted experts play MiniWoB++ tasks on training seeds: one JSONL line per "
              "successful trajectory"),
    "sft": ("hybrid_lm.agent.sft", "behaviour cloning of demonstrations (loss on action tokens only)"),
    "eval": ("hybrid_lm.agent.evaluate", "success per task on held-out seeds, the policy served by vLLM"),
    "rl": ("hybrid_lm.agent.rl", "online multi-turn GRPO in the browsers through TRL, the policy served by vLLM"),
}


def add_commands(subparsers, commands: dict) -> None:
    for name, (module_name, help_text) in commands.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-lm", description=hybrid_lm.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hybrid-lm {hybrid_lm.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(commands, COMMANDS)
    bench = commands.add_parser("bench", help="run a benchmark (prints a table, writes JSON and a PNG)")
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"hybrid_lm.bench.{name}")
        sub = benches.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    agent = commands.add_parser("agent", help="the web-agent loop on MiniWoB++: demos, sft, eval")
    add_commands(agent.add_subparsers(dest="agent", metavar="COMMAND", required=True), AGENT_COMMANDS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)
