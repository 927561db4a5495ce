"""Where prefill and decode time goes: one chunked generation over a long prompt, timed by
component.

    python bench/breakdown.py          # default model, 32K tokens, budget 2048, chunk 512
    python bench/breakdown.py --length 8192 --dtype float32 --policy streamingllm
    python bench/breakdown.py --kv-int8    # the int8 pool's costs (generate.py --kv-int8)

The settings are generate.py's for the model and its heads, with this benchmark's point (budget
2048, chunk 512, 256 stabilizers, n_loc 100) over them and the flags over that. Components
(exclusive times, so they add up to the whole): the MLP, the attention projections (q, k, v, o),
the retaining heads, attention itself (RoPE on the queries and sdpa), the cache write with the
re-rotation of the kept keys to their slots, policy scoring, eviction (ranking, top-k, gathering
the kept entries), the norms, the LM head, and the rest (embedding, RoPE tables, the mask,
Python). Timed with wall-clock hooks, which is exact on CPU, where every op runs before the next
starts; on CUDA each hook synchronizes first. Also counted: the model FLOPs of prefill and decode
(every linear layer's matmul, the heads' included, and attention over the keys each new token may
see: the masked part sdpa computes and discards is not counted), and on CPU their rate against
this machine's matmul peak: the best square `torch.mm` of the --peak-sizes in the same dtype and
threads. Prompts are seeded random token ids. Prints a markdown table (and writes it to --out,
with the JSON)."""
import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

import torch

from locret.context import Context
from locret.devices import default_dtype
from locret.errors import LocretError, run_script
from locret.eval.synthetic import random_prompt
from locret.eval.timing import matmul_peak
from locret.heads import load_heads
from locret.loading.weights import DTYPES, load_model
from locret.loading.zoo import DEFAULT_MODEL, local_heads, resolve_checkpoint
from locret.plan import Plan, chosen, default_settings, fit, heads_eviction
from locret.settings import NEEDS_HEADS
from models.base import RMSNorm

POINT = dict(budget=2048, chunk=512, stabilizers=256, n_loc=100)  # over the model's defaults
COMPONENTS = ("MLP", "attention projections", "retaining heads", "attention (RoPE, sdpa)",
              "cache write, re-rotation", "policy scoring", "eviction", "norms", "LM head", "other")


class Timers:
    """Seconds spent inside each timed region, by name; regions may nest (a parent includes its
    children)."""

    def __init__(self, device: torch.device):
        self.seconds, self.starts, self.device = defaultdict(float), [], device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = self.now()
            out = fn(*args, **kwargs)
            self.seconds[name] += self.now() - t0
            return out
        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        def stop(*_):
            self.seconds[name] += self.now() - self.starts.pop()
        module.register_forward_pre_hook(lambda *_: self.starts.append(self.now()))
        module.register_forward_hook(stop)

    def reset(self) -> None:
        self.seconds.clear()


def instrument(model, timers: Timers) -> None:
    """Time every module that is its own component; attention's own work is what its children
    leave."""
    for block in model.model.layers:
        attn = block.self_attn
        timers.hook(block.mlp, "MLP")
        timers.hook(attn, "attention total")
        for name, child in attn.named_children():
            part = "retaining heads" if name == "retaining_head" else "attention projections"
            timers.hook(child, part)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            timers.hook(module, "norms")
    timers.hook(model.lm_head, "LM head")


def instrument_engine(context: Context, timers: Timers) -> None:
    engine, cache = context.engine, context.engine.cache
    if cache.policy is not None:
        cache.policy = timers.wrap("policy scoring", cache.policy)
    cache.update = timers.wrap("cache update", cache.update)
    engine.evict = timers.wrap("eviction", engine.evict)


