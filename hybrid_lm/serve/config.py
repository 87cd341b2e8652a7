"""vLLM config hooks for our architectures (run when vLLM builds its config).

Prefix caching: the Transformer uses vLLM's block caching as is. Samba and SambaY (incl.
SambaY-DA and the released phi4flash format) declare `SupportsMambaPrefixCaching`, so when
prefix caching is on (vLLM's default) vLLM's hybrid hook, which runs after ours, switches the
Mamba state slots to its "align" mode: a request's running conv/SSM state lives in the slot of
the block holding its last token, the scheduler ends prefill chunks on block boundaries, and the
runner copies the state into the next block's slot when a request crosses one. So the slot of
every full block holds the exact state after that block's last token, and a prefix-cache hit
resumes from it (hybrid_lm.serve.layers.Mamba reads and writes these slots). Our hook keeps the
state of every full block, not only those at prompt ends (vLLM's default), so that a session's
next turn also finds the blocks its last action filled.

LRT cannot be served from a cache or in chunks and stay what the model computes: its prefill is
the interleaved schedule over the whole prompt, and a chunk (or a cached prefix) would be refined
on its own. Its hook turns both off, so each prompt is one forward, exactly the transformers
model's over the same tokens. It also serves LRT eagerly: vLLM traces a compiled graph once,
and LRT's passes depend on each batch's positions and its prefill/decode split.

Fast prefill (SambaY): vLLM's `kv_sharing_fast_prefill` (`--kv-sharing-fast-prefill`) is off by
default, as for every vLLM model, because with it prompt tokens get no logits (prompt logprobs
are refused). Turned on, SambaY's cross-decoder runs only on the rows vLLM samples from
(hybrid_lm.serve.samba); hybrid-lm's own engines (benchmarks, agent evaluation and RL) turn it
on for SambaY.
"""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger(__name__)

WORKER_EXTENSION = "hybrid_lm.serve.weights.WeightSync"  # a dotted path, as vLLM resolves it


class ServeHooks(VerifyAndUpdateConfig):
    """Every engine serving our checkpoints gets the weight-sync worker methods that
    `hybrid_lm.serve.update_weights` calls (unless the user brought a worker extension)."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION
        if cache.enable_prefix_caching and cache.prefix_cache_retention_interval == 0:
            # vLLM's default keeps sliding-window and Mamba states only where a prompt ends, so the
            # next turn of a session (previous prompt + its generated action + a new observation)
            # would recompute the action and the prompt's last partial block; keep every full
            # block's state instead (a kept block is still evicted like any cached block). An
            # explicit positive interval is the user's choice and stays.
            cache.prefix_cache_retention_interval = None


class WholePromptHooks(ServeHooks):
    """LRT: no prefix caching, no chunked prefill and no compilation, with a warning naming the
    reason; the token budget of a step is raised to max_model_len so that any prompt fits in one
    forward."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        super().verify_and_update_config(vllm_config)
        cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
        max_len = vllm_config.model_config.max_model_len
        turned_off = [name for name, on in (("prefix caching", cache.enable_prefix_caching),
                                            ("chunked prefill", scheduler.enable_chunked_prefill)) if on]
        if turned_off:
            logger.warning("hybrid-lm: %s refines each prompt with its interleaved schedule over the whole prompt, "
                           "so a cached prefix or a prompt chunk would change its output; %s turned off for this "
                           "model (every prompt is one forward).", vllm_config.model_config.architecture,
                           " and ".join(turned_off))
        if not vllm_config.model_config.enforce_eager:
            logger.warning("hybrid-lm: %s is served eagerly (enforce_eager): which tokens each refinement pass "
                           "runs depends on the batch, and vLLM compiles a graph once.",
                           vllm_config.model_config.architecture)
            vllm_config.model_config.enforce_eager = True
        cache.enable_prefix_caching = False
        scheduler.enable_chunked_prefill = False
        scheduler.long_prefill_token_threshold = 0
        if scheduler.max_num_batched_tokens < max_len:
            logger.warning("hybrid-lm: max_num_batched_tokens raised from %d to max_model_len %d so that a whole "
                           "prompt fits in one step.", scheduler.max_num_batched_tokens, max_len)
            scheduler.max_num_batched_tokens = max_len
