"""eval.py end to end on a tiny random model: reports agree with each other, runs reproduce, resume
is exact."""
import csv
import json
import math
import random

import pytest
import torch

import eval as cli
from locret import plan
from locret.errors import LocretError
from locret.eval import suite
from locret.eval.evaluation import Encoded, encode_item, evaluate
from locret.eval.stats import (exact_interval, paired, share_interval, share_text, sign_test,
                               wilson)
from locret.eval.tasks import make_item
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import load_model, stop_token_ids
from locret.settings import Settings

QUICK = ["--suite", "quick", "--dtype", "float32", "--device", "cpu", "--policies",
         "full,streamingllm,random,snapkv", "--budgets", "1/4,1/2", "--n", "2", "--chunk", "64",
         "--n-loc", "20"]
SMALL = ["--policies", "full", "--n", "1"]  # one item, full attention only: a run to refuse


def run_eval(folder, out, *flags):
    cli.main(cli.parse_args(["--ckpt", str(folder), "--out", str(out), *QUICK, *flags]))
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_quick_eval_writes_consistent_reports(tiny_chat_model, tmp_path):
    rows = run_eval(tiny_chat_model, tmp_path / "a")
    assert len(rows) == 2 * (1 + 3 * 2)  # items x (full + policies x budgets)
    table = list(csv.DictReader(open(tmp_path / "a" / "table.csv")))
    assert {(t["policy"], t["budget"]) for t in table} == {("full", "-")} | {
        (p, b) for p in ("streamingllm", "random", "snapkv") for b in ("0.25", "0.5")}
    for line in table:  # every table cell is the mean of its JSON lines
        group = [r for r in rows if r["policy"] == line["policy"]
                 and (line["budget"] == "-"
                      or f"{r['budget'] / r['length']:.4g}" == line["budget"])]
        assert float(line["passkey"]) == pytest.approx(100 * sum(r["score"] for r in group)
                                                       / len(group))
        assert float(line["ll_gap"]) == pytest.approx(sum(r["ll_gap"] for r in group) / len(group))
    markdown = (tmp_path / "a" / "table.md").read_text()
    assert markdown.count("\n") == len(table) + 2 and "| snapkv | 0.25 |" in markdown
    assert (tmp_path / "a" / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # the first policy named against the others and full
    pairs = (tmp_path / "a" / "paired.md").read_text()
    assert (pairs.count("| streamingllm |") == 2 * 3 and "| random |" in pairs
            and "| full |" in pairs)
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["needle_retention"] == 1.0 for r in full)


def test_locret_evicts_as_its_heads_were_trained_and_heuristics_per_head(tiny_chat_model, tmp_path,
                                                                         monkeypatch):
    from locret.heads import save_heads
    from locret.kv_pool import KVPool
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    save_heads(model, tmp_path / "shared.safetensors", backbone="tiny",
               training={"target": "shared"}, eviction="shared")
    modes, evict = [], KVPool.evict
    monkeypatch.setattr(KVPool, "evict",
                        lambda pool, keep, protect, shared=False, layers=slice(None): (
                            modes.append(shared), evict(pool, keep, protect, shared, layers))[1])
    flags = ["--heads", str(tmp_path / "shared.safetensors"), "--n", "1", "--budgets", "1/4"]
    run_eval(tiny_chat_model, tmp_path / "a", *flags, "--policies", "locret")
    assert modes and all(modes)
    modes.clear()
    run_eval(tiny_chat_model, tmp_path / "b", *flags, "--policies", "snapkv")
    assert modes and not any(modes)
    modes.clear()
    run_eval(tiny_chat_model, tmp_path / "c", *flags, "--policies", "snapkv",
             "--eviction", "shared")
    assert modes and all(modes)


