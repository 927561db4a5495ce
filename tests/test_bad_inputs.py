"""Every bad input is one clear line: a table of hostile or mistaken inputs to generate.py,
train.py, eval.py and the loaders, each expected to stop with its own message (an argparse error
or a LocretError), never a traceback or a silent wrong answer."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as eval_cli
import generate as generate_cli
import train as train_cli
from conftest import tiny_llama_config, write_tiny_tokenizer
from locret.errors import LocretError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random chat model folder, built once; each case works on a copy."""
    import transformers
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "model"
    config = tiny_llama_config(eos_token_id=2, bos_token_id=None, pad_token_id=None)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


# --- ways to break a model folder -----------------------------------------------------------------

def edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def write(name, text):
    return lambda folder: (folder / name).write_text(text)


def edit_weights(change):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors")
    return edit


def sharded(weight_map):
    def edit(folder):
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            weight_map if isinstance(weight_map, str) else json.dumps(weight_map))
    return edit


def heads_file(change=lambda tensors: None, backbone_change=None, meta_change=None):
    """A heads file for this model at <model>/heads.safetensors, its tensors changed by
    `change(tensors)`, the backbone it claims by `backbone_change` and its other metadata by
    `meta_change`."""
    def edit(folder):
        from safetensors import safe_open
        from locret.heads import save_heads
        from locret.loading.weights import load_model
        model = load_model(folder)
        model.add_retaining_heads(8)
        path = folder / "heads.safetensors"
        save_heads(model, path, backbone="tiny")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        meta["backbone_config"] = json.dumps(json.loads(meta["backbone_config"])
                                             | (backbone_change or {}))
        meta.update(meta_change or {})
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=meta)
    return edit


