"""The released format served by vLLM (CPU) through our plugin: strict loading, and greedy
tokens equal to transformers' on the same checkpoint."""
from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("vllm")

from release import damaged  # noqa: E402
from release import release_config, release_tensors, write_release  # noqa: E402
from serving import ENGINE_ARGS, hf_greedy, vllm_greedy  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hybrid_lm  # noqa: E402,F401  (registers phi4flash with transformers)


def test_vllm_greedy_equals_transformers(tmp_path):
    from vllm import LLM

    write_release(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [1, 6, 23, 45]  # 30 generated tokens cross the window (16) from every start
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    n = [30] * len(prompts)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, max_num_batched_tokens=32, **ENGINE_ARGS)
    try:
        assert llm.llm_engine.model_config.architecture == "Phi4FlashForCausalLM"
        assert vllm_greedy(llm, prompts, n) == hf_greedy(model, prompts, n)
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("damage", ["missing", "wrong shape"])
def test_vllm_loading_is_strict(tmp_path, monkeypatch, damage):
    """A release checkpoint missing a tensor, or holding one of the wrong shape, fails naming it."""
    from vllm import LLM

    name = "model.layers.3.attn.inner_cross_attn.lambda_k2" if damage == "missing" else "model.layers.7.attn.Wqkv.bias"
    write_release(tmp_path, tensors=damaged(release_tensors(release_config()), damage, name))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process, so the loader's error reaches us
    with pytest.raises(Exception, match=name.replace(".", r"\.")):
        LLM(str(tmp_path), skip_tokenizer_init=True, **ENGINE_ARGS)


def test_vllm_serves_the_stored_bf16(tmp_path):
    """With no dtype given vLLM serves the release's bf16 (A_log and lambdas stay fp32 in the
    model), and its greedy tokens follow transformers' bf16 forward."""
    from vllm import LLM

    write_release(tmp_path, seed=4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    args = {**ENGINE_ARGS}
    del args["dtype"]
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, **args)
    try:
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
        assert vllm_greedy(llm, [prompt], [12]) == hf_greedy(model, [prompt], [12])
    finally:
        del llm
        gc.collect()
