"""Pretraining: `hybrid-lm pretrain`, or `torchrun --nproc_per_node=N -m hybrid_lm.train.pretrain`.

With no arguments it trains a tiny SambaY on the embedded corpus (the standard library's own
source) with a byte-level BPE trained on it, shows a falling loss within minutes on a CPU and
prints a short sample. Rows are packed documents (cu_seqlens: Mamba restarts and attention stays
inside a document); LRT trains one row per sequence with its interleaved passes.

Output (--out, which must be new or empty unless --resume or --overwrite): checkpoints/step-N/
folders, each a whole HF model directory (weights, config, tokenizer) with its trainer state
(optimizer, data position, RNG, step), switched in atomically, so a run killed at any moment
resumes from its last checkpoint (see hybrid_lm.train.checkpoint); links at the top of --out to
the latest one, so AutoModelForCausalLM.from_pretrained(out) and vLLM load it; metrics.jsonl (one
row per logged step: step, loss (the mean since the previous row), lr, tokens_per_s, mfu;
validation rows add val_loss and val_bpb) and loss.png. Under torchrun every rank trains (DDP,
or FSDP2 with --fsdp; gloo on CPU, nccl on GPU) and only rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

import hybrid_lm
from hybrid_lm.archs.config import ARCHS, PRESETS
from hybrid_lm.bench.common import flops_per_token, peak_flops, pyplot, read_jsonl, save_figure
from hybrid_lm.cli import module_main, non_negative_int, positive_float, positive_int

from . import checkpoint, data, optim

# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def build_model(args, tokenizer, device: torch.device):
    overrides = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                     max_position_embeddings=max(args.seq_len, 2048))
    if args.arch == "lrt":
        overrides["lrt_subsets"] = args.lrt_subsets
    cfg = hybrid_lm.config(args.arch, args.preset, **overrides)
    return hybrid_lm.build(cfg).to(device)


def shard(model: torch.nn.Module, param_dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """FSDP2 over the model: one group per decoder layer, one for the rest. With param_dtype
    (bf16 on CUDA) parameters are gathered and computed in it, gradients reduced in fp32 and the
    sharded master weights stay fp32; the parameters the model keeps in fp32
    (`_keep_in_fp32_modules_strict`: Mamba's A_log and D, differential attention's lambdas) get
    groups of their own with an fp32 policy, so A = -exp(A_log) is never rounded to bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    keep_fp32 = set(model._keep_in_fp32_modules_strict)
    for layer in model.model.layers:
        if param_dtype is not None:
            for module in list(layer.modules()):
                if keep_fp32 & {name for name, _ in module.named_parameters(recurse=False)}:
                    # its submodules (projections, convolutions) in bf16 as one group; its own
                    # parameters in fp32, its inputs left as they come
                    if children := list(module.children()):
                        fully_shard(children, mp_policy=policy)
                    fully_shard(module, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def wrap(model: torch.nn.Module, args: argparse.Namespace, world: int, device: torch.device) -> torch.nn.Module:
    """The model as it trains: in train mode, each decoder layer checkpointed with
    --activation-checkpointing (transformers' gradient_checkpointing_enable), under torchrun in
    DDP or FSDP2 (--fsdp, see `shard`: bf16 on CUDA; gloo on a CPU stays fp32), compiled in place
    with --compile. One process: the model."""
    model.train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    net = model
    if world > 1 and args.fsdp:
        net = shard(model, torch.bfloat16 if device.type == "cuda" else None)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if args.compile:
        model.compile()  # in place: parameter names, state dicts and checkpoints stay those of the model
    return net


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------

def is_ours(model) -> bool:
    return getattr(optim.unwrap(model).config, "arch", None) in ARCHS


def model_logits(model, inputs: torch.Tensor, cu_seqlens: list, packed: Optional[bool] = None) -> torch.Tensor:
    """Logits [B, T, V] of rows of packed documents, each document seen on its own. Our models
    (packed=None or True) run the rows as one packed sequence with cu_seqlens (LRT: one row per
    sequence); any other causal LM (packed=False, a teacher) runs each document segment
    separately, so no attention crosses a document boundary."""
    B, T = inputs.shape
    if packed is None:
        packed = is_ours(model)
    if packed:
        if is_lrt(model):
            return model(inputs).logits
        cu = data.pack_cu_seqlens(cu_seqlens, T).to(inputs.device)
        return model(inputs.reshape(1, B * T), cu_seqlens=cu).logits.view(B, T, -1)
    rows = []
    for b in range(B):
        bounds = cu_seqlens[b].tolist()
        rows.append(torch.cat([model(inputs[b:b + 1, s:e]).logits[0] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]))
    return torch.stack(rows)


def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: list) -> torch.Tensor:
    """Next-token loss of every position [B, T] (model_logits' rows)."""
    B, T = inputs.shape
    logits = model_logits(model, inputs, cu_seqlens)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(B, T)


