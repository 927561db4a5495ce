"""bench/memory_speed.py --quick end to end on a tiny random model: every point measured in its own
process, pools exactly as predicted, fixed for evicting policies, growing for full attention."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import attention
from bench import memory_speed as bench
from locret.devices import default_dtype
from locret.errors import LocretError
from locret.heads import save_heads
from locret.loading.weights import load_model

RUNS = ("full", "locret", "streamingllm", bench.NO_EVICT, bench.INT8)
ENGINE_FIELDS = ("model", "policy", "kv_bytes_per_token", "pool_capacity", "predicted_pool_bytes",
                 "pool_bytes", "estimate_bytes", "kept_after_prefill", "rss_loaded_bytes", "peak_bytes",
                 "prefill_seconds", "decode_seconds", "prefill_tok_s", "decode_tok_s")


def test_quick_grid(tiny_chat_model, tmp_path, capsys):
    model = load_model(tiny_chat_model)
    torch.manual_seed(0)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "heads.safetensors", backbone="tiny")
    out, png = tmp_path / "bench.json", tmp_path / "memory.png"
    bench.main(bench.parse_args(["--quick", "--ckpt", str(tiny_chat_model), "--heads", str(tmp_path / "heads.safetensors"),
                                 "--dtype", "float32", "--transformers", "--heads-overhead",
                                 "--kv-int8", "--out", str(out), "--plot", str(png)]))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["prompt_tokens"], r["run"]) for r in rows] == [(n, run) for n in (256, 512) for run in (*RUNS, "transformers")]
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]
    for r in rows:
        fields = ENGINE_FIELDS if r["run"] != "transformers" else ("rss_loaded_bytes", "peak_bytes", "prefill_tok_s", "decode_tok_s")
        assert all(r.get(f) is not None for f in fields), r
        assert r["peak_bytes"] >= r["rss_loaded_bytes"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    engine = [r for r in rows if r["run"] != "transformers"]
    assert all(r["predicted_pool_bytes"] == r["pool_bytes"] for r in engine)
    assert all(r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 for r in rows)  # K+V x layers x KV heads x head dim x fp32
    pool = lambda run: [r["pool_bytes"] for r in rows if r["run"] == run]
    assert pool("locret") == pool("streamingllm") and len(set(pool("locret"))) == 1
    turned = [r["pool_bytes"] - r["pool_capacity"] * 2 * 16 * 4 for r in rows if r["run"] == bench.NO_EVICT]
    assert pool("full")[1] > pool("full")[0] and turned == pool("full")  # + a layer of keys turned to their slots
    assert len(set(pool(bench.INT8))) == 1 and pool(bench.INT8)[0] < pool("locret")[0]  # int8 K, V (+ scales, buffers)
    for run in ("locret", bench.INT8):
        assert [r["kept_after_prefill"] for r in rows if r["run"] == run] == [64 + 16] * 2  # budget + n_loc tail

    ratios = {line["prompt_tokens"]: line for line in result["speed_ratios"]}
    assert sorted(ratios) == [256, 512]
    for n, line in ratios.items():
        at = {r["run"]: r for r in rows if r["prompt_tokens"] == n}
        assert line["prefill_locret_vs_full"] == pytest.approx(at["locret"]["prefill_tok_s"] / at["full"]["prefill_tok_s"])
        assert line["decode_locret_vs_transformers"] == pytest.approx(
            at["locret"]["decode_tok_s"] / at["transformers"]["decode_tok_s"])
        no_heads = at[bench.NO_EVICT]["prefill_tok_s"]
        assert line["heads_overhead_pct"] == pytest.approx(100 * (at["full"]["prefill_tok_s"] / no_heads - 1))
    assert {g["run"] for g in result["memory_growth"]} == {*RUNS, "transformers"}

    table = capsys.readouterr().out
    assert table == out.with_suffix(".md").read_text() + "\n"
    assert "| run | prompt tokens |" in table and "| locret | 512 | 64 |" in table and "prefill locret/full" in table and "heads overhead %" in table
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stopped_run_keeps_measured_points(tiny_chat_model, tmp_path, monkeypatch):
    real_spawn, done = bench.spawn, []

    def spawn_then_stop(point):  # the second point is "killed" before it reports
        if done:
            raise KeyboardInterrupt
        done.append(point)
        return real_spawn(point)

    monkeypatch.setattr(bench, "spawn", spawn_then_stop)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(bench.parse_args(["--quick", "--ckpt", str(tiny_chat_model), "--policies", "full",
                                     "--dtype", "float32", "--out", str(out), "--plot", str(tmp_path / "m.png")]))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["run"], r["prompt_tokens"]) for r in rows] == [("full", 256)]
    assert rows[0]["pool_bytes"] == rows[0]["predicted_pool_bytes"] > 0
    assert "| full | 256 |" in out.with_suffix(".md").read_text()


def test_stream_bench_pipes_each_length_through_generate(tiny_chat_model, tmp_path, capsys):
    from bench import stream
    out = tmp_path / "stream"
    stream.main(stream.parse_args(["--ckpt", str(tiny_chat_model), "--lengths", "300,1200", "--new-tokens", "2",
                                   "--generate-args", "--dtype float32 --policy knorm --budget 64 --stabilizers 8 --chunk 32",
                                   "--out", str(out)]))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["requested_tokens"] for r in rows] == [300, 1200]
    for r in rows:  # the document, then the chat template and question
        assert r["requested_tokens"] <= r["prompt_tokens"] < 1.1 * r["requested_tokens"] + 60
        assert r["prompt_tokens"] // 32 <= r["chunks"] <= r["prompt_tokens"] // 32 + 2  # chunks of 32, then the question
        assert r["peak_bytes"] > 0 and r["prefill_tok_s"] > 0
    assert "peak memory" in capsys.readouterr().out


@pytest.fixture
def heldout_heads(tiny_chat_model, tmp_path, monkeypatch) -> list[str]:
    """A held-out haystack of plain prose for the tiny model, random heads saved for it: the benches' first flags."""
    from locret.eval import heldout
    text = " ".join(f"Option {i} now names the file it could not read, instead of failing quietly." for i in range(3000))
    monkeypatch.setattr(heldout, "text", lambda split: text)
    model = load_model(tiny_chat_model)
    torch.manual_seed(0)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "heads.safetensors", backbone="tiny")
    return ["--ckpt", str(tiny_chat_model), "--heads", str(tmp_path / "heads.safetensors"), "--length", "400",
            "--dtype", "float32", "--device", "cpu"]


