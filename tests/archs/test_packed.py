"""A packed batch (documents concatenated in one row, boundaries in cu_seqlens) gives each document
the logits it gets alone: attention stays inside a document, Mamba restarts, positions restart."""
import pytest
import torch

import hybrid_lm

ARCHS = ["transformer", "samba", "sambay", "sambay-da"]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_separate_runs(arch):
    cfg = hybrid_lm.config(arch)
    model = hybrid_lm.build(cfg).eval()
    lengths = [7, 1, 23, 12]  # past the tiny window of 16, and a one-token document
    docs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), cu_seqlens=cu).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_packed_gradients_flow_and_loss():
    cfg = hybrid_lm.config("sambay")
    model = hybrid_lm.build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 30))
    out = model(ids, labels=ids, cu_seqlens=torch.tensor([0, 10, 30], dtype=torch.int32))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bad,match", [
    (dict(ids=(2, 10)), "batch size 1"),
    (dict(cu=torch.tensor([0, 10])), "int32"),
    (dict(mask=True), "no attention_mask"),
])
def test_packed_rejects_bad_input(bad, match):
    model = hybrid_lm.build(hybrid_lm.config("transformer"))
    ids = torch.randint(0, 100, bad.get("ids", (1, 10)))
    cu = bad.get("cu", torch.tensor([0, 4, 10], dtype=torch.int32))
    mask = torch.ones_like(ids) if bad.get("mask") else None
    with pytest.raises(ValueError, match=match):
        model(ids, attention_mask=mask, cu_seqlens=cu)


def test_lrt_refuses_packed_documents():
    model = hybrid_lm.build(hybrid_lm.config("lrt"))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.randint(0, 100, (1, 10)), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
