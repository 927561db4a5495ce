"""The benchmarks as their command lines run them, on tiny random models: in this process where a
fresh one is not the point (a peak RSS of its own, another python), and never imported."""
import json
import runpy
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from locret.devices import default_dtype
from locret.eval.timing import repeated_speeds
from locret.heads import save_heads
from locret.kv_pool import KVPool
from locret.loading.weights import load_model
from locret.settings import Settings
from models import config_from_hf

ENGINE_FIELDS = ("pool_capacity", "predicted_pool_bytes", "pool_bytes", "estimate_bytes",
                 "kept_after_prefill", "rss_loaded_bytes", "peak_bytes", "prefill_seconds",
                 "decode_seconds", "prefill_tok_s", "decode_tok_s")


def save_random_heads(folder: Path, path: Path) -> None:
    """Seeded random retaining heads for the model in `folder`, saved to `path`."""
    model = load_model(folder)
    torch.manual_seed(0)
    model.add_retaining_heads(8)
    save_heads(model, path, backbone="tiny")


def memory_speed_point(point: dict, capsys, monkeypatch) -> dict:
    """One grid point of bench/memory_speed.py measured in this process (its --worker): the JSON."""
    run_bench("memory_speed", ["--worker", json.dumps(point)], monkeypatch)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_every_run_measures_its_pool_as_predicted(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """memory_speed's workers, one per run and length: pools exactly as predicted, fixed for
    evicting policies, growing for full attention; transformers' generate measured alike."""
    heads = tmp_path / "heads.safetensors"
    save_random_heads(tiny_chat_model, heads)
    common = dict(folder=str(tiny_chat_model), heads=str(heads), dtype="float32", decode_tokens=4,
                  seed=0, worker="engine")
    quick = dict(budget=64, chunk=32, stabilizers=16, n_loc=16)
    runs = {"full": {}, "locret": {}, "streamingllm": {}, "locret-noevict": None,
            "locret-int8": dict(kv_int8=True)}
    rows = []
    for length in (128, 256):
        for run, more in runs.items():
            policy = "locret" if run.startswith("locret") else run
            more = dict(budget=length) if more is None else more
            settings = asdict(Settings(policy=policy, **quick | more))
            point = dict(common, run=run, length=length, settings=settings)
            rows.append(dict(run=run, **memory_speed_point(point, capsys, monkeypatch)))
        point = dict(common, worker="transformers", length=length, settings=asdict(Settings()))
        rows.append(dict(run="transformers", **memory_speed_point(point, capsys, monkeypatch)))
    for r in rows:
        fields = ENGINE_FIELDS if r["run"] != "transformers" else ENGINE_FIELDS[-6:]
        assert all(r.get(f) is not None for f in fields), r
        assert r["peak_bytes"] >= r["rss_loaded_bytes"] > 0
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    engine = [r for r in rows if r["run"] != "transformers"]
    assert all(r["predicted_pool_bytes"] == r["pool_bytes"] for r in engine)
    pool = lambda run: [r["pool_bytes"] for r in rows if r["run"] == run]
    assert pool("locret") == pool("streamingllm") and len(set(pool("locret"))) == 1
    turned = [r["pool_bytes"] - r["pool_capacity"] * 2 * 16 * 4 for r in rows
              if r["run"] == "locret-noevict"]
    # full's pool grows; locret with nothing evicted holds the same + a layer of keys turned
    assert pool("full")[1] > pool("full")[0] and turned == pool("full")
    int8 = pool("locret-int8")  # int8 K and V (+ scales, buffers)
    assert len(set(int8)) == 1 and int8[0] < pool("locret")[0]
    for run in ("locret", "locret-int8"):  # budget + n_loc tail
        assert [r["kept_after_prefill"] for r in rows if r["run"] == run] == [64 + 16] * 2


def test_grid_runs_each_point_in_a_fresh_process(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """memory_speed.py --quick end to end: each point in its own process, the speed ratios and
    memory growth computed from the rows, the table, the plot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children: a test of the pipeline, not a timing
    heads, out, png = tmp_path / "heads.safetensors", tmp_path / "bench.json", tmp_path / "m.png"
    save_random_heads(tiny_chat_model, heads)
    run_bench("memory_speed", ["--quick", "--ckpt", str(tiny_chat_model), "--heads", str(heads),
                               "--lengths", "128,256", "--policies", "full,locret",
                               "--dtype", "float32", "--out", str(out), "--plot", str(png)],
              monkeypatch)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["prompt_tokens"], r["run"]) for r in rows] == [(n, run) for n in (128, 256)
                                                              for run in ("full", "locret")]
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]
    assert all(r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 for r in rows)  # K+V x L x KVH x D x 4
    assert [r["budget"] for r in rows] == [None, 64] * 2
    assert [r["settings"]["policy"] for r in rows] == ["full", "locret"] * 2
    assert all(r["settings"]["chunk"] == 32 and r["settings"]["n_loc"] == 16 for r in rows)
    assert all(r["pool_bytes"] == r["predicted_pool_bytes"] for r in rows)
    assert all(r["peak_bytes"] >= r["rss_loaded_bytes"] > 0 for r in rows)
    assert len({r["rss_loaded_bytes"] for r in rows}) > 1  # each process measured its own
    for line in result["speed_ratios"]:
        at = {r["run"]: r for r in rows if r["prompt_tokens"] == line["prompt_tokens"]}
        for phase in ("prefill", "decode"):
            ratio = at["locret"][f"{phase}_tok_s"] / at["full"][f"{phase}_tok_s"]
            assert line[f"{phase}_locret_vs_full"] == pytest.approx(ratio)
    assert [line["prompt_tokens"] for line in result["speed_ratios"]] == [128, 256]
    growth = {g["run"]: g for g in result["memory_growth"]}
    for run, g in growth.items():
        peaks = [r["peak_bytes"] for r in rows if r["run"] == run]
        assert (g["from_tokens"], g["to_tokens"]) == (128, 256)
        assert g["growth_pct"] == pytest.approx(100 * (peaks[1] / peaks[0] - 1))
    assert sorted(growth) == ["full", "locret"]
    table = capsys.readouterr().out
    assert table == out.with_suffix(".md").read_text() + "\n"
    assert "| run | prompt tokens |" in table and "| locret | 256 | 64 |" in table
    assert "prefill locret/full" in table and png.read_bytes()[:4] == b"\x89PNG"


def test_stopped_run_keeps_measured_points(tiny_chat_model, tmp_path, monkeypatch):
    """A run stopped part way keeps its rows: here full attention timed past the model's window
    and a kvpress press under another venv's python, then a stop before the third point."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "fake" / "kvpress").mkdir(parents=True)
    (tmp_path / "fake" / "kvpress" / "__init__.py").write_text(FAKE_KVPRESS)
    python = tmp_path / "python"  # another venv's python: here ours, seeing the fake kvpress
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "fake"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    real_run, pythons = subprocess.run, []

    def run_then_stop(cmd, **kwargs):  # the third point is "killed" before it reports
        if len(pythons) == 2:
            raise KeyboardInterrupt
        pythons.append(cmd[0])
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "run", run_then_stop)
    out = tmp_path / "bench.json"  # the tiny chat model's window is 1024 tokens
    with pytest.raises(KeyboardInterrupt):
        run_bench("memory_speed", ["--quick", "--ckpt", str(tiny_chat_model), "--policies", "full",
                                   "--lengths", "1100,1200", "--kvpress", str(python),
                                   "--dtype", "float32", "--out", str(out),
                                   "--plot", str(tmp_path / "m.png")], monkeypatch)
    assert pythons == [sys.executable, str(python)]
    full, press = json.loads(out.read_text())["rows"]
    assert "error" not in full and "error" not in press, (full, press)
    assert (full["run"], full["prompt_tokens"], full["kept_after_prefill"]) == ("full", 1100, 1100)
    assert full["pool_capacity"] > 1100 and full["pool_bytes"] == full["predicted_pool_bytes"] > 0
    assert (press["run"], press["budget"]) == ("kvpress-snapkv", 64)
    assert press["kept_after_prefill"] == 64 + 16  # the same budget as ours, plus the n_loc tail
    assert press["peak_bytes"] >= press["rss_loaded_bytes"] > 0 and press["decode_tok_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| full | 1100 |" in table and "| kvpress-snapkv | 1100 |" in table
    with pytest.raises(SystemExit):
        run_bench("memory_speed", ["--kvpress", str(python), "--presses", "nosuchpress"],
                  monkeypatch)


def test_stream_bench_pipes_each_length_through_generate(tiny_chat_model, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "stream"
    generate_args = "--dtype float32 --policy knorm --budget 64 --stabilizers 8 --chunk 32"
    run_bench("stream", ["--ckpt", str(tiny_chat_model), "--lengths", "200,500",
                         "--new-tokens", "2", "--generate-args", generate_args, "--out", str(out)],
              monkeypatch)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["requested_tokens"] for r in rows] == [200, 500]
    for r in rows:  # the document, then the chat template and question
        assert r["requested_tokens"] <= r["prompt_tokens"] < 1.1 * r["requested_tokens"] + 60
        # chunks of 32, then the question
        assert r["prompt_tokens"] // 32 <= r["chunks"] <= r["prompt_tokens"] // 32 + 2
        assert r["peak_bytes"] > 0 and r["prefill_tok_s"] > 0
    growth = 100 * (rows[1]["peak_bytes"] / rows[0]["peak_bytes"] - 1)
    assert f"peak memory {growth:+.1f}%" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, flags: list[str], monkeypatch) -> None:
    """bench/<name>.py as its command line runs it, in this process: the fixtures' patches hold."""
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", *flags])
    runpy.run_path(str(ROOT / "bench" / f"{name}.py"), run_name="__main__")


@pytest.fixture
def heldout_heads(tiny_chat_model, tmp_path, monkeypatch) -> list[str]:
    """A held-out haystack of plain prose for the tiny model, random heads saved for it: the
    benches' first flags."""
    from locret.eval import heldout
    text = " ".join(f"Option {i} now names the file it could not read, instead of failing quietly."
                    for i in range(3000))
    monkeypatch.setattr(heldout, "text", lambda split: text)
    model = load_model(tiny_chat_model)
    torch.manual_seed(0)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "heads.safetensors", backbone="tiny")
    return ["--ckpt", str(tiny_chat_model), "--heads", str(tmp_path / "heads.safetensors"),
            "--length", "400", "--dtype", "float32", "--device", "cpu"]


