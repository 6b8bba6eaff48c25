"""AutoModelForCausalLM: pick the family from `model_family` (our configs) or `model_type`
(Hugging Face checkpoints).

    model = AutoModelForCausalLM.from_config("configs/model/gpt_125m.yaml", kernels=KernelConfig())
    model = AutoModelForCausalLM.from_pretrained("path/to/hf_checkpoint_dir")
    model.save_pretrained("out/")   # loads in transformers
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..utils.config import ConfigError, from_dict, read_yaml
from .components import KernelConfig
from .gpt2.config import GPT2Config
from .gpt2.model import GPT2LMHeadModel
from .modeling_utils import CausalLM, read_hf_config
from .qwen2.config import Qwen2Config
from .qwen2.model import Qwen2ForCausalLM

MODEL_FAMILIES: dict[str, tuple[type, type[CausalLM]]] = {
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
ModelConfig = GPT2Config | Qwen2Config


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    """Build the family's config from a mapping that names its `model_family`."""
    family = data.get("model_family")
    if family is None:
        raise ConfigError(f"{where}: missing 'model_family' (one of {sorted(MODEL_FAMILIES)})")
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"{where}: model_family '{family}' is unknown; choose one of {sorted(MODEL_FAMILIES)}")
    config_cls, _ = MODEL_FAMILIES[family]
    return from_dict(config_cls, data, where=where)


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read a model YAML (configs/model/*.yaml) strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        available = ""
        folder = os.path.dirname(path) or "."
        if os.path.isdir(folder):
            names = sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml")))
            available = f"; files in '{folder}': {', '.join(names)}" if names else ""
        raise FileNotFoundError(f"model config not found: '{path}'{available}")
    return model_config_from_dict(read_yaml(path), where=path)


class AutoModelForCausalLM:
    """Factory only; never instantiated."""

    def __init__(self) -> None:
        raise TypeError("use AutoModelForCausalLM.from_config(...) or .from_pretrained(...)")

    @staticmethod
    def from_config(
        config: ModelConfig | dict[str, Any] | str | os.PathLike, kernels: KernelConfig | None = None
    ) -> CausalLM:
        """Build a randomly initialised model from a config object, a mapping or a model YAML path."""
        if isinstance(config, (str, os.PathLike)):
            config = load_model_config(config)
        elif isinstance(config, dict):
            config = model_config_from_dict(config)
        for config_cls, model_cls in MODEL_FAMILIES.values():
            if isinstance(config, config_cls):
                return model_cls(config, kernels=kernels)
        raise TypeError(f"expected a model config ({', '.join(c.__name__ for c, _ in MODEL_FAMILIES.values())}), got {type(config).__name__}")

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike,
        kernels: KernelConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | None = None,
    ) -> CausalLM:
        """Load a Hugging Face GPT-2 or Qwen2 checkpoint directory."""
        model_type = read_hf_config(path).get("model_type")
        if model_type not in MODEL_FAMILIES:
            raise ValueError(
                f"'{path}' holds a '{model_type}' checkpoint; supported model types: {sorted(MODEL_FAMILIES)}"
            )
        _, model_cls = MODEL_FAMILIES[model_type]
        return model_cls.from_pretrained(path, kernels=kernels, dtype=dtype, device=device)