def batch_loss(model, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: list) -> torch.Tensor:
    """The training loss of one batch: mean next-token loss; for LRT the mean of its interleaved
    passes' losses (the row of inputs plus its last target runs the schedule with labels)."""
    if is_lrt(model):
        row = torch.cat([inputs, targets[:, -1:]], dim=1)
        return model(row, labels=row).loss
    return token_losses(model, inputs, targets, cu_seqlens).mean()


def is_lrt(model) -> bool:
    return optim.unwrap(model).config.arch == "lrt"



@torch.no_grad()
def evaluate(model, tokenizer, documents, seq_len: int, device: torch.device, max_batches: int,
             batch_size: int) -> tuple[float, float]:
    """(mean validation loss in nats per token, bits per byte over the text targets), from the
    first max_batches batches of the validation split in order."""
    model.eval()
    rows = data.PackedRows(documents, tokenizer, seq_len, shuffle=False, repeat=False)
    byte_lengths = data.token_byte_lengths(tokenizer).to(device)
    nats = text_nats = 0.0
    tokens = nbytes = 0
    for _ in range(max_batches):
        try:
            inputs, targets, cu = rows.batch(batch_size)
        except StopIteration:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        loss = token_losses(model, inputs, targets, cu)
        lengths = byte_lengths[targets]
        nats += loss.sum().item()
        tokens += loss.numel()
        text_nats += loss[lengths > 0].sum().item()
        nbytes += int(lengths.sum())
    model.train()
    if tokens == 0:
        raise ValueError("validation split is empty: give more validation data or a shorter --seq-len")
    return nats / tokens, data.bits_per_byte(text_nats, nbytes)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def full_states(model, optimizer) -> tuple[Optional[dict], dict]:
    """(model state dict or None for a plain model, optimizer state) as one process would hold
    them. Under FSDP2 every rank must call this: it all-gathers the shards."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None, optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    opt = {name: get_optimizer_state_dict(model, o, options=options) for name, o in optimizer.optimizers.items()}
    return weights, opt


def save(out: Path, model, tokenizer, optimizer, rows_iter, step: int, metrics_rows: int, main_rank: bool,
         keep: int) -> None:
    """Checkpoint `step` (weights, config, tokenizer, trainer state), whole or not at all; every
    rank calls it (FSDP2 gathers), only the main rank writes."""
    weights, opt_state = full_states(model, optimizer)
    if not main_rank:
        return
    model = optim.unwrap(model)

    def write_files(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)

    state = {"optimizer": opt_state, "data": rows_iter.state_dict(), "rng": torch.get_rng_state(),
             "metrics_rows": metrics_rows, "arch": model.config.arch}
    checkpoint.save(out, step, write_files, state, keep)


def load_optimizer(model, optimizer, state: dict) -> None:
    """Restore optimizer state saved by save(); under FSDP2 each rank takes its shards."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        optimizer.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True)
    for name, o in optimizer.optimizers.items():
        set_optimizer_state_dict(model, o, state[name], options=options)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sambay", choices=ARCHS)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--data", default=None, help="text/jsonl/parquet file or folder, or a datasets name "
                        "(default: the embedded standard-library corpus)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer path or name (default: train a "
                        "byte-level BPE of --vocab-size on the training data)")
    parser.add_argument("--vocab-size", type=positive_int, default=4096)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per step per process")
    parser.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per step (default: "
                        "1, or what --total-batch-tokens implies)")
    parser.add_argument("--total-batch-tokens", type=positive_int, default=None, help="the global batch in tokens: "
                        "gradient accumulation = this / (world size x --batch-size x --seq-len), which must divide")
    parser.add_argument("--mix-rows", type=non_negative_int, default=8192, help="rows are drawn from permuted "
                        "blocks of this many stream rows, so a batch mixes documents (0: stream order)")
    parser.add_argument("--max-steps", type=positive_int, default=200)
    parser.add_argument("--stop-at", type=positive_int, default=None, help="stop after this step (the schedule "
                        "still spans --max-steps): a time-boxed job, resumed later with --resume")
    parser.add_argument("--tokens", type=positive_int, default=None, help="train on this many tokens (overrides "
                        "--max-steps)")
    parser.add_argument("--tokens-per-param", type=positive_float, default=None, help="train on this many tokens "
                        "per model parameter (20: Chinchilla's budget; overrides --max-steps)")
    parser.add_argument("--lr", type=positive_float, default=1.0, help="multiplier of the optimizer's base "
                        "learning rates")
    parser.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    parser.add_argument("--warmup", type=non_negative_int, default=20)
    parser.add_argument("--lrt-subsets", type=positive_int, default=2)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (our kernels trace as ops)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer's "
                        "activations in backward: less memory, about one more forward of compute")
    add_output_arguments(parser, "runs/pretrain")
    parser.add_argument("--eval-every", type=positive_int, default=50)
    parser.add_argument("--eval-batches", type=positive_int, default=8, help="validation batches per evaluation")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--sample", type=non_negative_int, default=64, help="tokens of the sample printed at the "
                        "end (0: none)")


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--out and what every command built on train_loop shares: resume or overwrite, checkpoints, logging."""
    parser.add_argument("--out", default=default_out, help="output folder: must be new or empty, unless --resume "
                        "or --overwrite")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start a new one")
    parser.add_argument("--save-every", type=positive_int, default=100, help="steps between checkpoints")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=2, help="the newest checkpoints kept")
    parser.add_argument("--log-every", type=positive_int, default=10)


def open_output(args: argparse.Namespace, main_rank: bool, world: int) -> tuple[Path, Optional[Path]]:
    """(out folder, checkpoint to resume from or None). A new run needs --out new or empty, or
    --overwrite; a resumed one its latest checkpoint. The main rank cleans what a kill left."""
    out = Path(args.out)
    if main_rank:
        checkpoint.claim_output(out, args.resume, args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean(out)
    barrier(world)
    return out, checkpoint.latest(out) if args.resume else None


@dataclass
class Run:
    """Where a training command runs and what it reads and writes: its rank among `world`
    processes, its device, the output folder, the checkpoint it resumes from (None: a new run)
    and the training and validation documents (none for commands with their own data)."""
    rank: int
    world: int
    device: torch.device
    out: Path
    resume_from: Optional[Path]
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes metrics, plots and samples."""
        return self.rank == 0


