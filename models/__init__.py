"""Self-contained model definitions, keyed by Hugging Face `model_type`."""
from .base import CausalLM, KVCache, RetainingHead
from .config import ModelConfig, RopeConfig, config_from_hf
from .gemma3 import Gemma3
from .llama import Llama
from .phi3 import Phi3

MODEL_TYPES: dict[str, type[CausalLM]] = {"llama": Llama, "mistral": Llama, "qwen2": Llama,
                                          "phi3": Phi3, "gemma3_text": Gemma3}

__all__ = ["CausalLM", "KVCache", "RetainingHead", "ModelConfig", "RopeConfig", "config_from_hf",
           "MODEL_TYPES"]
