"""Official (paper authors') heads files: read with weights_only only, checked against the backbone,
converted bf16-exactly into our safetensors format, downloaded and converted once per cache."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import tiny_llama_config, tiny_phi3_config
from locret.loading import official_heads
from locret.errors import LocretError
from locret.heads import load_heads
from locret.train.labels import LabelRecorder
from locret.loading.weights import load_model
from locret.loading.official_heads import (convert_official_heads, ensure_official_heads,
                                           read_official_heads)
from locret.loading.zoo import ZOO, local_heads

CONFIGS = {"llama": tiny_llama_config, "phi3": tiny_phi3_config}
HIDDEN, QKV, KVH, LAYERS = 24, 128, 2, 2  # tiny configs: q 4x16 + k 2x16 + v 2x16


def official_weights(layers=LAYERS, qkv=QKV, seed=0):
    """layer -> (fc1, fc2) in bf16, as the official files hold them."""
    g = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(HIDDEN, qkv, generator=g).bfloat16(),
                torch.randn(KVH, HIDDEN, generator=g).bfloat16())
            for i in range(layers)}


def write_official(path, weights, prefix="model.layers.{i}.self_attn."):
    sd = {}
    for i, (fc1, fc2) in weights.items():
        sd[prefix.format(i=i) + "fc1.weight"], sd[prefix.format(i=i) + "fc2.weight"] = fc1, fc2
    torch.save(sd, path)
    return path


def record_scores(model):
    """Capture every retaining head's input cat(q, k, v) and output scores in the next forward."""
    seen = {}
    for i, head in enumerate(model.retaining_heads):
        head.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
    return seen


def assert_one_line_error(fn, match):
    with pytest.raises(LocretError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", CONFIGS)
def test_convert_is_exact_and_scores_match(kind, save_hf, tmp_path):
    folder = save_hf(CONFIGS[kind]())[1]
    weights = official_weights()
    model, out = load_model(folder), tmp_path / "heads.safetensors"
    convert_official_heads(write_official(tmp_path / "official.bin", weights), model, out,
                           backbone="tiny")
    with safe_open(out, framework="pt") as f:
        fc1_weight = f.get_tensor("model.layers.1.self_attn.retaining_head.fc1.weight")
        assert fc1_weight.dtype == torch.bfloat16
        assert '"source": "official"' in f.metadata()["training"]
    # back in the model's dtype
    assert all(h.fc1.weight.dtype == torch.float32 for h in model.retaining_heads)
    fresh = load_model(folder)
    assert load_heads(fresh, out)["backbone"] == "tiny"
    seen = record_scores(fresh)
    with torch.no_grad():
        # a cache that scores: the heads run
        fresh(torch.randint(0, 128, (1, 9)), cache=LabelRecorder(fresh.config, 8))
    for i, (fc1, fc2) in weights.items():
        head = fresh.retaining_heads[i]
        assert (torch.equal(head.fc1.weight, fc1.float())
                and torch.equal(head.fc2.weight, fc2.float()))
        qkv, scores = seen[i]
        assert qkv.shape == (1, 9, QKV) and scores.shape == (1, KVH, 9)
        expected = F.linear(F.silu(F.linear(qkv, fc1.float())), fc2.float()).transpose(1, 2)
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prefix", ["layers.{i}.self_attn.", "model.layers.{i}.",
                                    "base_model.model.model.layers.{i}.self_attn."])
def test_other_key_layouts(prefix, tmp_path):
    weights = official_weights()
    heads = read_official_heads(write_official(tmp_path / "official.bin", weights, prefix))
    assert heads.keys() == weights.keys()
    assert all(torch.equal(heads[i][0], fc1) and torch.equal(heads[i][1], fc2)
               for i, (fc1, fc2) in weights.items())


