"""Behaviour cloning and evaluation end to end on a tiny SambaY: demonstrations from the experts,
`hybrid-lm agent sft` lowering the action loss, `hybrid-lm agent eval` through vLLM."""
import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from hybrid_lm.agent import sft
from hybrid_lm.agent.episodes import encode_episode
from hybrid_lm.cli import main

TASKS = "click-button,enter-text"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_policy):
    """A tokenizer, a random tiny SambaY saved with it, and the experts' demonstrations of two tasks."""
    root = tmp_path_factory.mktemp("agent")
    shutil.copytree(tiny_policy[0], root / "policy")
    tokenizer = tiny_policy[1]
    assert main(["agent", "demos", "--tasks", TASKS, "--episodes", "6", "--out", str(root / "demos.jsonl"),
                 "--pool", "2"]) == 0
    return root, tokenizer


def test_demos_file(setup):
    root, _ = setup
    rows = [json.loads(line) for line in (root / "demos.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["task"] for r in rows} == set(TASKS.split(","))
    assert all(r["reward"] == 1.0 and r["seed"] < 6 and r["steps"][-1]["action"] for r in rows)
    enter = [r for r in rows if r["task"] == "enter-text"]
    assert all(len(r["steps"]) == 2 and r["steps"][0]["action"].startswith("type(") for r in enter)


def test_sft_lowers_the_action_loss_and_eval_runs_in_vllm(setup):
    pytest.importorskip("vllm")
    root, tokenizer = setup
    demos = sft.load_demos(root / "demos.jsonl")
    sequences = [encode_episode(tokenizer, ep.steps) for ep in demos]
    before = sft.action_loss(AutoModelForCausalLM.from_pretrained(root / "policy"), sequences, tokenizer.eos_token_id)
    out = root / "sft"
    assert main(["agent", "sft", "--policy", str(root / "policy"), "--demos", str(root / "demos.jsonl"),
                 "--max-steps", "30", "--out", str(out), "--batch-size", "4", "--eval-every", "15"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_action_loss" in r] == [15, 30]
    after = sft.action_loss(AutoModelForCausalLM.from_pretrained(out), sequences, tokenizer.eos_token_id)
    assert after < 0.7 * before, (before, after)
    assert rows[-1]["val_action_loss"] < before

    assert main(["agent", "eval", "--policy", str(out), "--tasks", TASKS, "--episodes", "2", "--pool", "2",
                 "--out", str(root / "eval")]) == 0
    result = json.loads((root / "eval" / "eval.json").read_text())
    assert set(result["tasks"]) == set(TASKS.split(","))
    for task in result["tasks"].values():
        assert task["episodes"] == 2 and 0.0 <= task["success"] <= 1.0 and task["browser_errors"] == 0
    episodes = [json.loads(line) for line in (root / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 4 and all(ep["seed"] >= 1_000_000 for ep in episodes)  # held-out seeds
    assert all(s["action"] is not None for ep in episodes for s in ep["steps"])


def test_sft_refuses_bad_demos(tmp_path, setup, capsys):
    root, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "click-button"}\n')
    assert main(["agent", "sft", "--policy", str(root / "policy"), "--demos", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "line 1 is not a demonstration" in capsys.readouterr().err
    assert main(["agent", "sft", "--policy", str(root / "policy"), "--demos", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "no file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_demos_are_never_replaced_without_asking(setup, capsys):
    root, _ = setup
    before = (root / "demos.jsonl").read_text()
    assert main(["agent", "demos", "--tasks", TASKS, "--episodes", "1", "--out", str(root / "demos.jsonl")]) == 1
    assert "--overwrite" in capsys.readouterr().err and (root / "demos.jsonl").read_text() == before


def test_action_rows_label_only_the_policy_tokens():
    ids, labels = sft.action_rows([([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10], [0, 1])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
