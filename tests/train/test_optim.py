"""Muon / AdamW split, WSD schedule, clipping and exact resume (CPU, fp32)."""

import io
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import hybrid_lm
from hybrid_lm.train.optim import (Muon, build_optimizer, newton_schulz,
                                   split_params, wsd_schedule)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra intra-op threads only spin (and crawl when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(arch: str = "sambay", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return hybrid_lm.build(hybrid_lm.config(arch, "tiny", **overrides))


def _train(model, opt, batches, start: int, stop: int) -> list[float]:
    """Steps start..stop-1 of a len(batches)-step WSD run with clipping; the per-step losses."""
    losses = []
    for step in range(start, stop):
        opt.lr_scale(wsd_schedule(step, len(batches), warmup=2))
        loss = model(batches[step], labels=batches[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# -- Newton-Schulz ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 128)])
def test_newton_schulz_approximates_polar_factor(shape):
    g = torch.randn(shape)
    o = newton_schulz(g)
    assert o.dtype == g.dtype and o.shape == g.shape
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    # Same singular vectors: U^T O V is diagonal (off-diagonal mass at fp32 rounding level)...
    d = u.T @ o @ vh.T
    off = d - torch.diag(torch.diagonal(d))
    assert off.norm() / d.norm() < 1e-3
    # ...and singular values pushed near 1: after 5 steps the quintic leaves them in about
    # [0.68, 1.2] once they started above ~1e-2 of the Frobenius norm (the smallest singular value
    # of a 96x128 Gaussian is ~0.016 of it, of 64x256 ~0.065); checked with a little slack.
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.65 and sv.max() < 1.25, (sv.min(), sv.max())
    assert (o - u @ vh).norm() / (u @ vh).norm() < 0.3


def test_newton_schulz_zero_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(8, 16)), torch.zeros(8, 16))


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4, 1, 3))])


def test_muon_step_is_scaled_orthogonal_update():
    """First step, no momentum history: p -= lr * sqrt(max(1, rows/cols)) * NS(g) (Nesterov)."""
    p = nn.Parameter(torch.randn(32, 8))
    p.grad = torch.randn(32, 8)
    before = p.detach().clone()
    Muon([p], lr=0.1, momentum=0.9).step()
    # Nesterov on a fresh buffer: update = g + 0.9 * (0.1 g - g) = 0.19 g, a positive multiple
    expected = before - 0.1 * 2.0 * newton_schulz(0.19 * p.grad)
    torch.testing.assert_close(p.detach(), expected)


# -- parameter split -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,overrides", [
    ("transformer", {}), ("samba", {}), ("lrt", {}),
    ("sambay", {"differential_attention": True, "tie_word_embeddings": True}),
])
def test_split_covers_every_parameter_once(arch, overrides):
    model = _model(arch, **overrides)
    groups = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}  # shared tensors listed once
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == set(names)
    named = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == bool(overrides.get("tie_word_embeddings"))
    assert named["head"] == {"model.embed_tokens.weight" if tied else "lm_head.weight"}
    assert named["embed"] == (set() if tied else {"model.embed_tokens.weight"})
    for p in groups["matrix"]:
        assert p.ndim == 2 and names[id(p)].endswith(".weight") and "norm" not in names[id(p)]
    assert all(".layers." in n or n == "model.feedback.0.weight" for n in named["matrix"])
    # Every non-linear-map parameter is a "vector", whatever its shape (A_log is 2-D, conv 3-D).
    for n in names.values():
        if any(k in n for k in ("A_log", ".D", "conv1d", "norm", "bias", "gamma", "lambda")):
            assert n in named["vector"], n
    # Both optimizers together hold exactly these parameters.
    for kind in ("muon", "adamw"):
        opt = build_optimizer(model, kind)
        held = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(held) == sorted(ids)
        if kind == "muon":
            muon = [id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]]
            assert muon == [id(p) for p in groups["matrix"]]


def test_lr_scale_and_group_names():
    opt = build_optimizer(_model("sambay"), lr_mult=2.0, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"matrix", "embed", "head", "vector"}
    assert groups["matrix"]["lr"] == pytest.approx(0.04)  # Muon lr 0.02 * lr_mult, no width factor
    assert groups["matrix"]["weight_decay"] == 0.1 and groups["embed"]["weight_decay"] == 0.0
    width_scale = (64 / 768) ** -0.5  # the AdamW lrs are tuned for width 768
    assert groups["head"]["lr"] == pytest.approx(0.004 * 2.0 * width_scale)
    opt.lr_scale(0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.25 * g["initial_lr"])
    with pytest.raises(ValueError, match="kind"):
        build_optimizer(_model("sambay"), "sgd")


