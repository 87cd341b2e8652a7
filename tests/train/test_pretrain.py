"""Pretraining end to end on the CPU: the loss falls on the embedded corpus, a run stopped and
resumed reproduces the uninterrupted losses exactly, two torchrun processes match one process at
the same global batch (DDP; FSDP2 compiled with activation checkpointing), checkpoints reload with the Auto classes, bad checkpoints are refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybrid_lm.train import data

SMALL = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--eval-batches", "2", "--sample", "0",
         "--warmup", "5", "--log-every", "1"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """One small BPE trained on the first stretch of the embedded corpus, shared by every run."""
    path = tmp_path_factory.mktemp("tokenizer")
    data.train_tokenizer(data.load_documents(None, "train")[:200], 512).save_pretrained(path)
    return str(path)


def pretrain(*args: str, nproc: int = 1, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "hybrid_lm.train.pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hybrid_lm.train.pretrain", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_reloads(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    pretrain(*SMALL, "--arch", "sambay", "--tokenizer", tokenizer_dir, "--max-steps", "40", "--eval-every", "20",
             "--out", str(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert any("val_bpb" in r for r in rows)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert (out / "loss.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("import os\n")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize("arch", ["transformer", "lrt"])
def test_stop_and_resume_reproduces_losses(tmp_path, tokenizer_dir, arch):
    common = [*SMALL, "--arch", arch, "--tokenizer", tokenizer_dir, "--max-steps", "12", "--eval-every", "100"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    pretrain(*common, "--out", str(whole))
    pretrain(*common, "--out", str(part), "--stop-at", "5", "--save-every", "5")
    assert len(losses(part)) == 5
    pretrain(*common, "--out", str(part), "--resume")
    assert losses(part) == losses(whole)


@pytest.mark.parametrize("sharding, steps", [([], 6), (["--fsdp", "--compile", "--activation-checkpointing"], 3)],
                         ids=["ddp", "fsdp-compiled-checkpointed"])
def test_two_processes_equal_one(tmp_path, tokenizer_dir, sharding, steps):
    common = [*SMALL[:2], "--seq-len", "64", "--eval-batches", "2", "--sample", "0", "--warmup", "2",
              "--log-every", "1", "--arch", "sambay", "--tokenizer", tokenizer_dir, "--max-steps", str(steps),
              "--eval-every", "100"]
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(*common, "--batch-size", "4", "--out", str(one))
    pretrain(*common, "--batch-size", "2", "--out", str(two), *sharding, nproc=2, timeout=600)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_bad_checkpoints_are_refused(tmp_path, tokenizer_dir):
    from hybrid_lm.train.checkpoint import load_state

    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        load_state(tmp_path, "sambay")
    (tmp_path / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_state(tmp_path, "sambay")
    torch.save({"arch": "transformer", "step": 1}, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match="transformer"):
        load_state(tmp_path, "sambay")
