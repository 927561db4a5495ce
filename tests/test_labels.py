"""CIS labels against a brute-force reference built from transformers' own q/k and RoPE, the loss,
and the cross-layer ranks (ranking.py) against plain Python."""
import math

import pytest
import torch

from conftest import longrope, tiny_llama_config, tiny_phi3_config
from locret.train.labels import LabelRecorder, cis_labels
from locret.loading.weights import load_model
from locret.train.loss import keep_loss, retaining_loss, topk_overlap
from locret.ranking import percentile_rank, shared_rank
from locret.train.targets import (best_rank, graded_target, joint_rank_target, joint_target,
                                  shared_target)


def hf_rotated_qk(hf, tokens):
    """Per layer, transformers' q [H, T, D] and k [KVH, T, D] with its RoPE applied at positions
    0..T-1."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: inputs.__setitem__(
            i, (kwargs.get("hidden_states", args[0] if args else None),
                kwargs["position_embeddings"])), with_kwargs=True)
        for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(tokens)
    for h in hooks:
        h.remove()
    cfg, out = hf.config, []
    for i, layer in enumerate(hf.model.layers):
        x, (cos, sin) = inputs[i]
        attn, D = layer.self_attn, layer.self_attn.head_dim
        if hasattr(attn, "qkv_proj"):
            q_size, kv_size = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
            q, k, _ = attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k = attn.q_proj(x), attn.k_proj(x)
        q = q.view(1, -1, cfg.num_attention_heads, D).transpose(1, 2)
        k = k.view(1, -1, cfg.num_key_value_heads, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((q[0], k[0]))
    return out


def brute_force_labels(q, k, prompt_len):
    """Full T x T logits, then for each prompt token the max over answer rows and the GQA group."""
    H, T, D = q.shape
    kv_heads = k.shape[0]
    labels = torch.full((kv_heads, prompt_len), -math.inf)
    for h in range(H):
        logits = q[h] @ k[h // (H // kv_heads)].T / math.sqrt(D)  # [T, T]
        kv = h // (H // kv_heads)
        labels[kv] = torch.maximum(labels[kv], logits[prompt_len:, :prompt_len].amax(0))
    return labels


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_phi3_config,
                                    lambda: tiny_phi3_config(**longrope(16))],
                         ids=["llama-gqa", "phi3", "phi3-longrope"])
def test_labels_match_brute_force(save_hf, config):
    hf, folder = save_hf(config())
    model = load_model(folder)
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    recorder = LabelRecorder(model.config, prompt_len=24)
    with torch.no_grad():
        model(tokens, cache=recorder)
    for layer, (q, k) in enumerate(hf_rotated_qk(hf, tokens)):
        torch.testing.assert_close(recorder.labels[layer][0], brute_force_labels(q, k, 24),
                                   atol=1e-5, rtol=0)


def test_labels_only_need_answer_rows():
    q, k = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8)
    labels = cis_labels(q, k, prompt_len=45)
    assert labels.shape == (1, 2, 45)
    # The prompt's own queries play no part: changing them leaves the labels unchanged.
    q2 = q.clone()
    q2[:, :, :45] = torch.randn(1, 4, 45, 8)
    assert torch.equal(cis_labels(q2, k, 45), labels)


def test_loss_terms():
    pred, label = torch.randn(3, 1, 2, 20), torch.randn(3, 1, 2, 20)
    smooth_l1 = torch.where((pred - label).abs() < 1, 0.5 * (pred - label) ** 2,
                            (pred - label).abs() - 0.5).mean()
    mse_per_layer = [((pred[l, ..., 1:] - pred[l, ..., :-1]) ** 2).mean() for l in range(3)]
    expected = smooth_l1 + 0.01 * sum(mse_per_layer)
    torch.testing.assert_close(retaining_loss(pred, label, alpha=0.01), expected)


def test_keep_loss_terms():
    pred, label = torch.randn(3, 1, 2, 20), (torch.rand(3, 1, 2, 20) < 0.2).float()
    p = torch.sigmoid(pred)
    bce = -(label * p.log() + (1 - label) * (1 - p).log()).mean()
    mse_per_layer = [((pred[l, ..., 1:] - pred[l, ..., :-1]) ** 2).mean() for l in range(3)]
    torch.testing.assert_close(keep_loss(pred, label, alpha=0.01), bce + 0.01 * sum(mse_per_layer))


def test_topk_overlap():
    label = torch.arange(100.0).view(1, 1, 1, 100)
    assert topk_overlap(label * 2, label) == 1.0  # same order
    assert topk_overlap(-label, label) == 0.0  # reversed
    half = label.clone()
    half[..., 90:95] = -1  # 5 of the top 10 demoted
    assert topk_overlap(half, label) == 0.5


def test_joint_target_marks_the_tokens_with_the_best_mean_rank_over_the_given_layers():
    labels = torch.randn(5, 1, 2, 16, generator=torch.Generator().manual_seed(3))
    target = joint_target(labels, slice(1, 4), share=1 / 4)
    assert target.shape == labels.shape and (target == target[0, 0, 0]).all()  # one target for all
    mean_rank = [sum(sorted(labels[l, 0, h].tolist()).index(float(labels[l, 0, h, j]))
                     for l in (1, 2, 3) for h in (0, 1))
                 for j in range(16)]
    # ties by position, as percentile_rank
    chosen = sorted(range(16), key=lambda j: (mean_rank[j], j))[-4:]
    assert target[0, 0, 0].tolist() == [float(j in chosen) for j in range(16)]
    # the default share: an eighth of 16
    assert joint_target(labels, slice(None)).sum(dim=-1).max() == 2
    # layers matter
    assert not torch.equal(joint_target(labels, slice(0, 1)), joint_target(labels, slice(4, 5)))


def test_joint_rank_target_keeps_the_whole_joint_order_weighted_toward_its_top():
    labels = torch.randn(5, 1, 2, 16, generator=torch.Generator().manual_seed(3))
    target = joint_rank_target(labels, slice(1, 4))
    assert target.shape == labels.shape and (target == target[0, 0, 0]).all()  # one target for all
    row = target[0, 0, 0]
    # each rank once, sharpened
    torch.testing.assert_close(row.sort().values, (torch.arange(16) / 15) ** 8)
    for share in (1 / 4, 1 / 8):  # every budget's kept set is the joint target's
        kept = joint_target(labels, slice(1, 4), share)[0, 0, 0]
        assert torch.equal(torch.zeros(16).index_fill_(0, row.topk(int(16 * share)).indices, 1.0),
                           kept)
    torch.testing.assert_close(
        joint_rank_target(labels, slice(1, 4), sharpness=1.0)[0, 0, 0].sort().values,
        torch.arange(16) / 15)


def test_percentile_rank_and_shared_rank():
    x = torch.tensor([[3.0, -1.0, 7.0, 0.5, 2.0]])
    assert percentile_rank(x).tolist() == [[0.75, 0.0, 1.0, 0.25, 0.5]]
    # a tie: by position
    assert percentile_rank(torch.tensor([[2.0, 2.0, 1.0]])).tolist() == [[0.5, 1.0, 0.0]]
    scores = torch.randn(3, 2, 4, 9, generator=torch.Generator().manual_seed(1))  # [L, B, KVH, n]
    expected = torch.zeros(2, 9)
    for l in range(3):
        for b in range(2):
            for h in range(4):
                order = sorted(range(9), key=lambda j: float(scores[l, b, h, j]))
                for rank, j in enumerate(order):
                    expected[b, j] += rank / 8 / 12
    torch.testing.assert_close(shared_rank(scores), expected)


def test_shared_target_marks_the_tokens_with_the_best_rank_in_any_layer():
    labels = torch.randn(4, 1, 2, 16, generator=torch.Generator().manual_seed(2))
    target = shared_target(labels, share=1 / 4)
    assert target.shape == labels.shape and (target == target[0, 0, 0]).all()  # one target for all
    best = [max(sorted(labels[l, 0, h].tolist()).index(float(labels[l, 0, h, j]))
                for l in range(4) for h in range(2))
            for j in range(16)]
    # ties go by position, as percentile_rank does
    chosen = sorted(range(16), key=lambda j: (best[j], j))[-4:]
    assert target[0, 0, 0].tolist() == [float(j in chosen) for j in range(16)]
    assert shared_target(labels).sum(dim=-1).max() == 2  # the default: the top eighth of 16 tokens
    rank = best_rank(labels)[0]
    # spread evenly over [0, 1]
    torch.testing.assert_close(rank.sort().values, torch.arange(16) / 15)
    assert rank.argsort().tolist() == sorted(range(16), key=lambda j: (best[j], j))


def test_graded_target_counts_the_budgets_whose_kept_set_holds_a_token():
    labels = torch.randn(3, 1, 2, 32, generator=torch.Generator().manual_seed(4))
    target = graded_target(labels)  # shares 1/32, 1/16, 1/8, 1/4 of 32 tokens: the top 1, 2, 4, 8
    assert target.shape == labels.shape and (target == target[0, 0, 0]).all()  # one target for all
    best = [max(sorted(labels[l, 0, h].tolist()).index(float(labels[l, 0, h, j]))
                for l in range(3) for h in range(2))
            for j in range(32)]
    # best first; ties by position
    order = sorted(range(32), key=lambda j: (best[j], j), reverse=True)
    expected = [1.0] + [0.75] + [0.5] * 2 + [0.25] * 4 + [0.0] * 24  # by place in that order
    assert [float(target[0, 0, 0, j]) for j in order] == expected
    # its 1/8 cut is the shared target
    assert torch.equal((target >= 0.5).float(), shared_target(labels))
