"""train.py on a tiny random model: heads learn, the backbone stays frozen, resume is exact, torchrun works."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from locret.settings import Settings
from locret.train.head_inputs import chunked_head_inputs
from locret.heads import load_heads
from locret.train.labels import LabelRecorder
from locret.loading.weights import load_model
from locret.train.loss import topk_overlap
from locret.loading.tokenizer import Tokenizer
from locret.train.data import make_sample
from locret.settings import Settings

TINY_RUN = ["--head-hidden", "16", "--min-tokens", "60", "--max-tokens", "120", "--val-every", "0",
            "--dtype", "float32", "--device", "cpu", "--lr", "3e-3", "--warmup", "5"]


def run_train(folder, out, *flags):
    train.main(train.parse_args(["--ckpt", str(folder), "--out", str(out), *TINY_RUN, *flags]))


def heldout_overlap(model, folder, n=6):
    tok = Tokenizer(folder)
    scores = []
    with torch.no_grad():
        for i in range(n):
            ids, prompt_len = train.encode_sample(tok, make_sample(i, 99, tok, 60, 120))
            pred, label = train.heads_forward(model, ids, prompt_len)
            scores.append(topk_overlap(pred, label))
    return sum(scores) / n


def test_heads_learn_and_backbone_is_frozen(tiny_chat_model, tmp_path, capsys):
    backbone = load_model(tiny_chat_model)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(0)
    backbone.add_retaining_heads(16)  # the same initial heads train.py starts from (seed 0)
    untrained = heldout_overlap(backbone, tiny_chat_model)

    run_train(tiny_chat_model, tmp_path / "heads.safetensors", "--steps", "40", "--val-every", "20",
              "--val-samples", "3")
    log = capsys.readouterr().err
    val_losses = [float(line.split("val loss ")[1].split(",")[0]) for line in log.splitlines() if "val loss" in line]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]

    trained = load_model(tiny_chat_model)
    meta = load_heads(trained, tmp_path / "heads.safetensors")
    assert heldout_overlap(trained, tiny_chat_model) > untrained
    assert '"steps": 40' in meta["training"]
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "heads.safetensors").values())
    for name, value in trained.state_dict().items():  # the backbone's weights are untouched
        if ".retaining_head." not in name:
            assert torch.equal(value, before[name]), name


def test_resume_after_interruption_is_exact(tiny_chat_model, tmp_path, monkeypatch):
    run_train(tiny_chat_model, tmp_path / "full.safetensors", "--steps", "12", "--save-every", "4")

    calls = {"n": 0}
    real_forward = train.heads_forward

    def dies_at_step_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-run, after the checkpoint at step 4
        return real_forward(*args)
    monkeypatch.setattr(train, "heads_forward", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_chat_model, tmp_path / "cut.safetensors", "--steps", "12", "--save-every", "4")
    assert not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(train, "heads_forward", real_forward)
    run_train(tiny_chat_model, tmp_path / "cut.safetensors", "--steps", "12", "--save-every", "4", "--resume")

    full = load_file(tmp_path / "full.train-state.safetensors")
    resumed = load_file(tmp_path / "cut.train-state.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_resume_without_state_is_clear_error(tiny_chat_model, tmp_path):
    with pytest.raises(train.LocretError, match="--resume: no training state at"):
        run_train(tiny_chat_model, tmp_path / "h.safetensors", "--steps", "2", "--resume")


def test_resume_refuses_other_settings_and_cleans_a_half_written_state(tiny_chat_model, tmp_path):
    out = tmp_path / "h.safetensors"
    run_train(tiny_chat_model, out, "--steps", "2", "--save-every", "1")
    stale = tmp_path / f".{train.state_path(out).name}.tmp-12345"
    stale.write_bytes(b"half a state file")  # a kill during the state write leaves this behind
    for flags, changed in ((["--head-hidden", "8"], "--head-hidden 16 -> 8"), (["--seed", "1"], "--seed 0 -> 1"),
                           (["--lr", "1e-3"], "--lr 0.003 -> 0.001"),
                           (["--target", "shared"], "--target cis -> shared"),
                           (["--worked-examples", "0.5"], "--worked-examples 0.0 -> 0.5")):
        with pytest.raises(train.LocretError, match=changed):
            run_train(tiny_chat_model, out, "--steps", "3", "--resume", *flags)
    assert not stale.exists()
    run_train(tiny_chat_model, out, "--steps", "3", "--resume")  # more steps is fine
    assert load_file(train.state_path(out)) and '"steps": 3' in load_heads(load_model(tiny_chat_model), out)["training"]


def test_shared_target_heads_learn_it(tiny_chat_model, tmp_path, capsys):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    tok = Tokenizer(tiny_chat_model)
    ids, prompt_len = train.encode_sample(tok, make_sample(0, 5, tok, 60, 120))
    _, cis = train.heads_forward(model, ids, prompt_len)
    _, shared = train.heads_forward(model, ids, prompt_len, target="shared")
    assert shared.shape == cis.shape and (shared == shared[0, 0, 0]).all()  # one target for every layer and head
    assert shared.min() == 0 and shared.max() == 1 and not torch.equal(shared, cis)

    run_train(tiny_chat_model, tmp_path / "h.safetensors", "--target", "shared", "--steps", "20", "--val-every", "10",
              "--val-samples", "3")
    log = capsys.readouterr().err
    val_losses = [float(line.split("val loss ")[1].split(",")[0]) for line in log.splitlines() if "val loss" in line]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    assert '"target": "shared"' in load_heads(load_model(tiny_chat_model), tmp_path / "h.safetensors")["training"]


def test_joint_graded_and_rank_targets_come_from_the_labels_and_their_heads_evict_shared(tiny_chat_model, tmp_path):
    from locret.heads import trained_eviction
    from locret.train.targets import graded_target, joint_rank_target, joint_target
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    tok = Tokenizer(tiny_chat_model)
    ids, prompt_len = train.encode_sample(tok, make_sample(0, 5, tok, 60, 120))
    _, cis = train.heads_forward(model, ids, prompt_len)
    _, joint = train.heads_forward(model, ids, prompt_len, target="joint", layers=slice(1, 2))
    assert torch.equal(joint, joint_target(cis, slice(1, 2)))
    assert not torch.equal(joint, train.heads_forward(model, ids, prompt_len, target="shared")[1])
    assert torch.equal(train.heads_forward(model, ids, prompt_len, target="graded")[1], graded_target(cis))
    ranked = train.heads_forward(model, ids, prompt_len, target="joint-rank", layers=slice(1, 2))[1]
    assert torch.equal(ranked, joint_rank_target(cis, slice(1, 2)))

    run_train(tiny_chat_model, tmp_path / "h.safetensors", "--target", "joint", "--steps", "2", "--val-every", "0")
    meta = load_heads(load_model(tiny_chat_model), tmp_path / "h.safetensors")
    assert trained_eviction(meta) == "shared" and '"target": "joint"' in meta["training"]
    for target in ("graded", "joint-rank"):
        run_train(tiny_chat_model, tmp_path / "g.safetensors", "--target", target, "--steps", "2", "--val-every", "0")
        meta = load_heads(load_model(tiny_chat_model), tmp_path / "g.safetensors")
        assert trained_eviction(meta) == "shared" and f'"target": "{target}"' in meta["training"]


def test_label_recorder_predictions_carry_gradients_only_to_heads(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    recorder = LabelRecorder(prompt_len=10)
    model(torch.randint(0, 128, (1, 14)), cache=recorder, last_only=True)
    pred, label = recorder.stacked()
    assert pred.shape == label.shape == (2, 1, 2, 10) and pred.requires_grad and not label.requires_grad
    pred.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".retaining_head." not in n)
    assert all(h.fc1.weight.grad is not None for h in model.retaining_heads)


def test_torchrun_two_ranks(tiny_chat_model, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                          "--ckpt", str(tiny_chat_model), "--out", str(out), "--steps", "3", *TINY_RUN],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = load_model(tiny_chat_model)
    load_heads(model, out)
    state = load_file(tmp_path / "ddp.train-state.safetensors")
    assert int(state["adam.0.step"]) == 3  # three optimizer steps, each over both ranks' samples


def full_forward_head_inputs(model, ids):
    captured = []
    hooks = [h.register_forward_hook(lambda _h, inputs, _o: captured.append(inputs[0])) for h in model.retaining_heads]
    with torch.no_grad():
        model(torch.tensor([ids]), cache=LabelRecorder(len(ids) - 1))  # a cache that scores: the heads run
    for hook in hooks:
        hook.remove()
    return captured


def test_chunked_head_inputs_are_the_full_forwards_until_something_is_evicted(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    ids = torch.randint(0, 128, (90,)).tolist()
    full = full_forward_head_inputs(model, ids)
    roomy = Settings(policy="locret", budget=200, chunk=16, stabilizers=4, n_loc=10)
    for got, want in zip(chunked_head_inputs(model, ids, roomy), full):  # nothing evicted: the same inputs
        assert got.shape == want.shape == (1, 90, model.config.qkv_size) and not got.is_inference()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tight = Settings(policy="locret", budget=20, chunk=16, stabilizers=4, n_loc=10)
    evicted = chunked_head_inputs(model, ids, tight)
    for got, want in zip(evicted, full):  # the first chunk sees no evicted cache; later ones see what is kept
        torch.testing.assert_close(got[:, :16], want[:, :16], atol=1e-5, rtol=1e-5)
    assert max((got[:, 40:] - want[:, 40:]).abs().max().item() for got, want in zip(evicted[1:], full[1:])) > 1e-3


def test_eviction_aware_predictions_carry_gradients_only_to_heads(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.add_retaining_heads(8)
    tok = Tokenizer(tiny_chat_model)
    ids, prompt_len = train.encode_sample(tok, make_sample(0, 5, tok, 60, 120))
    zoo = Settings(budget=64, chunk=16, stabilizers=8, n_loc=4, span=3)
    plain, label = train.heads_forward(model, ids, prompt_len, "shared")
    aware, aware_label = train.heads_forward(model, ids, prompt_len, "shared", evicted=(zoo, 1 / 4))
    assert torch.equal(label, aware_label) and aware.shape == plain.shape and aware.requires_grad
    assert not torch.allclose(aware, plain, atol=1e-4)
    aware.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".retaining_head." not in n)
    assert all(h.fc1.weight.grad is not None for h in model.retaining_heads)


def test_eviction_aware_fine_tuning_starts_from_init_heads_and_learns(tiny_chat_model, tmp_path, capsys):
    run_train(tiny_chat_model, tmp_path / "start.safetensors", "--steps", "3")
    run_train(tiny_chat_model, tmp_path / "aware.safetensors", "--init", str(tmp_path / "start.safetensors"),
              "--evicted", "1/4", "--target", "shared", "--steps", "20", "--val-every", "10", "--val-samples", "3")
    log = capsys.readouterr().err
    val_losses = [float(line.split("val loss ")[1].split(",")[0]) for line in log.splitlines() if "val loss" in line]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    meta = load_heads(load_model(tiny_chat_model), tmp_path / "aware.safetensors")
    assert '"evicted": "1/4"' in meta["training"] and "start.safetensors" in meta["training"]
    with pytest.raises(train.LocretError, match="--init .* -> "):  # resuming with other starting heads is refused
        run_train(tiny_chat_model, tmp_path / "aware.safetensors", "--init", str(tmp_path / "aware.safetensors"),
                  "--evicted", "1/4", "--target", "shared", "--steps", "21", "--resume")


def test_init_heads_are_the_starting_point(tiny_chat_model, tmp_path):
    run_train(tiny_chat_model, tmp_path / "start.safetensors", "--steps", "3")
    run_train(tiny_chat_model, tmp_path / "same.safetensors", "--init", str(tmp_path / "start.safetensors"),
              "--steps", "1", "--lr", "1e-12", "--warmup", "0")
    start, same = load_file(tmp_path / "start.safetensors"), load_file(tmp_path / "same.safetensors")
    assert start.keys() == same.keys() and all(torch.equal(start[k], same[k]) for k in start)


def test_samples_fit_the_models_context(tmp_path, capsys):
    out = str(tmp_path / "heads.safetensors")
    official = train.parse_args(["--out", out])  # the paper's 10240-token prompts: past an 8K model's context
    train.fit_window(official, 8192)
    assert official.max_tokens == 7680 and "note: prompts of at most 7680" in capsys.readouterr().err  # 8192 - 1/16
    roomy = train.parse_args(["--out", out])
    train.fit_window(roomy, 131072)
    assert roomy.max_tokens == 10240  # nothing to cut
    with pytest.raises(train.LocretError, match="--max-tokens 9000: samples would pass the model's 8192-token"):
        train.fit_window(train.parse_args(["--out", out, "--max-tokens", "9000"]), 8192)
    with pytest.raises(train.LocretError, match="--min-tokens 4000 is above the longest prompt"):
        train.fit_window(train.parse_args(["--out", out, "--min-tokens", "4000"]), 4096)


def test_a_warmup_as_long_as_the_run_is_pointed_out(tmp_path, capsys):
    out = str(tmp_path / "heads.safetensors")
    train.parse_args(["--out", out, "--preset", "cpu", "--steps", "10"])  # the preset's warmup of 45
    note = "note: --warmup 45 is not shorter than --steps 10: the learning rate peaks at 22% of --lr, at the last step"
    assert note in capsys.readouterr().err
    train.parse_args(["--out", out, "--preset", "cpu", "--steps", "46"])
    assert "warmup" not in capsys.readouterr().err
