"""train.py on a tiny random model: heads learn, the backbone stays frozen, resume is exact,
torchrun works, and the default run on a CPU is the shipped heads' run."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from locret.errors import LocretError
from locret.heads import load_heads
from locret.loading.tokenizer import Tokenizer
from locret.loading.weights import load_model
from locret.settings import Settings
from locret.train import corpora, loop
from locret.train.config import fit_window
from locret.train.data import make_sample
from locret.train.forward import encode_sample, heads_forward
from locret.train.head_inputs import chunked_head_inputs
from locret.train.labels import LabelRecorder
from locret.train.loss import topk_overlap
from locret.train.state import state_path

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--head-hidden", "16", "--min-tokens", "60", "--max-tokens", "120", "--val-every", "0",
            "--dtype", "float32", "--device", "cpu", "--lr", "3e-3", "--warmup", "5",
            "--target", "cis", "--seed", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model's matmuls gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def synthetic_tasks_only(monkeypatch):
    """Samples from the synthetic tasks alone: no corpus on this machine is read."""
    monkeypatch.setattr(corpora, "STYLES", {})
    corpora.passages.cache_clear()
    yield
    corpora.passages.cache_clear()


def run_train(folder, out, *flags):
    """train.py's main -> its validations."""
    argv = ["--ckpt", str(folder), "--out", str(out), *TINY_RUN, *flags]
    return train.main(train.parse_args(argv))


def heldout_overlap(model, folder, n=6):
    tok = Tokenizer(folder)
    scores = []
    with torch.no_grad():
        for i in range(n):
            ids, prompt_len = encode_sample(tok, make_sample(i, 99, tok, 60, 120))
            pred, label = heads_forward(model, ids, prompt_len)
            scores.append(topk_overlap(pred, label))
    return sum(scores) / n


