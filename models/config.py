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
    hidden_act: str = "silu"  # the MLP's gate activation: silu | gelu_pytorch_tanh
    attention_scale: float | None = None  # softmax scale of q.k (None: 1/sqrt(head_dim))
    rope: RopeConfig = field(default_factory=RopeConfig)
    # per layer: full_attention or sliding_attention ([]: all full)
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None  # keys a sliding_attention query sees, its own included
    local_rope: RopeConfig | None = None  # the sliding_attention layers' RoPE (None: `rope`)

    @property
    def qkv_size(self) -> int:
        """Width of cat(q, k, v) for one token: the retaining heads' input."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def window(self, layer: int) -> int | None:
        """How many keys a query of `layer` sees (its own included); None: every earlier key."""
        sliding = bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def has_windows(self) -> bool:
        return "sliding_attention" in self.layer_types

    @property
    def global_layers(self) -> list[int]:
        """The layers whose queries see every earlier key: where a KV budget and retaining heads
        apply."""
        return [i for i in range(self.num_hidden_layers) if self.window(i) is None]

    @property
    def sliding_layers(self) -> list[int]:
        """The layers whose queries see only the last `sliding_window` keys."""
        return [i for i in range(self.num_hidden_layers) if self.window(i) is not None]


ROPE_TYPE_ALIASES = {"su": "longrope", "yarn": "longrope"}  # old Phi-3 configs' names for longrope
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# transformers' class defaults for keys a family's config.json may leave out
HF_DEFAULTS = {"gemma3_text": {
    "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "sliding_window": 4096, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "head_dim": 256}}
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


def ropes_from_hf(cfg: dict) -> tuple[RopeConfig, RopeConfig | None]:
    """(the full_attention layers' RoPE, the sliding_attention layers' or None where they share
    it), from `rope_parameters` keyed by layer type or from classic keys (`rope_local_base_freq`).
    """
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention")
        return (rope_from_hf({**cfg, "rope_parameters": params["full_attention"]}),
                rope_from_hf({**cfg, "rope_parameters": local}) if local else None)
    local_theta = cfg.get("rope_local_base_freq")
    local = None if local_theta is None else rope_from_hf(
        {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": local_theta}})
    return rope_from_hf(cfg), local


def layers_from_hf(cfg: dict, n: int) -> tuple[list[str], int | None]:
    """(each of the n layers' attention, the sliding window): `layer_types`, else every
    `sliding_window_pattern`-th layer full and the others sliding, else all full."""
    types, pattern = cfg.get("layer_types"), cfg.get("sliding_window_pattern")
    if types is None and pattern is None:
        return ["full_attention"] * n, None
    if types is None:
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if (not isinstance(types, list) or len(types) != n
            or any(t not in LAYER_TYPES for t in types)):
        raise ValueError(f"layer_types must list {n} of {', '.join(LAYER_TYPES)}, not {types!r}")
    if "sliding_attention" not in types:
        return types, None
    window = cfg.get("sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, not {window!r}")
    return types, window


def activation(cfg: dict) -> str:
    return cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")  # Gemma: the former


def check_supported(cfg: dict) -> None:
    """Config keys this package does not implement: ValueError."""
    act = activation(cfg)
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r} (supported: {', '.join(ACTIVATIONS)})")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ValueError(f"unsupported {key} {cfg[key]!r} (no softcapping)")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("unsupported use_bidirectional_attention (causal attention only)")


def config_from_hf(cfg: dict) -> ModelConfig:
    """A ModelConfig from the keys of a Hugging Face config.json; impossible values: ValueError."""
    cfg = {**HF_DEFAULTS.get(cfg.get("model_type"), {}), **cfg}
    check_supported(cfg)
    n_heads = cfg["num_attention_heads"]
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"num_attention_heads must be a positive integer, not {n_heads!r}")
    model_type = cfg["model_type"]
    attention_bias = bool(cfg.get("attention_bias", False))
    scalar = cfg.get("query_pre_attn_scalar")
    rope, local_rope = ropes_from_hf(cfg)
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
        hidden_act=activation(cfg),
        attention_scale=None if scalar is None else float(scalar) ** -0.5,
        rope=rope,
        local_rope=local_rope,
    )
    for name in SIZES:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({n_heads}) is not a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    config.layer_types, config.sliding_window = layers_from_hf(cfg, config.num_hidden_layers)
    return config
