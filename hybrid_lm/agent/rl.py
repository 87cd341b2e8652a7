"""`hybrid-lm agent rl`: online multi-turn GRPO of a policy in real browsers, through TRL.

Each step takes --instances task instances (a task and a training seed, disjoint from the
demonstration and evaluation seeds) and plays a group of --group-size sessions of each, all in
flight at once in a pool of headless browsers, turn by turn, with one batched vLLM generate per
turn (`play` with `LMPolicy` on TRL's own engine). A session is one sequence: its first
observation is the prompt; the completion interleaves the policy's actions (trained, with the
sampler's logprobs) and the following observations (env_mask 0: out of the loss). Its reward is the
environment's binary task success. GRPO (TRL's GRPOTrainer, colocate vLLM mode, `rollout_func`)
normalises rewards within each group and takes one optimizer step; TRL then syncs the new weights
into the running engine (our vLLM model's load_weights) before the next rollout.

Three things make this exact rather than approximate:
- the engine samples in the trainer's dtype: TRL builds its vllm.LLM with no dtype, and vLLM runs
  an fp32 checkpoint in bf16 on a CPU (logprob gap ~3e-3 against ~3e-7), so `engine_options` binds it;
- the trainer scores the same tokens the engine sampled: generated ids, never re-tokenized text; an
  end-of-text token appended after a cut generation was not sampled, so it is masked out;
- gradient checkpointing (GRPOConfig's default) recomputes our decoder layers exactly.
--history N keeps only the last N observations in full in what the policy reads (older pages
shrink to a placeholder, as in WebAgent-R1); the trained sequence holds the episode's final view,
so the earlier actions' contexts differ from the sampled ones, which the logged logprob gap and
TRL's importance-sampling correction account for.

Output (--out DIR): the final checkpoint (HF format, tokenizer included), metrics.jsonl (one line
per step: success_rate, mean_reward, episode_steps, invalid_action_rate, browser_errors,
rollout_seconds, train_seconds, tokens_generated, logprob_gap_mean/max, loss, ...), success.png
(the curve), and checkpoints/ (TRL's, for --resume: weights, optimizer, scheduler, step). A folder
that holds files is refused unless --resume continues its run or --overwrite replaces it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from hybrid_lm.bench.common import pyplot, read_jsonl, save_figure
from hybrid_lm.cli import non_negative_float, non_negative_int, positive_float, positive_int
from hybrid_lm.train import checkpoint

from .demos import task_list
from .env import EVAL_SEED, MAX_STEPS, InvalidAction, parse_action
from .episodes import MAX_ACTION_TOKENS, MAX_OBS_TOKENS, Episode, LMPolicy, encode_episode, play

TRAIN_SEED = EVAL_SEED // 10  # RL task instances: after the demonstrations' seeds (0, 1, ...), before EVAL_SEED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="checkpoint folder to start from (e.g. `agent sft`'s --out)")
    parser.add_argument("--tasks", default=None, help="comma-separated MiniWoB tasks (default: the default set)")
    parser.add_argument("--max-steps", type=positive_int, default=40, help="GRPO steps (default: 40)")
    parser.add_argument("--out", type=Path, default=Path("runs/agent/rl"), help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start a new one")
    parser.add_argument("--instances", type=positive_int, default=4, help="task instances per step (default: 4)")
    parser.add_argument("--group-size", type=positive_int, default=8,
                        help="sessions per task instance, GRPO's group (default: 8)")
    parser.add_argument("--lr", type=positive_float, default=1e-5, help="learning rate, constant (default: 1e-5)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--beta", type=non_negative_float, default=0.0,
                        help="KL coefficient to the start policy (default: 0)")
    parser.add_argument("--pool", type=positive_int, default=8, help="browsers in flight (default: 8)")
    parser.add_argument("--step-cap", type=positive_int, default=MAX_STEPS, help="steps per episode (default: 8)")
    parser.add_argument("--history", type=positive_int, default=None,
                        help="observations kept in full, older pages shrink to a placeholder (default: all)")
    parser.add_argument("--max-obs-tokens", type=positive_int, default=MAX_OBS_TOKENS)
    parser.add_argument("--max-action-tokens", type=positive_int, default=MAX_ACTION_TOKENS)
    parser.add_argument("--save-every", type=positive_int, default=10, help="checkpoint every N steps (default: 10)")
    parser.add_argument("--seed", type=non_negative_int, default=0)


def instance_prompts(tasks: list[str], steps: int, instances: int) -> list[str]:
    """The training prompts, one per task instance in step order: "task seed", tasks in turn."""
    n = steps * instances
    return [f"{tasks[i % len(tasks)]} {TRAIN_SEED + i}" for i in range(n)]


def parse_prompt(prompt: str) -> tuple[str, int]:
    task, seed = prompt.rsplit(" ", 1)
    return task, int(seed)


def count_invalid(episode: Episode) -> tuple[int, int]:
    """(actions taken, actions the page could not take) of an episode."""
    taken = [s for s in episode.steps if s.action is not None]
    invalid = 0
    for step in taken:
        try:
            parse_action(step.action, step.page)
        except InvalidAction:
            invalid += 1
    return len(taken), invalid


def episode_sample(tokenizer, episode: Episode, max_obs_tokens: int, history: Optional[int]) -> dict:
    """One GRPO sample of an episode: prompt_ids (the first observation), completion_ids (actions
    and later observations), env_mask (1: a sampled action token) and logprobs (the sampler's; 0
    where masked). A browser failure masks the whole episode: it taught nothing about the policy."""
    ids, mask = encode_episode(tokenizer, episode.steps, max_obs_tokens, history)
    sampled: list[Optional[float]] = []  # per action token in order; None: appended, not sampled
    for step in episode.steps:
        if step.action_ids is not None:
            lps = list(step.action_logprobs or [])
            sampled += lps + [None] * (len(step.action_ids) - len(lps))
    if episode.error is not None or not sampled:
        sampled = [None] * sum(mask)
    start = mask.index(1) if 1 in mask else max(len(ids) - 1, 0)
    if not ids:  # the browser failed before the first page
        ids, mask, start, sampled = [tokenizer.eos_token_id] * 2, [0, 0], 1, []
    it = iter(sampled)
    env_mask, logprobs = [], []
    for m in mask[start:]:
        lp = next(it) if m else None
        env_mask.append(int(lp is not None))
        logprobs.append(0.0 if lp is None else lp)
    return {"prompt_ids": ids[:start], "completion_ids": ids[start:], "env_mask": env_mask, "logprobs": logprobs}


class Rollout:
    """TRL's rollout_func: plays the batch's task instances (each prompt arrives group-size times,
    one session each) in the browser pool with TRL's engine, and keeps the step's statistics."""

    def __init__(self, envs, tokenizer, max_obs_tokens: int, max_action_tokens: int, history: Optional[int]):
        self.envs, self.tokenizer, self.history = envs, tokenizer, history
        self.max_obs_tokens, self.max_action_tokens = max_obs_tokens, max_action_tokens
        self.policy: Optional[LMPolicy] = None
        self.stats: dict = {}

    def __call__(self, prompts: list[str], trainer) -> dict:
        start = time.perf_counter()
        if self.policy is None:  # TRL's engine lives as long as the trainer
            self.policy = LMPolicy(trainer.vllm_generation.llm, self.tokenizer, self.max_obs_tokens,
                                   self.max_action_tokens, trainer.temperature, seed=None, logprobs=True,
                                   history=self.history)
        episodes = play([parse_prompt(p) for p in prompts], self.policy, self.envs)
        samples = [episode_sample(self.tokenizer, ep, self.max_obs_tokens, self.history) for ep in episodes]
        actions = [count_invalid(ep) for ep in episodes]
        self.stats = {
            "success_rate": sum(ep.reward >= 1 for ep in episodes) / len(episodes),
            "mean_reward": sum(ep.reward for ep in episodes) / len(episodes),
            "episode_steps": sum(n for n, _ in actions) / len(episodes),
            "invalid_action_rate": sum(i for _, i in actions) / max(1, sum(n for n, _ in actions)),
            "browser_errors": sum(ep.error is not None for ep in episodes),
            "tokens_generated": sum(len(s.action_ids or []) for ep in episodes for s in ep.steps),
            "rollout_seconds": time.perf_counter() - start,
        }
        out = {key: [s[key] for s in samples] for key in ("prompt_ids", "completion_ids", "env_mask", "logprobs")}
        out["env_reward"] = [float(ep.reward) for ep in episodes]
        return out


def env_reward(prompts, completions, env_reward, **kwargs) -> list[float]:
    """The reward function TRL calls: the environment's task reward, passed on by the rollout."""
    return env_reward


