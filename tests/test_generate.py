"""generate.py and the generation loop on a tiny random model."""
import pytest
import torch

import generate as cli
from locret import plan
from conftest import naive_greedy
from locret.context import generate
from locret.settings import Settings
from locret.sampling import Sampling, sample
from locret.loading.weights import load_model, stop_token_ids
from locret.loading.tokenizer import Tokenizer

FULL = Settings(policy="full", n_loc=0)


def test_greedy_generation_equals_uncached_argmax(tiny_chat_model):
    model = load_model(tiny_chat_model)
    prompt = list(range(3, 40))
    out, stats = generate(model, prompt, FULL, max_new_tokens=12)
    assert out == naive_greedy(model, prompt, 12)
    assert stats.prompt_tokens == 37 and stats.new_tokens == 12
    # (k, v) x layers + scratch, kv heads, capacity, head_dim, fp32
    kv = (2 * 2 + 1) * 2 * (37 + 12) * 16 * 4
    assert stats.pool_bytes == kv + 2 * 2 * (37 + 12) * (4 + 8)  # + scores and token indices


def test_generation_stops_at_stop_token(tiny_chat_model):
    model = load_model(tiny_chat_model)
    prompt = list(range(3, 20))
    free = naive_greedy(model, prompt, 6)
    out, _ = generate(model, prompt, FULL, max_new_tokens=6, stop_ids={free[2]})
    assert out == free[:free.index(free[2]) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draws = lambda seed: [sample(logits, Sampling(1.0, seed=seed), g)
                          for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]
    assert draws(3) == draws(3) and draws(3) != draws(4)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, Sampling(temperature=1.0, top_k=1), g) == int(logits.argmax())
    assert sample(logits, Sampling(temperature=1.0, top_p=1e-6), g) == int(logits.argmax())


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, Sampling(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert seen == {0, 1}


def test_cli_streams_answer_and_stats(tiny_chat_model, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("what is the capital of france ?")
    cli.main(cli.parse_args(["--ckpt", str(tiny_chat_model), "--prompt", str(tmp_path / "p.txt"),
                             "--max-new-tokens", "8", "--dtype", "float32"]))
    out, err = capsys.readouterr()
    tok = Tokenizer(tiny_chat_model)
    model = load_model(tiny_chat_model)
    question = [{"role": "user", "content": "what is the capital of france ?"}]
    prompt = tok.encode(tok.render_chat(question), add_special_tokens=False)
    expected = naive_greedy(model, prompt, 8)
    stops = stop_token_ids(tiny_chat_model, tok)
    if any(t in stops for t in expected):
        expected = expected[:min(expected.index(t) for t in stops if t in expected)]
    assert out == tok.decode(expected) + "\n"
    assert f"prompt tokens {len(prompt)}" in err and "tok/s" in err and "peak memory" in err


@pytest.mark.parametrize("content, message", [
    (b"   \n", "is empty"),
    (b"\xff\xfe bad", "is not UTF-8 text"),
])
def test_cli_bad_prompt_is_one_line_error(tiny_chat_model, tmp_path, run_generate, content,
                                          message):
    (tmp_path / "p.txt").write_bytes(content)
    run = run_generate("--ckpt", str(tiny_chat_model), "--prompt", str(tmp_path / "p.txt"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_cli_missing_prompt_file(tiny_chat_model, tmp_path):
    with pytest.raises(cli.LocretError, match="cannot read prompt .*nope.txt: No such file"):
        cli.main(cli.parse_args(["--ckpt", str(tiny_chat_model),
                                 "--prompt", str(tmp_path / "nope.txt")]))


def run_cli(folder, tmp_path, *flags, prompt="the quick brown fox jumps over the lazy dog " * 30):
    (tmp_path / "p.txt").write_text(prompt)
    cli.main(cli.parse_args(["--ckpt", str(folder), "--prompt", str(tmp_path / "p.txt"),
                             "--dtype", "float32", "--max-new-tokens", "4", *flags]))


def test_a_model_without_a_chat_template_is_prompted_as_plain_completion(tiny_chat_model, tmp_path,
                                                                        capsys):
    """A base model (no chat template) answers as with --no-chat, and says the same."""
    import shutil
    base = shutil.copytree(tiny_chat_model, tmp_path / "base")
    (base / "tokenizer_config.json").write_text("{}")
    run_cli(tiny_chat_model, tmp_path, "--policy", "full", "--no-chat")
    completion = capsys.readouterr()
    run_cli(base, tmp_path, "--policy", "full")
    plain = capsys.readouterr()
    assert plain.out == completion.out
    assert plain.err.split(" | ")[1] == completion.err.split(" | ")[1]  # the same prompt tokens


def test_cli_evicting_policy_reports_pool_and_compression(tiny_chat_model, tmp_path, capsys):
    run_cli(tiny_chat_model, tmp_path, "--policy", "snapkv", "--budget", "32", "--chunk", "16",
            "--stabilizers", "8", "--n-loc", "10")
    err = capsys.readouterr().err
    assert ("policy snapkv (budget 32)" in err and "chunks" in err and "compression" in err
            and "KV pool" in err)
    run_cli(tiny_chat_model, tmp_path, "--policy", "snapkv", "--budget", "32", "--chunk", "16",
            "--stabilizers", "8", "--eviction", "shared")
    assert "policy snapkv (budget 32, shared eviction)" in capsys.readouterr().err
    run_cli(tiny_chat_model, tmp_path, "--policy", "snapkv", "--budget", "32", "--chunk", "16",
            "--stabilizers", "8", "--eviction", "shared", "--shared-layers", "1-1")
    assert "policy snapkv (budget 32, shared eviction by layers 1-1)" in capsys.readouterr().err
    run_cli(tiny_chat_model, tmp_path, "--policy", "snapkv", "--budget", "32", "--chunk", "16",
            "--stabilizers", "8", "--kv-int8")
    assert "(int8) |" in capsys.readouterr().err
    from locret.context import GenerationStats
    stats = GenerationStats(prompt_tokens=100, new_tokens=2, chunks=3, kept_after_prefill=40,
                            prefill_seconds=1.0, question_tokens=10, question_seconds=0.1,
                            decode_seconds=0.5, pool_bytes=1024, peak_memory_bytes=2048)
    # the span applies to locret only
    for policy, span, shown in (("locret", 9, "policy locret (budget 32, span 9)"),
                                ("locret", 1, "policy locret (budget 32)"),
                                ("snapkv", 9, "policy snapkv (budget 32)")):
        assert shown + " |" in stats.summary(Settings(policy=policy, budget=32, span=span))


def test_cli_max_memory_picks_a_budget(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """The limit counts what the process already holds (its peak so far), then the pool and
    activations."""
    held = 100 * 2**20
    monkeypatch.setattr(plan, "peak_memory_bytes", lambda device: held)
    limit = f"{(held + 600_000) / 2**30:.12f}"  # room for about a hundred entries of the tiny model
    run_cli(tiny_chat_model, tmp_path, "--policy", "tova", "--max-memory", limit, "--chunk", "16",
            "--stabilizers", "8")
    err = capsys.readouterr().err
    budget = int(err.split("(budget ")[1].split(")")[0])
    assert 16 < budget < 300  # the limit binds below the prompt length
    with pytest.raises(cli.LocretError, match="above --max-memory"):
        run_cli(tiny_chat_model, tmp_path, "--policy", "tova", "--max-memory", limit,
                "--chunk", "16", "--stabilizers", "8", "--budget", str(budget + 50))


def test_cli_eviction_defaults_to_what_the_heads_were_trained_for(tiny_chat_model, tmp_path,
                                                                  capsys):
    from locret.heads import save_heads
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "cis.safetensors", backbone="tiny", training={"target": "cis"})
    save_heads(model, tmp_path / "shared.safetensors", backbone="tiny",
               training={"target": "shared"}, eviction="shared")
    flags = ["--budget", "32", "--chunk", "16", "--stabilizers", "8"]
    run_cli(tiny_chat_model, tmp_path, "--heads", str(tmp_path / "shared.safetensors"), *flags)
    assert "policy locret (budget 32, shared eviction)" in capsys.readouterr().err
    run_cli(tiny_chat_model, tmp_path, "--heads", str(tmp_path / "cis.safetensors"), *flags)
    assert "policy locret (budget 32)" in capsys.readouterr().err
    run_cli(tiny_chat_model, tmp_path, "--heads", str(tmp_path / "shared.safetensors"),
            "--eviction", "per-head", *flags)
    assert "policy locret (budget 32)" in capsys.readouterr().err  # the flag wins


def test_cli_heads_for_another_backbone(tiny_chat_model, tmp_path, save_hf, run_generate):
    from conftest import tiny_llama_config
    from locret.heads import save_heads
    other = load_model(save_hf(tiny_llama_config(hidden_size=32, num_attention_heads=2),
                               name="other")[1])
    other.add_retaining_heads(8)
    save_heads(other, tmp_path / "heads.safetensors", backbone="other-model")
    run = run_generate("--ckpt", str(tiny_chat_model), "--prompt", "-",
                       "--heads", str(tmp_path / "heads.safetensors"), stdin="hello")
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert ("heads were trained for another backbone (other-model: hidden_size 32 vs 64"
            in run.stderr)


def test_no_chat_uses_the_prompt_exactly_as_given(tiny_chat_model, tmp_path, capsys):
    """A completion prompt ending in a space keeps it (only the file's final newline goes), and the
    answer is transformers' greedy continuation of exactly that text."""
    import transformers
    text = "the quick brown fox "
    (tmp_path / "p.txt").write_text(text + "\n")
    cli.main(cli.parse_args(["--ckpt", str(tiny_chat_model), "--prompt", str(tmp_path / "p.txt"),
                             "--no-chat", "--policy", "full", "--max-new-tokens", "6",
                             "--dtype", "float32"]))
    out, _ = capsys.readouterr()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_chat_model / "tokenizer.json"))
    ids = hf_tok(text, return_tensors="pt").input_ids
    # the space is a token: dropping it would show
    assert ids.shape[1] != len(hf_tok(text.rstrip()).input_ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    expected = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2,
                           pad_token_id=2)[0, ids.shape[1]:]
    expected = [t for t in expected.tolist() if t != 2]
    assert out.removesuffix("\n") == Tokenizer(tiny_chat_model).decode(expected)


def test_nan_logits_stop_generation(tiny_chat_model):
    """Weights that turn NaN at run time (the load-time check samples only some values) stop with
    one line."""
    model = load_model(tiny_chat_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(cli.LocretError, match="NaN or inf logits"):
        generate(model, list(range(3, 20)), FULL, max_new_tokens=4)


def test_zoo_settings_are_the_defaults_and_flags_override_them():
    from locret.loading.zoo import DEFAULT_MODEL, ZOO
    entry = ZOO[DEFAULT_MODEL]
    defaults = plan.default_settings(entry, "locret", plan.heads_eviction(entry.heads))
    s = plan.resolve(defaults, plan.chosen(cli.parse_args(["--prompt", "p.txt"])),
                     prompt_tokens=4000)
    base = entry.settings
    assert (s.policy, s.budget, s.chunk, s.stabilizers, s.span, s.shared_layers, s.eviction) == \
        ("locret", base.budget, base.chunk, base.stabilizers, base.span, base.shared_layers,
         "shared")
    # the default model's heads score best with neighbours pooled (README's sensitivity table)
    assert base.span > 1
    args = cli.parse_args(["--prompt", "p.txt", "--span", "1", "--chunk", "64"])
    s = plan.resolve(defaults, plan.chosen(args), 4000)
    assert (s.span, s.chunk) == (1, 64)
    assert plan.resolve(plan.default_settings(None, "locret"), {}, 4000).span == 1  # not in the zoo


def test_stabilizers_left_out_are_the_zoos_share_of_any_budget():
    """`--budget 100` alone is a valid run: the stabilizers follow the budget (1/8 for the default
    model)."""
    from locret.loading.zoo import DEFAULT_MODEL, ZOO
    defaults = plan.default_settings(ZOO[DEFAULT_MODEL], "snapkv")
    assert plan.resolve(defaults, {"budget": 100}, 4000).stabilizers == 12
    assert plan.resolve(defaults, {"budget": 100, "stabilizers": 50}, 4000).stabilizers == 50
    generic = plan.default_settings(None, "snapkv")
    assert plan.resolve(generic, {"budget": 100}, 4000).stabilizers == 25  # GENERIC: 1/4
    with pytest.raises(cli.LocretError, match="must be larger than --stabilizers"):
        plan.resolve(defaults, {"budget": 100, "stabilizers": 100}, 4000)


def test_readme_links_to_docs_that_exist():
    """The README summarises; its links to pages under docs/ (and their section anchors) resolve."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    links = re.findall(r"\]\((docs/[^)#]+)(?:#([^)]+))?\)", (root / "README.md").read_text())
    pages = ("usage", "training", "evaluation", "results", "performance", "benchmarks",
             "choosing-settings", "tests")
    assert {page for page, _ in links} >= {f"docs/{name}.md" for name in pages}
    for page, anchor in links:
        assert (root / page).is_file(), page
        text = (root / page).read_text()
        slugs = [re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                 for line in text.splitlines() if line.startswith("#")]  # GitHub's anchors
        assert not anchor or anchor in slugs, f"{page}#{anchor}"


def test_readme_zoo_table_matches_the_zoo():
    from pathlib import Path
    from locret.loading.zoo import ZOO
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 8 and cells[1] != "hub id":
            rows[cells[0].split("`")[1]] = cells[1:]
    assert rows.keys() == ZOO.keys()
    for name, e in ZOO.items():
        s = e.settings
        assert rows[name] == [e.hub_id, *map(str, (s.budget, s.chunk, s.stabilizers, s.n_loc,
                                                   s.shared_layers, s.span))], name
