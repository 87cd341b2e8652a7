"""The vLLM benchmarks run end to end on the quick sizes and write their table, JSON and PNG
(eager engines: compiled ones are tested in test_vllm_models.py)."""
from __future__ import annotations

import argparse
import json

from hybrid_lm.bench import decode, rollout


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_rollout_quick(tmp_path, capsys):
    # observations longer than a block (128 tokens here), so the second turn has a cached prefix
    argv = ["--quick", "--eager", "--archs", "sambay", "--obs-tokens", "150", "--out", str(tmp_path)]
    assert rollout.run(_args(rollout, argv)) == 0
    result = json.loads(next(tmp_path.glob("rollout-*.json")).read_text())
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["prefix_caching"] is True and row["fast_prefill"] is True
    assert row["compiled"] is False
    assert row["rollout_tokens_per_s"] > 0 and 0 < row["latency_p50_s"] <= row["latency_p99_s"]
    assert len(row["turn_s"]) == result["meta"]["turns"] and row["peak_state_bytes"] > 0
    first, second = row["per_turn"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
    assert row["computed_prompt_tokens"] + row["cached_prompt_tokens"] == row["prompt_tokens"]
    assert second["prompt_tokens"] == 2 * (2 * 150 + 8)  # two sessions, two observations and one action each
    assert next(tmp_path.glob("rollout-*.png")).stat().st_size > 0
    assert "rollout tok/s" in capsys.readouterr().out


def test_decode_with_vllm_quick(tmp_path, capsys):
    """Decode rows, then the prefill point: SambaY with fast prefill on (hybrid-lm's default) and off."""
    args = _args(decode, ["--quick", "--engine", "vllm", "--eager", "--archs", "sambay", "--batch-sizes", "2",
                          "--out", str(tmp_path)])
    assert decode.run(args) == 0
    result = json.loads(next(tmp_path.glob("decode-vllm-*.json")).read_text())
    assert result["meta"]["engine"] == "vllm" and result["meta"]["prefill_len"] == decode.PREFILL_LEN["quick"]
    rows = result["rows"]
    assert [r["generated"] for r in rows] == decode.checkpoints(args.gen_len or decode.SWEEPS["quick"].gen_len)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 for r in rows)
    on, off = result["prefill_point"]
    assert (on["fast_prefill"], off["fast_prefill"]) == (True, False)
    for r in (on, off):
        assert r["status"] == "ok" and r["prompt_len"] == decode.PREFILL_LEN["quick"] and r["generated"] == 16
        assert 0 < r["first_token_s"] <= r["total_s"]
    assert result["fast_prefill_speedup"]["sambay"] == off["first_token_s"] / on["first_token_s"]
    assert "fast prefill" in capsys.readouterr().out
