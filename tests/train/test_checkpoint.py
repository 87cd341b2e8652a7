"""Checkpoints a kill cannot tear, and runs that are never replaced without asking: SIGKILL at
every point of a save, then --resume continues to the uninterrupted losses; a mismatched
weights/state pair, a missing checkpoint and a non-empty --out are refused in one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybrid_lm import cli
from hybrid_lm.train import checkpoint, data

# every point checkpoint.save pauses at under HYBRID_LM_SAVE_PAUSE, in order
SAVE_POINTS = ("folder made", "weights written", "state written", "folder renamed", "latest switched", "links made")
# one kill in each different state a save passes through: the new folder half written, whole but
# not renamed, renamed but not current, current
KILL_POINTS = ("weights written", "state written", "folder renamed", "latest switched")
STEPS = 2 * len(KILL_POINTS) + 2


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list[str]:
    """Arguments of a tiny, fast run: a small tokenizer and a small jsonl corpus (quick to load)."""
    root = tmp_path_factory.mktemp("inputs")
    docs = data.load_documents(None, "train")[:300]
    data.train_tokenizer(docs, 300).save_pretrained(root / "tokenizer")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return ["--arch", "transformer", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--sample", "0",
            "--warmup", "2", "--log-every", "1", "--eval-every", "1000", "--eval-batches", "1", "--save-every", "1",
            "--max-steps", str(STEPS), "--tokenizer", str(root / "tokenizer"), "--data", str(root / "docs.jsonl")]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hybrid_lm.train.pretrain", *args]


def env(pause: bool) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **({checkpoint.SAVE_PAUSE_ENV: "0.2"} if pause else {})}


def run_killed(args: list[str], at: int) -> None:
    """Run pretrain and SIGKILL it while it pauses at save point number `at` (counted from 0
    over all its saves)."""
    proc = subprocess.Popen(command(args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env(True))
    seen = 0
    try:
        for line in proc.stderr:
            if "save point:" in line:
                if seen == at:
                    proc.send_signal(signal.SIGKILL)
                    break
                seen += 1
        assert proc.wait(timeout=120) == -signal.SIGKILL, "the run ended before the save point"
    finally:
        proc.kill()
        proc.stderr.close()


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command(args), capture_output=True, text=True, timeout=300, env=env(False))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_at_every_save_point_resumes_exactly(tmp_path, common):
    whole, part = tmp_path / "whole", tmp_path / "part"
    done = run([*common, "--out", str(whole)])
    assert done.returncode == 0, done.stderr[-3000:]

    # killed inside the first save: there is no checkpoint, and --resume says so in one line
    run_killed([*common, "--out", str(part)], at=SAVE_POINTS.index("folder made"))
    refused = run([*common, "--out", str(part), "--resume"])
    assert refused.returncode == 1 and "no checkpoint" in refused.stderr and "Traceback" not in refused.stderr

    # each run makes one whole save, then dies at the next point of its second save
    for i, point in enumerate(KILL_POINTS):
        at = len(SAVE_POINTS) + SAVE_POINTS.index(point)
        run_killed([*common, "--out", str(part), "--resume" if i else "--overwrite"], at=at)
        folder = checkpoint.latest(part)
        state = checkpoint.load_state(folder, "transformer")  # whole: the weights are the state's
        if point == "latest switched":
            assert folder.name == f"step-{state['step']:06d}" and state["step"] >= 2
        assert AutoModelForCausalLM.from_pretrained(part) is not None  # the links reach the latest
    done = run([*common, "--out", str(part), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(part) == losses(whole)
    leftovers = [p.name for p in (part / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    kept = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert kept == ["latest", f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]  # --keep-checkpoints 2


def test_a_mismatched_pair_is_refused(tmp_path, common, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", *common, "--max-steps", "2", "--out", str(out)]) == 0
    older, newer = checkpoint.step_dir(out, 1), checkpoint.step_dir(out, 2)
    shutil.copy(older / "model.safetensors", newer / "model.safetensors")
    with pytest.raises(ValueError, match="not the ones"):
        checkpoint.load_state(newer, "transformer")
    capsys.readouterr()
    assert cli.main(["pretrain", *common, "--max-steps", "3", "--out", str(out), "--resume"]) == 1
    message = capsys.readouterr().err.strip()
    assert "not the ones" in message and "\n" not in message

    weights = newer / "model.safetensors"  # a truncated file is named, in loading and in resume
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(newer)
    with pytest.raises(ValueError, match="not the ones"):
        checkpoint.load_state(newer, "transformer")

    state = torch.load(newer / checkpoint.STATE_FILE, weights_only=True)
    torch.save({**state, "step": 7}, older / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match="step 7"):
        checkpoint.load_state(older, "transformer")


def test_a_new_run_never_replaces_an_old_one_without_asking(tmp_path, common, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", *common, "--max-steps", "1", "--out", str(out)]) == 0
    before = (out / "checkpoints" / "latest" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(["pretrain", *common, "--arch", "lrt", "--max-steps", "1", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert str(out) in message and "--resume" in message and "--overwrite" in message
    assert (out / "checkpoints" / "latest" / "model.safetensors").read_bytes() == before
    assert cli.main(["pretrain", *common, "--arch", "lrt", "--max-steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.arch == "lrt"

    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a hybrid-lm run"):
        checkpoint.claim_output(stranger, resume=False, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="choose one"):
        checkpoint.claim_output(out, resume=True, overwrite=True)


def test_leftovers_of_a_kill_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000003", "step-000004.tmp"):
        (root / name).mkdir(parents=True)
    (root / "latest").symlink_to("step-000002")
    (root / "latest.tmp").symlink_to("step-000003")
    (tmp_path / "metrics.jsonl.tmp").write_text("half a rewrite")
    checkpoint.clean(tmp_path)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert checkpoint.latest(tmp_path).name == "step-000002"


def test_the_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cli.main(["pretrain", "--out", str(tmp_path), "--resume", "--debug"])