@contextlib.contextmanager
def engine_options(policy: str, dtype: torch.dtype) -> Iterator[None]:
    """While TRL builds its vllm.LLM (it passes no dtype, and no GRPOConfig field reaches it),
    build it in `dtype`, so that the engine samples in the trainer's dtype, and with hybrid-lm's
    engine arguments for the policy (hybrid_lm.serve.engine_args: fast prefill for SambaY)."""
    import functools

    from trl.generation import vllm_generation

    from hybrid_lm.serve import engine_args

    original = vllm_generation.LLM
    vllm_generation.LLM = functools.partial(original, dtype=str(dtype).removeprefix("torch."), **engine_args(policy))
    try:
        yield
    finally:
        vllm_generation.LLM = original


def metrics_callback(rollout: Rollout, path: Path):
    """A TrainerCallback writing one metrics.jsonl line per step: the rollout's statistics, the
    step's training seconds and TRL's logged figures (loss, logprob gap between engine and trainer)."""
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not rollout.stats:
                return
            step_seconds = time.perf_counter() - self.started
            row = {"step": state.global_step, **{k: round(v, 6) if isinstance(v, float) else v
                                                   for k, v in rollout.stats.items()}}
            row["train_seconds"] = round(step_seconds - rollout.stats["rollout_seconds"], 3)
            row["logprob_gap_mean"] = logs.get("sampling/sampling_logp_difference/mean")
            row["logprob_gap_max"] = logs.get("sampling/sampling_logp_difference/max")
            for key in ("loss", "learning_rate", "grad_norm", "entropy", "kl", "completions/mean_length"):
                if key in logs:
                    row[key.replace("completions/", "completion_")] = logs[key]
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rollout.stats = {}

        def on_save(self, args, state, control, **kwargs):
            plot_curve(path, path.parent / "success.png")

    return MetricsLog()


