"""Strict loading: sharded checkpoints load; every kind of bad checkpoint is one clear error."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama_config
from locret.errors import LocretError
from locret.loading.weights import load_model
from locret.loading.zoo import resolve_checkpoint


@pytest.fixture
def folder(save_hf):
    return save_hf(tiny_llama_config())[1]


def test_sharded_checkpoint_loads(save_hf, tmp_path):
    hf, _ = save_hf(tiny_llama_config())
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(sharded)(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype(folder, dtype):
    model = load_model(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model(torch.randint(0, 128, (1, 5))).dtype == dtype


PEAK_AT_LOAD = """
import sys, torch
from locret.loading.weights import load_model
from locret.memory import rss_bytes
model = load_model(sys.argv[1], dtype=torch.bfloat16)
print(rss_bytes("VmHWM") - rss_bytes())  # the peak above what the loaded model holds
"""


def test_bf16_load_of_an_fp32_file_never_holds_the_file_too(save_hf):
    """Weights are converted one tensor at a time and the file's mapped pages let go: loading an fp32 file
    in bf16 peaks at what the loaded model holds, not at that plus the whole file."""
    _, folder = save_hf(tiny_llama_config(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8))
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert file_bytes > 80 * 2**20  # large beside the process's own noise
    run = subprocess.run([sys.executable, "-c", PEAK_AT_LOAD, str(folder)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 0.25 * file_bytes


def test_missing_config(tmp_path):
    with pytest.raises(LocretError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(LocretError, match="unsupported model_type 'gpt_neox'"):
        load_model(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LocretError, match="model.safetensors: unreadable safetensors file"):
        load_model(folder)


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor(folder):
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LocretError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_unexpected_tensor(folder):
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(LocretError, match="unexpected tensor model.layers.0.extra.weight"):
        load_model(folder)


def test_misshaped_tensor(folder):
    rewrite_weights(folder, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(LocretError, match=r"tensor model.norm.weight has shape \[63\], expected \[64\]"):
        load_model(folder)


def test_missing_shard(save_hf, tmp_path):
    hf, _ = save_hf(tiny_llama_config())
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LocretError, match=f"shard {shard.name} .* is missing"):
        load_model(tmp_path / "sharded")


def test_unknown_zoo_name():
    with pytest.raises(LocretError, match="unknown model 'llama-9000': not a zoo name"):
        resolve_checkpoint("llama-9000")


def test_hub_id_offline_is_one_line_error(tmp_path):
    """A hub id with no network (HF_HUB_OFFLINE) fails with one line that says how to use a local folder."""
    (tmp_path / "p.txt").write_text("hello")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "generate.py", "--ckpt", "someorg/some-model", "--prompt", str(tmp_path / "p.txt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "cannot download 'someorg/some-model'" in run.stderr and "--ckpt /path/to/folder" in run.stderr
