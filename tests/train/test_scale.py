"""Training at scale, checked on tiny models on the CPU: the global batch in tokens, the token
budget per parameter, activation checkpointing (same gradients), compiled steps (same losses),
FSDP2's bf16 policy (the fp32 parameters stay fp32)."""
import argparse
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import hybrid_lm
from hybrid_lm.archs.config import ARCHS
from hybrid_lm.train import optim, pretrain


def plan(world=1, **given) -> argparse.Namespace:
    args = argparse.Namespace(batch_size=4, seq_len=64, grad_accum=None, total_batch_tokens=None, tokens=None,
                              tokens_per_param=None)
    vars(args).update(given)
    model = torch.nn.Linear(10, 10)  # 110 parameters
    pretrain.plan_steps(args, model, world)
    return args


def test_batch_in_tokens_sets_the_accumulation():
    assert plan().grad_accum == 1
    assert plan(grad_accum=3).grad_accum == 3
    assert plan(total_batch_tokens=4 * 64 * 6).grad_accum == 6
    assert plan(world=2, total_batch_tokens=2 * 4 * 64 * 3).grad_accum == 3
    with pytest.raises(ValueError, match=r"not a multiple of world size x --batch-size x --seq-len = 2 x 4 x 64 = 512"):
        plan(world=2, total_batch_tokens=1000)
    with pytest.raises(ValueError, match="give one"):
        plan(grad_accum=2, total_batch_tokens=256)


def test_tokens_per_param_sets_the_budget():
    assert plan(tokens_per_param=20).tokens == 2200
    assert plan(tokens_per_param=0.5).tokens == 55
    with pytest.raises(ValueError, match="give one"):
        plan(tokens_per_param=20, tokens=100)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return hybrid_lm.build(hybrid_lm.config(arch, "tiny", num_hidden_layers=4, max_position_embeddings=256)).train()


def batch(vocab: int, rows: int = 2, T: int = 24):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (rows, T + 1), generator=g)
    cu = [torch.tensor([0, 9, T], dtype=torch.int32), torch.tensor([0, T], dtype=torch.int32)][:rows]
    return tokens[:, :-1], tokens[:, 1:], cu


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch):
    plain = tiny(arch)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    inputs, targets, cu = batch(plain.config.vocab_size)
    for model in (plain, checkpointed):
        pretrain.batch_loss(model, inputs, targets, cu).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_steps_give_the_eager_losses(arch):
    runs = []
    for compiled in (False, True):
        model = tiny(arch)
        if compiled:
            model.compile(backend="aot_eager")
        optimizer = optim.build_optimizer(model, "adamw")
        inputs, targets, cu = batch(model.config.vocab_size)
        losses = [pretrain.train_step(model, optimizer, lambda b: pretrain.batch_loss(model, *b),
                                      [(inputs, targets, cu)], torch.device("cpu")).item() for _ in range(5)]
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


FSDP_BF16 = '''
import json, sys, torch, torch.distributed as dist
import hybrid_lm
from hybrid_lm.train import pretrain
dist.init_process_group("gloo")
torch.manual_seed(0)
model = hybrid_lm.build(hybrid_lm.config(sys.argv[1], "tiny", num_hidden_layers=4)).train()
net = pretrain.shard(model, torch.bfloat16)
seen = {}  # parameter name -> dtype it had when its module ran
def recorder(prefix):
    def record(module, args):
        for name, p in module.named_parameters(recurse=False):
            seen[prefix + name] = str(p.dtype)
    return record
for prefix, module in model.named_modules():
    module.register_forward_pre_hook(recorder(prefix + "."))
tokens = torch.randint(0, model.config.vocab_size, (2, 17))
logits = net(tokens[:, :-1]).logits
torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
if dist.get_rank() == 0:
    json.dump({"seen": seen, "masters": sorted({str(p.dtype) for p in model.parameters()}),
               "grads": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})},
              open(sys.argv[2], "w"))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("arch", ["sambay-da"])  # Mamba's A_log and D, differential attention's lambdas
def test_fsdp_bf16_keeps_the_fp32_parameters(tmp_path, arch):
    """FSDP2's bf16 policy (what CUDA gets) on 2 gloo ranks: every parameter computes in bf16
    except those of `_keep_in_fp32_modules_strict` (and Mamba's D beside A_log); master weights
    and gradients stay fp32."""
    script, result = tmp_path / "fsdp_bf16.py", tmp_path / "result.json"
    script.write_text(FSDP_BF16)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), arch, str(result)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(result.read_text())
    keep = set(hybrid_lm.build(hybrid_lm.config(arch, "tiny", num_hidden_layers=4))._keep_in_fp32_modules_strict)
    # the modules holding a kept parameter keep all their own parameters fp32 (Mamba's D too)
    owners = {name.rsplit(".", 1)[0] for name in found["seen"] if name.rsplit(".", 1)[-1] in keep}
    fp32 = {name for name in found["seen"] if name.rsplit(".", 1)[0] in owners}
    assert keep <= {n.rsplit(".", 1)[-1] for n in fp32} <= keep | {"D"}
    assert {found["seen"][n] for n in fp32} == {"torch.float32"}
    assert {dtype for n, dtype in found["seen"].items() if n not in fp32} == {"torch.bfloat16"}
    assert found["masters"] == found["grads"] == ["torch.float32"]
