"""vLLM config hooks for our architectures (run when vLLM builds its config)."""
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
        parallel = vllm_config.parallel_config
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION


class HybridHooks(ServeHooks):
    """Samba, SambaY and LRT keep per-request state (Mamba conv/SSM states, LRT's latent) that a
    prefix-cache hit would not restore: turn prefix caching off, loudly, rather than serve
    outputs computed from a wrong state. (vLLM turns it on by default for hybrids.)"""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        super().verify_and_update_config(vllm_config)
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            logger.warning("hybrid-lm: %s keeps per-request recurrent state, which vLLM's prefix caching cannot "
                           "restore; prefix caching is disabled for this model.",
                           vllm_config.model_config.architecture)
            cache.enable_prefix_caching = False