def test_interrupted_run_resumes_without_duplicates_and_says_what_it_dropped(
        tiny_chat_model, tmp_path, monkeypatch, capsys):
    """A run killed after 5 results (and while writing a 6th line) resumes to the rows of a whole
    run: the same items, seed and settings give the same numbers, every run once."""
    whole = run_eval(tiny_chat_model, tmp_path / "whole")
    calls = {"n": 0}
    real = suite.evaluate

    def dies_after_5(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(suite, "evaluate", dies_after_5)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_chat_model, tmp_path / "cut")
    log = tmp_path / "cut" / "results.jsonl"
    numbers = lambda rows: [(r["task"], r["index"], r["policy"], r["budget"], r["score"],
                             r["log_likelihood"], r["ll_gap"], r["prediction"]) for r in rows]
    cut = [json.loads(line) for line in log.read_text().splitlines()]
    assert numbers(cut) == numbers(whole[:5])  # the same seed and settings reproduce
    log.write_text(log.read_text() + json.dumps(whole[5])[:30])  # killed while writing line 6
    monkeypatch.setattr(suite, "evaluate", real)
    capsys.readouterr()
    resumed = run_eval(tiny_chat_model, tmp_path / "cut")
    assert f"{log}: dropped line 6, cut short by a kill" in capsys.readouterr().err
    key = lambda r: (r["task"], r["length"], r["index"], r["policy"], r["budget"])
    assert sorted(map(key, resumed)) == sorted(map(key, whole))
    assert len(set(map(key, resumed))) == len(resumed)
    by_key = {key(r): r for r in whole}
    for r in resumed:
        assert r["log_likelihood"] == by_key[key(r)]["log_likelihood"]
        assert (r["score"], r["prediction"]) == (by_key[key(r)]["score"],
                                                 by_key[key(r)]["prediction"])


@pytest.mark.parametrize("policy", ["h2o", "tova", "knorm"])
def test_fidelity_is_exact_when_budget_covers_prompt(tiny_chat_model, policy):
    model, tok = load_model(tiny_chat_model), Tokenizer(tiny_chat_model)
    item = make_item("passkey", 0, 0, tok, 320)
    encoded = encode_item(tok, item, "completion")
    stops = stop_token_ids(tiny_chat_model, tok)
    full, reference = evaluate(model, tok, item, encoded, Settings("full", chunk=32, n_loc=10), 8,
                               stops, None)
    covered, _ = evaluate(model, tok, item, encoded,
                          Settings(policy, budget=len(encoded.prompt), chunk=32, stabilizers=4,
                                   n_loc=10), 8, stops, reference)
    assert (covered.ll_gap == 0.0 and covered.top1_agreement == 1.0
            and covered.needle_retention == 1.0)
    assert covered.prediction == full.prediction and not math.isnan(full.log_likelihood)
    small, _ = evaluate(model, tok, item, encoded,
                        Settings(policy, budget=16, chunk=32, stabilizers=4, n_loc=10), 8, stops,
                        reference)
    # compression counts every entry held after prefill: the budget and the n_loc tail
    assert (small.needle_retention < 1.0
            and small.compression == pytest.approx(len(encoded.prompt) / (16 + 10)))
    assert torch.isfinite(torch.tensor(small.ll_gap))


def test_perplexity_is_per_token(tiny_chat_model, tmp_path, monkeypatch):
    from locret.eval import haystack
    text = " ".join(f"Sentence {i} tells of the quick brown fox and the lazy dog."
                    for i in range(400))
    monkeypatch.setattr(haystack, "essays", lambda: text)
    rows = run_eval(tiny_chat_model, tmp_path, "--tasks", "perplexity", "--lengths", "320",
                    "--policies", "full,tova", "--budgets", "1/4")
    # scored, not generated
    assert all(r["prediction"] == "" and r["answer_tokens"] > 10 for r in rows)
    table = {line["policy"]: line for line in csv.DictReader(open(tmp_path / "table.csv"))}
    for policy in ("full", "tova"):
        of = [r for r in rows if r["policy"] == policy]
        expected = math.exp(-sum(r["log_likelihood"] for r in of)
                            / sum(r["answer_tokens"] for r in of))
        assert float(table[policy]["perplexity"]) == pytest.approx(expected)


def test_wilson_interval_is_exact_at_the_edges():
    low, high = wilson(0, 16)
    assert low == 0.0 and high == pytest.approx(100 * 1.96 ** 2 / (16 + 1.96 ** 2))  # 19.4, not +-0
    low, high = wilson(16, 16)
    assert high == 100.0 and low == pytest.approx(100 - 100 * 1.96 ** 2 / (16 + 1.96 ** 2))
    low, high = wilson(12, 24)
    assert low < 50 < high and high - 50 == pytest.approx(50 - low)


