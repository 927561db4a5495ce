"""Model configuration: a dataclass read from a Hugging Face `config.json` dict."""
from dataclasses import dataclass, field


@dataclass
class RopeConfig:
    rope_type: str = "default"  # default | linear | llama3 | longrope
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, longrope
    short_factor: list[float] = field(default_factory=list)  # longrope
    long_factor: list[float] = field(default_factory=list)  # longrope
    attention_factor: float | None = None  # longrope; derived when None


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def qkv_size(self) -> int:
        """Width of cat(q, k, v) for one token: the retaining heads' input."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim


ROPE_TYPE_ALIASES = {"su": "longrope", "yarn": "longrope"}  # old Phi-3 configs' names for longrope
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")


def rope_from_hf(cfg: dict) -> RopeConfig:
    """Read RoPE settings from the classic `rope_theta` + `rope_scaling` keys or the newer
    `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    # Phi-3 keeps it at the top level, and it wins
    original_max = cfg.get("original_max_position_embeddings")
    if original_max is None:
        original_max = params.get("original_max_position_embeddings",
                                  cfg.get("max_position_embeddings", 0))
    factor = params.get("factor")
    if factor is None and rope_type in ("longrope", "su", "yarn") and original_max:
        factor = cfg["max_position_embeddings"] / original_max  # Phi-3: the context extension ratio
    return RopeConfig(
        rope_type=ROPE_TYPE_ALIASES.get(rope_type, rope_type),
        theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(params.get("partial_rotary_factor",
                                               cfg.get("partial_rotary_factor", 1.0))),
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original_max),
        short_factor=list(params.get("short_factor") or []),
        long_factor=list(params.get("long_factor") or []),
        attention_factor=params.get("attention_factor"),
    )


def config_from_hf(cfg: dict) -> ModelConfig:
    """A ModelConfig from the keys of a Hugging Face config.json; impossible values: ValueError."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
    n_heads = cfg["num_attention_heads"]
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"num_attention_heads must be a positive integer, not {n_heads!r}")
    model_type = cfg["model_type"]
    attention_bias = bool(cfg.get("attention_bias", False))
    config = ModelConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2 always biases q, k, v (not o)
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope=rope_from_hf(cfg),
    )
    for name in SIZES:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({n_heads}) is not a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    return config