def test_bad_files_are_refused(tmp_path):
    fc1 = torch.zeros(HIDDEN, QKV, dtype=torch.bfloat16)
    fc2 = torch.zeros(KVH, HIDDEN, dtype=torch.bfloat16)
    cases = [
        ({"x": object()}, r"torch.load\(weights_only=True\) \(Unsupported global"),
        ({"model.layers.0.self_attn.fc1.weight": 3},
         r"'model.layers.0.self_attn.fc1.weight' is int, expected a tensor"),
        ({0: fc1}, "key 0 is not a string"),
        ([fc1, fc2], "expected a dict of tensors, got list"),
        ({}, "holds no retaining-head weights"),
        ({"model.layers.0.self_attn.fc1.weight": fc1, "model.layers.0.self_attn.fc2.weight": fc2,
          "lm_head.weight": fc1}, "unrecognised key 'lm_head.weight'"),
        ({"model.layers.0.self_attn.fc1.weight": fc1}, "layer 0 has no fc2 weight"),
        ({f"model.layers.{i}.self_attn.fc{j}.weight": w
          for i in (0, 2) for j, w in ((1, fc1), (2, fc2))},
         r"layers must be numbered 0..N-1, found \[0, 2\]"),
        ({"model.layers.0.self_attn.fc1.weight": fc1, "layers.0.fc1.weight": fc1},
         "layer 0 has two fc1 weights"),
        ({"model.layers.0.self_attn.fc1.weight": fc1[0]}, "is a 1-d torch.bfloat16 tensor"),
    ]
    for n, (obj, match) in enumerate(cases):
        torch.save(obj, tmp_path / f"bad{n}.bin")
        assert_one_line_error(lambda: read_official_heads(tmp_path / f"bad{n}.bin"), match)
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    assert_one_line_error(lambda: read_official_heads(tmp_path / "garbage.bin"),
                          "garbage.bin: not loadable")
    assert_one_line_error(lambda: read_official_heads(tmp_path / "nope.bin"), "nope.bin not found")


def test_heads_for_another_backbone_are_refused(save_hf, tmp_path):
    model = load_model(save_hf(tiny_llama_config())[1])
    out = tmp_path / "heads.safetensors"
    three = write_official(tmp_path / "three.bin", official_weights(layers=3))
    assert_one_line_error(lambda: convert_official_heads(three, model, out, "tiny"),
                          "three.bin: heads have 3 layers, the backbone 2")
    wide = write_official(tmp_path / "wide.bin", official_weights(qkv=120))
    assert_one_line_error(lambda: convert_official_heads(wide, model, out, "tiny"),
                          r"layer 0 fc1 has shape \[24, 120\], the backbone needs \[24, 128\]")
    assert not out.exists() and all(h is None for h in model.retaining_heads)


def test_ensure_offline_says_how_to_pass_heads(save_hf, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path / "cache"))
    model = load_model(save_hf(tiny_llama_config())[1])
    assert_one_line_error(lambda: ensure_official_heads(ZOO["llama-3.1-8b-instruct"], model),
                          r"cannot download llama-3.1-8B-instruct.bin "
                          r".*OSError: offline.*pass --heads")
    assert_one_line_error(lambda: ensure_official_heads(ZOO["smollm2-135m-instruct"], model),
                          "smollm2-135m-instruct has no official retaining heads; pass --heads")


def test_ensure_downloads_and_converts_once(save_hf, tmp_path, monkeypatch):
    import huggingface_hub
    folder = save_hf(tiny_llama_config())[1]
    bin_path = write_official(tmp_path / "official.bin", official_weights())
    calls = {"download": [], "convert": 0}

    def download(repo, filename, **kwargs):
        calls["download"].append((repo, filename))
        return str(bin_path)

    def convert(*args, convert=convert_official_heads, **kwargs):
        calls["convert"] += 1
        return convert(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(official_heads, "convert_official_heads", convert)
    monkeypatch.setenv("LOCRET_CACHE", str(tmp_path / "cache"))
    entry = ZOO["llama-3.1-8b-instruct"]
    first = ensure_official_heads(entry, load_model(folder))
    second = ensure_official_heads(entry, load_model(folder))
    assert first == second == tmp_path / "cache" / "heads" / "llama-3.1-8b-instruct.safetensors"
    assert calls == {"download": [("hyx21/Locret-llama-3.1-8B-instruct",
                                   "llama-3.1-8B-instruct.bin")], "convert": 1}
    fresh = load_model(folder)
    assert load_heads(fresh, first)["backbone"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert torch.equal(fresh.retaining_heads[1].fc2.weight, official_weights()[1][1].float())


def test_find_heads_prefers_given_then_shipped_then_official(monkeypatch):
    monkeypatch.setattr(official_heads, "ensure_official_heads",
                        lambda entry, model: f"official:{entry.name}")
    shipped, official = ZOO["smollm2-135m-instruct"], ZOO["llama-3.1-8b-instruct"]
    plain = ZOO["llama-3.2-1b-instruct"]
    assert local_heads("mine.safetensors", shipped) == "mine.safetensors"
    assert local_heads(None, shipped) == shipped.heads and shipped.heads.endswith(".safetensors")
    assert local_heads(None, official) is None and local_heads(None, None) is None
    assert official_heads.find_heads("mine.safetensors", official, None) == "mine.safetensors"
    assert official_heads.find_heads(None, shipped, None) == shipped.heads
    assert official_heads.find_heads(None, official, None) == "official:llama-3.1-8b-instruct"
    assert (official_heads.find_heads(None, plain, None) is None
            and official_heads.find_heads(None, None, None) is None)
