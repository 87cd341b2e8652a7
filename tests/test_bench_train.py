"""The training-step benchmark at its quick setup: tiny models, one subprocess per (arch, mode).
Compiling on a CPU (inductor, through gcc) is the slow part: about 20 s with a warm inductor
cache, 2 minutes cold, so only the Transformer runs, in the default modes."""
import argparse
import json

from hybrid_lm.bench import train as bench
from hybrid_lm.bench.common import device_slug


def run(tmp_path, monkeypatch, *argv: str) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # the children inherit it: tiny models gain nothing from threads, which only add noise on a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = bench.run(parser.parse_args(["--quick", "--out", str(tmp_path), *argv]))
    return rc, json.loads((tmp_path / f"train-{device_slug()}.json").read_text())


def test_quick_run_writes_a_row_per_mode_ratios_and_png(tmp_path, monkeypatch):
    rc, data = run(tmp_path, monkeypatch, "--archs", "transformer")
    rows = {(r["arch"], r["mode"]): r for r in data["rows"]}
    assert rc == 0, [r["error"] for r in data["rows"]]
    assert list(rows) == [("transformer", m) for m in bench.DEFAULT_MODES]
    for r in rows.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["params"] > 0
        assert r["seq_len"] == 32 and r["batch"] == 2 and r["steps"] == 2 and r["first_step_s"] > 0
        if data["meta"]["peak_kind"] == "rss":  # the child's own peak RSS, in bytes
            assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= r["base_bytes"] > 0
    assert data["step_time_vs_transformer"]["eager"]["transformer"] == 1.0
    assert data["compiled_vs_eager"]["transformer"] > 0
    assert set(data["checkpointed_vs_eager"]["transformer"]) == {"step_time", "peak_memory", "peak_above_base"}
    assert data["checkpointed_vs_eager"]["transformer"]["peak_memory"] > 0
    stem = tmp_path / f"train-{device_slug()}"
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 1 + len(rows)
    assert stem.with_suffix(".png").stat().st_size > 0


def test_a_child_past_its_timeout_becomes_an_error_row(tmp_path, monkeypatch):
    rc, data = run(tmp_path, monkeypatch, "--archs", "transformer", "lrt", "--modes", "eager", "--timeout", "0.01")
    assert rc == 1
    assert [(r["arch"], r["mode"], r["status"]) for r in data["rows"]] == [("transformer", "eager", "error"),
                                                                           ("lrt", "eager", "error")]
    assert all("timed out after 0.01 s" in r["error"] for r in data["rows"])
    assert data["lrt_vs_transformer"] == {"eager": None}


def test_unknown_mode_is_refused(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--modes", "eager,fast", "--out", str(tmp_path)])) == 2
    assert "--modes: unknown fast" in capsys.readouterr().err


def test_cli_lists_train_benchmark():
    from hybrid_lm.cli import build_parser
    args = build_parser().parse_args(["bench", "train", "--quick", "--archs", "transformer", "--modes", "eager"])
    assert args.run is bench.run and args.quick and args.modes == ["eager"]
