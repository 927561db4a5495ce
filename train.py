"""Fit retaining heads for a frozen backbone (Locret, arXiv 2410.01805).

    python train.py --ckpt smollm2-135m-instruct --out heads.safetensors
    python train.py ... --resume                       # continue a killed run exactly
    python train.py ... --init heads.safetensors --evicted 1/8   # fine-tune on the inputs inference gives
    torchrun --nproc_per_node 4 train.py ...           # data-parallel over the heads

Each step: one generated long-context sample (locret/train_data.py), one frozen forward over
prompt + answer that yields every layer's causal importance scores (the labels) and the heads'
predictions, then a step of AdamW on the heads alone."""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from locret.devices import check_device, default_device, default_dtype
from locret.settings import layer_slice
from locret.errors import LocretError, run_script, seed
from locret.files import remove_stale_temporaries, save_atomic, writable_file_path
from locret.train.head_inputs import chunked_head_inputs, evicted_settings
from locret.heads import load_heads, read_heads, save_heads
from locret.train.labels import LabelRecorder
from locret.loading.weights import DTYPES, load_model
from locret.train.loss import keep_loss, retaining_loss, topk_overlap
from locret.train.targets import SHARED_TARGETS, target_eviction
from locret.loading.tokenizer import Tokenizer
from locret.train.data import make_sample
from locret.loading.zoo import DEFAULT_MODEL, resolve_checkpoint
from locret.settings import GENERIC


@dataclass
class Rank:
    index: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0


