"""vLLM config hooks for our architectures."""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger(__name__)


class NoPrefixCaching(VerifyAndUpdateConfig):
    """Samba, SambaY and LRT keep per-request state (Mamba conv/SSM states, LRT's latent) that a
    prefix-cache hit would not restore: turn prefix caching off, loudly, rather than serve
    outputs computed from a wrong state. (vLLM turns it on by default for hybrids.)"""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            logger.warning("hybrid-lm: %s keeps per-request recurrent state, which vLLM's prefix caching cannot "
                           "restore; prefix caching is disabled for this model.",
                           vllm_config.model_config.architecture)
            cache.enable_prefix_caching = False