def start_run(args: argparse.Namespace) -> Run:
    """What pretrain and distill begin with: the distributed setup, the output folder (resume or
    overwrite as the flags say) and the documents; seeds torch."""
    rank, world, device = setup_distributed()
    out, resume_from = open_output(args, rank == 0, world)
    torch.manual_seed(args.seed)
    return Run(rank, world, device, out, resume_from, data.load_documents(args.data, "train"),
               data.load_documents(args.data, "val"))


def new_tokenizer(documents, vocab_size: int, world: int):
    """A byte-level BPE trained on the documents by rank 0 and sent to the others, so every rank
    has the same one (it is saved with each checkpoint). Saved and reloaded, as a resume sees it."""
    tokenizer = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            data.train_tokenizer(documents, vocab_size).save_pretrained(folder)
            tokenizer = data.load_tokenizer(folder)
    if world > 1:
        shared = [tokenizer]
        dist.broadcast_object_list(shared, src=0)
        tokenizer = shared[0]
    return tokenizer


def resume_model(model, resume_from: Optional[Path]) -> Optional[dict]:
    """Load the checkpoint's weights into `model` and return its trainer state (None: a new run)."""
    if resume_from is None:
        return None
    state = checkpoint.load_state(resume_from, model.config.arch)
    model.load_state_dict(type(model).from_pretrained(resume_from).state_dict())
    return state


