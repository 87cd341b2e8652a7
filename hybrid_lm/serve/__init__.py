"""hybrid_lm.serve: the vLLM plugin. `register` (the `vllm.general_plugins` entry point) makes
every hybrid_lm architecture servable by `vllm serve <checkpoint>` and `vllm.LLM(<checkpoint>)`;
`update_weights` pushes new weights into a running engine.

The model files (transformer.py, samba.py, lrt.py) import vLLM and are loaded lazily by vLLM's
registry; this module imports vLLM only inside its functions, so `import hybrid_lm` never needs it.
"""
from __future__ import annotations

import hybrid_lm.archs  # noqa: F401  (registers our configs with transformers' AutoConfig, for vLLM's config loading)

import json
from pathlib import Path

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
# a cross-decoder that only needs the rows vLLM samples from, under vLLM's kv_sharing_fast_prefill
FAST_PREFILL = ("SambaYForCausalLM", "Phi4FlashForCausalLM")
MAMBA_OP = "hybrid_lm::serve_mamba_mixer"


def register() -> None:
    """Register every architecture with vLLM's ModelRegistry (safe to call more than once)."""
    from vllm import ModelRegistry
    from vllm.config import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import ServeHooks, WholePromptHooks

    for arch, target in ARCHITECTURES.items():  # registering again replaces the entry with itself
        ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = WholePromptHooks if arch in WHOLE_PROMPT else ServeHooks
    # a compiled model's graph is split at the ops that read the batch's metadata (vLLM's attention
    # and Mamba ops by default): our Mamba mixer is one (hybrid_lm.serve.layers.serve_mamba_mixer)
    if MAMBA_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(MAMBA_OP)


def engine_args(path) -> dict:
    """The vLLM engine arguments hybrid-lm's own engines (benchmarks, agent evaluation and RL)
    use for the checkpoint at `path`: fast prefill for SambaY (its cross-decoder then runs on
    the sampled rows only, as in the transformers model; prompt logprobs are refused)."""
    config = Path(path, "config.json")
    if not config.is_file():
        raise FileNotFoundError(f"{path}: expected a checkpoint folder with a config.json")
    architectures = json.loads(config.read_text()).get("architectures") or []
    return {"kv_sharing_fast_prefill": True} if set(architectures) & set(FAST_PREFILL) else {}


__all__ = ["ARCHITECTURES", "engine_args", "register", "update_weights"]