def test_exact_interval_is_clopper_pearson():
    low, high = exact_interval(0, 24)  # closed forms at the edges: 1 - 0.025^(1/n), 0.025^(1/n)
    assert low == 0.0 and high == pytest.approx(100 * (1 - 0.025 ** (1 / 24)), abs=1e-6)
    low, high = exact_interval(24, 24)
    assert high == 100.0 and low == pytest.approx(100 * 0.025 ** (1 / 24), abs=1e-6)
    low, high = exact_interval(19, 24)  # at each end the far tail holds exactly 2.5%
    tail = lambda p, ks: sum(math.comb(24, k) * p**k * (1 - p)**(24 - k) for k in ks)
    assert tail(low / 100, range(19, 25)) == pytest.approx(0.025, abs=1e-9)
    assert tail(high / 100, range(0, 20)) == pytest.approx(0.025, abs=1e-9)
    assert (round(low), round(high)) == (58, 93)
    mirrored = exact_interval(5, 24)
    assert mirrored == pytest.approx((100 - high, 100 - low), abs=1e-6)


def test_sign_test_is_the_exact_binomial():
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10) and sign_test(0, 10) == sign_test(10, 0)
    # P(X <= 3) + P(X >= 7), n = 10
    assert sign_test(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 2 ** 10)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_table_counts_items_both_policies_answered():
    row = lambda policy, budget, index, score: {"task": "t", "length": 100, "index": index,
                                                "policy": policy, "budget": budget,
                                                "score": score}
    rows = [row("full", 0, i, s) for i, s in enumerate([1, 1, 1, 0])]
    rows += ([row("a", 10, i, s) for i, s in enumerate([1, 1, 1, 0.5])]
             + [row("b", 10, i, s) for i, s in enumerate([0, 1, 0])])
    rows += [row("b", 20, 0, 1.0)]  # another budget: never paired with a's budget-10 rows
    table = {line["against"]: line for line in paired(rows, "a")}
    assert table.keys() == {"full", "b"}
    assert (table["b"]["n"], table["b"]["higher"], table["b"]["lower"]) == (3, 2, 0)
    assert (table["b"]["score"], table["b"]["their_score"], table["b"]["budget"]) == (3, 1, "0.1")
    assert (table["full"]["n"], table["full"]["higher"], table["full"]["lower"]) == (4, 1, 0)
    assert table["full"]["p"] == pytest.approx(sign_test(1, 0)) == 1.0
    assert table["b"]["share_of_full"] == "-"
    assert table["full"]["share_of_full"] == share_text([1, 1, 1, 0.5], [1, 1, 1, 0]) != "-"