def test_sensitivity_varies_one_setting_at_a_time_and_resumes(heldout_heads, tmp_path, capsys,
                                                              monkeypatch):
    flags = heldout_heads + ["--budget", "1/4", "--stabilizers", "0,1/4", "--chunks", "64",
                             "--spans", "1,5", "--shared-layers", "all,1-1", "--n", "2",
                             "--oracle", "--out", str(tmp_path / "sens")]
    run_bench("sensitivity", flags, monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "sens.jsonl").read_text().splitlines()]
    # per item: full attention, the defaults (GENERIC: share 1/4, chunk 1024), one change each,
    # the oracles
    default = {"stabilizers": "1/4", "chunk": 1024, "span": 1, "eviction": "per-head",
               "layers": "all", "scorer": "heads"}
    points = [r["point"] for r in rows[:11]]
    assert points == [None, default, default | {"stabilizers": "0"}, default | {"chunk": 64},
                      default | {"span": 5}, default | {"eviction": "shared"},
                      default | {"layers": "1-1"}, default | {"scorer": "labels"},
                      default | {"scorer": "labels", "eviction": "shared"},
                      default | {"scorer": "shared labels", "eviction": "shared"},
                      default | {"scorer": "joint labels", "eviction": "shared"}]
    assert len(rows) == 22 and all(r["budget"] == 100 for r in rows)
    by_point = lambda p: [r["prediction"] + str(r["needle_retention"])
                          for r in rows if r["point"] == p]
    # the labels, not the heads, chose
    assert by_point(default | {"scorer": "labels"}) != by_point(default)
    table = capsys.readouterr().out
    assert table == (tmp_path / "sens.md").read_text() and len(table.splitlines()) == 2 + 11
    assert ("| full attention | - | - | - | - | - |" in table
            and "| 1/4 | 64 | 1 | per-head | all | heads |" in table)
    assert "| 1/4 | 1024 | 1 | shared | all | shared labels |" in table
    run_bench("sensitivity", flags, monkeypatch)  # everything done: nothing is added
    assert len((tmp_path / "sens.jsonl").read_text().splitlines()) == 22
    assert capsys.readouterr().out == table


