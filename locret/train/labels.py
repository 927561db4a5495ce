"""Causal importance scores (CIS), the retaining heads' training targets (Locret, arXiv 2410.01805).

For global layer l (sliding-window layers evict nothing), KV head h and prompt token j: the largest
pre-softmax attention logit q_p . k_j * scale (scale: 1 / sqrt(d) unless the model sets its own)
that any answer position p, through any query head of h's GQA group, gives to j;
RoPE is applied to q and k at their true positions. One frozen forward over prompt + answer
computes every layer's labels: the prompt's keys do not depend on the answer, and only answer rows
x prompt columns of the logits are formed, never the full T x T matrix."""
import math

import torch

from models import ModelConfig
from models.rope import apply_rope


def cis_labels(q: torch.Tensor, k: torch.Tensor, prompt_len: int,
               scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k [B, KVH, T, D] (RoPE applied) -> labels [B, KVH, prompt_len] in float32."""
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    # [B, KVH, G, A, D]
    answer_q = q[:, :, prompt_len:].reshape(B, kv_heads, H // kv_heads, T - prompt_len, D)
    prompt_k = k[:, :, None, :prompt_len]  # [B, KVH, 1, P, D]
    # [B, KVH, G, A, P]
    logits = answer_q.float() @ prompt_k.float().transpose(-1, -2) * (scale or 1 / math.sqrt(D))
    return logits.amax(dim=(2, 3))


class LabelRecorder:
    """A pass-through cache for one full causal forward from position 0: records each global
    layer's CIS labels and the retaining heads' predictions for the prompt tokens (predictions
    keep their autograd graph)."""
    scoring = True

    def __init__(self, config: ModelConfig, prompt_len: int):
        self.prompt_len, self.scale = prompt_len, config.attention_scale
        self.global_layers = set(config.global_layers)
        self.labels: dict[int, torch.Tensor] = {}
        self.predictions: dict[int, torch.Tensor] = {}

    def update(self, layer, q, k, v, head_scores, rope):
        k = apply_rope(k, *rope)
        if layer not in self.global_layers:
            return k, v
        with torch.no_grad():
            self.labels[layer] = cis_labels(q, k, self.prompt_len, self.scale)
        if head_scores is not None:
            self.predictions[layer] = head_scores[..., :self.prompt_len]
        return k, v

    def attention_mask(self, n_new):
        return None  # plain causal attention over prompt + answer

    def window_view(self, positions, window):
        return positions, None  # the keys are the forward's own

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, labels), each [global layers, B, KVH, prompt_len]."""
        layers = sorted(self.labels)
        return (torch.stack([self.predictions[i] for i in layers]),
                torch.stack([self.labels[i] for i in layers]))