def test_share_interval_holds_exactly_the_ratios_within_two_standard_errors():
    rng = random.Random(0)
    ours = [float(rng.random() < 0.6) for _ in range(60)]
    theirs = [float(rng.random() < 0.5) if x else float(rng.random() < 0.3) for x in ours]
    lo, hi = share_interval(ours, theirs)
    assert lo < sum(ours) / sum(theirs) < hi
    # Fieller: the ratios a paired z-test of ours - r * theirs keeps
    for r in [i / 100 for i in range(50, 300)]:
        d = [x - r * y for x, y in zip(ours, theirs)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
        assert (abs(mean) <= 1.96 * se) == (lo <= r <= hi), r


def test_share_interval_is_unbounded_when_the_reference_scores_nothing():
    assert (share_interval([1.0, 0.0, 1.0], [0.0, 0.0, 0.0]) is None
            and share_text([1.0, 0.0], [0.0, 0.0]) == "-")
    assert share_interval([1.0], [1.0]) is None
    # full attention always right: the share is our mean,
    # 0.75 +- 1.96 * sqrt(sample variance 3/14 / 8)
    assert share_text([1.0] * 6 + [0.0] * 2, [1.0] * 8) == "75% (43-107)"
    assert share_interval([1.0, 0.0] * 8, [1.0, 0.0] * 8) == pytest.approx((1.0, 1.0))


def test_share_interval_is_never_negative():
    # one answer of 24 where full attention has 21: the normal approximation reaches below 0
    ours, theirs = [1.0] + [0.0] * 23, [1.0] * 21 + [0.0] * 3
    lo, hi = share_interval(ours, theirs)
    assert lo == 0.0 < sum(ours) / sum(theirs) < hi < 1
    assert share_text(ours, theirs) == "5% (0-14)"


def test_rerun_with_other_settings_is_refused(tiny_chat_model, tmp_path):
    run_eval(tiny_chat_model, tmp_path / "a", *SMALL)
    for flags, changed in ((["--seed", "1"], "seed"), (["--n-loc", "21"], "n_loc"),
                           (["--kv-int8"], "kv_int8"), (["--random-seed", "3"], "random_seed"),
                           (["--unprotected-final-eviction"], "final_stabilizers")):
        with pytest.raises(LocretError, match=f"\\({changed} differ\\)"):
            run_eval(tiny_chat_model, tmp_path / "a", *SMALL, *flags)
    (tmp_path / "file").write_text("")
    with pytest.raises(LocretError, match="is a file"):
        run_eval(tiny_chat_model, tmp_path / "file", *SMALL)


def test_unset_settings_follow_the_zoo_and_a_change_of_its_defaults_is_refused(
        tiny_chat_model, tmp_path, monkeypatch):
    """Left out, stabilizers are the zoo's share of each budget and chunk the zoo's; --seed draws
    the items only. The defaults in effect are recorded with the results, so a rerun after they
    change cannot mix old rows with new ones."""
    from dataclasses import replace
    base = replace(plan.GENERIC, budget=1024, chunk=96, stabilizers=128, span=3)  # a share of 1/8
    monkeypatch.setattr(plan, "GENERIC", base)
    subject = suite.Subject(None, None, [], None, "per-head")
    # 600 prompt tokens, the last 10 the question
    encoded = Encoded(list(range(600)), [], [], 10, 0)
    config = lambda flags: cli.suite_config(cli.parse_args(list(flags)))
    at_512 = lambda *flags: suite.run_settings(subject, config(flags), "random", 512, encoded)
    settings = at_512("--seed", "5")
    assert (settings.stabilizers, settings.chunk, settings.span, settings.n_loc) == (64, 96, 3, 100)
    assert settings.random_seed == 0 and at_512("--random-seed", "5").random_seed == 5
    assert at_512("--span", "1").span == 1 and at_512("--suite", "heldout").n_loc == 10
    assert at_512("--stabilizers", "8").stabilizers == 8
    run_eval(tiny_chat_model, tmp_path / "a", *SMALL)
    recorded = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert recorded["defaults"]["stabilizers"] == 128 and recorded["n_loc"] == 20
    monkeypatch.setattr(plan, "GENERIC", replace(base, stabilizers=64))
    with pytest.raises(LocretError, match=r"\(defaults differ\)"):
        run_eval(tiny_chat_model, tmp_path / "a", *SMALL)


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "abc"], "--lengths must be integers"),
    (["--budgets", "1/0"], "--budgets fractions"),
    (["--n", "0"], "must be positive"), (["--chunk", "0"], "--chunk must be positive"),
    (["--n-loc", "tail"], "--n-loc must be"), (["--quick"], "unrecognized arguments: --quick")])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(flags)
    assert message in capsys.readouterr().err