def test_sensitivity_varies_one_setting_at_a_time_and_resumes(heldout_heads, tmp_path, capsys):
    from bench import sensitivity
    flags = heldout_heads + ["--budget", "1/4", "--stabilizers", "0,1/4", "--chunks", "64", "--spans", "1,5",
                             "--shared-layers", "all,1-1", "--n", "2", "--oracle", "--out", str(tmp_path / "sens")]
    sensitivity.main(sensitivity.parse_args(flags))
    rows = [json.loads(line) for line in (tmp_path / "sens.jsonl").read_text().splitlines()]
    # per item: full attention, the defaults (GENERIC_SETTINGS: share 1/4, chunk 1024), one change each, the oracles
    default = {"stabilizers": "1/4", "chunk": 1024, "span": 1, "eviction": "per-head", "layers": "all",
               "scorer": "heads"}
    points = [r["point"] for r in rows[:11]]
    assert points == [None, default, default | {"stabilizers": "0"}, default | {"chunk": 64}, default | {"span": 5},
                      default | {"eviction": "shared"}, default | {"layers": "1-1"}, default | {"scorer": "labels"},
                      default | {"scorer": "labels", "eviction": "shared"},
                      default | {"scorer": "shared labels", "eviction": "shared"},
                      default | {"scorer": "joint labels", "eviction": "shared"}]
    assert len(rows) == 22 and all(r["budget"] == 100 for r in rows)
    by_point = lambda p: [r["prediction"] + str(r["needle_retention"]) for r in rows if r["point"] == p]
    assert by_point(default | {"scorer": "labels"}) != by_point(default)  # the labels, not the heads, chose
    table = capsys.readouterr().out
    assert table == (tmp_path / "sens.md").read_text() and len(table.splitlines()) == 2 + 11
    assert "| full attention | - | - | - | - | - |" in table and "| 1/4 | 64 | 1 | per-head | all | heads |" in table
    assert "| 1/4 | 1024 | 1 | shared | all | shared labels |" in table
    sensitivity.main(sensitivity.parse_args(flags))  # everything done: nothing is added
    assert len((tmp_path / "sens.jsonl").read_text().splitlines()) == 22
    assert capsys.readouterr().out == table


