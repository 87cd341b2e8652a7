"""Distillation on the CPU: the chunked losses equal naive full computations, the sparse top-k KL
equals the dense one when k = vocab, online and top-k runs lower the student's KL to a fixed
random teacher on held-out rows, a vocabulary mismatch is refused, and sequence mode trains only
on completion tokens."""
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hybrid_lm
from hybrid_lm.train import data, distill, losses, pretrain

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than with the threads fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--sample", "0",
         "--warmup", "2", "--log-every", "5", "--optimizer", "adamw", "--chunk-tokens", "48"]


def naive_kl(s, t, T):
    p, log_p, log_q = F.softmax(t / T, -1), F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    return (p * (log_p - log_q)).sum(-1).mean() * T * T


def naive_jsd(s, t, T, beta):
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    m = beta * p + (1 - beta) * q
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)).mean() * T * T


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_kd_loss_matches_naive(chunk):
    torch.manual_seed(0)
    s = torch.randn(3, 5, 50, dtype=torch.float64).mul(3).requires_grad_()
    t = torch.randn(3, 5, 50, dtype=torch.float64).mul(3)
    for T in (1.0, 2.5):
        got = losses.kd_loss(s, t, T, "kl", chunk_tokens=chunk)
        want = naive_kl(s, t, T)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        g1, = torch.autograd.grad(got, s)
        g2, = torch.autograd.grad(want, s)
        assert torch.allclose(g1.double(), g2, atol=1e-6)
        for beta in (0.1, 0.5, 0.9):
            assert losses.kd_loss(s, t, T, "jsd", beta, chunk_tokens=chunk).item() == pytest.approx(
                naive_jsd(s, t, T, beta).item(), rel=1e-5)
    # the limits of the generalized JSD: forward KL at beta 0, reverse KL at beta 1
    assert losses.kd_loss(s, t, 1.0, "jsd", 0.0, chunk_tokens=chunk).item() == pytest.approx(naive_kl(s, t, 1).item(), rel=1e-5)
    assert losses.kd_loss(s, t, 1.0, "jsd", 1.0, chunk_tokens=chunk).item() == pytest.approx(naive_kl(t, s, 1).item(), rel=1e-5)
    # a mask averages over the kept tokens only
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2:] = True
    assert losses.kd_loss(s, t, 1.0, mask=mask, chunk_tokens=chunk).item() == pytest.approx(
        naive_kl(s[1, 2:], t[1, 2:], 1).item(), rel=1e-5)