# -- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_overfits_one_batch(kind):
    model = _model("sambay")
    batch = torch.randint(0, model.config.vocab_size, (2, 32))
    losses = _train(model, build_optimizer(model, kind), [batch] * 30, 0, 30)
    # Random tokens: ln(512) = 6.24 at the start; memorising 64 tokens takes it far below.
    assert losses[0] > 6.0 and losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_resume_is_bitwise_exact(kind):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(6)]
    model = _model("sambay")
    opt = build_optimizer(model, kind, weight_decay=0.1)
    _train(model, opt, batches, 0, 6)

    half = _model("sambay")
    half_opt = build_optimizer(half, kind, weight_decay=0.1)
    _train(half, half_opt, batches, 0, 3)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optim": half_opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = _model("sambay", seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state["model"])
    resumed_opt = build_optimizer(resumed, kind, weight_decay=0.1)
    resumed_opt.load_state_dict(state["optim"])
    _train(resumed, resumed_opt, batches, 3, 6)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match="optimizer state"):
        build_optimizer(resumed, "adamw" if kind == "muon" else "muon").load_state_dict(
            state["optim"])


# -- schedule and clipping -------------------------------------------------------------------------

def test_wsd_schedule():
    f = lambda step, **kw: wsd_schedule(step, total=100, warmup=10, **kw)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == 1.0
    assert f(10) == f(50) == f(80) == 1.0  # stable until the last 20% (decay_fraction=0.2)
    assert f(90) == pytest.approx(0.5) and f(99) == pytest.approx(0.05) and f(100) == 0.0
    assert f(90, floor=0.1) == pytest.approx(0.55) and f(100, floor=0.1) == pytest.approx(0.1)
    assert wsd_schedule(0, total=100, warmup=0) == 1.0
    # Warmup and decay overlapping: the smaller ramp wins.
    assert wsd_schedule(7, total=10, warmup=10, decay_fraction=0.5) == pytest.approx(0.6)
    assert wsd_schedule(50, total=100, warmup=0, decay_fraction=0.0) == 1.0


# -- FSDP2 -----------------------------------------------------------------------------------------

FSDP_WORKER = textwrap.dedent("""
    import copy, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import hybrid_lm
    from hybrid_lm.train.optim import build_optimizer, split_params, wsd_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    open(os.path.join(sys.argv[1], f"started{rank}"), "w").close()
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    ref = hybrid_lm.build(hybrid_lm.config("sambay", "tiny"))
    model, init = copy.deepcopy(ref), copy.deepcopy(ref)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opts = [build_optimizer(m, "muon", weight_decay=0.1) for m in (ref, model)]
    g = torch.Generator().manual_seed(0)
    steps = 4
    for step in range(steps):
        batch = torch.randint(0, 512, (4, 16), generator=g)
        # reference: this process alone on the whole batch; sharded: each rank on its half
        for m, opt, x in ((ref, opts[0], batch), (model, opts[1], batch.chunk(2)[rank])):
            opt.lr_scale(wsd_schedule(step, steps, warmup=1))
            m(x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)  # FSDP2: reduces each shard's norm across ranks
            opt.step()
            opt.zero_grad()
    # Muon matrices must match to fp32 noise. AdamW's per-element normalisation turns the rounding
    # differences of reduce-scatter vs one process's gradient sum into larger ones where a
    # gradient entry is tiny (eps=1e-10), hence the looser bound on its parameters.
    muon_ids = {id(p) for p in split_params(model)["matrix"]}
    worst = {"muon": 0.0, "adamw": 0.0}
    for a, b, c in zip(model.parameters(), ref.parameters(), init.parameters()):
        key = "muon" if id(a) in muon_ids else "adamw"
        worst[key] = max(worst[key], (a.full_tensor() - b).abs().max().item())
        assert not torch.equal(b, c) or b.ndim < 2  # every matrix was actually trained
    print(f"rank {rank}: max |fsdp - single| muon {worst['muon']:.1e} adamw {worst['adamw']:.1e}")
    assert worst["muon"] < 1e-5 and worst["adamw"] < 2e-4, worst
    dist.destroy_process_group()
""")


def test_fsdp2_muon_matches_single_process(tmp_path):
    """Two gloo ranks with FSDP2-sharded (DTensor) params follow the single-process run: Muon's
    full-matrix Newton-Schulz on gathered gradients, AdamW and clipping on shards."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session, so that on a timeout the launcher and both workers are ended together.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, start_new_session=True)
    try:
        output = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] + "\n(timed out after 120 s)"
    if not all((tmp_path / f"started{rank}").exists() for rank in (0, 1)):
        pytest.skip(f"torchrun could not start two gloo ranks:\n{output[-2000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert output.count("max |fsdp - single|") == 2, output[-2000:]