def test_layers_ranks_needles_per_layer_and_range(heldout_heads, tmp_path, capsys, monkeypatch):
    flags = heldout_heads + ["--n", "3", "--out", str(tmp_path / "l")]
    run_bench("layers", flags + ["--ranges", "all,1-1"], monkeypatch)
    table = capsys.readouterr().out
    assert table == (tmp_path / "l.md").read_text() and table.startswith(
        "| ranked by | needle tokens in the top 0.125 (3 heldout_val items)")
    shares, by_kind = table.split("\n\n")
    cells = {row.split(" | ")[0][2:]: row.strip("| ").split(" | ")[1:]
             for row in shares.splitlines()[2:]}
    values = {row: float(needle) for row, (needle, _) in cells.items()}
    assert list(values) == ["layer 0", "layer 1", "all", "1-1", "labels (best rank in any layer)"]
    # a one-layer range
    assert all(0 <= v <= 1 for v in values.values()) and values["1-1"] == values["layer 1"]
    assert len(set(values.values())) > 1  # layers, ranges and labels rank differently
    assert all(0 <= float(value) <= 1 for _, value in cells.values())
    # value tokens by the kind asked: one column per kind among the 3 items, rows for --ranges and
    # the labels
    header, _, *kind_rows = by_kind.splitlines()
    counts = [int(c.split("(")[1].rstrip(")")) for c in header.strip("| ").split(" | ")[1:]]
    assert sum(counts) == 3 and [r.split(" | ")[0][2:] for r in kind_rows] == [
        "all", "1-1", "labels (best rank in any layer)"]
    assert kind_rows[0].count(" | ") == len(counts)
    run_bench("layers", flags + ["--task", "passkey", "--n", "2", "--share", "0.0625",
                                 "--ranges", "all"], monkeypatch)
    out = capsys.readouterr().out
    # no kinds outside the suite
    assert "needle tokens in the top 0.0625 (2 passkey items)" in out and "\n\n" not in out
    beyond = "--ranges 0-5: layers are numbered among the model's 2 global layers, 0-1"
    with pytest.raises(SystemExit, match=beyond):
        run_bench("layers", flags + ["--ranges", "0-5"], monkeypatch)
    with pytest.raises(SystemExit, match="--ranges must be FIRST-LAST"):
        run_bench("layers", flags + ["--ranges", "5"], monkeypatch)


