"""Streamed input at constant memory: pipe N tokens of text into `generate.py --prompt -
--question ...` and report the child's prefill speed and peak memory at each N (they should not
grow with N).

    python bench/stream.py                          # 100K and 1M tokens on the default model, CPU
    python bench/stream.py --lengths 20000,100000 --out runs/stream

The text is seeded pseudo-English (words, numbers, punctuation, paragraphs) generated as it is
written, so the benchmark holds none of it either. Each length runs in its own process: its peak
RSS (VmHWM) is its own. Writes a markdown table (stdout and --out with .md) and the JSON (--out)."""
import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, when run as a script

from locret.errors import LocretError, run_script
from locret.eval.synthetic import QUESTION, text_blocks
from locret.loading.tokenizer import Tokenizer
from locret.loading.zoo import DEFAULT_MODEL, resolve_checkpoint

STATS = re.compile(r"prompt tokens (\d+) in (\d+) chunks .* prefill ([\d.]+) tok/s .* "
                   r"peak memory ([\d.]+) (MiB|GiB)")


def chars_per_token(tokenizer: Tokenizer, seed: int) -> float:
    sample = "".join(text_blocks(200_000, seed))
    return len(sample) / len(tokenizer.encode_plain(sample))


def run_point(args, n_tokens: int, ratio: float) -> dict:
    """One child process fed `n_tokens` worth of text through its standard input."""
    cmd = [sys.executable, str(ROOT / "generate.py"), "--ckpt", args.ckpt, "--prompt", "-",
           "--question", QUESTION, "--max-new-tokens", str(args.new_tokens),
           *args.generate_args.split()]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    err = []  # read as it comes: a full stderr pipe would stall the child
    reader = threading.Thread(
        target=lambda: err.append(child.stderr.read().decode(errors="replace")))
    reader.start()
    t0 = time.perf_counter()
    try:
        for block in text_blocks(int(n_tokens * ratio * 1.01), args.seed):
            child.stdin.write(block.encode())
    except BrokenPipeError:
        pass
    child.stdin.close()
    answer = child.stdout.read().decode(errors="replace").strip()
    child.wait()
    reader.join()
    wall = time.perf_counter() - t0
    found = STATS.search(err[0].replace("\r", "\n"))
    if child.returncode or not found:
        last = err[0].strip().splitlines()[-1:]
        raise LocretError(f"generate.py failed at {n_tokens} tokens: {last}")
    tokens, chunks, tps, peak, unit = found.groups()
    peak_bytes = int(float(peak) * 2 ** (30 if unit == "GiB" else 20))
    return dict(requested_tokens=n_tokens, prompt_tokens=int(tokens), chunks=int(chunks),
                prefill_tok_s=float(tps), peak_bytes=peak_bytes, wall_seconds=wall, answer=answer)


def table(rows: list[dict]) -> str:
    lines = ["| prompt tokens | chunks | prefill tok/s | peak memory (MiB) | wall (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['chunks']} | {r['prefill_tok_s']:.1f} | "
              f"{r['peak_bytes'] / 2**20:.1f} | {r['wall_seconds']:.0f} |" for r in rows]
    first, last = rows[0], rows[-1]
    lines += ["", f"from {first['prompt_tokens']} to {last['prompt_tokens']} tokens: peak memory "
              f"{100 * (last['peak_bytes'] / first['peak_bytes'] - 1):+.1f}%, prefill tok/s "
              f"{100 * (last['prefill_tok_s'] / first['prefill_tok_s'] - 1):+.1f}%"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    folder, _ = resolve_checkpoint(args.ckpt)
    ratio = chars_per_token(Tokenizer(folder), args.seed)
    rows = []
    for n in args.lengths:
        rows.append(run_point(args, n, ratio))
        print(f"{n} tokens: {rows[-1]['prefill_tok_s']:.1f} tok/s, "
              f"peak {rows[-1]['peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    report = table(rows)
    print(report)
    if args.out:
        out = Path(args.out)
        meta = dict(date=str(date.today()), machine=platform.processor() or platform.machine(),
                    ckpt=args.ckpt, generate_args=args.generate_args, new_tokens=args.new_tokens,
                    seed=args.seed)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        out.with_suffix(".md").write_text(report + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    p.add_argument("--lengths", default="100000,1000000",
                   help="prompt lengths in tokens, comma-separated")
    p.add_argument("--new-tokens", type=int, default=8,
                   help="tokens to generate after the question")
    p.add_argument("--generate-args", default="",
                   help="more generate.py flags, e.g. \"--budget 512 --dtype float32\"")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths must be integers, comma-separated (got {args.lengths!r})")
    if any(n < 1 for n in args.lengths) or args.new_tokens < 1:
        p.error("--lengths and --new-tokens must be positive")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