def run(args: argparse.Namespace) -> int:
    job = start_run(args)
    world, device = job.world, job.device
    if job.resume_from is not None or args.tokenizer:
        tokenizer = data.load_tokenizer(str(job.resume_from or args.tokenizer))
    else:
        tokenizer = new_tokenizer(job.train_docs, args.vocab_size, world)

    model = build_model(args, tokenizer, device)
    plan_steps(args, model, world)
    state = resume_model(model, job.resume_from)
    net = wrap(model, args, world, device)
    optimizer = optim.build_optimizer(net, args.optimizer, args.lr)
    rows_iter = data.PackedRows(job.train_docs, tokenizer, args.seq_len, rank=job.rank, world_size=world,
                                seed=args.seed, mix_rows=args.mix_rows)
    passes = 1 + (1 if model.config.arch == "lrt" else 0)  # LRT: pass 0 plus one refinement per token
    flops = flops_per_token(model, args.seq_len, passes)
    peak = peak_flops(device)

    def loss_fn(batch) -> torch.Tensor:
        inputs, targets, cu = batch
        return batch_loss(net, inputs.to(device), targets.to(device), cu)

    def eval_fn(model) -> dict:
        val_loss, val_bpb = evaluate(model, tokenizer, job.val_docs, args.seq_len, device, args.eval_batches,
                                     args.batch_size)
        return {"val_loss": val_loss, "val_bpb": val_bpb}

    def mfu(tokens_per_s: float) -> Optional[float]:
        return None if peak is None else round(tokens_per_s * flops / (peak * world), 4)

    return train_loop(args, job, net, optimizer, rows_iter, tokenizer, state, loss_fn, eval_fn, mfu)