def test_heads_learn_and_backbone_is_frozen(tiny_chat_model, tmp_path):
    backbone = load_model(tiny_chat_model)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(0)
    backbone.add_retaining_heads(16)  # the same initial heads train.py starts from (seed 0)
    untrained = heldout_overlap(backbone, tiny_chat_model)

    validations = run_train(tiny_chat_model, tmp_path / "heads.safetensors", "--steps", "40",
                            "--val-every", "20", "--val-samples", "3")
    assert [v.step for v in validations] == [20, 40]
    assert validations[1].loss < validations[0].loss

    trained = load_model(tiny_chat_model)
    meta = load_heads(trained, tmp_path / "heads.safetensors")
    assert heldout_overlap(trained, tiny_chat_model) > untrained
    assert '"steps": 40' in meta["training"]
    heads = load_file(tmp_path / "heads.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in heads.values())
    for name, value in trained.state_dict().items():  # the backbone's weights are untouched
        if ".retaining_head." not in name:
            assert torch.equal(value, before[name]), name


def test_resume_after_interruption_is_exact(tiny_chat_model, tmp_path, monkeypatch):
    run = ["--steps", "6", "--save-every", "2"]
    run_train(tiny_chat_model, tmp_path / "full.safetensors", *run)

    calls = {"n": 0}

    def dies_at_step_4(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed mid-run, after the checkpoint at step 2
        return heads_forward(*args)
    monkeypatch.setattr(loop, "heads_forward", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_chat_model, tmp_path / "cut.safetensors", *run)
    assert not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(loop, "heads_forward", heads_forward)
    run_train(tiny_chat_model, tmp_path / "cut.safetensors", *run, "--resume")

    full = load_file(tmp_path / "full.train-state.safetensors")
    resumed = load_file(tmp_path / "cut.train-state.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_resume_without_state_is_clear_error(tiny_chat_model, tmp_path):
    with pytest.raises(LocretError, match="--resume: no training state at"):
        run_train(tiny_chat_model, tmp_path / "h.safetensors", "--steps", "2", "--resume")


def test_resume_refuses_other_settings_and_cleans_a_half_written_state(tiny_chat_model, tmp_path):
    out = tmp_path / "h.safetensors"
    run_train(tiny_chat_model, out, "--steps", "2", "--save-every", "1")
    stale = tmp_path / f".{state_path(out).name}.tmp-12345"
    stale.write_bytes(b"half a state file")  # a kill during the state write leaves this behind
    for flags, changed in ((["--head-hidden", "8"], "--head-hidden 16 -> 8"),
                           (["--seed", "1"], "--seed 0 -> 1"),
                           (["--lr", "1e-3"], "--lr 0.003 -> 0.001"),
                           (["--target", "shared"], "--target cis -> shared"),
                           (["--worked-examples", "0.5"], "--worked-examples 0.0 -> 0.5")):
        with pytest.raises(LocretError, match=changed):
            run_train(tiny_chat_model, out, "--steps", "3", "--resume", *flags)
    assert not stale.exists()
    run_train(tiny_chat_model, out, "--steps", "3", "--resume")  # more steps is fine
    training = json.loads(load_heads(load_model(tiny_chat_model), out)["training"])
    assert load_file(state_path(out)) and training["steps"] == 3


def test_shared_targets_come_from_the_labels_and_their_heads_evict_shared(tiny_chat_model,
                                                                          tmp_path):
    from locret.heads import trained_eviction
    from locret.train.targets import graded_target, joint_rank_target, joint_target
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    tok = Tokenizer(tiny_chat_model)
    ids, prompt_len = encode_sample(tok, make_sample(0, 5, tok, 60, 120))
    _, cis = heads_forward(model, ids, prompt_len)
    _, shared = heads_forward(model, ids, prompt_len, target="shared")
    assert shared.shape == cis.shape and (shared == shared[0, 0, 0]).all()  # one for all heads
    assert shared.min() == 0 and shared.max() == 1 and not torch.equal(shared, cis)
    _, joint = heads_forward(model, ids, prompt_len, target="joint", layers=slice(1, 2))
    assert torch.equal(joint, joint_target(cis, slice(1, 2)))
    assert not torch.equal(joint, heads_forward(model, ids, prompt_len, target="shared")[1])
    graded = heads_forward(model, ids, prompt_len, target="graded")[1]
    assert torch.equal(graded, graded_target(cis))
    ranked = heads_forward(model, ids, prompt_len, target="joint-rank", layers=slice(1, 2))[1]
    assert torch.equal(ranked, joint_rank_target(cis, slice(1, 2)))

    for target in ("shared", "graded", "joint", "joint-rank"):
        run_train(tiny_chat_model, tmp_path / "g.safetensors", "--target", target, "--steps", "1")
        meta = load_heads(load_model(tiny_chat_model), tmp_path / "g.safetensors")
        assert trained_eviction(meta) == "shared"
        assert json.loads(meta["training"])["target"] == target


def test_label_recorder_predictions_carry_gradients_only_to_heads(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    recorder = LabelRecorder(model.config, prompt_len=10)
    model(torch.randint(0, 128, (1, 14)), cache=recorder, last_only=True)
    pred, label = recorder.stacked()
    assert pred.shape == label.shape == (2, 1, 2, 10)
    assert pred.requires_grad and not label.requires_grad
    pred.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".retaining_head." not in n)
    assert all(h.fc1.weight.grad is not None for h in model.retaining_heads)


RANK_SCRIPT = """import runpy, sys
sys.path.insert(0, {repo!r})
from locret.train import corpora
corpora.STYLES = {{}}  # synthetic tasks only: neither rank reads a corpus
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def test_torchrun_two_ranks(tiny_chat_model, tmp_path):
    out, rank_script = tmp_path / "ddp.safetensors", tmp_path / "rank.py"
    rank_script.write_text(RANK_SCRIPT.format(repo=str(REPO), train=str(REPO / "train.py")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(rank_script), "--ckpt", str(tiny_chat_model), "--out", str(out),
                          "--steps", "2", *TINY_RUN],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    load_heads(load_model(tiny_chat_model), out)
    state = load_file(tmp_path / "ddp.train-state.safetensors")
    assert int(state["adam.0.step"]) == 2  # two optimizer steps, each over both ranks' samples


def full_forward_head_inputs(model, ids):
    captured = []
    hooks = [h.register_forward_hook(lambda _h, inputs, _o: captured.append(inputs[0]))
             for h in model.retaining_heads]
    with torch.no_grad():
        model(torch.tensor([ids]), cache=LabelRecorder(model.config, len(ids) - 1))  # it scores
    for hook in hooks:
        hook.remove()
    return captured


def test_chunked_head_inputs_are_the_full_forwards_until_something_is_evicted(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    ids = torch.randint(0, 128, (90,)).tolist()
    full = full_forward_head_inputs(model, ids)
    roomy = Settings(policy="locret", budget=200, chunk=16, stabilizers=4, n_loc=10,
                     score_question=True)  # the question's tokens get head inputs too
    roomy_inputs = chunked_head_inputs(model, ids, roomy)
    for got, want in zip(roomy_inputs, full):  # nothing evicted: the same inputs
        assert got.shape == want.shape == (1, 90, model.config.qkv_size) and not got.is_inference()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tight = Settings(policy="locret", budget=20, chunk=16, stabilizers=4, n_loc=10,
                     score_question=True)
    evicted = chunked_head_inputs(model, ids, tight)
    for got, want in zip(evicted, full):  # no eviction before the second chunk
        torch.testing.assert_close(got[:, :16], want[:, :16], atol=1e-5, rtol=1e-5)
    later = [(got[:, 40:] - want[:, 40:]).abs().max().item()
             for got, want in zip(evicted[1:], full[1:])]
    assert max(later) > 1e-3


def test_eviction_aware_predictions_carry_gradients_only_to_heads(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    tok = Tokenizer(tiny_chat_model)
    ids, prompt_len = encode_sample(tok, make_sample(0, 5, tok, 60, 120))
    zoo = Settings(budget=64, chunk=16, stabilizers=8, n_loc=4, span=3)
    plain, label = heads_forward(model, ids, prompt_len, "shared")
    aware, aware_label = heads_forward(model, ids, prompt_len, "shared", evicted=(zoo, 1 / 4))
    assert torch.equal(label, aware_label) and aware.shape == plain.shape and aware.requires_grad
    assert not torch.allclose(aware, plain, atol=1e-4)
    aware.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".retaining_head." not in n)
    assert all(h.fc1.weight.grad is not None for h in model.retaining_heads)


def test_eviction_aware_fine_tuning_starts_from_init_heads_and_learns(tiny_chat_model, tmp_path):
    run_train(tiny_chat_model, tmp_path / "start.safetensors", "--steps", "3")
    validations = run_train(tiny_chat_model, tmp_path / "aware.safetensors",
                            "--init", str(tmp_path / "start.safetensors"), "--evicted", "1/4",
                            "--target", "shared", "--steps", "20", "--val-every", "10",
                            "--val-samples", "3")
    assert [v.step for v in validations] == [10, 20]
    assert validations[1].loss < validations[0].loss
    meta = load_heads(load_model(tiny_chat_model), tmp_path / "aware.safetensors")
    training = json.loads(meta["training"])
    assert training["evicted"] == "1/4" and training["init"] == "start.safetensors"  # no folder
    with pytest.raises(LocretError, match="--init .* -> "):  # other starting heads: refused
        run_train(tiny_chat_model, tmp_path / "aware.safetensors",
                  "--init", str(tmp_path / "aware.safetensors"), "--evicted", "1/4",
                  "--target", "shared", "--steps", "21", "--resume")


def test_init_heads_are_the_starting_point(tiny_chat_model, tmp_path):
    run_train(tiny_chat_model, tmp_path / "start.safetensors", "--steps", "3")
    run_train(tiny_chat_model, tmp_path / "same.safetensors",
              "--init", str(tmp_path / "start.safetensors"), "--steps", "1", "--lr", "1e-12",
              "--warmup", "0")
    start = load_file(tmp_path / "start.safetensors")
    same = load_file(tmp_path / "same.safetensors")
    assert start.keys() == same.keys() and all(torch.equal(start[k], same[k]) for k in start)


def test_samples_fit_the_models_context(tmp_path, capsys):
    out = str(tmp_path / "heads.safetensors")
    official = train.parse_args(["--out", out, "--preset", "official"])  # 10240-token prompts
    assert fit_window(official.config, official.chosen, 8192).max_tokens == 7680  # 8192 - 1/16
    assert "note: prompts of at most 7680" in capsys.readouterr().err
    assert fit_window(official.config, official.chosen, 131072) == official.config  # nothing to cut
    chosen = train.parse_args(["--out", out, "--preset", "official", "--max-tokens", "9000"])
    with pytest.raises(LocretError, match="--max-tokens 9000: samples would pass the model's 8192"):
        fit_window(chosen.config, chosen.chosen, 8192)
    short = train.parse_args(["--out", out, "--preset", "official", "--min-tokens", "4000"])
    with pytest.raises(LocretError, match="--min-tokens 4000 is above the longest prompt"):
        fit_window(short.config, short.chosen, 4096)


def test_a_warmup_as_long_as_the_run_is_pointed_out(tmp_path, capsys):
    out = str(tmp_path / "heads.safetensors")
    train.parse_args(["--out", out, "--preset", "cpu", "--steps", "10"])  # the preset's warmup: 45
    note = ("note: --warmup 45 is not shorter than --steps 10: the learning rate peaks at 22% of "
            "--lr, at the last step")
    assert note in capsys.readouterr().err
    train.parse_args(["--out", out, "--preset", "cpu", "--steps", "46"])
    assert "warmup" not in capsys.readouterr().err


def test_the_default_run_on_a_cpu_is_the_shipped_heads_run(tmp_path):
    with safe_open(REPO / "locret/weights/smollm2-135m-instruct.heads.safetensors", "pt") as f:
        shipped = json.loads(f.metadata()["training"])
    job = train.parse_args(["--out", str(tmp_path / "heads.safetensors"), "--device", "cpu"])
    assert job.config.preset == "cpu" and asdict(job.config) == shipped
    assert all(f"--{k.replace('_', '-')} {v}" in train.preset_help("cpu")
               for k, v in shipped.items() if k not in ("preset", "ckpt", "init", "evicted"))
    official = train.parse_args(["--out", str(tmp_path / "h.safetensors"), "--preset", "official"])
    recipe = official.config
    assert (recipe.target, recipe.steps, recipe.warmup) == ("cis", 3000, 2000)
