"""Fit retaining heads for a frozen backbone (Locret, arXiv 2410.01805).

    python train.py                   # the shipped heads' run on a CPU, the paper's on a GPU
    python train.py --ckpt smollm2-135m-instruct --out heads.safetensors --steps 300
    python train.py ... --resume      # continue a killed run exactly
    python train.py ... --init heads.safetensors --evicted 1/8  # fine-tune on inference's inputs
    torchrun --nproc_per_node 4 train.py ...                    # data-parallel over the heads

Each step: one generated long-context sample (locret/train/data.py), one frozen forward over
prompt + answer that yields every layer's causal importance scores (the labels) and the heads'
predictions, then a step of AdamW on the heads alone (locret/train/loop.py)."""
import argparse
import sys
from pathlib import Path

from locret.devices import check_device, default_device, default_dtype
from locret.errors import LocretError, run_script, seed
from locret.files import writable_file_path
from locret.loading.weights import DTYPES
from locret.loading.zoo import DEFAULT_MODEL
from locret.train.config import (ANSWER_SHARE, FIELDS, PRESETS, TARGETS, Job, config_notes,
                                 default_preset, resolve_config)
from locret.train.loop import train
from locret.train.validate import Validation


def main(job: Job) -> list[Validation]:
    return train(job)


def job_of(args: argparse.Namespace) -> Job:
    """The flags resolved once: the preset (by device unless given) with the flags given over it."""
    device = check_device(args.device or default_device())
    dtype = args.dtype or default_dtype(device)
    if dtype == "float16" and device == "cpu":
        raise LocretError("--dtype float16 on CPU overflows in training (NaN heads): "
                          "use float32 or bfloat16")
    choices = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    config = resolve_config(args.preset or default_preset(device), choices)
    if not writable_file_path(args.out):
        raise LocretError(f"--out {args.out}: need a file path in an existing, writable folder")
    return Job(config, frozenset(choices), Path(args.out), args.init and Path(args.init),
               args.resume, device, dtype)


def preset_help(name: str) -> str:
    values = PRESETS[name]
    return " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in FIELDS
                    if values.get(k) is not None)


def by_preset(key: str) -> str:
    return f"(cpu: {PRESETS['cpu'][key]}, official: {PRESETS['official'][key]})"


def parse_args(argv=None) -> Job:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help=(
        "the defaults of every flag not given. cpu, the default on a CPU, is the run that made the "
        f"shipped heads: {preset_help('cpu')}. official, the default with CUDA, is the paper's "
        f"run: {preset_help('official')}, --warmup 2/3 of --steps"))
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"backbone: zoo name, HF folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--out", default="heads.safetensors",
                   help="where to write the heads (default: heads.safetensors)")
    p.add_argument("--steps", type=int, help=f"training samples, batch 1 {by_preset('steps')}")
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state next to --out")
    p.add_argument("--init", metavar="HEADS", help=(
        "start from these heads (e.g. to fine-tune the shipped ones) instead of random ones; "
        "the head size is theirs"))
    p.add_argument("--seed", type=seed, help=f"data and initialisation seed {by_preset('seed')}")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), help=(
        "backbone and heads dtype (default: bfloat16 where native, as official; else float32 on "
        "CPU, float16 on GPUs without bf16)"))
    a = p.add_argument_group("advanced (research knobs; defaults from --preset)")
    a.add_argument("--target", choices=TARGETS, help=(
        "cis: each layer's heads fit its causal importance scores (the paper's); shared: every "
        "head learns which tokens one kept set for all layers needs (the top eighth by their best "
        "rank in any layer), for --eviction shared; graded: the same at budgets 1/32, 1/16, 1/8 "
        "and 1/4 at once; joint: the shared target ranked by the mean rank over the layers the "
        "zoo ranks a shared eviction by; joint-rank: that rank itself, raised to the 8th power "
        f"{by_preset('target')}"))
    a.add_argument("--evicted", metavar="FRACTION", help=(
        "eviction-aware training: fit the heads on the inputs they get at inference, from a "
        "chunked prefill of each prompt under this budget (e.g. 1/8 of it; the zoo's chunk, "
        "stabilizer share and span), the heads being trained choosing what is kept"))
    a.add_argument("--min-tokens", type=int,
                   help=f"shortest generated prompt {by_preset('min_tokens')}")
    a.add_argument("--max-tokens", type=int, help=(
        f"longest generated prompt {by_preset('max_tokens')}; a preset's is cut to the model's "
        f"context less 1/{ANSWER_SHARE}"))
    a.add_argument("--worked-examples", type=float, metavar="SHARE",
                   help="share of the prompts that open with an answered example of their task (0)")
    a.add_argument("--head-hidden", type=int,
                   help=f"retaining head hidden size {by_preset('head_hidden')}")
    a.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01, official)")
    a.add_argument("--alpha", type=float, help="smoothness weight (0.0025, official)")
    a.add_argument("--lr", type=float, help="peak AdamW learning rate (5e-4, official)")
    a.add_argument("--warmup", type=int, help=(
        "warmup steps, then linear decay (cpu: 45, official: 2/3 of --steps, its 2000 of 3000)"))
    a.add_argument("--val-every", type=int,
                   help=f"validate every N steps, 0: never {by_preset('val_every')}")
    a.add_argument("--val-samples", type=int,
                   help=f"held-out samples per validation {by_preset('val_samples')}")
    a.add_argument("--save-every", type=int,
                   help=f"write the resumable state every N steps {by_preset('save_every')}")
    args = p.parse_args(argv)
    try:
        job = job_of(args)
    except LocretError as e:
        p.error(str(e))
    for note in config_notes(job.config):
        print(f"note: {note}", file=sys.stderr)
    return job


if __name__ == "__main__":
    run_script(main, parse_args)
