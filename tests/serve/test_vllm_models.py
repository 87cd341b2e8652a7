"""vLLM (CPU, through our plugin) against transformers: greedy tokens equal, for every arch, on a
compiled engine (vLLM's default, enforce_eager=False) with hybrid-lm's own engine arguments, as
the benchmarks and the RL trainer run it. Eager engines are covered by the row-counting tests."""
from __future__ import annotations

import gc

import pytest
import torch

import hybrid_lm

from serving import ENGINE_ARGS, hf_greedy, tiny_checkpoint, vllm_greedy

ARCHS = ["transformer", "samba", "sambay", "sambay-da", "lrt"]
# prompts of 1 to 45 tokens; 40 generated tokens cross the tiny window (16) from every start
LENGTHS = [1, 5, 23, 45]
# the transformer gets a window too, so every arch's windowed attention is exercised
OVERRIDES = {"transformer": {"sliding_window": 16}}


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tmp_path_factory):
    from vllm import LLM

    from hybrid_lm.serve import engine_args

    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    model = tiny_checkpoint(path, arch, **OVERRIDES.get(arch, {}))
    # a small token budget splits long prompts into chunks and mixes prefill chunks with decodes
    # (LRT's config hook turns chunking off and raises the budget: its prompts stay whole)
    llm = LLM(str(path), skip_tokenizer_init=True, max_num_batched_tokens=32,
              **{**ENGINE_ARGS, "enforce_eager": False, **engine_args(path)})
    yield arch, path, model, llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def test_engine_is_compiled_with_our_arguments(served):
    """Compiled (LRT is served eagerly whatever is asked: its config hook says why), with fast
    prefill for SambaY."""
    arch, _, _, llm = served
    config = llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager == (arch == "lrt")
    assert config.cache_config.kv_sharing_fast_prefill == arch.startswith("sambay")


def test_greedy_equals_transformers(served):
    arch, _, model, llm = served
    prompts = prompts_of(LENGTHS)
    n = [40] * len(prompts)
    assert vllm_greedy(llm, prompts, n) == hf_greedy(model, prompts, n)


def test_requests_of_different_lengths_share_the_engine(served):
    """Different prompt and output lengths in one engine: requests join and leave the batch."""
    arch, _, model, llm = served
    prompts = prompts_of([30, 2, 17, 9, 44, 3], seed=2)
    n = [7, 33, 1, 20, 12, 26]
    assert vllm_greedy(llm, prompts, n) == hf_greedy(model, prompts, n)


def test_update_weights_serves_the_new_policy(served, tmp_path):
    """After update_weights with another checkpoint's weights, vLLM serves that checkpoint;
    partial, repeated updates are in place and idempotent; bad names or shapes are refused."""
    from hybrid_lm.serve import update_weights

    arch, path, model, llm = served
    other = tiny_checkpoint(tmp_path / "other", arch, seed=7, **OVERRIDES.get(arch, {}))
    prompts, n = prompts_of([6, 19], seed=3), [24, 24]
    update_weights(llm, other.state_dict())
    assert vllm_greedy(llm, prompts, n) == hf_greedy(other, prompts, n)
    # a partial stream (one layer's MLP back to the original), twice
    partial = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.1.mlp.")}
    mixed = hybrid_lm.build(other.config).eval()
    mixed.load_state_dict({**other.state_dict(), **partial})
    for _ in range(2):
        assert sorted(update_weights(llm, partial.items())) == sorted(partial)
    assert vllm_greedy(llm, prompts, n) == hf_greedy(mixed, prompts, n)
    with pytest.raises(ValueError, match="model.layers.0.nope"):
        update_weights(llm, {"model.layers.0.nope": torch.zeros(3)})
    with pytest.raises(ValueError, match="model.final_layernorm.weight.*expected shape"):
        update_weights(llm, {"model.final_layernorm.weight": torch.zeros(3)})
    update_weights(llm, model.state_dict())  # back to the module's checkpoint for later tests
