"""Model families (GPT-2, Qwen2), their configs, and the Auto factory."""

from .components import KernelConfig
from .gpt2.config import GPT2Config
from .gpt2.model import GPT2LMHeadModel
from .modeling_auto import MODEL_FAMILIES, AutoModelForCausalLM, load_model_config, model_config_from_dict
from .modeling_utils import CausalLM, CausalLMOutput, shift_labels
from .qwen2.config import Qwen2Config
from .qwen2.model import Qwen2ForCausalLM

__all__ = [
    "MODEL_FAMILIES",
    "AutoModelForCausalLM",
    "CausalLM",
    "CausalLMOutput",
    "GPT2Config",
    "GPT2LMHeadModel",
    "KernelConfig",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "load_model_config",
    "model_config_from_dict",
    "shift_labels",
]