def test_layers_ranks_needles_per_layer_and_range(heldout_heads, tmp_path, capsys):
    from bench import layers
    from locret.errors import LocretError
    flags = heldout_heads + ["--n", "3", "--out", str(tmp_path / "l")]
    layers.main(layers.parse_args(flags + ["--ranges", "all,1-1"]))
    table = capsys.readouterr().out
    assert table == (tmp_path / "l.md").read_text() and table.startswith("| ranked by | needle tokens in the top 0.125 (3 heldout_val items)")
    shares, by_kind = table.split("\n\n")
    cells = {row.split(" | ")[0][2:]: row.strip("| ").split(" | ")[1:] for row in shares.splitlines()[2:]}
    values = {row: float(needle) for row, (needle, _) in cells.items()}
    assert list(values) == ["layer 0", "layer 1", "all", "1-1", "labels (best rank in any layer)"]
    assert all(0 <= v <= 1 for v in values.values()) and values["1-1"] == values["layer 1"]  # a one-layer range
    assert len(set(values.values())) > 1  # layers, ranges and labels rank differently
    assert all(0 <= float(value) <= 1 for _, value in cells.values())
    # value tokens by the kind asked: one column per kind among the 3 items, rows for --ranges and the labels
    header, _, *kind_rows = by_kind.splitlines()
    counts = [int(c.split("(")[1].rstrip(")")) for c in header.strip("| ").split(" | ")[1:]]
    assert sum(counts) == 3 and [r.split(" | ")[0][2:] for r in kind_rows] == ["all", "1-1", "labels (best rank in any layer)"]
    assert kind_rows[0].count(" | ") == len(counts)
    layers.main(layers.parse_args(flags + ["--task", "passkey", "--n", "2", "--share", "0.0625", "--ranges", "all"]))
    out = capsys.readouterr().out
    assert "needle tokens in the top 0.0625 (2 passkey items)" in out and "\n\n" not in out  # no kinds outside the suite
    with pytest.raises(LocretError, match="--ranges 0-5: the model has layers 0-1"):
        layers.main(layers.parse_args(flags + ["--ranges", "0-5"]))
    with pytest.raises(LocretError, match="--ranges must be FIRST-LAST"):
        layers.parse_args(flags + ["--ranges", "5"])


