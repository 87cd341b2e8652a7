"""hybrid_lm.serve: the vLLM plugin. `register` (the `vllm.general_plugins` entry point) makes
every hybrid_lm architecture servable by `vllm serve <checkpoint>` and `vllm.LLM(<checkpoint>)`;
`update_weights` pushes new weights into a running engine.

The model files (transformer.py, samba.py, lrt.py) import vLLM and are loaded lazily by vLLM's
registry; this module imports vLLM only inside its functions, so `import hybrid_lm` never needs it.
"""
from __future__ import annotations

import hybrid_lm.archs  # noqa: F401  (registers our configs with transformers' AutoConfig, for vLLM's config loading)

from .weights import update_weights

# architectures in our checkpoints' config.json -> the vLLM model class serving them
ARCHITECTURES = {
    "TransformerForCausalLM": "hybrid_lm.serve.transformer:TransformerForCausalLM",
    "SambaForCausalLM": "hybrid_lm.serve.samba:SambaForCausalLM",
    "SambaYForCausalLM": "hybrid_lm.serve.samba:SambaYForCausalLM",
    "LRTForCausalLM": "hybrid_lm.serve.lrt:LRTForCausalLM",
    # Phi-4-mini-flash-reasoning's released format: our sambay-da under the release's config.json
    # (hybrid_lm.archs.phi4flash); vLLM itself dropped this architecture after 0.10.2
    "Phi4FlashForCausalLM": "hybrid_lm.serve.samba:SambaYForCausalLM",
}
# served without prefix caching or chunked prefill (hybrid_lm.serve.config explains why)
WHOLE_PROMPT = ("LRTForCausalLM",)


def register() -> None:
    """Register every architecture with vLLM's ModelRegistry (safe to call more than once)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import ServeHooks, WholePromptHooks

    for arch, target in ARCHITECTURES.items():  # registering again replaces the entry with itself
        ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = WholePromptHooks if arch in WHOLE_PROMPT else ServeHooks


__all__ = ["ARCHITECTURES", "register", "update_weights"]
