"""Distillation: `hybrid-lm distill --teacher PATH --mode logits|topk|sequence`.

A student of any of our architectures (--arch/--preset, or an existing checkpoint with --student)
learns from a teacher causal LM (any AutoModelForCausalLM directory, ours included):

  logits    online logit KD: the teacher runs on every training batch; the loss is
            kd_weight * KD + (1 - kd_weight) * CE, KD being the forward KL(teacher || student)
            at --temperature (scaled by T^2), or the generalized JSD (--kind jsd, --beta).
  topk      offline logit KD: the teacher's top-k log-probs (at --temperature) of --cache-rows
            training rows are written once to safetensors shards (cache_topk) and reused by every
            later run; the KD term is sparse_kd_loss, whose missing teacher mass is one explicit
            "other" bucket (see there).
  sequence  sequence-level KD: the teacher completes prompts (--gen-engine: vLLM, by default when
            importable and on a GPU, or transformers generate); the generations are written once to
            sequences.jsonl and the student trains on them with the loss masked to the completion
            tokens.

Teacher and student must share the vocabulary: a different vocab_size (or tokenizer) is a
ValueError. The loss terms (hybrid_lm.train.losses) are computed in chunks of --chunk-tokens
tokens, each chunk recomputed in the backward pass, so fp32 copies of the [tokens, vocab] logits
are bounded by one chunk.
The output directory is pretrain's: atomic checkpoints (resumable with --resume) with the latest
linked at the top as an HF model directory, metrics.jsonl (validation rows add val_loss, val_bpb and val_kl, the student's mean
KL(teacher || student) at temperature 1 on held-out rows) and loss.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from hybrid_lm.archs.config import ARCHS
from hybrid_lm.bench.common import read_jsonl
from hybrid_lm.cli import module_main, non_negative_float, positive_float, positive_int, unit_float

from . import data, optim, pretrain
from .losses import IGNORE, ce_loss, kd_loss, sparse_kd_loss

CACHE_INDEX = "index.json"
SEQUENCES_FILE = "sequences.jsonl"


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def load_teacher(path: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """Any AutoModelForCausalLM directory or name, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    teacher = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def check_vocab(teacher, student, tokenizer=None, teacher_tokenizer=None) -> None:
    """Teacher, student (and tokenizers, where given) must share one vocabulary: ValueError if not."""
    tv, sv = teacher.config.vocab_size, optim.unwrap(student).config.vocab_size
    if tv != sv:
        raise ValueError(f"vocabulary mismatch: the teacher has vocab_size {tv}, the student {sv}; "
                         "distillation needs the same tokenizer and vocabulary")
    if tokenizer is not None and len(tokenizer) > sv:
        raise ValueError(f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens, the models {sv}")
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError("vocabulary mismatch: the student's tokenizer differs from the teacher's")


# ---------------------------------------------------------------------------------------------
# offline top-k cache
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def cache_topk(teacher, rows: data.PackedRows, num_rows: int, k: int, path, temperature: float = 1.0,
               batch_size: int = 8, rows_per_shard: int = 1024, device: Optional[torch.device] = None) -> Path:
    """Write the teacher's top-k log-probs of the next num_rows rows once, to safetensors shards
    under path; a complete cache with the same k, temperature and seq_len is reused as is.

    Shard topk-NNNNN.safetensors holds tokens int64 [n, T + 1] (inputs and targets), cu_flat and
    cu_offsets int64 (each row's cu_seqlens concatenated, and where each starts), topk_ids int32
    [n, T, k] and topk_logprobs float32 [n, T, k] = top-k of log_softmax(teacher logits / T).
    index.json (written last, so a cache cut short is rewritten) lists shards and settings."""
    from safetensors.torch import save_file
    path = Path(path)
    settings = {"k": k, "temperature": temperature, "seq_len": rows.seq_len, "rows": num_rows,
                "vocab_size": teacher.config.vocab_size}
    index = path / CACHE_INDEX
    if index.is_file():
        meta = json.loads(index.read_text())
        if {key: meta.get(key) for key in settings} == settings:
            return path
    path.mkdir(parents=True, exist_ok=True)
    device = device or next(teacher.parameters()).device
    shards, done = [], 0
    while done < num_rows:
        tokens, cus, ids, lps = [], [], [], []
        n = min(rows_per_shard, num_rows - done)
        got = 0
        while got < n:
            try:
                inputs, targets, cu = rows.batch(min(batch_size, n - got))
            except StopIteration:
                break
            logits = pretrain.model_logits(teacher, inputs.to(device), cu)
            lp = F.log_softmax(logits.float() / temperature, dim=-1)
            top = lp.topk(k, dim=-1)
            tokens.append(torch.cat([inputs, targets[:, -1:]], dim=1))
            cus.extend(c.long() for c in cu)
            ids.append(top.indices.int().cpu())
            lps.append(top.values.cpu())
            got += inputs.shape[0]
        if got == 0:
            break
        offsets = torch.tensor([0] + [len(c) for c in cus]).cumsum(0)
        name = f"topk-{len(shards):05d}.safetensors"
        save_file({"tokens": torch.cat(tokens).contiguous(), "cu_flat": torch.cat(cus).contiguous(),
                   "cu_offsets": offsets.contiguous(), "topk_ids": torch.cat(ids).contiguous(),
                   "topk_logprobs": torch.cat(lps).contiguous()}, str(path / name))
        shards.append(name)
        done += got
        if got < n:
            break
    if done == 0:
        raise ValueError("cache_topk: no rows to cache")
    index.write_text(json.dumps({**settings, "rows": num_rows, "written_rows": done, "shards": shards}))
    return path


class RowCursor:
    """Rows 0..n-1 walked in order and repeating, rank-strided; resumable (state_dict)."""
    rank: int
    world_size: int
    pos: int

    def take(self, n: int, batch_size: int) -> list[int]:
        """This rank's next batch_size row indices."""
        idx = [(self.pos + self.rank + j * self.world_size) % n for j in range(batch_size)]
        self.pos += batch_size * self.world_size
        return idx

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class TopkRows(RowCursor):
    """Batches from a cache_topk directory, in order, repeating; resumable like PackedRows.
    batch(B) -> (inputs, targets, cu_seqlens, topk_ids, topk_logprobs)."""

    def __init__(self, path, rank: int = 0, world_size: int = 1):
        from safetensors.torch import load_file
        path = Path(path)
        self.meta = json.loads((path / CACHE_INDEX).read_text())
        shards = [load_file(str(path / name)) for name in self.meta["shards"]]
        self.tokens = torch.cat([s["tokens"] for s in shards])
        self.ids = torch.cat([s["topk_ids"] for s in shards])
        self.logprobs = torch.cat([s["topk_logprobs"] for s in shards])
        self.cu = [s["cu_flat"][o[i]:o[i + 1]].int() for s in shards
                   for o in [s["cu_offsets"]] for i in range(len(o) - 1)]
        self.seq_len = self.tokens.shape[1] - 1
        self.rank, self.world_size, self.pos = rank, world_size, 0

    def batch(self, batch_size: int):
        idx = self.take(len(self.tokens), batch_size)
        tokens = self.tokens[idx]
        return (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), [self.cu[i] for i in idx],
                self.ids[idx], self.logprobs[idx])