def autocast(device: torch.device):
    """bf16 autocast on a GPU, nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_step(net, optimizer, loss_fn: Callable[[tuple], torch.Tensor], batches: list, device: torch.device
               ) -> torch.Tensor:
    """One optimizer step, the one every training command and `bench train` run: loss_fn of each
    micro-batch under autocast, gradients accumulated over them (the loss is their mean), clipped
    to norm 1, then the optimizer's step. Returns the step's loss, detached (no host sync)."""
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast(device):
            loss = loss_fn(batch) / len(batches)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def plan_steps(args: argparse.Namespace, model, world: int) -> None:
    """Set args.grad_accum (from --total-batch-tokens: nanochat's total_batch_size) and args.tokens
    (from --tokens-per-param) before a run; ValueError when the batch does not divide."""
    per_micro_batch = world * args.batch_size * args.seq_len
    if args.total_batch_tokens is not None:
        if args.grad_accum is not None:
            raise ValueError("--grad-accum and --total-batch-tokens: give one (the second sets the first)")
        if args.total_batch_tokens % per_micro_batch:
            raise ValueError(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of world size x "
                             f"--batch-size x --seq-len = {world} x {args.batch_size} x {args.seq_len} = "
                             f"{per_micro_batch}")
        args.grad_accum = args.total_batch_tokens // per_micro_batch
    args.grad_accum = args.grad_accum or 1
    if args.tokens_per_param is not None:
        if args.tokens is not None:
            raise ValueError("--tokens and --tokens-per-param: give one")
        args.tokens = math.ceil(args.tokens_per_param * sum(p.numel() for p in model.parameters()))


def train_loop(args, job: Run, net, optimizer, rows_iter, tokenizer, state: Optional[dict],
               loss_fn: Callable[[tuple], torch.Tensor], eval_fn: Callable[[torch.nn.Module], dict],
               mfu: Optional[Callable[[float], Optional[float]]] = None) -> int:
    """The training loop of pretrain and distill: resume from `state`, then WSD-scheduled steps of
    loss_fn(rows_iter.batch(B)) with gradient accumulation and clipping; a metrics.jsonl row every
    log_every steps (eval_fn(model)'s validation metrics every eval_every, and MFU when `mfu` is
    given); atomic checkpoints; loss.png and a sample at the end."""
    world, device, out, main_rank = job.world, job.device, job.out, job.main
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * world
    total = args.max_steps if args.tokens is None else math.ceil(args.tokens / tokens_per_step)
    start, metrics_rows = 0, 0
    if state is not None:
        load_optimizer(net, optimizer, state["optimizer"])
        rows_iter.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        start, metrics_rows = state["step"], state["metrics_rows"]
    metrics_path = out / "metrics.jsonl"
    if main_rank:  # a resumed run keeps the rows up to its checkpoint, dropping any logged after it
        kept = metrics_path.read_text().splitlines()[:metrics_rows] if state is not None and metrics_path.exists() else []
        tmp = metrics_path.with_name(metrics_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics_path)  # a kill here keeps the old rows, never half of them
    stop = total if args.stop_at is None else min(total, args.stop_at)
    bar = progress(range(start, stop), main_rank, initial=start, total=total)
    clock, logged = time.perf_counter(), start
    interval_loss = torch.zeros((), device=device)  # summed over the steps since the last log row
    for step in bar:
        optimizer.lr_scale(optim.wsd_schedule(step, total, args.warmup))
        interval_loss += train_step(net, optimizer, loss_fn, [rows_iter.batch(args.batch_size)
                                                              for _ in range(args.grad_accum)], device)
        done = step + 1
        if done % args.log_every == 0 or done == stop or done % args.eval_every == 0:
            if world > 1:  # the loss of the global batch
                dist.all_reduce(interval_loss, op=dist.ReduceOp.SUM)
                interval_loss /= world
            if device.type == "cuda":
                torch.cuda.synchronize()
            tps = tokens_per_step * (done - logged) / (time.perf_counter() - clock)
            row = {"step": done, "loss": float(interval_loss) / (done - logged), "lr": optimizer.param_groups[0]["lr"],
                   "tokens_per_s": round(tps, 1)}
            postfix = dict(loss=f"{row['loss']:.3f}", tok_s=f"{tps:.0f}")
            if mfu is not None:
                row["mfu"] = postfix["mfu"] = mfu(tps)
            if done % args.eval_every == 0 or done == stop:
                row.update(eval_fn(optim.unwrap(net)))
            if main_rank:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                metrics_rows += 1
                bar.set_postfix(**postfix)
            clock, logged = time.perf_counter(), done  # evaluation time is not training time
            interval_loss.zero_()
        if done % args.save_every == 0 or done == stop:
            save(out, net, tokenizer, optimizer, rows_iter, done, metrics_rows, main_rank, args.keep_checkpoints)
            barrier(world)
    if main_rank:
        plot_loss(metrics_path, out / "loss.png")
    if args.sample and stop == total:  # every rank generates (FSDP2 gathers), the main one prints
        text = sample(optim.unwrap(net), tokenizer, device, args.sample)
        if main_rank:
            print(text)
    if world > 1:
        dist.destroy_process_group()
    return 0


def progress(steps: range, show: bool, initial: int, total: int):
    """A tqdm bar on rank 0 (plain iteration elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(steps, initial=initial, total=total, disable=not show, unit="step")


def plot_loss(metrics: Path, path: Path) -> None:
    """Training loss (and validation loss where measured) against step; skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    rows = read_jsonl(metrics)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


@torch.no_grad()
def sample(model, tokenizer, device: torch.device, n: int) -> str:
    """A short greedy continuation of a fixed prompt, to see what the model learned."""
    model.eval()
    prompt = "def "
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.eos_token_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv: Optional[list] = None) -> int:
    return module_main(["pretrain"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
