"""`make demo`'s pipeline on a small budget: two pretrained checkpoints, both served by vLLM, one
comparison; a second run reuses the finished training."""
from __future__ import annotations

import json

from hybrid_lm import demo

SMALL = ["--steps", "3", "--sessions", "2", "--turns", "2", "--obs-tokens", "24", "--action-tokens", "4", "--eager"]


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *SMALL]) == 0
    result = json.loads((out / "demo.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"sambay", "transformer"}
    for r in rows.values():
        assert r["status"] == "ok" and r["val_bpb"] > 0 and r["rollout_tokens_per_s"] > 0
        assert r["peak_state_bytes"] > 0 and len(r["loss_curve"]) >= 1
    # the same size: parameter counts within 20% of each other
    params = [r["params"] for r in rows.values()]
    assert max(params) < 1.2 * min(params)
    assert (out / "demo.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "rollout tok/s" in printed and "demo.png" in printed
    # rerun: the finished training runs are reused, not retrained
    metrics = (out / "sambay" / "metrics.jsonl").read_text()
    demo.train("sambay", out / "sambay", 3)
    assert (out / "sambay" / "metrics.jsonl").read_text() == metrics
    assert "resuming" in capsys.readouterr().out