def test_breakdown_splits_prefill_and_decode_by_component(tiny_chat_model, tmp_path, capsys):
    from bench import breakdown
    model = load_model(tiny_chat_model)
    layer_weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    torch.manual_seed(0)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "heads.safetensors", backbone="tiny")
    common = ["--ckpt", str(tiny_chat_model), "--length", "300", "--budget", "64", "--chunk", "32", "--stabilizers", "16",
              "--n-loc", "12", "--decode-tokens", "3", "--peak-sizes", "64,128"]
    out = tmp_path / "locret.json"
    breakdown.main(breakdown.parse_args([*common, "--dtype", "float32", "--heads", str(tmp_path / "heads.safetensors"),
                                         "--out", str(out)]))
    r = json.loads(out.read_text())
    assert r["chunks"] == 10 and r["decode_steps"] == 3  # 288 body tokens in chunks of 32, then the n_loc tail
    for phase in ("prefill", "decode"):
        parts = r[phase]
        assert list(parts) == list(breakdown.COMPONENTS)
        assert sum(parts.values()) == pytest.approx(r[f"{phase}_seconds"])
        assert all(parts[name] > 0 for name in ("MLP", "attention projections", "attention (RoPE, sdpa)",
                                                "cache write, re-rotation", "norms", "LM head"))
        assert parts["other"] >= 0
    assert r["prefill"]["retaining heads"] > 0 and r["prefill"]["policy scoring"] > 0 and r["prefill"]["eviction"] > 0
    decode = r["decode"]  # decoding neither scores (so the heads do not run) nor evicts
    assert decode["retaining heads"] == decode["policy scoring"] == decode["eviction"] == 0
    table = capsys.readouterr().out
    assert table == out.with_suffix(".md").read_text() and "| policy scoring |" in table and "| **total** |" in table
    assert r["matmul_peak_gflop_s"] > 0 and r["peak_sizes"] == [64, 128] and "% of it, decode at" in table

    breakdown.main(breakdown.parse_args([*common, "--policy", "full", "--out", str(tmp_path / "full.json")]))
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["dtype"] == default_dtype("cpu") == default_dtype("cpu:0")  # no --dtype: the device's default
    assert full["prefill"]["retaining heads"] == full["prefill"]["policy scoring"] == full["prefill"]["eviction"] == 0
    c = model.config  # full attention: every token sees every one before it, however the chunks fall
    per_key, lm_head = 4 * c.num_attention_heads * c.head_dim * c.num_hidden_layers, 2 * model.lm_head.weight.numel()
    assert full["prefill_flops"] == 2 * 300 * layer_weights + 10 * lm_head + per_key * 300 * 301 // 2
    assert full["decode_flops"] == 3 * (2 * layer_weights + lm_head) + per_key * (301 + 302 + 303)
    assert r["prefill_flops"] < full["prefill_flops"]  # locret's chunks see at most the budget and themselves
    assert "this machine's matmul peak" in capsys.readouterr().out
    breakdown.main(breakdown.parse_args([*common, "--policy", "full", "--peak-sizes", "0"]))
    assert "this machine's matmul peak" not in capsys.readouterr().out
    breakdown.main(breakdown.parse_args([*common, "--policy", "streamingllm", "--kv-int8", "--out", str(tmp_path / "int8.json")]))
    assert json.loads((tmp_path / "int8.json").read_text())["settings"]["kv_int8"] and not r["settings"]["kv_int8"]
    script = Path(breakdown.__file__)  # as a command: bad input is one line, not a traceback
    done = subprocess.run([sys.executable, str(script), "--ckpt", str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: unknown model") and len(done.stderr.splitlines()) == 1
    for bad in (["--decode-tokens", "0"], ["--peak-sizes", "1024,x"], ["--peak-sizes", "-5"]):
        with pytest.raises(SystemExit):
            breakdown.parse_args(bad)


FAKE_KVPRESS = '''
"""Stands in for kvpress (its own venv in real use): keeps each layer's last entries after the prefill."""
from contextlib import contextmanager


class SnapKVPress:
    def __init__(self, compression_ratio):
        self.compression_ratio = compression_ratio

    def compress(self, module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keep = round(layer.keys.shape[2] * (1 - self.compression_ratio))
        layer.keys, layer.values = layer.keys[:, :, -keep:], layer.values[:, :, -keep:]

    @contextmanager
    def __call__(self, model):
        hooks = [l.self_attn.register_forward_hook(self.compress, with_kwargs=True) for l in model.model.layers]
        yield
        for h in hooks:
            h.remove()
'''


def test_kvpress_runs_under_its_own_python_beside_ours(tiny_chat_model, tmp_path):
    (tmp_path / "fake" / "kvpress").mkdir(parents=True)
    (tmp_path / "fake" / "kvpress" / "__init__.py").write_text(FAKE_KVPRESS)
    python = tmp_path / "python"  # another venv's python: here ours, seeing the fake kvpress
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "fake"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "bench.json"
    bench.main(bench.parse_args(["--quick", "--ckpt", str(tiny_chat_model), "--policies", "full", "--dtype", "float32",
                                 "--kvpress", str(python), "--out", str(out), "--plot", str(tmp_path / "m.png")]))
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if r["run"] == "kvpress-snapkv"]
    assert [r["prompt_tokens"] for r in rows] == [256, 512] and all("error" not in r for r in rows), rows
    assert all(r["kept_after_prefill"] == 64 + 16 for r in rows)  # the same budget as ours, plus the n_loc tail
    assert all(r["peak_bytes"] >= r["rss_loaded_bytes"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert "| kvpress-snapkv | 512 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        bench.parse_args(["--kvpress", str(python), "--presses", "nosuchpress"])


def test_full_attention_is_timed_past_the_window(tiny_chat_model, tmp_path):
    out = tmp_path / "bench.json"  # the tiny chat model's window is 1024 tokens
    bench.main(bench.parse_args(["--quick", "--ckpt", str(tiny_chat_model), "--policies", "full", "--lengths", "1536",
                                 "--dtype", "float32", "--out", str(out), "--plot", str(tmp_path / "m.png")]))
    [row] = json.loads(out.read_text())["rows"]
    assert "error" not in row, row["error"]
    assert row["kept_after_prefill"] == 1536 and row["pool_capacity"] > 1536  # prompt + the new tokens


def test_repeated_gpu_timings_report_medians_and_decode_range():
    """--repeats (cuda): each point's medians of prefill and decode time, and the decode speed's range."""
    timings = [(2.0, 0.5), (1.0, 0.25), (4.0, 1.0), (3.0, 0.2), (5.0, 0.4)]  # (prefill s, decode s)
    row = bench.repeated_speeds(1000, 11, timings)
    assert row["prefill_seconds"] == 3.0 and row["prefill_tok_s"] == 1000 / 3.0
    assert row["decode_seconds"] == 0.4 and row["decode_tok_s"] == 10 / 0.4
    assert (row["decode_tok_s_min"], row["decode_tok_s_max"], row["repeats"]) == (10.0, 50.0, 5)
    assert bench.repeated_speeds(1000, 11, timings[:2])["prefill_seconds"] == 1.0  # the lower middle of an even count
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--repeats", "0"])


@pytest.mark.parametrize("heads, message", [("none.safetensors", "not found"), ("config.json", "unreadable safetensors")])
def test_bad_heads_file_is_one_error_before_any_point(tiny_chat_model, tmp_path, heads, message):
    args = ["--quick", "--ckpt", str(tiny_chat_model), "--policies", "locret", "--heads", str(tiny_chat_model / heads),
            "--dtype", "float32", "--out", str(tmp_path / "bench.json")]
    with pytest.raises(LocretError, match=message):
        bench.main(bench.parse_args(args))
    assert not (tmp_path / "bench.json").exists()  # no point ran


def test_attention_bench(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "attention.json"
    attention.main(attention.parse_args(["--ckpt", str(tiny_chat_model), "--chunk", "24", "--entries", "40",
                                         "--dtype", "float32", "--repeats", "1", "--mm-size", "64", "--out", str(out)]))
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 and all(r["ms"] > 0 and r["gflop_s"] > 0 for r in rows.values())
    wrong = rows.pop("no mask (a bound: wrong answer)")
    assert wrong["max_error"] > 1e-2  # the chunk's tokens see their future: a check that the errors are measured
    assert all(r["max_error"] < 1e-5 for r in rows.values()), rows  # every other way computes the same attention
    assert "| cache and chunk apart, merged by log-sum-exp (the engine's) |" in capsys.readouterr().out


def test_sensitivity_runs_the_oracle_on_a_benchmark_task(heldout_heads, tmp_path, capsys):
    from bench import sensitivity
    flags = heldout_heads + ["--task", "passkey", "--length", "400", "--budget", "1/4", "--stabilizers", "1/4",
                             "--chunks", "1024", "--spans", "1", "--evictions", "per-head", "--n", "1", "--oracle",
                             "--out", str(tmp_path / "passkey")]
    sensitivity.main(sensitivity.parse_args(flags))
    rows = [json.loads(line) for line in (tmp_path / "passkey.jsonl").read_text().splitlines()]
    assert [r["point"] and r["point"]["scorer"] for r in rows] == [None, "heads", "labels", "labels", "shared labels",
                                                                   "joint labels"]
    assert all(r["task"] == "passkey" and 0 <= r["score"] <= 1 for r in rows)
    assert all(0 <= r["needle_retention"] <= 1 for r in rows)  # the passkey is tracked as a needle
    assert rows[0]["needle_retention"] == 1.0 and "shared labels" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--budget", "abc"], "--budget must be a fraction"), (["--budget", "1/0"], "--budget must be a fraction"),
    (["--budget", "0"], "keeps no entries"), (["--stabilizers", "0,2"], "shares of the budget, each in"),
    (["--stabilizers", "1/0"], "invalid fractions value"), (["--n", "0"], "--n >= 1")])
def test_sensitivity_bad_flags_are_one_line(flags, message, capsys):
    from bench import sensitivity
    with pytest.raises(SystemExit):
        sensitivity.parse_args(flags)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_kept_splits_the_pool_by_part_of_the_prompt(heldout_heads, tmp_path, capsys):
    from types import SimpleNamespace
    from bench import kept
    from locret.eval.evaluation import Encoded
    encoded = Encoded(list(range(12)), [], [range(5, 7)], 2, 3)  # preamble 0-2, needle 5-6, question 10-11
    part = kept.parts_of(encoded, 10)
    assert part.tolist() == [0, 0, 0, 2, 2, 1, 1, 2, 2, 2]
    pool = SimpleNamespace(index=torch.tensor([[[[0, 5, 8, 9], [5, 6, 1, 2]]]]), length=4)  # [L, B, KVH, n]
    by_part, needles = kept.kept_shares(pool, part)
    assert by_part == pytest.approx([3 / 8, 3 / 8, 2 / 8]) and needles == pytest.approx((1 + 2) / 2 / 2)
    flags = heldout_heads + ["--task", "heldout_val", "--budget", "1/4", "--policies", "locret,streamingllm",
                             "--n", "2", "--show", "--out", str(tmp_path / "kept")]
    kept.main(kept.parse_args(flags))
    out = capsys.readouterr().out
    table = (tmp_path / "kept.md").read_text()
    assert out.endswith(table) and "locret, item 0" in out and "streamingllm, item 0" in out
    rows = {line.split(" | ")[0][2:]: [float(x.strip(" |%")) for x in line.split(" | ")[1:]]
            for line in table.splitlines()[5:]}
    assert list(rows) == ["locret", "streamingllm"]
    assert all(sum(r[:3]) == pytest.approx(100, abs=2) and 0 <= r[3] <= 100 for r in rows.values())
    with pytest.raises(SystemExit):
        kept.parse_args(heldout_heads + ["--budget", "abc"])
    assert "--budget must be a fraction" in capsys.readouterr().err


def test_transient_measures_a_cut_model_in_a_fresh_process(capsys):
    from bench import transient
    from locret.kv_pool import KVPool
    from models import config_from_hf
    hf = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=4096, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)
    point = dict(model="tiny", hf=hf, settings=dict(budget=256, chunk=512, stabilizers=32, n_loc=16), layers=2,
                 policy="locret", dtype="float32")
    row = transient.spawn(point)
    config, cut = config_from_hf(hf), config_from_hf(dict(hf, num_hidden_layers=2))
    assert row["prompt_tokens"] == 256 + 2 * 512 + 16 and row["capacity"] == 256 + 512
    assert row["pool_bytes"] == KVPool.bytes_needed(cut, 768, 1, torch.float32, turned_keys=True)
    assert row["full_depth_pool_bytes"] == KVPool.bytes_needed(config, 768, 1, torch.float32, turned_keys=True)
    # the MLP alone holds 3 x 512 x 4096 fp32 values (24 MiB) at once; the estimate's bound is close to what is used
    assert 24 * 2**20 < row["transient_bytes"] < row["bound_bytes"] + 32 * 2**20
    md = transient.table([row]).splitlines()
    assert len(md) == 3 and md[2].startswith("| tiny | 2 | locret | float32 | 256 / 512 |")
    with pytest.raises(SystemExit):
        transient.parse_args(["--policies", "full"])
    assert "unknown --policies full" in capsys.readouterr().err
