"""The training-step benchmark at its quick setup (tiny models, a few seconds)."""
import argparse
import json

import torch

from hybrid_lm.bench import train as bench


def test_quick_run_writes_rows_ratio_and_png(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads, which only add noise on a busy machine
    try:
        rc = bench.run(parser.parse_args(["--quick", "--out", str(tmp_path)]))
    finally:
        torch.set_num_threads(threads)
    stem = tmp_path / f"train-{bench.device_slug()}"
    data = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["arch"]: r for r in data["rows"]}
    assert rc == 0, [r["error"] for r in data["rows"]]
    assert list(rows) == list(bench.DEFAULT_ARCHS)
    for r in rows.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["params"] > 0
        assert r["seq_len"] == 32 and r["batch"] == 2 and r["steps"] == 2
    assert data["step_time_vs_transformer"]["transformer"] == 1.0
    assert data["lrt_vs_transformer"] > 0
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 1 + len(rows)
    assert stem.with_suffix(".png").stat().st_size > 0


def test_cli_lists_train_benchmark():
    from hybrid_lm.cli import build_parser
    args = build_parser().parse_args(["bench", "train", "--quick", "--archs", "transformer"])
    assert args.run is bench.run and args.quick
