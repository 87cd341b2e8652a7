"""Prefix caching for the hybrids in vLLM (CPU, through our plugin), on by default as vLLM has it.

Multi-turn sessions run through one engine: turn t appends an observation to each session's
history and generates an action, and every turn's greedy tokens must equal transformers' greedy
tokens on the whole history, while turns after the first are served from the cache (vLLM's
`num_cached_tokens`). Samba, SambaY, SambaY-DA and the released phi4flash format resume their
Mamba conv and SSM states from the block slots of vLLM's align mode; LRT is served without
caching and chunking (each prompt one forward) and must equal transformers all the same.

The SambaY engines run with hybrid-lm's engine arguments, so with vLLM's fast prefill: the
cross-decoder answers only for the rows vLLM samples from, and must still equal transformers.
"""
from __future__ import annotations

import gc

import pytest
import torch

from release import write_release
from serving import ENGINE_ARGS, count_rows, hf_greedy, rows_seen, tiny_checkpoint, vllm_greedy

from hybrid_lm.serve import engine_args

ARCHS = ["samba", "sambay", "sambay-da", "phi4flash"]
ACTION = 6  # generated tokens per turn
# a token budget below the block size: prompts run in chunks, some ending mid-block
BUDGET = 64


def load(path, arch: str, seed: int = 0):
    """A random tiny checkpoint of `arch` written at `path` (phi4flash: in the released format),
    and its transformers model."""
    if arch != "phi4flash":
        return tiny_checkpoint(path, arch, seed=seed)
    from transformers import AutoModelForCausalLM

    write_release(path, seed=seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine(path, **args):
    """An eager engine on the checkpoint at `path`, with hybrid-lm's engine arguments (fast prefill for SambaY)."""
    from vllm import LLM

    return LLM(str(path), skip_tokenizer_init=True,
               **{**ENGINE_ARGS, "max_model_len": 1024, **engine_args(path), **args})


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    model = load(path, arch)
    llm = engine(path, max_num_batched_tokens=BUDGET)
    yield arch, model, llm
    shutdown(llm)


def fast_prefill(llm) -> bool:
    return llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill


def block_size(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.block_size


def tokens(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, 512, (n,), generator=generator).tolist()


def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=ACTION, ignore_eos=True)


def play(llm, model, observations: list[list[list[int]]]) -> list[list[tuple[int, int]]]:
    """Run the sessions turn by turn (observations[s][t]: session s's observation at turn t; all
    sessions' turn t in one generate) and check each turn's tokens against transformers' greedy
    tokens on the whole history. Returns, per turn, each session's (history length before the
    turn's observation, num_cached_tokens)."""
    histories: list[list[int]] = [[] for _ in observations]
    report = []
    for t in range(len(observations[0])):
        before = [len(h) for h in histories]
        for h, obs in zip(histories, observations):
            h.extend(obs[t])
        outs = llm.generate([{"prompt_token_ids": h} for h in histories], greedy(), use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == hf_greedy(model, histories, [ACTION] * len(histories)), f"turn {t + 1}"
        report.append([(b, o.num_cached_tokens) for b, o in zip(before, outs)])
        for h, action in zip(histories, got):
            h.extend(action)
    return report


def assert_cached_histories(report, B: int) -> None:
    """From turn 2 on each session is served at least its previous history, rounded down to the block size."""
    for t, turn in enumerate(report[1:], start=2):
        for s, (before, cached) in enumerate(turn):
            assert cached >= before // B * B, f"turn {t}, session {s}: {cached} cached of {before}"
    assert sum(cached for turn in report[1:] for _, cached in turn) > 0


def test_prefix_caching_is_on_by_default(served):
    arch, _, llm = served
    config = llm.llm_engine.vllm_config.cache_config
    assert config.enable_prefix_caching and config.mamba_cache_mode == "align"
    assert fast_prefill(llm) == (arch != "samba")


def test_prompts_of_1_to_300_tokens_mixed_with_decodes(served):
    """Prompts of 1 to 300 tokens in one generate call under a 64-token budget: long prompts run in
    chunks while short requests already decode, so steps mix decode rows and prefill chunks (some
    ending mid-block); a second call repeats some prompts with a new ending (prefix-cache hits)."""
    _, model, llm = served
    g = torch.Generator().manual_seed(16)
    prompts = [tokens(n, g) for n in (1, 2, 9, 31, 64, 65, 127, 190, 300)]
    n = [12, 30, 5, 17, 1, 9, 22, 3, 8]
    assert vllm_greedy(llm, prompts, n) == hf_greedy(model, prompts, n)
    again = [p + tokens(7 + i, g) for i, p in enumerate(prompts[4:])]
    outs = llm.generate([{"prompt_token_ids": p} for p in again], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(model, again, [ACTION] * len(again))
    assert sum(o.num_cached_tokens for o in outs) > 0


def test_cross_decoder_runs_on_sampled_rows_only(served):
    """With fast prefill the cross-decoder sees exactly the rows the LM head samples from (one per
    request per step), while the self-decoder sees every scheduled token."""
    arch, model, llm = served
    if arch == "samba":
        pytest.skip("Samba has no cross-decoder")
    llm.apply_model(count_rows)
    g = torch.Generator().manual_seed(17)
    prompts, n = [tokens(m, g) for m in (250, 3, 120)], [4, 10, 6]
    assert vllm_greedy(llm, prompts, n) == hf_greedy(model, prompts, n)
    (seen,) = llm.apply_model(rows_seen)
    # every prompt token and every generated token but the last is fed once (no cache hit here)
    assert seen["self_decoder"] == sum(map(len, prompts)) + sum(n) - len(n)
    assert seen["cross_decoder"] == seen["logits"]
    # one row per request and step: a few dozen, against 390 without the skip
    assert seen["cross_decoder"] < seen["self_decoder"] / 4


def test_turns_equal_transformers_on_the_whole_history(served):
    """Three sessions of three turns whose histories end just before, just after and well past
    block boundaries (never on one: the last action token is not computed, so its block is not
    cached yet)."""
    _, model, llm = served
    B, g = block_size(llm), torch.Generator().manual_seed(11)
    lengths = [(B - 1 - ACTION, B // 2 + 3, B + 1), (B + 1, B - 9, 3), (2 * B - 3, 5, B - 2)]
    report = play(llm, model, [[tokens(n, g) for n in session] for session in lengths])
    assert all(cached == 0 for _, cached in report[0])
    assert_cached_histories(report, B)


def test_sessions_sharing_a_long_first_observation(served):
    """Four sessions open on the same long observation, then diverge; a fifth arriving later
    is served that observation from the cache."""
    _, model, llm = served
    B, g = block_size(llm), torch.Generator().manual_seed(12)
    first = tokens(2 * B + B // 3, g)
    report = play(llm, model, [[first, tokens(20 + 17 * s, g), tokens(B // 2 + s, g)] for s in range(4)])
    assert_cached_histories(report, B)
    (late,) = play(llm, model, [[first + tokens(9, g)]])
    assert late[0][1] >= len(first) // B * B


def test_update_weights_resets_the_cache(served, tmp_path):
    """After a weight push, the next turn is the new weights' output on the whole history, computed afresh."""
    from hybrid_lm.serve import update_weights

    arch, model, llm = served
    other = load(tmp_path, arch, seed=5)
    B, g = block_size(llm), torch.Generator().manual_seed(13)
    history = tokens(B + 40, g)
    (action,) = vllm_greedy(llm, [history], [ACTION])
    history += action + tokens(30, g)
    try:
        update_weights(llm, other.state_dict())
        outs = llm.generate([{"prompt_token_ids": history}], greedy(), use_tqdm=False)
        assert outs[0].num_cached_tokens == 0
        assert [list(outs[0].outputs[0].token_ids)] == hf_greedy(other, [history], [ACTION])
    finally:
        update_weights(llm, model.state_dict())  # back to the fixture's checkpoint for later tests


def test_eviction_keeps_outputs_exact(tmp_path):
    """A KV budget of a few blocks: sessions evict each other's cached blocks (and may be
    preempted); every turn still equals transformers. A budget above the block size but not a
    multiple of it makes the scheduler split prompts at block boundaries."""
    model = tiny_checkpoint(tmp_path, "sambay", seed=3)
    llm = engine(tmp_path, max_model_len=512, max_num_batched_tokens=200, num_gpu_blocks_override=24)
    try:
        B, g = block_size(llm), torch.Generator().manual_seed(14)
        report = play(llm, model, [[tokens(B + 10 * s + 7, g) for _ in range(3)] for s in range(3)])
        # somebody lost blocks it had cached: the last turn of some session hits less than its history
        assert any(cached < before // B * B for before, cached in report[-1])
    finally:
        shutdown(llm)


def test_lrt_prompts_are_whole_and_exact(tmp_path):
    """LRT: prefix caching and chunked prefill are turned off even when asked for, so a small
    token budget does not split a prompt, and every turn equals transformers on the whole history."""
    model = tiny_checkpoint(tmp_path, "lrt")
    llm = engine(tmp_path, max_num_batched_tokens=32, enable_prefix_caching=True)
    try:
        config = llm.llm_engine.vllm_config
        assert not config.cache_config.enable_prefix_caching and not config.scheduler_config.enable_chunked_prefill
        assert config.scheduler_config.max_num_batched_tokens >= 1024
        g = torch.Generator().manual_seed(15)
        report = play(llm, model, [[tokens(n, g) for n in (70, 45, 90)] for _ in range(2)])
        assert all(cached == 0 for turn in report for _, cached in turn)
    finally:
        shutdown(llm)