def nan_first(tensors, prefix=""):
    name = next(k for k in sorted(tensors) if k.startswith(prefix))
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def big_vocab_tokenizer(folder):
    """Words whose ids (beyond 200) do not exist in the 128-token model; the prompt uses one."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"zzword{i}" for i in range(200)])
    tok.save(str(folder / "tokenizer.json"))
    (folder.parent / "p.txt").write_text("what is zzword199 ?")


PROMPT = "what is the capital of france ?"

# (id, script, flags ({m}: the model folder, {d}: the case folder), setup, expected message)
CASES = [
    # generate.py: numbers and flags
    ("temperature-nan", "generate", ["--temperature", "nan"], None, "finite --temperature"),
    ("temperature-inf", "generate", ["--temperature", "inf"], None, "finite --temperature"),
    ("temperature-negative", "generate", ["--temperature", "-1"], None, "finite --temperature"),
    ("top-p-zero", "generate", ["--top-p", "0"], None, "0 < --top-p <= 1"),
    ("top-p-above-one", "generate", ["--top-p", "1.5"], None, "0 < --top-p <= 1"),
    ("top-k-negative", "generate", ["--top-k", "-1"], None, "--top-k >= 0"),
    ("max-memory-nan", "generate", ["--max-memory", "nan"], None,
     "--max-memory must be a positive"),
    ("max-memory-zero", "generate", ["--max-memory", "0"], None, "--max-memory must be a positive"),
    ("seed-negative", "generate", ["--seed", "-1"], None, "--seed: must be in"),
    ("seed-beyond-64-bits", "generate", ["--seed", str(2 ** 64)], None, "--seed: must be in"),
    ("seed-word", "generate", ["--seed", "lucky"], None, "--seed: must be an integer"),
    ("max-new-tokens-zero", "generate", ["--max-new-tokens", "0"], None,
     "--max-new-tokens must be at least 1"),
    ("heads-with-heuristic", "generate", ["--policy", "h2o", "--heads", "x.safetensors"], None,
     "--heads is used by --policy locret only"),
    ("unknown-policy", "generate", ["--policy", "oracle"], None, "invalid choice: 'oracle'"),
    ("shared-layers-malformed", "generate", ["--policy", "h2o", "--shared-layers", "3"], None,
     "--shared-layers must be FIRST-LAST"),
    ("shared-layers-beyond-model", "generate",
     ["--policy", "h2o", "--eviction", "shared", "--shared-layers", "0-9"],
     None, "--shared-layers 0-9: layers are numbered among the model's 2 global layers, 0-1"),
    ("shared-layers-eval", "eval",
     ["--policies", "h2o", "--shared-layers", "x-y", "--tasks", "passkey", "--lengths", "240"],
     None, "--shared-layers must be FIRST-LAST"),
    ("unknown-positions", "generate", ["--positions", "absolute"], None,
     "invalid choice: 'absolute'"),
    ("budget-not-a-number", "generate", ["--budget", "lots"], None, "invalid int value"),
    # generate.py: settings the engine cannot run
    ("budget-zero", "generate", ["--policy", "knorm", "--budget", "0"], None,
     r"--budget must be at least 1 entry per KV head \(got 0\)"),
    ("budget-below-stabilizers", "generate",
     ["--policy", "knorm", "--budget", "8", "--stabilizers", "8"], None,
     r"--budget \(8\) must be larger than --stabilizers"),
    ("chunk-zero", "generate", ["--policy", "knorm", "--chunk", "0"], None,
     "--chunk must be at least 1"),
    ("n-loc-past-prompt", "generate", ["--n-loc", "500"], None, "--n-loc must be in"),
    ("context-overflow-full", "generate", ["--policy", "full", "--max-new-tokens", "400"], None,
     "past the model's 256-token context"),
    ("context-overflow-decode", "generate",
     ["--policy", "knorm", "--budget", "16", "--stabilizers", "4", "--max-new-tokens", "1000000"],
     None, "past the model's 256-token context"),
    ("memory-too-small", "generate",
     ["--policy", "knorm", "--stabilizers", "4", "--max-memory", "0.000001"], None,
     r"--max-memory 0.0 MiB is too small: even budget 5 needs [\d.]+ [MG]iB \(weights and "
     r"runtime included\)"),
    ("max-memory-below-runtime", "generate",
     ["--policy", "knorm", "--stabilizers", "4", "--budget", "30", "--max-memory", "0.01"], None,
     "runtime included"),
    ("locret-without-heads", "generate", ["--policy", "locret"], None,
     "--policy locret needs retaining heads"),
    # generate.py: devices and files
    ("device-cuda-absent", "generate", ["--device", "cuda"], None, "no CUDA GPU is available"),
    ("device-unknown", "generate", ["--device", "tpu"], None, "unknown device 'tpu'"),
    ("device-mps", "generate", ["--device", "mps"], None, "not supported"),
    ("device-cpu-index", "generate", ["--device", "cpu:7"], None, "the CPU has no device index"),
    ("prompt-missing", "generate", ["--prompt", "{d}/nope.txt"], None, "cannot read prompt"),
    ("question-file-missing", "generate", ["--question-file", "{d}/nope.txt"], None,
     "cannot read question file"),
    ("save-context-folder-missing", "generate", ["--save-context", "{d}/no/such/c.safetensors"],
     None, "--save-context .*: need a file path in an existing, writable folder"),
    ("save-context-is-dir", "generate", ["--save-context", "{d}"], None,
     "need a file path in an existing"),
    ("prompt-empty", "generate", ["--prompt", "{d}/empty.txt"], write("../empty.txt", ""),
     "is empty"),
    ("prompt-blank", "generate", ["--prompt", "{d}/blank.txt"], write("../blank.txt", " \n\t\n"),
     "is empty"),
    ("prompt-not-utf8", "generate", ["--prompt", "{d}/latin1.txt"],
     lambda f: (f.parent / "latin1.txt").write_bytes(b"caf\xe9 au lait"), "is not UTF-8"),
    ("heads-directory", "generate", ["--policy", "locret", "--heads", "{d}"], None,
     "is a directory"),
    ("heads-missing", "generate", ["--policy", "locret", "--heads", "{d}/none.safetensors"], None,
     "not found"),
    ("heads-garbage", "generate", ["--policy", "locret", "--heads", "{m}/junk.safetensors"],
     write("junk.safetensors", "not a safetensors file"), "unreadable safetensors"),
    ("heads-not-heads", "generate", ["--policy", "locret", "--heads", "{m}/model.safetensors"],
     None, "not a retaining-heads file"),
    ("heads-nan", "generate", ["--policy", "locret", "--heads", "{m}/heads.safetensors"],
     heads_file(lambda t: nan_first(t)), "holds NaN or inf"),
    ("heads-hidden-not-a-number", "generate",
     ["--policy", "locret", "--heads", "{m}/heads.safetensors"],
     heads_file(meta_change={"head_hidden": "eight"}), "broken retaining-heads metadata"),
    ("heads-backbone-not-json", "generate",
     ["--policy", "locret", "--heads", "{m}/heads.safetensors"],
     heads_file(meta_change={"backbone_config": "{hidden"}), "broken retaining-heads metadata"),
    ("heads-training-a-list", "generate",
     ["--policy", "locret", "--heads", "{m}/heads.safetensors"],
     heads_file(meta_change={"training": "[]"}), "broken retaining-heads metadata"),
    ("load-context-with-span", "generate",
     ["--load-context", "{d}/c.safetensors", "--question", "q", "--span", "3"],
     None, "drop .*--span"),
    ("heads-other-backbone", "generate", ["--policy", "locret", "--heads", "{m}/heads.safetensors"],
     heads_file(backbone_change={"hidden_size": 96}), "trained for another backbone"),
    ("cache-is-a-file", "generate", ["--ckpt", "smollm2-135m-instruct"], "cache-file",
     "LOCRET_CACHE"),
    ("unknown-zoo-name", "generate", ["--ckpt", "llama-9000"], None,
     "unknown model 'llama-9000': not a zoo name"),
    ("folder-without-model", "generate", ["--ckpt", "{d}"], None,
     "no config.json|no tokenizer.json"),
    # model folders
    ("config-invalid-json", "generate", [], write("config.json", "{model_type: llama"),
     "not valid JSON"),
    ("config-array", "generate", [], write("config.json", "[1, 2]"),
     "expected a JSON object, found a list"),
    ("config-unknown-type", "generate", [], edit_config(model_type="gpt2"),
     "unsupported model_type 'gpt2'"),
    ("config-negative-size", "generate", [], edit_config(hidden_size=-64),
     "hidden_size must be a positive"),
    ("config-string-size", "generate", [], edit_config(num_hidden_layers="two"),
     "num_hidden_layers must be"),
    ("config-zero-heads", "generate", [], edit_config(num_attention_heads=0, head_dim=None),
     "num_attention_heads must be a positive"),
    ("config-heads-not-grouped", "generate", [], edit_config(num_key_value_heads=3),
     "not a multiple"),
    ("config-missing-key", "generate", [], edit_config(intermediate_size=None), "invalid config"),
    ("config-unsupported-rope", "generate", [], edit_config(rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "unsupported rope type 'dynamic'"),
    ("config-longrope-factors", "generate", [], edit_config(rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0,
        "original_max_position_embeddings": 128,
        "short_factor": [1.0], "long_factor": [1.0]}), "longrope needs 8 short and long factors"),
    ("config-bad-activation", "generate", [], edit_config(hidden_act="gelu"),
     "unsupported hidden_act"),
    ("weights-missing", "generate", [], lambda f: (f / "model.safetensors").unlink(),
     "no model.safetensors"),
    ("weights-truncated", "generate", [], lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors: unreadable safetensors file"),
    ("weights-missing-tensor", "generate", [], edit_weights(lambda t: t.pop("model.norm.weight")),
     "missing tensor model.norm.weight"),
    ("weights-misshaped", "generate", [],
     edit_weights(lambda t: t.update({"model.norm.weight": torch.ones(3)})),
     r"tensor model.norm.weight has shape \[3\], expected \[64\]"),
    ("weights-unexpected-tensor", "generate", [],
     edit_weights(lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)})),
     "unexpected tensor model.layers.0.extra.weight"),
    ("weights-nan", "generate", [], edit_weights(lambda t: nan_first(t, "model.layers.1.mlp")),
     "holds NaN or inf"),
    ("index-invalid-json", "generate", [], sharded("{"), "not valid JSON"),
    ("index-no-weight-map", "generate", [], sharded({"metadata": {}}), "no weight_map"),
    ("index-traversal", "generate", [],
     sharded({"weight_map": {"model.norm.weight": "../outside.safetensors"}}),
     "leaves the model folder"),
    ("index-absolute", "generate", [],
     sharded({"weight_map": {"model.norm.weight": "/etc/passwd"}}),
     "leaves the model folder"),
    ("index-missing-shard", "generate", [],
     sharded({"weight_map": {"model.norm.weight": "model-2.safetensors"}}),
     "is missing"),
    ("no-tokenizer", "generate", [], lambda f: (f / "tokenizer.json").unlink(),
     "no tokenizer.json"),
    ("tokenizer-beyond-vocab", "generate", ["--no-chat"], big_vocab_tokenizer,
     "beyond the model's vocabulary"),
    # eval.py
    ("eval-lengths", "eval", ["--lengths", "abc"], None, "--lengths must be integers"),
    ("eval-device-unknown", "eval", ["--device", "cpu:3"], None, "the CPU has no device index"),
    ("eval-budget-zero-division", "eval", ["--budgets", "1/0"], None, "--budgets fractions"),
    ("eval-budget-word", "eval", ["--budgets", "abc"], None, "--budgets fractions"),
    ("eval-budget-zero", "eval", ["--budgets", "0"], None, "--budgets fractions"),
    ("eval-budget-over-one", "eval", ["--budgets", "2/1"], None, "fractions of the prompt"),
    ("eval-budget-decimal", "eval", ["--budgets", "0.5"], None, "--budgets fractions"),
    ("eval-n-zero", "eval", ["--n", "0"], None, "must be positive"),
    ("eval-n-negative", "eval", ["--n", "-3"], None, "must be positive"),
    ("eval-n-loc", "eval", ["--n-loc", "tail"], None, "--n-loc must be"),
    ("eval-unknown-task", "eval", ["--tasks", "passkey2"], None,
     "--tasks: unknown 'passkey2' \\(choose from passkey,"),
    ("eval-empty-task", "eval", ["--tasks", "passkey,,vt"], None, "--tasks: unknown ''"),
    ("eval-unknown-policy", "eval", ["--policies", "full,oracle"], None,
     "--policies: unknown 'oracle' \\(choose from full,"),
    ("eval-split-without-suite", "eval", ["--split", "test"], None,
     "--split applies to --suite heldout or multiquestion"),
    ("eval-out-is-file", "eval",
     ["--out", "{m}/config.json", "--suite", "quick", "--lengths", "128"],
     None, "is a file"),
    ("eval-out-under-file", "eval",
     ["--out", "{m}/config.json/results", "--suite", "quick", "--lengths", "128"], None,
     "cannot create --out"),
    ("eval-length-past-window", "eval", ["--lengths", "250"], None,
     "past the model's 256-token context"),
    ("eval-seed-negative", "eval", ["--seed", "-5"], None, "--seed: must be in"),
    ("eval-chunk-zero", "eval", ["--chunk", "0"], None, "--chunk must be positive"),
    ("eval-max-new-tokens-zero", "eval", ["--max-new-tokens", "0"], None,
     "--max-new-tokens and --chunk must be"),
    ("eval-settings-corrupt", "eval", ["--suite", "quick", "--lengths", "128"],
     lambda f: ((f.parent / "results").mkdir(),
                (f.parent / "results" / "settings.json").write_text("{")),
     "settings.json is unreadable"),
    ("eval-settings-a-list", "eval", ["--suite", "quick", "--lengths", "128"],
     lambda f: ((f.parent / "results").mkdir(),
                (f.parent / "results" / "settings.json").write_text("[1]")),
     "settings.json is not a settings object"),
    ("eval-heads-missing", "eval", ["--policies", "locret", "--heads", "{d}/none.safetensors"],
     None, "not found"),
    ("eval-heads-not-heads", "eval", ["--policies", "locret", "--heads", "{m}/model.safetensors"],
     None, "not a retaining-heads file"),
    # train.py
    ("train-out-is-dir", "train", ["--out", "{d}"], None, "need a file path in an existing"),
    ("train-out-parent-missing", "train", ["--out", "{d}/no/such/heads.safetensors"], None,
     "existing, writable"),
    ("train-save-every", "train", ["--save-every", "0"], None, "--save-every >= 1"),
    ("train-val-samples", "train", ["--val-every", "5", "--val-samples", "0"], None,
     "--val-samples >= 1"),
    ("train-lr-nan", "train", ["--lr", "nan"], None, "finite --lr > 0"),
    ("train-lr-zero", "train", ["--lr", "0"], None, "finite --lr > 0"),
    ("train-lr-negative", "train", ["--lr=-1e-3"], None, "finite --lr > 0"),
    ("train-alpha-inf", "train", ["--alpha", "inf"], None, "--alpha"),
    ("train-min-above-max", "train", ["--min-tokens", "900", "--max-tokens", "800"], None,
     "--min-tokens <= --max-tokens"),
    ("train-steps-zero", "train", ["--steps", "0"], None, "--steps >= 1"),
    ("train-warmup-negative", "train", ["--warmup", "-5"], None, "--warmup >= 0"),
    ("train-float16-cpu", "train", ["--dtype", "float16", "--device", "cpu"], None,
     "float16 on CPU"),
    ("train-resume-without-state", "train", ["--resume"], None, "no training state"),
    ("train-seed-beyond-64-bits", "train", ["--seed", str(2 ** 64)], None, "--seed: must be in"),
    ("train-resume-garbage-state", "train", ["--resume"],
     lambda f: (f.parent / "heads.train-state.safetensors").write_bytes(b"not a state file"),
     "unreadable training state"),
    ("train-init-missing", "train", ["--init", "{d}/none.safetensors"], None, "not found"),
    ("train-init-not-heads", "train", ["--init", "{m}/model.safetensors"], None,
     "not a retaining-heads file"),
    ("train-init-other-size", "train", ["--init", "{m}/heads.safetensors", "--head-hidden", "4"],
     heads_file(), "hidden size 8: drop --head-hidden"),
    ("train-init-other-backbone", "train",
     ["--init", "{m}/heads.safetensors", "--head-hidden", "8"],
     heads_file(backbone_change={"hidden_size": 96}), "trained for another backbone"),
    ("train-evicted-whole", "train", ["--evicted", "1"], None, "--evicted must be a fraction in"),
    ("train-evicted-words", "train", ["--evicted", "an eighth"], None,
     "--evicted must be a fraction in"),
    ("train-worked-examples-above-one", "train", ["--worked-examples", "1.5"], None,
     "--worked-examples must be a share"),
    ("train-worked-examples-nan", "train", ["--worked-examples", "nan"], None,
     "--worked-examples must be a share"),
]


def with_defaults(flags: list[str], defaults: dict[str, str]) -> list[str]:
    """`flags` after every default flag they do not set themselves."""
    given = {f for f in flags if f.startswith("--")}
    return ([x for flag, value in defaults.items() if flag not in given for x in (flag, value)]
            + flags)


def run_case(script, flags, model, case_dir):
    flags = [f.format(m=model, d=case_dir) for f in flags]
    common = {"--ckpt": str(model), "--device": "cpu"}
    if script == "generate":
        defaults = {**common, "--prompt": str(case_dir / "p.txt"), "--max-new-tokens": "4",
                    "--dtype": "float32"}
        generate_cli.main(generate_cli.parse_args(with_defaults(flags, defaults)))
    elif script == "eval":
        defaults = {**common, "--out": str(case_dir / "results"), "--dtype": "float32",
                    "--policies": "full"}
        eval_cli.main(eval_cli.parse_args(with_defaults(flags, defaults)))
    else:
        defaults = {**common, "--out": str(case_dir / "heads.safetensors"), "--steps": "1",
                    "--head-hidden": "4",
                    "--min-tokens": "60", "--max-tokens": "80", "--val-every": "0"}
        train_cli.main(train_cli.parse_args(with_defaults(flags, defaults)))


@pytest.mark.parametrize("case, script, flags, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, script, flags, setup, message, base, tmp_path,
                                     monkeypatch, capsys):
    case_dir = tmp_path / "case"
    model = case_dir / "model"
    shutil.copytree(base, model)
    (case_dir / "p.txt").write_text(PROMPT)  # before setup, which may replace it
    if setup == "cache-file":
        (case_dir / "cache").write_text("not a folder")
        monkeypatch.setenv("LOCRET_CACHE", str(case_dir / "cache"))
    elif setup:
        setup(model)
    with pytest.raises((LocretError, SystemExit)) as caught:
        run_case(script, flags, model, case_dir)
    text = (str(caught.value) if caught.type is LocretError
            else capsys.readouterr().err.strip().splitlines()[-1])
    if caught.type is SystemExit:
        # argparse's usage error, after one line of usage and one of error
        assert caught.value.code == 2
    assert "\n" not in text and "Traceback" not in text
    assert __import__("re").search(message, text), text


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
