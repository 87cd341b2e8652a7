"""`hybrid-lm agent rl` on a tiny random SambaY: the GRPO samples an episode becomes, one GRPO step
through TRL with our engine (weights synced bit for bit, greedy action following the policy), and
a run resumed from its checkpoint."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_lm.agent.env import Page
from hybrid_lm.agent.episodes import Episode, Step, encode_episode
from hybrid_lm.agent.rl import episode_sample, instance_prompts, parse_prompt
from hybrid_lm.cli import main

pytest.importorskip("trl")


def page(text: str) -> Page:
    return Page('Click on the "ok" button.', [
        {"ref": 1, "parent": 0, "tag": "body", "text": "", "value": "", "id": "", "classes": ""},
        {"ref": 4, "parent": 1, "tag": "button", "text": text, "value": "", "id": "", "classes": ""}])


def test_episode_sample_masks_observations(tiny_policy):
    _, tokenizer = tiny_policy
    eos = tokenizer.eos_token_id
    act1 = tokenizer.encode(" click(9)", add_special_tokens=False) + [eos]
    act2 = tokenizer.encode(" click(4", add_special_tokens=False) + [eos]  # cut: its eos was appended
    lp1 = [-0.5 - i for i in range(len(act1))]
    lp2 = [-0.25] * (len(act2) - 1)
    episode = Episode("click-button", 7, [Step(page("ok"), "", "click(9)", act1, lp1),
                                          Step(page("ok"), "invalid action: no element 9", "click(4", act2, lp2)],
                      reward=0.0, done=True)
    sample = episode_sample(tokenizer, episode, 200, None)
    ids, mask = encode_episode(tokenizer, episode.steps)
    prompt, completion = sample["prompt_ids"], sample["completion_ids"]
    assert prompt + completion == ids and len(prompt) == mask.index(1)
    assert tokenizer.decode(prompt).startswith("task: Click on") and tokenizer.decode(prompt).endswith("action:")
    assert len(sample["env_mask"]) == len(completion) == len(sample["logprobs"])
    env = [t for t, m in zip(completion, sample["env_mask"]) if m == 0]
    assert tokenizer.decode(env[:-1]).lstrip().startswith("invalid action: no element 9")  # the observation
    assert env[-1] == eos  # the appended end-of-text was not sampled: out of the loss
    assert [lp for lp, m in zip(sample["logprobs"], sample["env_mask"]) if m] == lp1 + lp2
    assert all(lp == 0.0 for lp, m in zip(sample["logprobs"], sample["env_mask"]) if not m)

    episode.error = "browser died"
    failed = episode_sample(tokenizer, episode, 200, None)
    assert failed["completion_ids"] == completion and not any(failed["env_mask"])
    lost = episode_sample(tokenizer, Episode("click-button", 7, error="no page"), 200, None)
    assert lost["completion_ids"] and not any(lost["env_mask"])

    short = episode_sample(tokenizer, episode, 200, history=1)  # the first page shrinks to a placeholder
    assert len(short["prompt_ids"]) < len(prompt) and "(1 more elements)" in tokenizer.decode(short["prompt_ids"])


def test_instance_prompts_cycle_tasks_on_training_seeds():
    prompts = instance_prompts(["a", "b", "c"], steps=2, instances=2)
    assert [parse_prompt(p) for p in prompts] == [("a", 100_000), ("b", 100_001), ("c", 100_002), ("a", 100_003)]


def test_one_grpo_step_syncs_the_engine(tiny_policy, tmp_path):
    pytest.importorskip("vllm")
    policy, tokenizer = tiny_policy
    result_path = tmp_path / "result.json"
    script = Path(__file__).with_name("grpo_step.py")
    proc = subprocess.run([sys.executable, str(script), str(policy), str(tmp_path / "run"), str(result_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result_path.read_text())

    (out,) = r["rollout"]  # the rollout_func's output: one session per prompt, groups of 2
    assert len(out["prompts"]) == 4 and out["prompts"][0] == out["prompts"][1] != out["prompts"][2]
    assert out["env_reward"] and all(x in (0.0, 1.0) for x in out["env_reward"])
    for prompt, completion, env_mask, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["env_mask"],
                                                      out["logprobs"]):
        assert len(completion) == len(env_mask) == len(logprobs) > 0
        assert tokenizer.decode(prompt).startswith("task: ") and tokenizer.decode(prompt).endswith("action:")
        assert env_mask[0] == 1  # the completion starts with the policy's first action
        sampled = [lp for lp, m in zip(logprobs, env_mask) if m]
        assert sampled and all(lp <= 0 and math.isfinite(lp) for lp in sampled)
        assert all(lp == 0.0 for lp, m in zip(logprobs, env_mask) if not m)
        observation = tokenizer.decode([t for t, m in zip(completion, env_mask) if not m])
        if 0 in env_mask[:-1]:  # a second turn: its observation is the environment's
            assert "action:" in observation

    gap = [row["sampling/sampling_logp_difference/mean"] for row in r["log"]
           if "sampling/sampling_logp_difference/mean" in row]
    assert gap and gap[0] < 1e-4, f"engine and trainer logprobs differ by {gap}: not the trainer's dtype?"
    assert r["dtypes"] == ["torch.float32"]
    assert len(r["changed"]) == r["params"], "the step should move every parameter"
    assert r["unequal"] == [], "after TRL's sync the engine's weights equal the trainer's, bit for bit"
    assert r["after"] != r["before"], "the greedy action should change with the policy"
    assert r["after"] == r["hf_after"]


def rl_args(policy: Path, out: Path, steps: int) -> list[str]:
    return ["agent", "rl", "--policy", str(policy), "--tasks", "click-test", "--max-steps", str(steps),
            "--instances", "1", "--group-size", "2", "--pool", "2", "--step-cap", "2", "--save-every", "1",
            "--out", str(out)]


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    code = "import sys; from hybrid_lm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)


def test_rl_resume_continues_the_run(tiny_policy, tmp_path):
    pytest.importorskip("vllm")
    policy, _ = tiny_policy
    out = tmp_path / "run"
    first = run_cli(rl_args(policy, out, 1))
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    for key in ("success_rate", "mean_reward", "episode_steps", "invalid_action_rate", "rollout_seconds",
                "train_seconds", "tokens_generated", "logprob_gap_mean"):
        assert key in rows[0], key
    assert (out / "success.png").is_file() and (out / "config.json").is_file()
    assert (out / "checkpoints" / "checkpoint-1" / "optimizer.pt").is_file()

    again = run_cli(rl_args(policy, out, 2))
    assert again.returncode != 0 and "pass --resume" in again.stderr  # never over a run without asking

    resumed = run_cli([*rl_args(policy, out, 2), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]


def test_rl_refuses_a_missing_policy(tmp_path, capsys):
    assert main(["agent", "rl", "--policy", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "not a checkpoint folder" in capsys.readouterr().err
