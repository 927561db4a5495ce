"""Self-contained model definitions, keyed by Hugging Face `model_type`."""
from .base import CausalLM, KVCache, RetainingHead
from .config import ModelConfig, RopeConfig, config_from_hf
from .llama import Llama
from .phi3 import Phi3

MODEL_TYPES: dict[str, type[CausalLM]] = {"llama": Llama, "mistral": Llama, "qwen2": Llama,
                                          "phi3": Phi3}

__all__ = ["CausalLM", "KVCache", "RetainingHead", "ModelConfig", "RopeConfig", "config_from_hf",
           "MODEL_TYPES"]