def setup_distributed(device: str) -> Rank:
    """Under torchrun, join the process group; alone, rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:
        return Rank()
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size())


def encode_sample(tokenizer: Tokenizer, sample) -> tuple[list[int], int]:
    """Prompt followed by the answer -> (token ids, prompt length). A chat sample is a user turn the
    assistant answers; a completion sample is plain text the answer continues after a space."""
    if sample.form == "chat":
        prompt = tokenizer.encode_chat([{"role": "user", "content": sample.prompt}])
        answer = tokenizer.encode(sample.answer, add_special_tokens=False)
    else:
        prompt = tokenizer.encode(sample.prompt, add_special_tokens=True)
        answer = tokenizer.encode(" " + sample.answer, add_special_tokens=False)
    return prompt + answer, len(prompt)


def heads_forward(model, ids: list[int], prompt_len: int, target: str = "cis", evicted: tuple | None = None,
                  layers: slice = slice(None)):
    """One causal forward over prompt + answer -> (predictions, labels), each [L, 1, KVH, prompt_len]:
    per-layer CIS labels, or one target in [0, 1] for all layers and heads (ranking.SHARED_TARGETS[target];
    `joint` and `joint-rank` rank tokens by `layers`).
    With `evicted` (zoo settings, budget fraction), the predictions come from the head inputs of a chunked
    prefill of the prompt under that budget instead (head_inputs.py): what the heads see at inference."""
    recorder = LabelRecorder(prompt_len)
    with torch.set_grad_enabled(torch.is_grad_enabled() and evicted is None):
        model(torch.tensor([ids], device=model.lm_head.weight.device), cache=recorder, last_only=True)
    pred, label = recorder.stacked()
    if evicted:
        settings = evicted_settings(*evicted, prompt_len, target_eviction(target))
        inputs = chunked_head_inputs(model, ids[:prompt_len], settings)
        pred = torch.stack([head(x) for head, x in zip(model.retaining_heads, inputs)])
    if target in SHARED_TARGETS:
        label = SHARED_TARGETS[target](label, layers)
    return pred, label


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def head_parameters(model) -> list[torch.nn.Parameter]:
    return [p for head in model.retaining_heads for p in head.parameters()]


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".train-state.safetensors")


def save_state(path: Path, model, optimizer, step: int, args) -> None:
    """Heads, AdamW moments and the step, as safetensors (no pickle), written atomically."""
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(head_parameters(model))}
    for i, p in enumerate(head_parameters(model)):
        for name, value in optimizer.state[p].items():
            tensors[f"adam.{i}.{name}"] = value
    save_atomic(tensors, path, {"step": str(step), "args": json.dumps(vars(args), default=str)}, "training state")


def load_state(path: Path, model, optimizer, args) -> int:
    """Restore heads and AdamW moments; return the step to continue from. The settings that shape the
    heads and the data must be the saved run's (--steps, validation and saving may change)."""
    if not path.is_file():
        raise LocretError(f"--resume: no training state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return restore_state(f, model, optimizer, args)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:  # truncated, foreign, misshaped
        raise LocretError(f"--resume: unreadable training state {path} ({type(e).__name__}: {e})") from None


def restore_state(f, model, optimizer, args) -> int:
    """`load_state`'s reading of the open state file `f`: the step to continue from."""
    step, saved = int(f.metadata()["step"]), json.loads(f.metadata()["args"])
    if not isinstance(saved, dict):
        raise ValueError("its args are not a settings object")
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in SAME_ON_RESUME
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise LocretError(f"--resume: the saved run used other settings ({'; '.join(changed)}); "
                          "resume with the same ones, or start a new --out")
    for i, p in enumerate(head_parameters(model)):
        p.data.copy_(f.get_tensor(f"param.{i}"))
        optimizer.state[p] = {name: f.get_tensor(f"adam.{i}.{name}").to(p.device)
                              for name in ("step", "exp_avg", "exp_avg_sq")}
    return step


@torch.no_grad()
def validate(model, tokenizer, args, evicted: tuple | None, layers: slice) -> tuple[float, float]:
    """Mean loss and top-10% overlap on held-out samples (a seed training never uses)."""
    losses, overlaps = [], []
    for i in range(args.val_samples):
        sample = make_sample(i, args.seed + 1_000_003, tokenizer, args.min_tokens, args.max_tokens,
                             args.worked_examples)
        pred, label = heads_forward(model, *encode_sample(tokenizer, sample), args.target, evicted, layers)
        losses.append(LOSSES[args.target](pred, label, args.alpha).item())
        overlaps.append(topk_overlap(pred, label))
    return sum(losses) / len(losses), sum(overlaps) / len(overlaps)


def main(args: argparse.Namespace) -> None:
    device, dtype, rank = training_device(args)
    model, tokenizer, zoo = backbone_with_heads(args, device, dtype)
    evicted = (zoo, float(Fraction(args.evicted))) if args.evicted else None
    layers = layer_slice(zoo.shared_layers, model.config.num_hidden_layers)  # what --target joint ranks by
    params = head_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    out = Path(args.out)
    remove_stale_temporaries(state_path(out))
    step = load_state(state_path(out), model, optimizer, args) if args.resume else 0
    warmup = args.warmup if args.warmup is not None else round(args.steps * 2 / 3)
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=not rank.main, file=sys.stderr)
    started, tokens, lengths = time.perf_counter(), 0, []
    while step < args.steps:
        sample = make_sample(step * rank.world + rank.index, args.seed, tokenizer, args.min_tokens, args.max_tokens,
                             args.worked_examples)
        ids, prompt_len = encode_sample(tokenizer, sample)
        lengths.append(prompt_len)
        pred, label = heads_forward(model, ids, prompt_len, args.target, evicted, layers)
        loss = LOSSES[args.target](pred, label, args.alpha)
        update(params, optimizer, loss, args.lr * lr_factor(step, warmup, args.steps), rank)
        step, tokens = step + 1, tokens + len(ids) * rank.world
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", overlap=f"{topk_overlap(pred, label):.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        if rank.main and args.val_every and (step % args.val_every == 0 or step == args.steps):
            val_loss, val_overlap = validate(model, tokenizer, args, evicted, layers)
            bar.write(f"step {step}: val loss {val_loss:.4f}, val top-10% overlap {val_overlap:.3f}",
                      file=sys.stderr)
        if rank.main and (step % args.save_every == 0 or step == args.steps):
            save_state(state_path(out), model, optimizer, step, args)
    if rank.main:
        training = {k: v for k, v in vars(args).items() if k not in ("resume", "device")}
        save_heads(model, out, backbone=args.ckpt, training=training, dtype=torch.bfloat16,
                   eviction=target_eviction(args.target))
        seen = f", prompts of {min(lengths)}-{max(lengths)} tokens" if lengths else ""
        bar.write(f"wrote {out} ({step} steps, {time.perf_counter() - started:.0f} s this run, "
                  f"{tokens / (time.perf_counter() - started):.0f} tok/s{seen})", file=sys.stderr)
    if rank.world > 1:
        dist.destroy_process_group()


def training_device(args: argparse.Namespace) -> tuple[str, str, Rank]:
    """(device, dtype, this process's rank); under torchrun each rank takes its own GPU."""
    device = check_device(args.device or default_device())
    dtype = args.dtype or default_dtype(device)
    if dtype == "float16" and device == "cpu":
        raise LocretError("--dtype float16 on CPU overflows in training (NaN heads): use float32 or bfloat16")
    rank = setup_distributed(device)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device, dtype, rank


def backbone_with_heads(args: argparse.Namespace, device: str, dtype: str):
    """The frozen backbone with heads to train (--init's, or fresh from --seed) -> (model, tokenizer, zoo settings)."""
    folder, entry = resolve_checkpoint(args.ckpt)
    tokenizer = Tokenizer(folder)
    model = load_model(folder, device, DTYPES[dtype])
    fit_window(args, model.config.max_position_embeddings)
    torch.manual_seed(args.seed)  # identical initial heads on every rank
    if args.init:
        load_heads(model, args.init)
    else:
        model.add_retaining_heads(args.head_hidden)
    return model, tokenizer, entry.settings if entry else GENERIC


def update(params: list, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, rank: Rank) -> None:
    """One AdamW step on the heads at learning rate `lr`: gradients averaged over ranks, clipped by value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if rank.world > 1:  # data parallel
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= rank.world
    torch.nn.utils.clip_grad_value_(params, 0.5)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def fit_window(args, window: int) -> None:
    """Samples must fit the model's context: the preset's longest prompt is cut to it (the official 10240
    tokens is past the default model's 8192), a --max-tokens given past it is an error."""
    longest = window - window // ANSWER_SHARE
    if args.max_tokens > longest:
        if "max_tokens" not in args.from_preset:
            raise LocretError(f"--max-tokens {args.max_tokens}: samples would pass the model's {window}-token "
                              f"context (with room for the answer, at most {longest})")
        print(f"note: prompts of at most {longest} tokens (the preset's {args.max_tokens} would pass the model's "
              f"{window}-token context)", file=sys.stderr)
        args.max_tokens = longest
    if args.min_tokens > args.max_tokens:
        raise LocretError(f"--min-tokens {args.min_tokens} is above the longest prompt this model takes ({args.max_tokens})")


ANSWER_SHARE = 16  # 1/ANSWER_SHARE of the context kept for a sample's answer and its prompt's overshoot (up to ~2%)
LOSSES = {"cis": retaining_loss} | dict.fromkeys(SHARED_TARGETS, keep_loss)
PRESETS = {  # defaults by preset; any flag given wins
    "official": dict(steps=3000, min_tokens=1024, max_tokens=10240, head_hidden=1024, warmup=None, val_every=100,
                     val_samples=8, save_every=50),
    # The shipped heads' recipe for this project's 2-core CPU (README, "Training retaining heads").
    "cpu": dict(steps=300, min_tokens=1024, max_tokens=6144, head_hidden=256, warmup=45, val_every=150,
                val_samples=6, save_every=10),
}
SAME_ON_RESUME = ("ckpt", "target", "head_hidden", "seed", "lr", "min_tokens", "max_tokens", "alpha", "weight_decay",
                  "dtype", "evicted", "init", "worked_examples")


def valid_fraction(text: str) -> bool:
    try:
        return 0 < Fraction(text) < 1
    except (ValueError, ZeroDivisionError):
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = lambda key: f"official: {PRESETS['official'][key]}, cpu: {PRESETS['cpu'][key]}"
    p.add_argument("--preset", choices=list(PRESETS), default="official",
                   help="defaults for the flags below: the paper's run (official, default) or the CPU recipe of "
                        "the shipped heads (cpu)")
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help="backbone: zoo name, HF folder or hub id")
    p.add_argument("--out", default="heads.safetensors", help="where to write the heads (default: heads.safetensors)")
    p.add_argument("--target", choices=list(LOSSES), default="cis",
                   help="cis: each layer's heads fit its causal importance scores (the paper's); shared: every head "
                        "learns which tokens one kept set for all layers needs (the top eighth by their best rank "
                        "in any layer), for --eviction shared; graded: the same at budgets 1/32, 1/16, 1/8 and 1/4 "
                        "at once (a token's target is the share of those kept sets that hold it); joint: the shared "
                        "target, ranked by the mean rank over the "
                        "layers the zoo ranks a shared eviction by (13-22 for the default model); joint-rank: that "
                        "rank itself, every budget's order, raised to the 8th power to weight its top")
    p.add_argument("--evicted", metavar="FRACTION", default=None,
                   help="eviction-aware training: fit the heads on the inputs they get at inference, from a chunked "
                        "prefill of each prompt under this budget (e.g. 1/8 of it; the zoo's chunk, stabilizer share "
                        "and span), the heads being trained choosing what is kept; labels still from the full forward")
    p.add_argument("--init", metavar="HEADS", default=None,
                   help="start from these heads (e.g. to fine-tune the shipped ones) instead of random ones; "
                        "the head size is theirs")
    p.add_argument("--steps", type=int, help=f"training samples, batch 1 ({preset('steps')})")
    p.add_argument("--min-tokens", type=int, help=f"shortest generated prompt ({preset('min_tokens')})")
    p.add_argument("--max-tokens", type=int, help=f"longest generated prompt ({preset('max_tokens')}; a preset's is cut to the model's context less 1/{ANSWER_SHARE})")
    p.add_argument("--worked-examples", type=float, default=0.0, metavar="SHARE",
                   help="share of the samples whose prompt opens with an answered example of its task, as few-shot "
                        "prompts do (default: 0)")
    p.add_argument("--head-hidden", type=int, help=f"retaining head hidden size ({preset('head_hidden')})")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (official: torch's 0.01)")
    p.add_argument("--alpha", type=float, default=0.0025, help="smoothness weight (official: 0.0025)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (official: 5e-4)")
    p.add_argument("--warmup", type=int, help="warmup steps, then linear decay (official: 2/3 of --steps, as its "
                   f"2000 of 3000; cpu: {PRESETS['cpu']['warmup']})")
    p.add_argument("--seed", type=seed, default=0, help="data and initialisation seed")
    p.add_argument("--val-every", type=int, help=f"validate every N steps, 0: never ({preset('val_every')})")
    p.add_argument("--val-samples", type=int, help=f"held-out samples per validation ({preset('val_samples')})")
    p.add_argument("--save-every", type=int, help=f"write the resumable state every N steps ({preset('save_every')})")
    p.add_argument("--resume", action="store_true", help="continue from the training state next to --out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="backbone and heads dtype (default: bfloat16 where native, as official; else float32 on CPU, "
                        "float16 on GPUs without bf16)")
    args = p.parse_args(argv)
    if args.init:
        _, meta = read_heads(Path(args.init), tensors=False)
        if args.head_hidden not in (None, int(meta["head_hidden"])):
            p.error(f"--init {args.init} holds heads of hidden size {meta['head_hidden']}: drop --head-hidden")
        args.head_hidden = int(meta["head_hidden"])
    if args.evicted is not None and not valid_fraction(args.evicted):
        p.error(f"--evicted must be a fraction in (0, 1) such as 1/8, not {args.evicted!r}")
    args.from_preset = [key for key in PRESETS[args.preset] if getattr(args, key) is None]
    for key in args.from_preset:
        setattr(args, key, PRESETS[args.preset][key])
    if not 0 <= args.worked_examples <= 1:
        p.error(f"--worked-examples must be a share in [0, 1], not {args.worked_examples}")
    if args.steps < 1 or args.head_hidden < 1 or not 0 < args.min_tokens <= args.max_tokens:
        p.error("need --steps >= 1, --head-hidden >= 1 and 0 < --min-tokens <= --max-tokens")
    if args.save_every < 1 or args.val_every < 0 or (args.val_every and args.val_samples < 1) or (args.warmup or 0) < 0:
        p.error("need --save-every >= 1, --val-every >= 0, --val-samples >= 1 and --warmup >= 0")
    if not all(math.isfinite(v) and v >= 0 for v in (args.lr, args.alpha, args.weight_decay)) or args.lr == 0:
        p.error("need a finite --lr > 0 and finite --alpha, --weight-decay >= 0")
    if not writable_file_path(args.out):
        p.error(f"--out {args.out}: need a file path in an existing, writable folder")
    if (args.warmup or 0) >= args.steps:
        print(f"note: --warmup {args.warmup} is not shorter than --steps {args.steps}: the learning rate peaks at "
              f"{args.steps / args.warmup:.0%} of --lr, at the last step, and never decays", file=sys.stderr)
    if args.min_tokens < 256:
        print(f"note: samples shorter than about 256 tokens come out longer than --min-tokens {args.min_tokens} "
              "(a question and its needles need room); the real range is reported at the end", file=sys.stderr)
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
