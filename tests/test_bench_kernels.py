"""The kernel benchmark on the CPU: references only, tiny sizes, plain PyTorch (no Triton interpreter)."""
import argparse
import importlib.util
import json
import types

import pytest
import torch

from hybrid_lm.bench import kernels as bench
from hybrid_lm.bench.common import device_slug
from hybrid_lm.kernels import reference

ROW_FIELDS = {"op", "pass", "impl", "sizes", "dtype", "status", "time_ms", "bytes", "gbps", "frac_copy_bw",
              "tflops", "rel_err", "error", "note"}
META_FIELDS = {"device", "device_slug", "torch", "triton", "python", "cuda", "baselines", "copy_gbps", "dtype",
               "bytes_models", "timing"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: on a GPU the full benchmark runs instead")
def test_cpu_quick_run_writes_rows_json_and_png(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick", "--out", str(tmp_path), "--dtype", "fp32"])) == 0

    stem = tmp_path / f"kernels-{device_slug()}"
    result = json.loads(stem.with_suffix(".json").read_text())
    meta, rows = result["meta"], result["rows"]
    assert META_FIELDS <= meta.keys()
    assert meta["copy_gbps"] > 0
    assert set(meta["bytes_models"]) == set(bench.OPS)
    assert {r["op"] for r in rows} == set(bench.OPS)
    for r in rows:
        assert ROW_FIELDS <= r.keys(), r
        assert r["status"] == "ok", r
        assert r["impl"] == "reference"  # on a CPU only the references run
        assert r["time_ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0 and r["frac_copy_bw"] > 0
    assert {r["pass"] for r in rows if r["op"] == "selective_scan"} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["pass"] for r in rows if r["op"] == "selective_state_update"} == {"decode"}
    assert all(r["tflops"] > 0 for r in rows if r["op"] == "interleaved_attention")

    # the JSONL streams the same rows after a meta line, so a run cut off still leaves results
    lines = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert lines[0]["meta"]["device"] == meta["device"] and lines[1:] == rows
    png = stem.with_suffix(".png")
    if importlib.util.find_spec("matplotlib"):
        assert png.stat().st_size > 0
    else:
        assert not png.exists()


@pytest.mark.parametrize("quick", [True, False])
def test_bytes_models_are_positive_for_every_size_and_pass(quick):
    for op, spec in bench.OPS.items():
        for s in spec.sizes(quick):
            nbytes = spec.bytes(s, 2)
            assert set(nbytes) == ({"decode"} if spec.passes == bench.DECODE else {"fwd", "bwd"}), op
            assert all(b > 0 for b in nbytes.values()), (op, s)
            assert spec.flops is None or all(f > 0 for f in spec.flops(s).values())


def _fake_baselines() -> dict:
    """Stand-ins for mamba-ssm and causal-conv1d with their documented [B, D, T] / [B, N, T] layouts,
    computed by our reference, so the benchmark's layout conversions can be checked on a CPU."""
    def t(x):
        return None if x is None else x.transpose(1, 2)

    def conv_fn(x, weight, bias=None, activation=None):
        assert x.stride(1) == 1, "the benchmark passes causal-conv1d a channel-last view"
        return t(reference.causal_conv1d(t(x), weight, bias, activation))

    def scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        assert u.shape[1] == A.shape[0] and B.shape[1] == A.shape[1] and u.is_contiguous()
        return t(reference.selective_scan(t(u), t(delta), A, t(B), t(C), D, t(z), delta_bias, delta_softplus))

    return {
        "causal_conv1d": types.SimpleNamespace(causal_conv1d_fn=conv_fn,
                                               causal_conv1d_update=reference.causal_conv1d_update),
        "mamba_ssm.ops.selective_scan_interface": types.SimpleNamespace(selective_scan_fn=scan_fn),
        "mamba_ssm.ops.triton.selective_state_update": types.SimpleNamespace(
            selective_state_update=reference.selective_state_update),
    }


def test_every_implementation_computes_the_reference_in_our_layout(monkeypatch):
    """The GPU's implementation set, run on a CPU: 'ours' dispatches to the reference there, the
    baselines are layout-faithful fakes and SDPA is torch's. Outputs brought back to our layout
    must match the reference, and gradients must flow to the leaves the timing differentiates."""
    fakes = _fake_baselines()
    monkeypatch.setattr(bench, "optional_module", lambda name: (fakes[name], "fake"))
    device = torch.device("cpu")
    seen = set()
    for op, spec in bench.OPS.items():
        sizes = spec.sizes(True) + ([dict(B=2, T=32, H=4, Hkv=2, Dh=16, q_stride=1, window=None)]
                                    if op == "interleaved_attention" else [])
        for s in sizes:
            p = spec.inputs(s, device, torch.float32)
            impls = bench.impls_for(op, s, on_gpu=True)
            ref = bench.forward_output(impls["reference"], p)
            for name, impl in impls.items():
                seen.add(name)
                err = bench.rel_err(bench.forward_output(impl, p), ref)
                assert err < 1e-5, (op, s, name, err)
                if spec.passes != bench.DECODE:
                    q = impl.prepare(p)
                    leaves = [v for v in q.values() if isinstance(v, torch.Tensor) and v.requires_grad]
                    out = impl.forward(q)
                    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
                    assert all(g is not None and g.shape == x.shape for g, x in zip(grads, leaves))
    assert seen == set(bench.IMPL_ORDER)


def test_targets_read_met_missed_or_not_measured():
    def row(impl, ms, frac=0.5, **sizes):
        return {"op": "selective_scan", "pass": "fwd+bwd", "impl": impl, "sizes": sizes, "status": "ok",
                "time_ms": ms, "frac_copy_bw": frac}

    big = dict(B=8, T=4096, Dm=4096, N=16)
    assert "MET" in bench.check_targets([row("ours", 9.0, **big), row("mamba_ssm", 10.0, **big)])[0]
    assert "MISSED" in bench.check_targets([row("ours", 11.0, **big), row("mamba_ssm", 10.0, **big)])[0]
    decode = dict(row("ours", 0.05, frac=0.85, B=256, Dm=4096, N=16), op="selective_state_update", **{"pass": "decode"})
    lines = bench.check_targets([row("ours", 9.0, **big), decode])
    assert "not measured" in lines[0] and "MET" in lines[1] and "not measured" in lines[2]
