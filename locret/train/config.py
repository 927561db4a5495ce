"""What a training run is: a preset's values with the user's flags over them, resolved once into a
TrainConfig. The heads file records it as its "training" metadata, so it holds no machine paths."""
import math
import sys
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

from ..errors import LocretError
from ..heads import read_heads
from .targets import SHARED_TARGETS


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    ckpt: str  # the backbone as the user named it
    target: str  # cis, or one of targets.SHARED_TARGETS
    steps: int  # training samples, batch 1
    min_tokens: int  # shortest generated prompt
    max_tokens: int  # longest generated prompt
    worked_examples: float  # share of prompts opening with an answered example of their task
    head_hidden: int
    weight_decay: float
    alpha: float  # smoothness weight
    lr: float  # peak AdamW learning rate
    warmup: int  # linear warmup steps, then linear decay to 0
    seed: int  # data and initialisation
    val_every: int  # 0: never
    val_samples: int
    save_every: int  # steps between writes of the resumable state
    init: str | None = None  # the file name of the heads the run started from
    evicted: str | None = None  # eviction-aware training under this budget fraction, e.g. "1/8"


@dataclass(frozen=True)
class Job:
    """One run on this machine: its config, and what the heads file does not record."""
    config: TrainConfig
    chosen: frozenset  # the config fields the user's flags set
    out: Path  # the heads file; its resumable state is written next to it
    init: Path | None  # heads to start from
    resume: bool
    device: str
    dtype: str


SHARED_RECIPE = dict(worked_examples=0.0, weight_decay=0.01, alpha=0.0025, lr=5e-4)
PRESETS = {  # the values of every flag a user does not give
    # The paper's run (official code); warmup None: 2/3 of the steps, as its 2000 of 3000.
    "official": dict(SHARED_RECIPE, target="cis", steps=3000, min_tokens=1024, max_tokens=10240,
                     head_hidden=1024, warmup=None, seed=0, val_every=100, val_samples=8,
                     save_every=50),
    # The run that made the shipped heads, on this project's 2-core CPU.
    "cpu": dict(SHARED_RECIPE, target="shared", steps=700, min_tokens=1024, max_tokens=6144,
                head_hidden=256, warmup=45, seed=6, val_every=175, val_samples=6, save_every=10),
}
TARGETS = ("cis", *SHARED_TARGETS)
ANSWER_SHARE = 16  # 1/ANSWER_SHARE of the context is kept for an answer and a prompt's overshoot


def default_preset(device: str) -> str:
    """The shipped heads' CPU run on a CPU, the paper's run on a GPU."""
    return "cpu" if device == "cpu" else "official"


def resolve_config(preset: str, choices: dict) -> TrainConfig:
    """PRESETS[preset] with `choices` (field -> value, the flags given) over it, checked. With an
    `init` path the head size is that file's and the config records the file's name."""
    values = {**PRESETS[preset], **choices, "preset": preset}
    if choices.get("init"):
        values |= init_values(Path(choices["init"]), choices.get("head_hidden"))
    if values["warmup"] is None:
        values["warmup"] = round(values["steps"] * 2 / 3)
    config = TrainConfig(**values)
    check_config(config)
    return config


def init_values(init: Path, head_hidden: int | None) -> dict:
    _, meta = read_heads(init, tensors=False)
    theirs = int(meta["head_hidden"])
    if head_hidden not in (None, theirs):
        raise LocretError(f"--init {init} holds heads of hidden size {theirs}: drop --head-hidden")
    return {"head_hidden": theirs, "init": init.name}


def check_config(c: TrainConfig) -> None:
    """One clear error for a setting no run can use."""
    if c.evicted is not None and not valid_fraction(c.evicted):
        raise LocretError(f"--evicted must be a fraction in (0, 1) such as 1/8, not {c.evicted!r}")
    if not 0 <= c.worked_examples <= 1:
        raise LocretError(f"--worked-examples must be a share in [0, 1], not {c.worked_examples}")
    if c.steps < 1 or c.head_hidden < 1 or not 0 < c.min_tokens <= c.max_tokens:
        raise LocretError("need --steps >= 1, --head-hidden >= 1 "
                          "and 0 < --min-tokens <= --max-tokens")
    if c.save_every < 1 or c.val_every < 0 or (c.val_every and c.val_samples < 1) or c.warmup < 0:
        raise LocretError("need --save-every >= 1, --val-every >= 0, --val-samples >= 1 "
                          "and --warmup >= 0")
    if not all(math.isfinite(v) and v >= 0 for v in (c.lr, c.alpha, c.weight_decay)) or c.lr == 0:
        raise LocretError("need a finite --lr > 0 and finite --alpha, --weight-decay >= 0")


def valid_fraction(text: str) -> bool:
    try:
        return 0 < Fraction(text) < 1
    except (ValueError, ZeroDivisionError):
        return False


def config_notes(c: TrainConfig) -> list[str]:
    """What about a valid config may surprise its user."""
    notes = []
    if c.warmup >= c.steps:
        notes.append(f"--warmup {c.warmup} is not shorter than --steps {c.steps}: the learning "
                     f"rate peaks at {c.steps / c.warmup:.0%} of --lr, at the last step, and "
                     "never decays")
    if c.min_tokens < 256:
        notes.append(f"samples shorter than about 256 tokens come out longer than --min-tokens "
                     f"{c.min_tokens} (a question and its needles need room); the real range is "
                     "reported at the end")
    return notes


def fit_window(config: TrainConfig, chosen: set, window: int) -> TrainConfig:
    """Samples must fit the model's `window`: a preset's longest prompt is cut to it (the official
    10240 tokens is past the default model's 8192), a --max-tokens `chosen` past it is an error."""
    longest = window - window // ANSWER_SHARE
    if config.max_tokens > longest:
        if "max_tokens" in chosen:
            raise LocretError(f"--max-tokens {config.max_tokens}: samples would pass the model's "
                              f"{window}-token context (with room for the answer, at most "
                              f"{longest})")
        print(f"note: prompts of at most {longest} tokens (the preset's {config.max_tokens} would "
              f"pass the model's {window}-token context)", file=sys.stderr)
        config = replace(config, max_tokens=longest)
    if config.min_tokens > config.max_tokens:
        raise LocretError(f"--min-tokens {config.min_tokens} is above the longest prompt this "
                          f"model takes ({config.max_tokens})")
    return config


FIELDS = tuple(f.name for f in fields(TrainConfig))
