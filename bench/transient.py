"""Transient memory of a chunked prefill against the KV pool, at a large model's shape and settings, on CPU.
The model is cut to a few layers with random weights: a forward frees each layer's activations before the
next, so the transient does not grow with depth, while the pool does. Each run touches its whole pool,
resets the peak RSS (/proc/self/clear_refs) and prefills once with eviction; the transient is the peak RSS
over the RSS just before, set against the pool the full-depth model would hold at the same settings.

    python bench/transient.py                                   # Llama-3.1-8B shape, the paper's settings
    python bench/transient.py --layers 1,2 --policies locret,h2o --out runs/transient
    python bench/transient.py --model phi-3-mini-128k --dtype bfloat16

Each (layers, policy) runs in a fresh process so its peak is its own. Linux only. Table to stdout (and OUT.md)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a script

import torch

from bench.memory_speed import GPU_MODELS, make_prompt, random_model
from locret.context import Context
from locret.engine import pool_bytes
from locret.settings import Settings, pool_capacity
from locret.errors import LocretError, run_script
from locret.loading.weights import DTYPES
from locret.memory import activation_bytes, format_bytes, rss_bytes
from locret.policies import EVICTING
from models import config_from_hf


def reset_peak() -> None:
    """From here on VmHWM tracks this process's RSS anew (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


@torch.inference_mode()
def measure(point: dict) -> dict:
    """One prefill in this process: the transient (peak RSS over the RSS before) and what it is set against.
    `point`: the shape (hf, a config.json dict), the settings, the layers to run, the policy and dtype."""
    hf, dtype = point["hf"], DTYPES[point["dtype"]]
    model = random_model(dict(hf, num_hidden_layers=point["layers"]), "cpu", dtype)
    settings = Settings(point["policy"], **point["settings"])
    prompt = make_prompt(hf["vocab_size"], settings.budget + 2 * settings.chunk + settings.n_loc, seed=0)  # evicts twice
    capacity = pool_capacity(settings, len(prompt), 1)
    context = Context(model, settings, capacity, len(prompt))
    for buffer in context.pool.buffers():  # resident before the baseline: the pool is not transient
        buffer.fill_(1)
    before = rss_bytes()
    reset_peak()
    context.prefill(prompt)
    transient = rss_bytes("VmHWM") - before
    return dict({k: v for k, v in point.items() if k != "hf"}, prompt_tokens=len(prompt), capacity=capacity,
                pool_bytes=context.pool.nbytes, transient_bytes=transient,
                full_depth_pool_bytes=pool_bytes(settings, config_from_hf(hf), capacity, dtype),
                bound_bytes=activation_bytes(model, settings.chunk, capacity, settings.policy))


def points(args) -> list[dict]:
    """One run per (layers, policy): the shape of --model at the paper's settings for it."""
    hf, base = GPU_MODELS[args.model]
    settings = dict(budget=base.budget, chunk=base.chunk, stabilizers=base.stabilizers, n_loc=base.n_loc)
    return [dict(model=args.model, hf=hf, settings=settings, layers=layers, policy=policy, dtype=args.dtype)
            for layers in args.layers for policy in args.policies]


def spawn(point: dict) -> dict:
    """measure(point) in a fresh interpreter: its peak RSS is its own."""
    code = f"import json, sys; from bench.transient import measure; print(json.dumps(measure({point!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise LocretError(f"the {point['layers']}-layer {point['policy']} run failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    md = ["| model shape | layers run | policy | dtype | budget / chunk | pool (full depth) | transient | "
          "transient / pool | estimate's bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['layers']} | {r['policy']} | {r['dtype']} | "
                  f"{r['settings']['budget']} / {r['settings']['chunk']} | "
                  f"{format_bytes(r['full_depth_pool_bytes'])} | {format_bytes(r['transient_bytes'])} | "
                  f"{100 * r['transient_bytes'] / r['full_depth_pool_bytes']:.1f}% | {format_bytes(r['bound_bytes'])} |")
    return "\n".join(md) + "\n"


def main(args: argparse.Namespace) -> None:
    if not Path("/proc/self/clear_refs").exists():
        raise LocretError("bench/transient.py reads peak RSS from Linux's /proc: it runs on Linux only")
    rows = []
    for point in points(args):
        rows.append(spawn(point))
        print(f"{point['layers']} layers, {point['policy']}: transient {format_bytes(rows[-1]['transient_bytes'])}",
              file=sys.stderr, flush=True)
    report = table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(report)
    print(report, end="")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(GPU_MODELS), default="llama-3.1-8b",
                   help="a published shape, at the paper's settings for it")
    p.add_argument("--layers", type=lambda t: [int(x) for x in t.split(",")], default=[2],
                   help="layers to run, comma-separated (default: 2)")
    p.add_argument("--policies", type=lambda t: t.split(","), default=["locret"],
                   help=f"comma-separated, from {', '.join(EVICTING)}")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights and pool (default: float32: CPUs without native bf16 emulate its matmuls)")
    p.add_argument("--out", default=None, help="also write OUT.json and OUT.md")
    args = p.parse_args(argv)
    unknown = [x for x in args.policies if x not in EVICTING]
    if unknown:
        p.error(f"unknown --policies {', '.join(unknown)} (choose from {', '.join(EVICTING)})")
    if min(args.layers) < 1:
        p.error("--layers must be at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