def test_help_leads_with_everyday_flags_and_groups_the_research_knobs(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    advanced = text.index("advanced (")
    assert all(text.index(f"  {flag} ") < advanced for flag in ("--suite", "--budgets", "--out"))
    knobs = ("--chunk", "--span", "--random-seed")
    assert all(text.index(f"  {flag} ") > advanced for flag in knobs)


def test_heldout_suite_keeps_just_the_question_uncompressed(tiny_chat_model, tmp_path, monkeypatch):
    from locret.eval import heldout
    text = " ".join(f"Option {i} now names the file it could not read, instead of failing quietly."
                    for i in range(3000))
    monkeypatch.setattr(heldout, "text", lambda split: text)
    cli.main(cli.parse_args(["--ckpt", str(tiny_chat_model), "--out", str(tmp_path),
                             "--suite", "heldout", "--lengths", "400", "--n", "2",
                             "--policies", "full,knorm", "--budgets", "1/4", "--chunk", "64",
                             "--dtype", "float32", "--device", "cpu"]))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    needles = [r for r in rows if r["task"] == "heldout_val"]
    assert len(needles) == 4 and not any(r["needle_in_tail"] for r in needles)
    for r in rows:  # compression counts the tail too: just the question, nothing for plain text
        if r["policy"] == "knorm" and r["task"] == "heldout_val":
            assert 1 < r["compression"] < r["prompt_tokens"] / r["budget"]
        elif r["policy"] == "knorm":
            assert r["compression"] == r["prompt_tokens"] / r["budget"]
    table = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert ({(t["policy"], t["length"], t["n"]) for t in table}
            == {("full", "400", "2"), ("knorm", "400", "2")})
    kinds = [make_item("heldout_val", i, 0, Tokenizer(tiny_chat_model), 400).kind for i in range(2)]
    # the item's own value kind
    assert [r["kind"] for r in needles if r["policy"] == "full"] == kinds
    by_kind = (tmp_path / "by_kind.md").read_text().splitlines()[2:]
    # every needle row once, by kind and policy
    assert sum(int(line.split(" | ")[4]) for line in by_kind) == 4
    assert all(line.split(" | ")[1] in heldout.ATTRIBUTES for line in by_kind)


def test_multi_question_suite_asks_one_context_what_separate_compressions_ask(tiny_chat_model,
                                                                             tmp_path, monkeypatch):
    """Four facts per document: shared asks them of one compressed context; with n_loc just the
    question, the eviction sees the same document either way, so both modes give the same
    predictions."""
    from locret.eval import heldout
    text = " ".join(f"Option {i} now names the file it could not read, instead of failing quietly."
                    for i in range(3000))
    monkeypatch.setattr(heldout, "text", lambda split: text)
    cli.main(cli.parse_args(["--ckpt", str(tiny_chat_model), "--out", str(tmp_path),
                             "--suite", "multiquestion", "--lengths", "800", "--n", "2",
                             "--policies", "full,knorm", "--chunk", "64",
                             "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"]))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and all(len(r["scores"]) == 4 for r in rows)
    by_mode = {(r["index"], r["policy"], r["mode"]): r for r in rows}
    for index in range(2):
        for policy in ("full", "knorm"):
            shared = by_mode[(index, policy, "shared")]
            separate = by_mode[(index, policy, "separate")]
            assert shared["predictions"] == separate["predictions"]
            assert shared["needle_kept"] == separate["needle_kept"]
    table = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert {(t["policy"], t["mode"], t["n"]) for t in table} == {
        (p, m, "8") for p in ("full", "knorm") for m in ("shared", "separate")}
    assert all(float(t["seconds_per_doc"]) > 0 for t in table)


def test_int8_pool_rows_hold_fewer_bytes_and_old_folders_resume(tiny_chat_model, tmp_path):
    plain = run_eval(tiny_chat_model, tmp_path / "plain", "--policies", "snapkv",
                     "--budgets", "1/4")
    int8 = run_eval(tiny_chat_model, tmp_path / "int8", "--policies", "snapkv", "--budgets", "1/4",
                    "--kv-int8")
    assert json.loads((tmp_path / "int8" / "settings.json").read_text())["kv_int8"] is True
    pool = lambda rows: [r["pool_bytes"] for r in rows if r["policy"] == "snapkv"]
    # K and V at 56% (test_kv_pool); on this 2-layer model one layer's read-back buffers weigh as
    # much again
    assert pool(int8) and all(i < p for i, p in zip(pool(int8), pool(plain)))
    # a folder from before the flag: no kv_int8 recorded
    settings = tmp_path / "plain" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items()
                                    if k != "kv_int8"}))
    assert run_eval(tiny_chat_model, tmp_path / "plain", "--policies", "snapkv",
                    "--budgets", "1/4") == plain