def test_layers_has_a_row_per_global_layer_of_a_hybrid_model(tmp_path, capsys, monkeypatch):
    """Gemma 3's heads sit on its global layers only (2 of the tiny config's 6): one row each,
    named by its model layer, and --ranges numbered among them."""
    from test_gemma3 import save_gemma3, tiny_gemma3_config
    from conftest import write_tiny_tokenizer
    folder = tmp_path / "gemma3"
    save_gemma3(folder, tiny_gemma3_config(max_position_embeddings=1024))
    write_tiny_tokenizer(folder)
    model = load_model(folder)
    model.add_retaining_heads(8)
    save_heads(model, folder / "heads.safetensors", backbone="tiny")
    flags = ["--ckpt", str(folder), "--heads", str(folder / "heads.safetensors"), "--length", "400",
             "--dtype", "float32", "--device", "cpu", "--task", "passkey", "--n", "2",
             "--out", str(tmp_path / "l")]
    run_bench("layers", flags + ["--ranges", "all,1-1"], monkeypatch)
    table = capsys.readouterr().out.split("\n\n")[0]
    rows = [r.split(" | ")[0][2:] for r in table.splitlines()[2:]]
    assert rows == ["layer 2", "layer 5", "all", "1-1", "labels (best rank in any layer)"]
    beyond = "--ranges 0-5: layers are numbered among the model's 2 global layers, 0-1"
    with pytest.raises(SystemExit, match=beyond):
        run_bench("layers", flags + ["--ranges", "0-5"], monkeypatch)


