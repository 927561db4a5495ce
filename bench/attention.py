"""One layer's chunk attention on this machine, against its matmul peak: what prefill's largest
cost can reach.

    python bench/attention.py            # the default model's heads, chunk 512 over 2048 entries
    python bench/attention.py --chunk 256 --dtype float32

A prefill chunk's queries attend over the kept entries plus, causally, each other. Timed here:
the engine's call (models/base.attend: the kept entries and the chunk apart in sdpa's CPU flash
kernel, merged by their log-sum-exps) and the alternatives one might try, each the best of
--repeats, with its GFLOP/s (4 x heads x chunk x keys x head dim per call, the masked half
counted), its share of a square `torch.mm`'s rate in the same dtype (the peak, measured first)
and its largest error against sdpa in float32.
Prints a markdown table (and writes it to --out, with the JSON)."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from locret.devices import default_dtype
from locret.errors import run_script
from locret.eval.timing import best_seconds, matmul_peak
from locret.loading.weights import DTYPES, read_config
from locret.loading.zoo import DEFAULT_MODEL, resolve_checkpoint
from models import config_from_hf
from models.base import attend


def variants(q, k, v, mask):
    """name -> a function computing the chunk's attention [B, H, T, D] another way."""
    (B, H, T, D), KVH, S = q.shape, k.shape[1], k.shape[2]
    G = H // KVH

    def matmuls():  # bf16 scores, fp32 softmax: what a hand-written kernel would start from
        scores = (q.view(B, KVH, G * T, D) @ k.transpose(-1, -2)).float().mul_(D**-0.5)
        scores = scores.view(B, KVH, G, T, S).masked_fill_(~mask, float("-inf"))
        return (scores.softmax(-1).to(q.dtype).view(B, KVH, G * T, S) @ v).view(B, H, T, D)

    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    sdpa = F.scaled_dot_product_attention
    return {
        "cache and chunk apart, merged by log-sum-exp (the engine's)": lambda: attend(
            q, k, v, causal_lower_right(T, S), False),
        "sdpa, additive mask, GQA (the engine's until 2026-12-04)": lambda: sdpa(
            q, k, v, attn_mask=additive, enable_gqa=True),
        "sdpa, boolean mask": lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
        "sdpa, K and V repeated per query head": lambda: sdpa(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask),
        "sdpa in float32": lambda: sdpa(
            q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True).to(q.dtype),
        "matmuls, float32 softmax": matmuls,
        "no mask (a bound: wrong answer)": lambda: sdpa(q, k, v, enable_gqa=True),
    }


def main(args: argparse.Namespace) -> None:
    folder, _ = resolve_checkpoint(args.ckpt)
    config = config_from_hf(read_config(folder))
    H, KVH, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    T = args.chunk
    S, dtype = args.entries + T, DTYPES[args.dtype]
    torch.manual_seed(0)
    q = torch.randn(1, H, T, D, dtype=dtype)
    k, v = torch.randn(1, KVH, S, D, dtype=dtype), torch.randn(1, KVH, S, D, dtype=dtype)
    # [T, S]: every kept entry, then the chunk causally
    mask = torch.arange(S)[None, :] <= args.entries + torch.arange(T)[:, None]
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               enable_gqa=True)
    peak = matmul_peak(args.mm_size, dtype, args.repeats)
    flops = 4 * H * T * S * D
    rows = [dict(variant=f"torch.mm {args.mm_size}x{args.mm_size} (the peak)",
                 ms=2 * args.mm_size**3 / peak / 1e6, gflop_s=peak, share_of_peak=1.0,
                 max_error=0.0)]
    for name, fn in variants(q, k, v, mask).items():
        seconds = best_seconds(fn, args.repeats)
        error = (fn().float() - reference).abs().max().item()
        rows.append(dict(variant=name, ms=seconds * 1e3, gflop_s=flops / seconds / 1e9,
                         share_of_peak=flops / seconds / 1e9 / peak, max_error=error))
    lines = [f"{config.model_type}: {H} query heads, {KVH} KV heads of {D}; {T} queries over "
             f"{args.entries} kept entries + themselves ({flops / 1e9:.2f} GFLOP), {args.dtype}, "
             f"{torch.get_num_threads()} threads", "",
             "| variant | ms | GFLOP/s | share of mm peak | max error vs fp32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']:.1f} | {r['gflop_s']:.0f} | "
              f"{100 * r['share_of_peak']:.0f}% | {r['max_error']:.2g} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(settings=vars(args), rows=rows), indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help="the model whose head counts and size are used (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=512,
                   help="queries per chunk (default: %(default)s)")
    p.add_argument("--entries", type=int, default=2048,
                   help="kept entries before the chunk: the budget (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 where native, else float32")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per variant, the best one counts (default: %(default)s)")
    p.add_argument("--mm-size", type=int, default=2048,
                   help="side of the square matmul that measures the peak (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path; the table goes next to it as .md")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype("cpu")
    if min(args.chunk, args.entries, args.repeats, args.mm_size) < 1:
        p.error("--chunk, --entries, --repeats and --mm-size must be at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
