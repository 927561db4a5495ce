"""Synthetic inputs for the benchmarks, where speed and memory are measured and the content does
not matter: seeded random prompts, seeded pseudo-English, and published model shapes with random
weights."""
import random

import torch

from models import MODEL_TYPES, CausalLM, config_from_hf

from ..loading.zoo import ZOO, ZooEntry

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no what up out more about time river market letter garden station winter engine "
         "window harbour ledger signal copper lantern meadow quietly rapidly carefully seldom "
         "always northern crooked silent amber hollow").split()
QUESTION = "What is the last number mentioned in the text?"

# config.json of meta-llama/Llama-3.1-8B-Instruct and microsoft/Phi-3-mini-128k-instruct
LLAMA_31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
PHI3_MINI_128K = dict(
    model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False,
    # the published per-frequency factors change values, not shapes or cost: 1.0 stands in
    rope_scaling=dict(type="longrope", short_factor=[1.0] * 48, long_factor=[1.0] * 48))
# name -> (shape, the zoo entry whose settings are the paper's for it)
PUBLISHED_SHAPES: dict[str, tuple[dict, ZooEntry]] = {
    "llama-3.1-8b": (LLAMA_31_8B, ZOO["llama-3.1-8b-instruct"]),
    "phi-3-mini-128k": (PHI3_MINI_128K, ZOO["phi-3-mini-128k-instruct"])}


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """Seeded random token ids: the same prompt for every run at this length."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (length,), generator=generator).tolist()


def text_blocks(n_chars: int, seed: int, block: int = 1 << 16):
    """`n_chars` characters of seeded pseudo-English (words, numbers, sentences, paragraphs), in
    blocks: generated as they are consumed."""
    rng, written = random.Random(seed), 0
    while written < n_chars:
        words = [rng.choice(WORDS) if rng.random() > 0.05 else str(rng.randint(0, 99999))
                 for _ in range(block // 6)]
        text = " ".join(words).replace(" the ", ". The ", 3) + ".\n\n"
        text = text[:n_chars - written]
        written += len(text)
        yield text


def random_model(hf: dict, device: str, dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    """The architecture of `hf` (a config.json dict) in `dtype` on `device`: normal(0, 0.02)
    matrices, unit norms, and retaining heads of the paper's size."""
    config = config_from_hf(hf)
    with torch.device("meta"):
        model = MODEL_TYPES[hf["model_type"]](config).to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():  # matrices; RMSNorm weights (no biases here)
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    with torch.device(device):  # buffers came from the meta device empty
        model.make_rope()
    model.eval().requires_grad_(False)
    model.add_retaining_heads(1024)
    return model