def test_breakdown_splits_prefill_and_decode_by_component(tiny_chat_model, tmp_path, capsys,
                                                          monkeypatch):
    model = load_model(tiny_chat_model)
    layer_weights = sum(m.weight.numel() for m in model.model.layers.modules()
                        if isinstance(m, torch.nn.Linear))
    heads = tmp_path / "heads.safetensors"
    save_random_heads(tiny_chat_model, heads)
    common = ["--ckpt", str(tiny_chat_model), "--length", "300", "--budget", "64", "--chunk", "32",
              "--stabilizers", "16", "--n-loc", "12", "--decode-tokens", "3",
              "--peak-sizes", "64,128"]
    out = tmp_path / "locret.json"
    run_bench("breakdown", [*common, "--dtype", "float32", "--heads", str(heads),
                            "--out", str(out)], monkeypatch)
    r = json.loads(out.read_text())
    assert r["chunks"] == 10 and r["decode_steps"] == 3  # 288 tokens in chunks of 32, the tail
    assert {k: r["settings"][k] for k in ("budget", "chunk", "stabilizers", "n_loc")} == dict(
        budget=64, chunk=32, stabilizers=16, n_loc=12)
    components = ["MLP", "attention projections", "retaining heads", "attention (RoPE, sdpa)",
                  "cache write, re-rotation", "policy scoring", "eviction", "norms", "LM head",
                  "other"]
    for phase in ("prefill", "decode"):
        parts = r[phase]
        assert list(parts) == components
        assert sum(parts.values()) == pytest.approx(r[f"{phase}_seconds"])
        always = ("MLP", "attention projections", "attention (RoPE, sdpa)",
                  "cache write, re-rotation", "norms", "LM head")
        assert all(parts[name] > 0 for name in always)
        assert parts["other"] >= 0
    prefill = r["prefill"]
    assert min(prefill["retaining heads"], prefill["policy scoring"], prefill["eviction"]) > 0
    decode = r["decode"]  # decoding neither scores (so the heads do not run) nor evicts
    assert decode["retaining heads"] == decode["policy scoring"] == decode["eviction"] == 0
    table = capsys.readouterr().out
    assert table == out.with_suffix(".md").read_text() and "| policy scoring |" in table
    assert r["matmul_peak_gflop_s"] > 0 and r["peak_sizes"] == [64, 128]
    assert "this machine's matmul peak" in table and "% of it, decode at" in table

    full_flags = [*common, "--policy", "full", "--peak-sizes", "0",
                  "--out", str(tmp_path / "full.json")]
    run_bench("breakdown", full_flags, monkeypatch)
    full = json.loads((tmp_path / "full.json").read_text())
    assert "this machine's matmul peak" not in capsys.readouterr().out  # --peak-sizes 0
    # no --dtype: the device's
    assert full["dtype"] == default_dtype("cpu") == default_dtype("cpu:0")
    assert full["prefill"]["retaining heads"] == full["prefill"]["policy scoring"] == 0
    assert full["prefill"]["eviction"] == 0
    c = model.config  # full attention: each token sees every one before it, whatever the chunks
    per_key = 4 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    lm_head = 2 * model.lm_head.weight.numel()
    attention = per_key * 300 * 301 // 2
    assert full["prefill_flops"] == 2 * 300 * layer_weights + 10 * lm_head + attention
    assert full["decode_flops"] == 3 * (2 * layer_weights + lm_head) + per_key * (301 + 302 + 303)
    # locret's chunks see at most the budget and themselves
    assert r["prefill_flops"] < full["prefill_flops"]
    int8 = tmp_path / "int8.json"
    run_bench("breakdown", [*common, "--policy", "streamingllm", "--kv-int8", "--peak-sizes", "0",
                            "--out", str(int8)], monkeypatch)
    assert json.loads(int8.read_text())["settings"]["kv_int8"] and not r["settings"]["kv_int8"]
    with pytest.raises(SystemExit) as stop:  # bad input is one line, not a traceback
        run_bench("breakdown", ["--ckpt", str(tmp_path / "missing")], monkeypatch)
    assert str(stop.value).startswith("error: unknown model") and "\n" not in str(stop.value)
    with pytest.raises(SystemExit, match="--budget \\(64\\) must be larger than --stabilizers"):
        run_bench("breakdown", [*common, "--policy", "h2o", "--stabilizers", "64"], monkeypatch)
    for bad in (["--decode-tokens", "0"], ["--peak-sizes", "1024,x"], ["--peak-sizes", "-5"]):
        with pytest.raises(SystemExit):
            run_bench("breakdown", bad, monkeypatch)


