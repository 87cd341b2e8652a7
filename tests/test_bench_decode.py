"""The decode benchmark at its quick sweep (tiny models, a few seconds), and its command line."""
import argparse
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import hybrid_lm
from hybrid_lm.bench import decode as bench
from hybrid_lm.bench.common import device_slug

META_FIELDS = {"device", "device_slug", "torch", "triton", "transformers", "python", "cuda", "dtype", "preset",
               "models", "prompt_len", "gen_len", "batch_sizes", "checkpoints", "window_steps", "decode_step",
               "timing"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One quick run of every default architecture; lrt may fail to build while it is written,
    which must leave an error row and no more."""
    out = tmp_path_factory.mktemp("decode")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # one thread: tiny models gain nothing from more, and on a busy machine threads waiting on each
    # other can make a tiny op take milliseconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench.run(parser.parse_args(["--quick", "--out", str(out)]))
    finally:
        torch.set_num_threads(threads)
    stem = out / f"decode-{device_slug()}"
    return rc, stem, json.loads(stem.with_suffix(".json").read_text())


def test_rows_have_every_field_and_positive_throughput(result):
    rc, stem, data = result
    meta, rows = data["meta"], data["rows"]
    assert META_FIELDS <= meta.keys()
    quick = bench.SWEEPS["quick"]
    assert (meta["preset"], meta["prompt_len"], meta["gen_len"]) == quick[:3]
    assert meta["decode_step"].startswith("eager")
    assert rc == int(any(r["status"] == "error" for r in rows))
    for r in rows:
        assert list(r) == list(bench.FIELDS), r
    ok = [r for r in rows if r["status"] == "ok"]
    for arch in ("transformer", "samba", "sambay"):
        mine = [r for r in ok if r["arch"] == arch]
        # every checkpoint at every batch size, in order
        assert [(r["batch"], r["generated"]) for r in mine] == [
            (b, g) for b in quick.batch_sizes for g in meta["checkpoints"]], arch
    lrt = [r for r in rows if r["arch"] == "lrt"]
    assert lrt and all(r["status"] == "ok" or r["error"] for r in lrt)
    for r in ok:
        assert r["tokens_per_s"] > 0 and r["cum_tokens_per_s"] > 0 and r["step_ms"] > 0 and r["prefill_s"] > 0
        assert r["cache_bytes"] > 0 and r["params"] > 0 and 1 <= r["window_steps"] <= r["generated"]

    # the JSONL streams the same rows after a meta line, so a run cut off still leaves results
    lines = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert lines[0]["meta"]["device"] == meta["device"] and lines[1:] == rows
    png = stem.with_suffix(".png")
    assert png.stat().st_size > 0 if importlib.util.find_spec("matplotlib") else not png.exists()


def _growth_per_token(rows, arch, batch) -> float:
    """Cache bytes added per generated token per sequence, between the first and last checkpoints."""
    mine = [r for r in rows if r["arch"] == arch and r["batch"] == batch and r["status"] == "ok"]
    first, last = mine[0], mine[-1]
    return (last["cache_bytes"] - first["cache_bytes"]) / (last["generated"] - first["generated"]) / batch


def test_cache_grows_per_token_and_sambay_slower_than_transformer(result):
    _, _, data = result
    rows, meta = data["rows"], data["meta"]
    # the quick prompt is longer than the sliding window: every windowed layer is full from the start
    assert meta["prompt_len"] > meta["models"]["sambay"]["sliding_window"]
    element = 2 if meta["dtype"] == "bfloat16" else 4
    tf = meta["models"]["transformer"]
    for batch in meta["batch_sizes"]:
        grown = [r["cache_bytes"] for r in rows if r["arch"] == "transformer" and r["batch"] == batch]
        assert grown == sorted(grown) and grown[0] < grown[-1]
        # every layer keeps K and V of every token
        assert _growth_per_token(rows, "transformer", batch) == (
            tf["num_hidden_layers"] * 2 * tf["num_key_value_heads"] * tf["head_dim"] * element)
        # SambaY's only growing cache is its one full-attention layer's
        assert 0 < _growth_per_token(rows, "sambay", batch) < _growth_per_token(rows, "transformer", batch)
        assert _growth_per_token(rows, "samba", batch) == 0


def test_summary_gives_the_sambay_over_transformer_ratio_at_the_longest_length(result):
    _, _, data = result
    summary = data["sambay_vs_transformer"]
    assert [s["batch"] for s in summary] == data["meta"]["batch_sizes"]
    for s in summary:
        assert s["generated"] == data["meta"]["gen_len"] and s["instant"] > 0 and s["cumulative"] > 0


def test_ratio_says_why_when_the_transformer_did_not_run():
    def row(arch, status, generated=None, tps=None, error=None):
        return {"arch": arch, "batch": 64, "prompt_len": 2048, "status": status, "generated": generated,
                "tokens_per_s": tps, "cum_tokens_per_s": tps, "error": error}

    rows = [row("sambay", "ok", 1024, 50.0), row("sambay", "ok", 2048, 40.0),
            row("transformer", "ok", 1024, 10.0), row("transformer", "error", error="OutOfMemoryError: ...")]
    (entry,) = bench.ratios(rows)
    assert entry["generated"] == 1024 and entry["instant"] == 5.0  # the longest length both reached
    (entry,) = bench.ratios([rows[0], row("transformer", "skipped", error="needs about 300 GB")])
    assert entry["generated"] is None and "needs about 300 GB" in entry["why"]
    assert "not measured" in bench.ratio_lines([entry])[0]


def test_unknown_arch_is_refused(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--archs", "transformer,gpt5"])) == 2
    assert "gpt5" in capsys.readouterr().err
    assert set(bench.DEFAULT_ARCHS) <= set(hybrid_lm.archs.ARCHS)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "hybrid_lm", "bench", "decode", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--archs", "--preset", "--batch-sizes", "--prompt-len", "--gen-len", "--quick", "--out"):
        assert option in out
