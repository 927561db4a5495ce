"""Loading: sharded checkpoints, dtypes, a bf16 load's peak memory, an offline hub id (the table of
bad checkpoints, each one clear error, is in test_bad_inputs)."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama_config
from locret.errors import LocretError
from locret.loading import weights
from locret.loading.weights import load_model


@pytest.fixture
def folder(save_hf):
    return save_hf(tiny_llama_config())[1]


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(save_hf, tmp_path):
    hf, _ = save_hf(tiny_llama_config())
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(sharded)(tokens), hf(tokens).logits,
                                   atol=1e-5, rtol=0)
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LocretError, match=f"shard {shard.name} .* is missing"):
        load_model(sharded)


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
    """Weights are converted a block of rows at a time and the file's mapped pages let go: loading
    an fp32 file in bf16 peaks at what the loaded model holds, not at that plus the whole file or
    plus its largest tensor (here the embedding and the LM head, each half the file)."""
    _, folder = save_hf(tiny_llama_config(vocab_size=32768, hidden_size=512, intermediate_size=512,
                                          num_hidden_layers=2, num_attention_heads=8,
                                          num_key_value_heads=8))
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert file_bytes > 120 * 2**20  # large beside the process's own noise
    run = subprocess.run([sys.executable, "-c", PEAK_AT_LOAD, str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 0.25 * file_bytes


def test_converting_in_blocks_changes_no_value(folder, monkeypatch):
    """Blocks of a few rows (the last one short) give each tensor exactly as one conversion does."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 3 * 64 * 4 + 1)  # 3 rows of 64 fp32 values
    loaded = load_model(folder, dtype=torch.bfloat16).state_dict()
    for name, tensor in load_file(folder / "model.safetensors").items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


def test_missing_config(tmp_path):
    with pytest.raises(LocretError, match="no config.json"):
        load_model(tmp_path)


def test_hub_id_offline_is_one_line_error(tmp_path, monkeypatch, run_generate):
    """A hub id with no network (HF_HUB_OFFLINE) fails with one line that says how to use a local
    folder."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "p.txt").write_text("hello")
    run = run_generate("--ckpt", "someorg/some-model", "--prompt", str(tmp_path / "p.txt"))
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert ("cannot download 'someorg/some-model'" in run.stderr
            and "--ckpt /path/to/folder" in run.stderr)