FAKE_KVPRESS = '''
"""Stands in for kvpress (its own venv in real use): keeps each layer's last entries after the
prefill."""
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
        hooks = [layer.self_attn.register_forward_hook(self.compress, with_kwargs=True)
                 for layer in model.model.layers]
        yield
        for h in hooks:
            h.remove()
'''


def test_repeated_gpu_timings_report_medians_and_decode_range(monkeypatch):
    """--repeats (cuda): each point's medians of prefill and decode time, and the decode speed's
    range."""
    timings = [(2.0, 0.5), (1.0, 0.25), (4.0, 1.0), (3.0, 0.2), (5.0, 0.4)]  # (prefill s, decode s)
    row = repeated_speeds(1000, 11, timings)
    assert row["prefill_seconds"] == 3.0 and row["prefill_tok_s"] == 1000 / 3.0
    assert row["decode_seconds"] == 0.4 and row["decode_tok_s"] == 10 / 0.4
    assert (row["decode_tok_s_min"], row["decode_tok_s_max"], row["repeats"]) == (10.0, 50.0, 5)
    # the lower middle of an even count
    assert repeated_speeds(1000, 11, timings[:2])["prefill_seconds"] == 1.0
    with pytest.raises(SystemExit):
        run_bench("memory_speed", ["--device", "cuda", "--repeats", "0"], monkeypatch)


@pytest.mark.parametrize("heads, message", [("none.safetensors", "not found"),
                                            ("config.json", "unreadable safetensors")])
def test_bad_heads_file_is_one_error_before_any_point(tiny_chat_model, tmp_path, heads, message,
                                                      monkeypatch):
    args = ["--quick", "--ckpt", str(tiny_chat_model), "--policies", "locret",
            "--heads", str(tiny_chat_model / heads), "--dtype", "float32",
            "--out", str(tmp_path / "bench.json")]
    with pytest.raises(SystemExit, match=message):
        run_bench("memory_speed", args, monkeypatch)
    assert not (tmp_path / "bench.json").exists()  # no point ran


def test_attention_bench(tiny_chat_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "attention.json"
    run_bench("attention", ["--ckpt", str(tiny_chat_model), "--chunk", "24", "--entries", "40",
                            "--dtype", "float32", "--repeats", "1", "--mm-size", "64",
                            "--out", str(out)], monkeypatch)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 and all(r["ms"] > 0 and r["gflop_s"] > 0 for r in rows.values())
    wrong = rows.pop("no mask (a bound: wrong answer)")
    assert wrong["max_error"] > 1e-2  # the chunk's tokens see their future: the errors are measured
    # every other way computes the same attention
    assert all(r["max_error"] < 1e-5 for r in rows.values()), rows
    engine = "cache and chunk apart, merged by log-sum-exp (the engine's)"
    assert f"| {engine} | {rows[engine]['ms']:.1f} |" in capsys.readouterr().out


def test_sensitivity_runs_the_oracle_on_a_benchmark_task(heldout_heads, tmp_path, capsys,
                                                         monkeypatch):
    flags = heldout_heads + ["--task", "passkey", "--length", "400", "--budget", "1/4",
                             "--stabilizers", "1/4", "--chunks", "1024", "--spans", "1",
                             "--evictions", "per-head", "--n", "1", "--oracle",
                             "--out", str(tmp_path / "passkey")]
    run_bench("sensitivity", flags, monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "passkey.jsonl").read_text().splitlines()]
    assert [r["point"] and r["point"]["scorer"] for r in rows] == [
        None, "heads", "labels", "labels", "shared labels", "joint labels"]
    assert all(r["task"] == "passkey" and 0 <= r["score"] <= 1 for r in rows)
    assert all(0 <= r["needle_retention"] <= 1 for r in rows)  # the passkey is tracked as a needle
    assert rows[0]["needle_retention"] == 1.0 and "shared labels" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--budget", "abc"], "--budget must be a fraction"),
    (["--budget", "1/0"], "--budget must be a fraction"),
    (["--budget", "0"], "keeps no entries"),
    (["--stabilizers", "0,2"], "shares of the budget, each in"),
    (["--stabilizers", "1/0"], "invalid fractions value"),
    (["--n", "0"], "--n >= 1")])