# ---------------------------------------------------------------------------------------------
# sequence-level distillation
# ---------------------------------------------------------------------------------------------

def prompts_from_documents(documents: Iterable[str], tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    """The first prompt_tokens tokens of the first n non-empty documents."""
    prompts = []
    for doc in documents:
        ids = tokenizer.encode(doc, add_special_tokens=False)[:prompt_tokens]
        if ids:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


@torch.no_grad()
def generate(teacher_path: str, teacher, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
             temperature: float = 0.0, engine: str = "auto") -> list[list[int]]:
    """The teacher's completion of every prompt (token ids, up to and including eos), by
    `engine`: "vllm" (hybrid-lm's own vLLM engine, hybrid_lm.bench.vllm_engine.serve, with the
    teacher's dtype), "transformers" (generate, one prompt at a time: no padding, which every
    architecture of ours handles), or "auto": vLLM when it is importable and a GPU is present.
    temperature 0: greedy."""
    if engine == "auto":
        engine = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "transformers"
    if engine == "vllm":
        from vllm import SamplingParams

        from hybrid_lm.bench.vllm_engine import serve
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=[eos_id])
        max_len = max(len(p) for p in prompts) + max_new_tokens
        with serve(teacher_path, max_len, next(teacher.parameters()).dtype) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    device = next(teacher.parameters()).device
    completions = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        out = teacher.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id,
                               **sampling)
        completions.append(out[0, len(p):].tolist())
    return completions


