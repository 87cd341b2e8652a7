"""The `hybrid-lm` command line: pretrain, distill, convert, demo, bench and agent.

Every number a command takes is checked by its argparse type before any work starts, and an
error ends in one line naming what to fix (`--debug`, or HYBRID_LM_DEBUG=1, shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Callable, Optional, Sequence

import hybrid_lm

DEBUG_ENV = "HYBRID_LM_DEBUG"


# ---------------------------------------------------------------------------------------------
# argparse types: a number out of range is refused before any work starts
# ---------------------------------------------------------------------------------------------

def _number(kind: type, lowest: float, inclusive: bool, highest: Optional[float] = None) -> Callable[[str], float]:
    bound = f">= {lowest}" if inclusive else f"> {lowest}"
    wanted = f"{'an integer' if kind is int else 'a number'} {bound}"
    if highest is not None:
        wanted += f" and <= {highest}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        below = value < lowest or (value == lowest and not inclusive)
        if not math.isfinite(value) or below or (highest is not None and value > highest):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, True)
non_negative_int = _number(int, 0, True)
positive_float = _number(float, 0.0, False)
non_negative_float = _number(float, 0.0, True)
unit_float = _number(float, 0.0, True, 1.0)  # a weight or probability in [0, 1]

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
        add_module(sub, module)


def add_module(parser: argparse.ArgumentParser, module) -> None:
    """A command's arguments (its module's add_arguments), --debug, and its run function."""
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help=f"on an error, show the traceback (or set {DEBUG_ENV}=1)")
    parser.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-lm", description=hybrid_lm.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hybrid-lm {hybrid_lm.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(commands, COMMANDS)
    bench = commands.add_parser("bench", help="run a benchmark (prints a table, writes JSON and a PNG)")
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"hybrid_lm.bench.{name}")
        add_module(benches.add_parser(name, help=help_text, description=help_text), module)
    agent = commands.add_parser("agent", help="the web-agent loop on MiniWoB++: demos, sft, eval")
    add_commands(agent.add_subparsers(dest="agent", metavar="COMMAND", required=True), AGENT_COMMANDS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args, parser.prog)


def run_command(args: argparse.Namespace, prog: str) -> int:
    """args.run(args); an exception ends in one line on stderr and exit code 1, unless --debug."""
    try:
        return args.run(args)
    except Exception as e:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        names = (prog, args.command, getattr(args, "bench", None), getattr(args, "agent", None))
        command = " ".join(filter(None, names))
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{command}: error: {message} ({type(e).__name__}; --debug shows the traceback)", file=sys.stderr)
        return 1


def module_main(command: Sequence[str], argv: Optional[Sequence[str]]) -> int:
    """`python -m hybrid_lm.train.pretrain ARGS` (what torchrun launches) as `hybrid-lm pretrain ARGS`."""
    return main([*command, *(sys.argv[1:] if argv is None else argv)])