def read_metrics(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def plot_curve(metrics_path: Path, png: Path, window: int = 5) -> None:
    """Success rate per step and its running mean over `window` steps; skipped without matplotlib."""
    rows = read_metrics(metrics_path)
    plt = pyplot()
    if plt is None or not rows:
        return
    steps = [r["step"] for r in rows]
    rate = [r["success_rate"] for r in rows]
    smooth = [sum(rate[max(0, i - window + 1):i + 1]) / len(rate[max(0, i - window + 1):i + 1])
              for i in range(len(rate))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rate, ".", alpha=0.4, label="rollout success")
    ax.plot(steps, smooth, "-", label=f"mean of {window} steps")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, png)


def last_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def grpo_config(args: argparse.Namespace, max_len: int, on_gpu: bool, **overrides):
    """TRL's GRPOConfig for a run: one rollout of --instances x --group-size sessions per optimizer
    step, the engine in-process (colocate), gradient checkpointing on (GRPOConfig's default)."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(args.out / "checkpoints"), max_steps=args.max_steps, seed=args.seed,
        per_device_train_batch_size=args.instances * args.group_size, gradient_accumulation_steps=1,
        num_generations=args.group_size, shuffle_dataset=False, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=args.beta, temperature=args.temperature,
        max_completion_length=max_len, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=max_len,
        vllm_gpu_memory_utilization=0.3 if on_gpu else 0.2, use_cpu=not on_gpu, bf16=on_gpu,
        logging_steps=1, save_steps=args.save_every, save_total_limit=2, report_to="none",
        gradient_checkpointing=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


def build_trainer(args: argparse.Namespace, envs, **config_overrides):
    """(GRPOTrainer, Rollout) for a run of `agent rl`'s arguments over the browsers `envs`, its
    engine built in the trainer's dtype (checked)."""
    import os

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from hybrid_lm.train.data import load_tokenizer

    from .env import check_tasks
    from .episodes import max_model_len

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    tasks = check_tasks(task_list(args.tasks))
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    tokenizer = load_tokenizer(args.policy)
    max_len = max_model_len(args.step_cap, args.max_obs_tokens, args.max_action_tokens,
                            model.config.max_position_embeddings)
    dataset = Dataset.from_dict({"prompt": instance_prompts(tasks, args.max_steps, args.instances)})
    rollout = Rollout(envs, tokenizer, args.max_obs_tokens, args.max_action_tokens, args.history)
    dtype = torch.bfloat16 if on_gpu else torch.float32  # what the trainer computes in
    with engine_options(args.policy, dtype):
        trainer = GRPOTrainer(model=model, reward_funcs=[env_reward], train_dataset=dataset,
                              args=grpo_config(args, max_len, on_gpu, **config_overrides),
                              processing_class=tokenizer, rollout_func=rollout,
                              callbacks=[metrics_callback(rollout, args.out / "metrics.jsonl")])
    served = trainer.vllm_generation.llm.llm_engine.model_config.dtype
    if served != dtype:
        raise RuntimeError(f"vLLM engine: expected dtype {dtype}, runs {served}")
    return trainer, rollout


def run(args: argparse.Namespace) -> int:
    from hybrid_lm.bench.vllm_engine import require_vllm

    from .episodes import browsers

    require_vllm()
    if not Path(args.policy, "config.json").is_file():
        raise FileNotFoundError(f"--policy: {args.policy} is not a checkpoint folder (no config.json)")
    metrics_path = args.out / "metrics.jsonl"
    checkpoint.claim_output(args.out, args.resume, args.overwrite)
    resume_from = last_checkpoint(args.out / "checkpoints")
    if args.resume and resume_from is None:
        raise FileNotFoundError(f"--resume: {args.out / 'checkpoints'} holds no checkpoint to continue from")
    args.out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:  # the curve continues from the checkpoint: drop steps logged after it
        step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"]
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    with browsers(min(args.pool, args.instances * args.group_size), args.step_cap) as envs:
        trainer, rollout = build_trainer(args, envs)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        trainer.save_model(str(args.out))
        rollout.tokenizer.save_pretrained(str(args.out))
    plot_curve(metrics_path, args.out / "success.png")
    rows = read_metrics(metrics_path)
    if rows:
        tail = rows[-min(5, len(rows)):]
        print(f"success rate: first step {rows[0]['success_rate']:.2f}, "
              f"last {len(tail)} steps {sum(r['success_rate'] for r in tail) / len(tail):.2f}")
    print(f"-> {args.out} ({len(rows)} steps in metrics.jsonl)")
    return 0
