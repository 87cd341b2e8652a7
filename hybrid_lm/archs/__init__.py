"""Model families on hybrid_lm.kernels, registered with transformers' Auto classes on import:
each has a base model (`...Model`, AutoModel) and a causal LM (`...ForCausalLM`, AutoModelForCausalLM)."""
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import HybridCache
from .config import ARCHS, PRESETS, HybridConfig, config
from .lrt import LRTForCausalLM, LRTModel
from .model import HybridForCausalLM, HybridModel, HybridPreTrainedModel
from .phi4flash import Phi4FlashForCausalLM, Phi4FlashModel
from .samba import SambaForCausalLM, SambaModel, SambaYForCausalLM, SambaYModel
from .transformer import TransformerForCausalLM, TransformerModel

MODEL_CLASSES: dict[type, type] = {
    cls.config_class: cls for cls in (TransformerForCausalLM, SambaForCausalLM, SambaYForCausalLM, LRTForCausalLM,
                                    Phi4FlashForCausalLM)
}

for _config_cls, _model_cls in MODEL_CLASSES.items():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModel.register(_config_cls, _model_cls.model_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def build(config: HybridConfig) -> HybridForCausalLM:
    """The causal LM for `config` (from hybrid_lm.config), freshly initialised."""
    cls = MODEL_CLASSES.get(type(config))
    if cls is None:
        raise ValueError(f"config: expected a config from hybrid_lm.config(...), got {type(config).__name__}")
    config.validate_arch()
    return cls(config)


def expected_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of `config`'s checkpoints and its shape (the model built on the meta
    device: no memory, any size). A tied lm_head is absent, as in the files."""
    with torch.device("meta"):
        model = build(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


__all__ = ["ARCHS", "PRESETS", "HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel", "HybridPreTrainedModel",
           "LRTModel", "Phi4FlashModel", "SambaModel", "SambaYModel", "TransformerModel", "build", "config",
           "expected_shapes"]