def test_sensitivity_bad_flags_are_one_line(flags, message, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        run_bench("sensitivity", flags, monkeypatch)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_kept_splits_the_pool_by_part_of_the_prompt(heldout_heads, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace
    from locret.eval.evaluation import Encoded
    kept = SimpleNamespace(**runpy.run_path(str(ROOT / "bench" / "kept.py")))
    # preamble 0-2, needle 5-6, question 10-11
    encoded = Encoded(list(range(12)), [], [range(5, 7)], 2, 3)
    part = kept.parts_of(encoded, 10)
    assert part.tolist() == [0, 0, 0, 2, 2, 1, 1, 2, 2, 2]
    # [L, B, KVH, n]
    pool = SimpleNamespace(index=torch.tensor([[[[0, 5, 8, 9], [5, 6, 1, 2]]]]), length=4)
    by_part, needles = kept.kept_shares(pool, part)
    assert (by_part == pytest.approx([3 / 8, 3 / 8, 2 / 8])
            and needles == pytest.approx((1 + 2) / 2 / 2))
    flags = heldout_heads + ["--task", "heldout_val", "--budget", "1/4",
                             "--policies", "locret,streamingllm",
                             "--n", "2", "--show", "--out", str(tmp_path / "kept")]
    run_bench("kept", flags, monkeypatch)
    out = capsys.readouterr().out
    table = (tmp_path / "kept.md").read_text()
    assert out.endswith(table) and "locret, item 0" in out and "streamingllm, item 0" in out
    rows = {line.split(" | ")[0][2:]: [float(x.strip(" |%")) for x in line.split(" | ")[1:]]
            for line in table.splitlines()[5:]}
    assert list(rows) == ["locret", "streamingllm"]
    assert all(sum(r[:3]) == pytest.approx(100, abs=2) and 0 <= r[3] <= 100 for r in rows.values())
    with pytest.raises(SystemExit):
        run_bench("kept", heldout_heads + ["--budget", "abc"], monkeypatch)
    assert "--budget must be a fraction" in capsys.readouterr().err


def test_transient_measures_a_cut_model_in_a_fresh_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    hf = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=4096,
              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False)
    (tmp_path / "tiny.json").write_text(json.dumps(hf))
    run_bench("transient", ["--model", str(tmp_path / "tiny.json"), "--budget", "256",
                            "--chunk", "512", "--stabilizers", "32", "--n-loc", "16",
                            "--out", str(tmp_path / "t")], monkeypatch)
    [row] = json.loads((tmp_path / "t.json").read_text())
    config, cut = config_from_hf(hf), config_from_hf(dict(hf, num_hidden_layers=2))
    assert row["prompt_tokens"] == 256 + 2 * 512 + 16 and row["capacity"] == 256 + 512
    assert row["pool_bytes"] == KVPool.bytes_needed(cut, 768, torch.float32, turned_keys=True)
    full_depth = KVPool.bytes_needed(config, 768, torch.float32, turned_keys=True)
    assert row["full_depth_pool_bytes"] == full_depth
    # the MLP alone holds 3 x 512 x 4096 fp32 values (24 MiB) at once; the estimate's bound is
    # close to what is used
    assert 24 * 2**20 < row["transient_bytes"] < row["bound_bytes"] + 32 * 2**20
    md = (tmp_path / "t.md").read_text().splitlines()
    assert len(md) == 3 and md[2].startswith("| tiny | 2 | locret | float32 | 256 / 512 |")
    assert capsys.readouterr().out.splitlines()[-1] == md[2]
    with pytest.raises(SystemExit):
        run_bench("transient", ["--policies", "full"], monkeypatch)
    assert "unknown --policies full" in capsys.readouterr().err
