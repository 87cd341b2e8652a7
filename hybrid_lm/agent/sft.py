"""`hybrid-lm agent sft`: behaviour cloning of the experts' demonstrations, for any of our archs.

Every demonstration is one row: the whole episode as the policy will be served it
(hybrid_lm.agent.episodes.encode_episode, with the policy's own tokenizer), right-padded to the
longest demonstration of its batch. The loss is the next-token loss on the action tokens only (each action's text
and its end-of-text token); observations and padding carry none. It runs through the model's own
`labels` loss, so LRT trains with its interleaved passes as in pretraining.

The training loop is pretraining's (hybrid_lm.train.pretrain.train_loop: WSD schedule, clipping,
atomic checkpoints, --resume, --overwrite). Output (--out): the fine-tuned HF checkpoint
(AutoModelForCausalLM and vLLM load it; its checkpoints under checkpoints/), loss.png and metrics.jsonl, whose rows add `val_action_loss`:
the mean action-token loss, in eval mode, over held-out demonstrations (every tenth; with fewer than
ten demonstrations, over all of them).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid_lm.train import checkpoint, data, optim, pretrain
from hybrid_lm.train.distill import RowCursor
from hybrid_lm.train.losses import IGNORE

from hybrid_lm.cli import non_negative_int, positive_float, positive_int
from .episodes import MAX_OBS_TOKENS, Episode, encode_episode


def load_demos(path: Path) -> list[Episode]:
    """The episodes of a demos JSONL file, with a clear error for a missing or malformed one."""
    if not path.is_file():
        raise FileNotFoundError(f"--demos: no file {path} (make one with `hybrid-lm agent demos`)")
    episodes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            episodes.append(Episode.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--demos: {path} line {n} is not a demonstration (task, seed, reward, steps): {e}") from e
    if not episodes:
        raise ValueError(f"--demos: {path} holds no demonstrations")
    return episodes


def action_rows(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) pairs -> input_ids and labels int64 [B, longest]: right-padded; labels are the ids
    where the mask is 1 (the policy's tokens) and IGNORE elsewhere, padding included."""
    seq_len = max(len(seq) for seq, _ in sequences)
    ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), seq_len), IGNORE, dtype=torch.long)
    for b, (seq, mask) in enumerate(sequences):
        ids[b, :len(seq)] = torch.tensor(seq)
        labels[b, :len(seq)] = torch.where(torch.tensor(mask, dtype=torch.bool), ids[b, :len(seq)], IGNORE)
    return ids, labels


class DemoRows(RowCursor):
    """Batches of demonstrations, in a seeded shuffled order, repeating; resumable.
    batch(B) -> (input_ids, labels), padded to the batch's longest demonstration. Demonstrations
    differ in length by 30x (a click against three steps over many checkboxes): each block of
    BUCKET shuffled ones is sorted by length, so a batch pads little."""
    BUCKET = 64

    def __init__(self, sequences: list, pad_id: int, seed: int = 0):
        order = list(sequences)
        random.Random(seed).shuffle(order)
        self.sequences = [s for i in range(0, len(order), self.BUCKET)
                          for s in sorted(order[i:i + self.BUCKET], key=lambda s: len(s[0]))]
        self.pad_id = pad_id
        self.rank, self.world_size, self.pos = 0, 1, 0

    def batch(self, batch_size: int):
        return action_rows([self.sequences[i] for i in self.take(len(self.sequences), batch_size)], self.pad_id)


@torch.no_grad()
def action_loss(model, sequences: list, pad_id: int, batch_size: int = 8) -> float:
    """Mean next-token loss over the action tokens of `sequences`, in eval mode (the logits a served
    model would give)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids, labels = action_rows(sequences[i:i + batch_size], pad_id)
        ids, labels = ids.to(model.device), labels.to(model.device)
        logits = model(ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != IGNORE
        total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="the checkpoint to start from (e.g. a `hybrid-lm pretrain` "
                        "output): any of our archs, with its tokenizer")
    parser.add_argument("--demos", type=Path, required=True, help="JSONL of `hybrid-lm agent demos`")
    parser.add_argument("--max-steps", type=positive_int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="demonstrations per step")
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    parser.add_argument("--lr", type=positive_float, default=1.0, help="multiplier of the optimizer's base learning rates")
    parser.add_argument("--optimizer", default="adamw", choices=("muon", "adamw"))
    parser.add_argument("--warmup", type=non_negative_int, default=10)
    parser.add_argument("--max-obs-tokens", type=positive_int, default=MAX_OBS_TOKENS,
                        help="token budget of one observation (as eval and RL serve it)")
    parser.add_argument("--eval-every", type=positive_int, default=50)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    pretrain.add_output_arguments(parser, "runs/agent/sft")
    # what pretraining's loop reads and behaviour cloning fixes: no token budget, no time box, no sample
    parser.set_defaults(tokens=None, stop_at=None, sample=0, fsdp=False, seq_len=None)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    if not Path(args.policy, "config.json").is_file():
        raise FileNotFoundError(f"--policy: {args.policy} is not a checkpoint folder (no config.json)")
    episodes = load_demos(args.demos)
    out, resume_from = pretrain.open_output(args, True, 1)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resume_from or args.policy
    tokenizer = data.load_tokenizer(str(source))
    model = AutoModelForCausalLM.from_pretrained(str(source)).to(device)
    if getattr(model.config, "arch", None) is None:
        raise ValueError(f"--policy {args.policy!r}: not a hybrid-lm checkpoint (its config has no arch)")
    state = None if resume_from is None else checkpoint.load_state(resume_from, model.config.arch)

    sequences = [encode_episode(tokenizer, ep.steps, args.max_obs_tokens) for ep in episodes]
    held_out = [s for i, s in enumerate(sequences) if i % 10 == 9] or sequences
    train = [s for i, s in enumerate(sequences) if i % 10 != 9] or sequences
    longest = max(len(ids) for ids, _ in sequences)
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"--demos: the longest demonstration has {longest} tokens, more than the model's "
                         f"{model.config.max_position_embeddings} positions: lower --max-obs-tokens")
    # the loop's tokens/s counts batch_size * seq_len tokens a step: the mean demonstration length
    args.seq_len = round(sum(len(ids) for ids, _ in train) / len(train))
    pad = tokenizer.eos_token_id
    rows = DemoRows(train, pad, args.seed)
    model.train()
    optimizer = optim.build_optimizer(model, args.optimizer, args.lr)

    def loss_fn(batch) -> torch.Tensor:
        ids, labels = batch
        return model(ids.to(device), labels=labels.to(device)).loss

    def eval_fn(net) -> dict:
        return {"val_action_loss": action_loss(net, held_out, pad, args.batch_size)}

    print(f"behaviour cloning {args.policy} ({model.config.arch}) on {len(train)} demonstrations "
          f"({len(held_out)} held out), {args.seq_len} tokens each on average")
    job = pretrain.Run(rank=0, world=1, device=device, out=out, resume_from=resume_from)
    return pretrain.train_loop(args, job, model, optimizer, rows, tokenizer, state, loss_fn, eval_fn)