class FlopCounter:
    """Model FLOPs as they run: 2 x rows x weights per nn.Linear call, and per engine forward of T
    new tokens over S kept entries, 4 x heads x head dim x (T x S + T (T + 1) / 2) per global layer
    for attention, and at most S = window - 1 in a sliding-window layer."""

    def __init__(self, model, engine):
        self.flops = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(self.count_linear)
        c = model.config
        per_key = 4 * c.num_attention_heads * c.head_dim
        windowed = c.num_hidden_layers - len(c.global_layers)
        forward = engine.forward

        def counted(tokens, *args, **kwargs):
            T, S = len(tokens), engine.pool.length
            own = T * (T + 1) // 2
            seen = len(c.global_layers) * (T * S + own)
            if windowed:
                seen += windowed * (T * min(S, c.sliding_window - 1) + own)
            self.flops += per_key * seen
            return forward(tokens, *args, **kwargs)
        engine.forward = counted

    def count_linear(self, module, inputs, output):
        self.flops += 2 * (inputs[0].numel() // module.in_features) * module.weight.numel()


def breakdown(seconds: dict, total: float) -> dict:
    """Inclusive timers -> exclusive components that sum to `total`."""
    s = defaultdict(float, seconds)
    timed = ("MLP", "attention projections", "retaining heads", "policy scoring", "eviction",
             "norms", "LM head")
    parts = {name: s[name] for name in timed}
    parts["cache write, re-rotation"] = s["cache update"] - s["policy scoring"]
    parts["attention (RoPE, sdpa)"] = (s["attention total"] - s["attention projections"]
                                       - s["retaining heads"] - s["cache update"])
    parts["other"] = total - sum(parts.values())
    return {name: parts[name] for name in COMPONENTS}


def run_timed(model, prompt: list[int], plan: Plan, decode_tokens: int, timers: Timers) -> dict:
    """One generation: the prefill's components (all chunks) and the decode steps' (the first new
    token excluded)."""
    context = Context(model, plan.settings, plan.capacity, len(prompt), progress=True,
                      total=len(prompt))
    instrument_engine(context, timers)
    counter = FlopCounter(model, context.engine)
    timers.reset()
    t0 = timers.now()
    logits = context.prefill(prompt)
    prefill = timers.now() - t0
    prefill_parts, prefill_flops = breakdown(timers.seconds, prefill), counter.flops
    timers.reset()
    counter.flops = 0
    token, t0 = int(logits.argmax()), timers.now()
    with torch.inference_mode():
        for _ in range(decode_tokens):
            token = int(context.engine.decode_step(token).argmax())
    decode = timers.now() - t0
    return dict(prompt_tokens=len(prompt), chunks=context.chunks + 1, prefill_seconds=prefill,
                decode_steps=decode_tokens, decode_seconds=decode, prefill=prefill_parts,
                decode=breakdown(timers.seconds, decode), prefill_flops=prefill_flops,
                decode_flops=counter.flops)


def markdown(r: dict) -> str:
    per_chunk = r["prefill_seconds"] / r["chunks"]
    per_step = r["decode_seconds"] / r["decode_steps"]
    lines = ["| component | prefill ms / chunk | prefill % | decode ms / step | decode % |",
             "|---|---|---|---|---|"]
    for name in COMPONENTS:
        p, d = r["prefill"][name], r["decode"][name]
        lines.append(f"| {name} | {1e3 * p / r['chunks']:.1f} | "
                     f"{100 * p / r['prefill_seconds']:.1f} | {1e3 * d / r['decode_steps']:.2f} | "
                     f"{100 * d / r['decode_seconds']:.1f} |")
    lines.append(f"| **total** | **{1e3 * per_chunk:.1f}** | 100 | **{1e3 * per_step:.2f}** | "
                 "100 |")
    lines.append(f"\n{r['prompt_tokens']} prompt tokens in {r['chunks']} chunks: prefill "
                 f"{r['prompt_tokens'] / r['prefill_seconds']:.0f} tok/s; decode "
                 f"{1 / per_step:.1f} tok/s")
    rates = {phase: r[f"{phase}_flops"] / r[f"{phase}_seconds"] / 1e9
             for phase in ("prefill", "decode")}
    lines.append(f"model FLOPs: {r['prefill_flops'] / r['prompt_tokens'] / 1e9:.3f} GFLOP per "
                 f"prompt token; prefill {rates['prefill']:.0f} GFLOP/s, decode "
                 f"{rates['decode']:.1f} GFLOP/s")
    if r.get("matmul_peak_gflop_s"):
        peak = r["matmul_peak_gflop_s"]
        sides = ", ".join(map(str, r["peak_sizes"]))
        lines.append(f"this machine's matmul peak: {peak:.0f} GFLOP/s (the best square torch.mm of "
                     f"side {sides} in {r['dtype']}, {r['threads']} threads): prefill at "
                     f"{100 * rates['prefill'] / peak:.0f}% of it, decode at "
                     f"{100 * rates['decode'] / peak:.1f}%")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    folder, entry = resolve_checkpoint(args.ckpt)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or default_dtype(args.device)]
    model = load_model(folder, device=args.device, dtype=dtype)
    heads = local_heads(args.heads, entry) if args.policy == "locret" else None
    if args.policy == "locret":
        if heads is None:
            raise LocretError(NEEDS_HEADS)
        load_heads(model, heads)
    timers = Timers(device)
    instrument(model, timers)
    defaults = replace(default_settings(entry, args.policy, heads_eviction(heads)), **POINT)
    prompt = random_prompt(model.config.vocab_size, args.length, args.seed)
    plan = fit(model, defaults, chosen(args), len(prompt), args.decode_tokens)
    result = run_timed(model, prompt, plan, args.decode_tokens, timers)
    result.update(model=str(args.ckpt), dtype=str(dtype).removeprefix("torch."), device=str(device),
                  threads=torch.get_num_threads(), settings=asdict(plan.settings))
    if device.type == "cpu" and args.peak_sizes:
        peak = max(matmul_peak(n, dtype, 3) for n in args.peak_sizes)
        result.update(peak_sizes=args.peak_sizes, matmul_peak_gflop_s=peak)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table + "\n")


def sizes(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048]; '0' -> [] (no peak measured)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if values == [0]:
        return []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive whole numbers like 1024,2048 (or 0), not {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"zoo name or HF-layout folder (default: {DEFAULT_MODEL})")
    p.add_argument("--heads", default=None, help="retaining heads for locret (default: the zoo "
                   "entry's); their training picks the eviction mode")
    p.add_argument("--policy", default="locret",
                   help="any evicting policy, or full (default: %(default)s)")
    p.add_argument("--length", type=int, default=32768, help="prompt tokens (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="decode steps timed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 where the device has it")
    p.add_argument("--peak-sizes", type=sizes, default="1024,2048,4096",
                   help="cpu: sides of the square torch.mm whose best rate is the machine's peak; "
                   "0 skips it (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path; the table goes next to it as .md")
    g = p.add_argument_group("settings (over the model's, as generate.py's flags)")
    g.add_argument("--budget", type=int, default=None, help=f"default: {POINT['budget']}")
    g.add_argument("--chunk", type=int, default=None, help=f"default: {POINT['chunk']}")
    g.add_argument("--stabilizers", type=int, default=None,
                   help=f"default: {POINT['stabilizers']} of {POINT['budget']}, its share of "
                   "another budget")
    g.add_argument("--n-loc", type=int, default=None, help=f"default: {POINT['n_loc']}")
    g.add_argument("--kv-int8", action="store_true", default=None,
                   help="store K and V as int8 (generate.py's --kv-int8)")
    args = p.parse_args(argv)
    if args.decode_tokens < 1:
        p.error("--decode-tokens must be at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
