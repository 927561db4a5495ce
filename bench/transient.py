"""Transient memory of a chunked prefill against the KV pool, at a large model's shape and
settings, on CPU. The model is cut to a few layers with random weights: a forward frees each
layer's activations before the next, so the transient does not grow with depth, while the pool
does. Each run touches its whole pool, resets the peak RSS (/proc/self/clear_refs) and prefills
once, evicting twice; the transient is the peak RSS over the RSS just before, set against the pool
the full-depth model would hold at the same settings.

    python bench/transient.py                        # Llama-3.1-8B shape, the paper's settings
    python bench/transient.py --layers 1,2 --policies locret,h2o --out runs/transient
    python bench/transient.py --model phi-3-mini-128k --dtype bfloat16
    python bench/transient.py --model path/to/config.json --budget 4096   # any shape

Each (layers, policy) runs in a fresh process so its peak is its own. Linux only. Table to stdout
(and OUT.md)."""
import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

import torch

from locret.context import Context
from locret.engine import pool_bytes
from locret.errors import LocretError, run_script
from locret.eval.synthetic import PUBLISHED_SHAPES, random_model, random_prompt
from locret.loading.weights import DTYPES
from locret.loading.zoo import ZooEntry
from locret.memory import activation_bytes, format_bytes, rss_bytes
from locret.plan import chosen, default_settings, resolve
from locret.policies import EVICTING
from locret.settings import Settings, pool_capacity
from models import config_from_hf


def reset_peak() -> None:
    """From here on VmHWM tracks this process's RSS anew (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


@torch.inference_mode()
def measure(point: dict) -> dict:
    """One prefill in this process: the transient (peak RSS over the RSS before) and what it is
    set against. `point`: the shape (hf, a config.json dict), the settings, the layers to run and
    the dtype."""
    hf, dtype, settings = point["hf"], DTYPES[point["dtype"]], Settings(**point["settings"])
    model = random_model(dict(hf, num_hidden_layers=point["layers"]), "cpu", dtype)
    prompt = random_prompt(hf["vocab_size"], point["prompt_tokens"], seed=0)
    capacity = pool_capacity(settings, len(prompt), 1)
    context = Context(model, settings, capacity, len(prompt))
    for buffer in context.pool.buffers():  # resident before the baseline: the pool is not transient
        buffer.fill_(1)
    before = rss_bytes()
    reset_peak()
    context.prefill(prompt)
    transient = rss_bytes("VmHWM") - before
    return dict({k: v for k, v in point.items() if k != "hf"}, capacity=capacity,
                pool_bytes=context.pool.nbytes, transient_bytes=transient,
                full_depth_pool_bytes=pool_bytes(settings, config_from_hf(hf), capacity, dtype),
                bound_bytes=activation_bytes(model, settings.chunk, capacity, settings.policy))


def shape(model: str) -> tuple[dict, ZooEntry | None]:
    """--model -> (config.json dict, zoo entry with its settings, or None: GENERIC's)."""
    if model in PUBLISHED_SHAPES:
        return PUBLISHED_SHAPES[model]
    path = Path(model)
    if not path.is_file():
        raise LocretError(f"--model {model}: neither a published shape "
                          f"({', '.join(PUBLISHED_SHAPES)}) nor a config.json")
    return json.loads(path.read_text()), None


def points(args) -> list[dict]:
    """One run per (layers, policy): the shape of --model at its settings, a prompt that evicts
    twice."""
    hf, entry = shape(args.model)
    runs = []
    for policy in args.policies:
        s = resolve(default_settings(entry, policy), chosen(args))
        runs += [dict(model=Path(args.model).stem if entry is None else args.model, hf=hf,
                      settings=asdict(s), layers=layers, dtype=args.dtype,
                      prompt_tokens=s.budget + 2 * s.chunk + s.n_loc) for layers in args.layers]
    return sorted(runs, key=lambda run: run["layers"])


def spawn(point: dict) -> dict:
    """measure(point) in a fresh interpreter: its peak RSS is its own."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise LocretError(f"the {point['layers']}-layer {point['settings']['policy']} run failed: "
                          f"{lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    md = ["| model shape | layers run | policy | dtype | budget / chunk | pool (full depth) | "
          "transient | transient / pool | estimate's bound |", "|---" * 9 + "|"]
    for r in rows:
        s, full = r["settings"], r["full_depth_pool_bytes"]
        md.append(f"| {r['model']} | {r['layers']} | {s['policy']} | {r['dtype']} | "
                  f"{s['budget']} / {s['chunk']} | {format_bytes(full)} | "
                  f"{format_bytes(r['transient_bytes'])} | "
                  f"{100 * r['transient_bytes'] / full:.1f}% | {format_bytes(r['bound_bytes'])} |")
    return "\n".join(md) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    if not Path("/proc/self/clear_refs").exists():
        raise LocretError("bench/transient.py reads peak RSS from Linux's /proc: "
                          "it runs on Linux only")
    rows = []
    for point in points(args):
        rows.append(spawn(point))
        print(f"{point['layers']} layers, {point['settings']['policy']}: transient "
              f"{format_bytes(rows[-1]['transient_bytes'])}", file=sys.stderr, flush=True)
    report = table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(report)
    print(report, end="")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a published shape, at the paper's "
                   f"settings for it ({', '.join(PUBLISHED_SHAPES)}; default: %(default)s), or a "
                   "config.json (settings: those of models outside the zoo)")
    p.add_argument("--layers", type=lambda t: [int(x) for x in t.split(",")], default=[2],
                   help="layers to run, comma-separated (default: 2)")
    p.add_argument("--policies", type=lambda t: t.split(","), default=["locret"],
                   help=f"comma-separated, from {', '.join(EVICTING)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and pool "
                   "(default: float32: CPUs without native bf16 emulate its matmuls)")
    p.add_argument("--out", default=None, help="also write OUT.json and OUT.md")
    g = p.add_argument_group("settings (over the shape's, as generate.py's flags)")
    for flag in ("budget", "chunk", "stabilizers", "n-loc"):
        g.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one point, as JSON
    args = p.parse_args(argv)
    unknown = [x for x in args.policies if x not in EVICTING]
    if unknown:
        p.error(f"unknown --policies {', '.join(unknown)} (choose from {', '.join(EVICTING)})")
    if min(args.layers) < 1:
        p.error("--layers must be at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