def completion_rows(pairs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """(prompt, completion) token lists -> inputs and targets int64 [B, seq_len] (truncated
    or right-padded), targets IGNORE except where the target token is a completion token."""
    B = len(pairs)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    for b, (prompt, completion) in enumerate(pairs):
        seq = (list(prompt) + list(completion))[:seq_len + 1]
        n = len(seq) - 1
        inputs[b, :n] = torch.tensor(seq[:-1])
        tgt = torch.tensor(seq[1:])
        completion_target = torch.arange(1, n + 1) >= len(prompt)  # target position j predicts seq[j]
        targets[b, :n] = torch.where(completion_target, tgt, torch.full_like(tgt, IGNORE))
    return inputs, targets


class SequenceRows(RowCursor):
    """Batches of teacher generations, in order, repeating; resumable.
    batch(B) -> (inputs, targets with IGNORE outside completions, cu_seqlens: one segment a row)."""

    def __init__(self, pairs: list, seq_len: int, pad_id: int, rank: int = 0, world_size: int = 1):
        if not pairs:
            raise ValueError("sequence mode: no prompts")
        self.pairs, self.seq_len, self.pad_id = pairs, seq_len, pad_id
        self.rank, self.world_size, self.pos = rank, world_size, 0

    def batch(self, batch_size: int):
        idx = self.take(len(self.pairs), batch_size)
        inputs, targets = completion_rows([self.pairs[i] for i in idx], self.seq_len, self.pad_id)
        return inputs, targets, [torch.tensor([0, self.seq_len], dtype=torch.int32)] * batch_size


def sequence_pairs(args, teacher, tokenizer, documents, out: Path, main_rank: bool, world: int) -> list:
    """The (prompt, completion) pairs of sequences.jsonl in --out, generated once by the teacher."""
    path = out / SEQUENCES_FILE
    if not path.is_file():
        if main_rank:
            if args.prompts:
                texts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
                texts = [json.loads(t)["prompt"] if t.lstrip().startswith("{") else t for t in texts][:args.num_prompts]
                prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
            else:
                prompts = prompts_from_documents(documents, tokenizer, args.num_prompts, args.prompt_tokens)
            completions = generate(args.teacher, teacher, prompts, args.gen_tokens, tokenizer.eos_token_id,
                                   args.gen_temperature, args.gen_engine)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions)))
            tmp.replace(path)
        pretrain.barrier(world)
    return [(r["prompt"], r["completion"]) for r in read_jsonl(path)]


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_kl(student, teacher, tokenizer, documents, seq_len: int, device: torch.device,
                max_batches: int, batch_size: int) -> float:
    """Mean KL(teacher || student) per token at temperature 1 over the first max_batches batches
    of held-out documents, in order."""
    student.eval()
    rows = data.PackedRows(documents, tokenizer, seq_len, shuffle=False, repeat=False)
    total, tokens = 0.0, 0
    for _ in range(max_batches):
        try:
            inputs, _, cu = rows.batch(batch_size)
        except StopIteration:
            break
        inputs = inputs.to(device)
        total += kd_loss(pretrain.model_logits(student, inputs, cu), pretrain.model_logits(teacher, inputs, cu)).item() * inputs.numel()
        tokens += inputs.numel()
    student.train()
    if tokens == 0:
        raise ValueError("validation split is empty: give more validation data or a shorter --seq-len")
    return total / tokens


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    pretrain.add_arguments(parser)
    parser.set_defaults(out="runs/distill", arch="sambay")
    parser.add_argument("--teacher", required=True, help="teacher causal LM: any AutoModelForCausalLM directory or name")
    parser.add_argument("--student", default=None, help="start the student from this checkpoint (default: a new "
                        "--arch/--preset model)")
    parser.add_argument("--mode", default="logits", choices=("logits", "topk", "sequence"))
    parser.add_argument("--kind", default="kl", choices=("kl", "jsd"), help="online KD divergence")
    parser.add_argument("--beta", type=unit_float, default=0.5, help="generalized JSD mixture weight")
    parser.add_argument("--kd-weight", type=unit_float, default=0.9, help="alpha: loss = alpha KD + (1 - alpha) CE")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--topk", type=positive_int, default=64, help="teacher log-probs kept per token (--mode topk)")
    parser.add_argument("--cache", default=None, help="top-k cache folder (default: OUT/topk_cache)")
    parser.add_argument("--cache-rows", type=positive_int, default=1024, help="training rows cached (--mode topk)")
    parser.add_argument("--chunk-tokens", type=positive_int, default=1024, help="tokens per chunk of the loss computation")
    parser.add_argument("--prompts", default=None, help="text file (one prompt a line) or jsonl with 'prompt' "
                        "(--mode sequence; default: the starts of training documents)")
    parser.add_argument("--num-prompts", type=positive_int, default=256)
    parser.add_argument("--prompt-tokens", type=positive_int, default=32)
    parser.add_argument("--gen-tokens", type=positive_int, default=64)
    parser.add_argument("--gen-temperature", type=non_negative_float, default=0.0, help="0: greedy")
    parser.add_argument("--gen-engine", default="auto", choices=("auto", "vllm", "transformers"),
                        help="what generates the teacher's completions (--mode sequence); auto: vLLM when it is "
                        "installed and a GPU is present, else transformers")


def build_student(args, tokenizer, device: torch.device):
    if args.student is None:
        return pretrain.build_model(args, tokenizer, device)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.student).to(device)
    if not pretrain.is_ours(model):
        raise ValueError(f"--student {args.student!r} is not a hybrid-lm model (config.arch not in {ARCHS})")
    return model


