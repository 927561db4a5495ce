"""The training loop (Locret, arXiv 2410.01805): each step, one generated long-context sample, one
frozen forward over prompt + answer that yields every layer's labels and the heads' predictions,
then a step of AdamW on the heads alone. The state is saved every config.save_every steps."""
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from tqdm import tqdm

from ..files import remove_stale_temporaries
from ..heads import load_heads, save_heads
from ..loading.checkpoint import open_checkpoint
from ..loading.tokenizer import Tokenizer
from ..settings import GENERIC, layer_slice
from .config import Job, TrainConfig, fit_window
from .distributed import Rank, join, leave
from .forward import LOSSES, heads_forward, training_ids
from .loss import topk_overlap
from .optimizer import adamw, lr_factor, update
from .state import head_parameters, load_state, save_state, state_path
from .targets import target_eviction
from .validate import Validation, validate


@dataclass
class Throughput:
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    prompt_lengths: list[int] = field(default_factory=list)

    def add(self, tokens: int, prompt_len: int) -> None:
        self.tokens += tokens
        self.prompt_lengths.append(prompt_len)

    def tokens_per_s(self) -> float:
        return self.tokens / (time.perf_counter() - self.started)

    def summary(self) -> str:
        lengths = self.prompt_lengths
        seen = f", prompts of {min(lengths)}-{max(lengths)} tokens" if lengths else ""
        return (f"{time.perf_counter() - self.started:.0f} s this run, "
                f"{self.tokens_per_s():.0f} tok/s{seen}")


def train(job: Job) -> list[Validation]:
    """Train the heads `job` asks for and write them to job.out -> the validations made."""
    device, rank = join(job.device)
    _, entry, tokenizer, model = open_checkpoint(job.config.ckpt, device, job.dtype)
    config = fit_window(job.config, job.chosen, model.config.max_position_embeddings)
    torch.manual_seed(config.seed)  # identical initial heads on every rank
    if job.init:
        load_heads(model, job.init)
    else:
        model.add_retaining_heads(config.head_hidden)
    defaults = entry.settings if entry else GENERIC
    evicted = (defaults, float(Fraction(config.evicted))) if config.evicted else None
    # --target joint's ranking layers, among the global ones
    layers = layer_slice(defaults.shared_layers, len(model.config.global_layers))
    validations = run_steps(job, config, model, tokenizer, rank, evicted, layers)
    leave(rank)
    return validations


def run_steps(job: Job, config: TrainConfig, model, tokenizer: Tokenizer, rank: Rank,
              evicted: tuple | None, layers: slice) -> list[Validation]:
    params = head_parameters(model)
    optimizer, state = adamw(params, config), state_path(job.out)
    remove_stale_temporaries(state)
    step = load_state(state, model, optimizer, config, job.dtype) if job.resume else 0
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not rank.main,
               file=sys.stderr)
    throughput, validations = Throughput(), []
    while step < config.steps:
        index = step * rank.world + rank.index
        ids, prompt_len = training_ids(tokenizer, config, index, config.seed)
        pred, label = heads_forward(model, ids, prompt_len, config.target, evicted, layers)
        loss = LOSSES[config.target](pred, label, config.alpha)
        lr = config.lr * lr_factor(step, config.warmup, config.steps)
        update(params, optimizer, loss, lr, rank)
        step += 1
        throughput.add(len(ids) * rank.world, prompt_len)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", overlap=f"{topk_overlap(pred, label):.3f}",
                        tok_s=f"{throughput.tokens_per_s():.0f}")
        last = step == config.steps
        if rank.main and config.val_every and (step % config.val_every == 0 or last):
            validations.append(validate(model, tokenizer, config, step, evicted, layers))
            bar.write(str(validations[-1]), file=sys.stderr)
        if rank.main and (step % config.save_every == 0 or last):
            save_state(state, model, optimizer, step, config, job.dtype)
    if rank.main:
        save_heads(model, job.out, backbone=config.ckpt, training=asdict(config),
                   dtype=torch.bfloat16, eviction=target_eviction(config.target))
        bar.write(f"wrote {job.out} ({step} steps, {throughput.summary()})", file=sys.stderr)
    return validations