def test_sparse_kd_loss():
    torch.manual_seed(1)
    V = 40
    s = torch.randn(2, 6, V).mul(2).requires_grad_()
    t = torch.randn(2, 6, V).mul(2)
    for T in (1.0, 2.0):
        lp = F.log_softmax(t / T, -1)
        top = lp.topk(V, -1)  # k = V: the dense KL
        got = losses.sparse_kd_loss(s, top.indices, top.values, T, chunk_tokens=5)
        want = losses.kd_loss(s, t, T)
        assert got.item() == pytest.approx(want.item(), rel=1e-4)
        g1, = torch.autograd.grad(got, s)
        g2, = torch.autograd.grad(want, s)
        assert torch.allclose(g1, g2, atol=1e-5)
        assert torch.isfinite(g1).all()
        # k < V: the exact KL between the (k + 1)-bucket distributions (top k plus "other")
        k = 5
        top = lp.topk(k, -1)
        log_q = F.log_softmax(s / T, -1)
        p_k, q_k = top.values.exp(), log_q.gather(-1, top.indices).exp()
        p_o, q_o = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
        want = ((p_k * (p_k.log() - q_k.log())).sum(-1) + p_o * (p_o.log() - q_o.log())).mean() * T * T
        assert losses.sparse_kd_loss(s, top.indices, top.values, T).item() == pytest.approx(want.item(), rel=1e-4)
        assert want.item() <= losses.kd_loss(s, t, T).item() + 1e-6  # a lower bound of the full KL


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a fixed random teacher (a tiny transformer with a sharpened head, so its
    distribution is far from the student's) and an initial student, saved as checkpoints."""
    root = tmp_path_factory.mktemp("distill")
    tokenizer = data.train_tokenizer(data.load_documents(None, "train")[:200], 512)
    overrides = dict(vocab_size=len(tokenizer), head_dim=None, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(123)
    teacher = hybrid_lm.build(hybrid_lm.config("transformer", "tiny", num_hidden_layers=2, **overrides))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(0)
    student = hybrid_lm.build(hybrid_lm.config("transformer", "tiny", num_hidden_layers=2, **overrides))
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root, tokenizer


def val_kl(student_dir, root, tokenizer) -> float:
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = distill.load_teacher(str(root / "teacher"), torch.device("cpu"))
    return distill.evaluate_kl(student, teacher, tokenizer, data.load_documents(None, "val"), 32,
                               torch.device("cpu"), 4, 4)


def run(*args) -> None:
    """`hybrid-lm distill`; --debug: an error raises, for pytest.raises."""
    assert distill.main([*SMALL, *map(str, args), "--debug"]) == 0


def test_online_distillation_lowers_kl(tmp_path, setup):
    root, tokenizer = setup
    out = tmp_path / "online"
    run("--teacher", root / "teacher", "--student", root / "student", "--mode", "logits", "--kd-weight", "0.9",
        "--max-steps", "150", "--eval-every", "150", "--out", out)
    before, after = val_kl(root / "student", root, tokenizer), val_kl(out, root, tokenizer)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_kl"] == pytest.approx(after, rel=0.2) and "val_bpb" in rows[-1]
    # the run resumes from its checkpoint and continues
    run("--teacher", root / "teacher", "--student", root / "student", "--mode", "logits", "--kd-weight", "0.9",
        "--max-steps", "155", "--eval-every", "155", "--out", out, "--resume")
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 155


def test_packed_and_per_document_teacher_logits_agree(setup):
    root, tokenizer = setup
    teacher = distill.load_teacher(str(root / "teacher"), torch.device("cpu"))
    docs = ["import os\n", "x = 1\ny = 2\n", "def f(a):\n    return a + 1\n"] * 20
    rows = data.PackedRows(docs, tokenizer, 32, shuffle=False)
    inputs, _, cu = rows.batch(4)
    assert any(len(c) > 2 for c in cu)  # some row holds more than one document
    packed = pretrain.model_logits(teacher, inputs, cu, packed=True)
    separate = pretrain.model_logits(teacher, inputs, cu, packed=False)
    assert torch.allclose(packed, separate, atol=1e-4)


def test_topk_distillation_from_cache_lowers_kl(tmp_path, setup):
    root, tokenizer = setup
    out, cache = tmp_path / "topk", tmp_path / "cache"
    run("--teacher", root / "teacher", "--student", root / "student", "--mode", "topk", "--topk", "64",
        "--cache", cache, "--cache-rows", "256", "--kd-weight", "1.0", "--max-steps", "150", "--eval-every", "150",
        "--out", out)
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == 64 and index["written_rows"] == 256
    from safetensors.torch import load_file
    shard = load_file(str(cache / index["shards"][0]))
    assert shard["topk_ids"].shape == (256, 32, 64) and shard["tokens"].shape == (256, 33)
    # the cache matches the teacher's log-probs
    teacher = distill.load_teacher(str(root / "teacher"), torch.device("cpu"))
    rows = distill.TopkRows(cache)
    inputs, _, cu, ids, lps = rows.batch(2)
    lp = F.log_softmax(pretrain.model_logits(teacher, inputs, cu), -1)
    assert torch.allclose(lp.gather(-1, ids.long()), lps, atol=1e-4)
    before, after = val_kl(root / "student", root, tokenizer), val_kl(out, root, tokenizer)
    assert after < 0.7 * before, (before, after)
    # written once: a second run reuses the shards as they are
    mtime = (cache / index["shards"][0]).stat().st_mtime_ns
    run("--teacher", root / "teacher", "--student", root / "student", "--mode", "topk", "--topk", "64",
        "--cache", cache, "--cache-rows", "256", "--max-steps", "2", "--eval-every", "100", "--out", tmp_path / "again")
    assert (cache / index["shards"][0]).stat().st_mtime_ns == mtime


def test_vocabulary_mismatch_raises(tmp_path, setup):
    root, tokenizer = setup
    other = hybrid_lm.build(hybrid_lm.config("transformer", "tiny", num_hidden_layers=1, vocab_size=len(tokenizer) + 8))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        run("--teacher", tmp_path / "other", "--tokenizer", root / "teacher", "--arch", "transformer",
            "--max-steps", "1", "--out", tmp_path / "out")
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distill.check_vocab(other, student)
    with pytest.raises(ValueError, match="vocabularies must match"):
        losses.kd_loss(torch.zeros(2, 10), torch.zeros(2, 12))


def test_completion_mask():
    pairs = [([5, 6, 7], [8, 9, 0]), ([1, 2], [3]), ([4] * 10, [2, 2])]
    inputs, targets = distill.completion_rows(pairs, seq_len=6, pad_id=0)
    I = losses.IGNORE
    assert inputs.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 0, 0, 0, 0], [4] * 6]
    assert targets.tolist() == [[I, I, 8, 9, 0, I], [I, 3, I, I, I, I], [I] * 6]
    # the loss counts the completion targets only
    logits = torch.randn(3, 6, 10, requires_grad=True)
    loss = losses.ce_loss(logits, targets, chunk_tokens=4)
    keep = targets != I
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-5)
    g, = torch.autograd.grad(loss, logits)
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"))])
def test_sequence_distillation_runs(tmp_path, setup, engine):
    """--mode sequence end to end, the teacher's completions generated by transformers or by
    hybrid-lm's vLLM engine (the GPU default; here vLLM for the CPU): every completion is the
    teacher's greedy continuation, and the student trains on them."""
    root, tokenizer = setup
    teacher_dir = root / "teacher"
    if engine == "vllm":  # vLLM's CPU attention takes head sizes of 32 and up: the tiny preset's, not 16
        teacher_dir = tmp_path / "teacher32"
        torch.manual_seed(123)
        teacher32 = hybrid_lm.build(hybrid_lm.config("transformer", "tiny", num_hidden_layers=2,
                                                     vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                                     bos_token_id=tokenizer.eos_token_id,
                                                     pad_token_id=tokenizer.eos_token_id))
        with torch.no_grad():
            teacher32.lm_head.weight.mul_(8.0)
        teacher32.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "seq"
    run("--teacher", teacher_dir, "--arch", "sambay", "--mode", "sequence", "--num-prompts", "6",
        "--prompt-tokens", "8", "--gen-tokens", "12", "--max-steps", "10", "--eval-every", "10", "--out", out,
        "--gen-engine", engine)
    pairs = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and all(len(p["prompt"]) == 8 and 0 < len(p["completion"]) <= 12 for p in pairs)
    teacher = distill.load_teacher(str(teacher_dir), torch.device("cpu"))
    for p in pairs:  # greedy completions are the teacher's own, stopping at eos
        ids = torch.tensor([p["prompt"] + p["completion"]])
        with torch.no_grad():
            logits = teacher(ids).logits[0, len(p["prompt"]) - 1:-1]
        assert logits.argmax(-1).tolist() == p["completion"]
        assert tokenizer.eos_token_id not in p["completion"][:-1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > rows[-1]["loss"]
    assert AutoModelForCausalLM.from_pretrained(out).config.arch == "sambay"