def step_loss(args, net, teacher, batch, device: torch.device) -> torch.Tensor:
    """The distillation loss of one batch."""
    if args.mode == "sequence":
        inputs, targets, cu = batch
        logits = pretrain.model_logits(net, inputs.to(device), cu)
        return ce_loss(logits, targets.to(device), args.chunk_tokens)
    if args.mode == "topk":
        inputs, targets, cu, ids, lps = batch
    else:
        inputs, targets, cu = batch
    inputs, targets = inputs.to(device), targets.to(device)
    logits = pretrain.model_logits(net, inputs, cu)
    if args.mode == "topk":
        kd = sparse_kd_loss(logits, ids.to(device), lps.to(device), args.temperature, chunk_tokens=args.chunk_tokens)
    else:
        with torch.no_grad():
            teacher_logits = pretrain.model_logits(teacher, inputs, cu)
        kd = kd_loss(logits, teacher_logits, args.temperature, args.kind, args.beta, chunk_tokens=args.chunk_tokens)
    if args.kd_weight >= 1.0:
        return kd
    return args.kd_weight * kd + (1 - args.kd_weight) * ce_loss(logits, targets, args.chunk_tokens)


def run(args: argparse.Namespace) -> int:
    if not Path(args.teacher).expanduser().exists() and data.looks_like_path(args.teacher):
        raise FileNotFoundError(f"--teacher {args.teacher!r}: no such folder")
    job = pretrain.start_run(args)
    world, device = job.world, job.device
    teacher_dir = Path(args.teacher)
    teacher_tokenizer = data.load_tokenizer(args.teacher) if (teacher_dir / "tokenizer_config.json").is_file() else None
    if job.resume_from is not None:
        tokenizer = data.load_tokenizer(str(job.resume_from))
    elif args.tokenizer:
        tokenizer = data.load_tokenizer(args.tokenizer)
    elif teacher_tokenizer is not None:
        tokenizer = teacher_tokenizer
    else:
        raise ValueError(f"--tokenizer: the teacher folder {args.teacher} has no tokenizer (no tokenizer_config.json); "
                         "give the teacher's tokenizer")
    teacher = load_teacher(args.teacher, device, torch.bfloat16 if device.type == "cuda" else None)

    model = build_student(args, tokenizer, device)
    check_vocab(teacher, model, tokenizer, teacher_tokenizer)
    pretrain.plan_steps(args, model, world)
    state = pretrain.resume_model(model, job.resume_from)
    net = pretrain.wrap(model, args, world, device)
    optimizer = optim.build_optimizer(net, args.optimizer, args.lr)

    if args.mode == "topk":
        cache = Path(args.cache) if args.cache else job.out / "topk_cache"
        if job.main:
            cache_topk(teacher, data.PackedRows(job.train_docs, tokenizer, args.seq_len, seed=args.seed), args.cache_rows,
                       args.topk, cache, args.temperature, args.batch_size, device=device)
        pretrain.barrier(world)
        rows_iter = TopkRows(cache, job.rank, world)
        if (rows_iter.meta["temperature"], rows_iter.seq_len) != (args.temperature, args.seq_len):
            raise ValueError(f"top-k cache {cache} was written at temperature {rows_iter.meta['temperature']}, "
                             f"seq_len {rows_iter.seq_len}; this run asks {args.temperature}, {args.seq_len}")
        if rows_iter.meta["vocab_size"] != model.config.vocab_size:
            raise ValueError(f"vocabulary mismatch: the top-k cache has vocab_size {rows_iter.meta['vocab_size']}, "
                             f"the student {model.config.vocab_size}")
    elif args.mode == "sequence":
        pairs = sequence_pairs(args, teacher, tokenizer, job.train_docs, job.out, job.main, world)
        rows_iter = SequenceRows(pairs, args.seq_len, tokenizer.eos_token_id, job.rank, world)
    else:
        rows_iter = data.PackedRows(job.train_docs, tokenizer, args.seq_len, rank=job.rank, world_size=world,
                                    seed=args.seed)

    def loss_fn(batch) -> torch.Tensor:
        return step_loss(args, net, teacher, batch, device)

    def eval_fn(student) -> dict:
        with pretrain.autocast(device):
            val_loss, val_bpb = pretrain.evaluate(student, tokenizer, job.val_docs, args.seq_len, device,
                                                  args.eval_batches, args.batch_size)
            val_kl = evaluate_kl(student, teacher, tokenizer, job.val_docs, args.seq_len, device, args.eval_batches,
                                 args.batch_size)
        return {"val_loss": val_loss, "val_bpb": val_bpb, "val_kl": val_kl}

    return pretrain.train_loop(args, job, net, optimizer, rows_iter, tokenizer, state, loss_fn, eval_fn)


def main(argv: Optional[list] = None) -> int:
    return module_main(["distill"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
