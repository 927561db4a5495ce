"""Memory and speed of generation against prompt length: full attention, Locret and StreamingLLM
side by side in one run (and transformers' own generate with --transformers, the heads' cost with
--heads-overhead, kvpress's post-prefill presses at the same budget with --kvpress, Locret with an
int8 pool with --kv-int8).

    python bench/memory_speed.py                     # 4K..64K tokens on the default model, CPU
    python bench/memory_speed.py --lengths 4096,8192 --decode-tokens 8
    python bench/memory_speed.py --kvpress ../kvpress-venv/bin/python --presses snapkv,streamingllm
    python bench/memory_speed.py --device cuda --emulate-gib 24   # Llama-3.1-8B, Phi-3-mini shapes

CPU: each grid point runs in a fresh process, so its peak RSS (VmHWM) is its own; every run starts
from the grid's settings (budget 2048, chunk 512, 256 stabilizers, n_loc 100) over generate.py's
for the model and its heads. GPU: published shapes with random bf16 weights at the paper's settings
for them, one process, peak torch.cuda.max_memory_allocated per point, under a memory cap that
emulates a smaller card, each point timed --repeats times (the medians, and decoding's range).
Prompts are seeded random token ids, the same for every run at one length; past the model's
window (8K for the default model) full attention is timed anyway, as transformers' generate is,
its text meaningless. Decode tok/s counts the steps after the first new token. Writes a markdown
table (stdout and --out with .md), the JSON (--out) and a plot of peak memory against prompt
length (--plot)."""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as a script

import torch

from locret.context import Context, generate
from locret.devices import default_dtype
from locret.engine import pool_bytes
from locret.errors import LocretError, run_script
from locret.eval.synthetic import PUBLISHED_SHAPES, random_model, random_prompt
from locret.eval.timing import repeated_speeds, speeds
from locret.heads import load_heads
from locret.loading.weights import DTYPES, load_model, read_config
from locret.loading.zoo import DEFAULT_MODEL, ZooEntry, local_heads, resolve_checkpoint
from locret.memory import estimate, rss_bytes
from locret.plan import chosen, default_settings, heads_eviction, resolve
from locret.policies import POLICIES
from locret.settings import NEEDS_HEADS, Settings, pool_capacity
from models import ModelConfig, config_from_hf

# Each grid's prompt lengths, decode steps and the settings its runs start from (flags override).
GRID = dict(lengths="4096,8192,16384,32768,65536", decode_tokens=16,
            settings=dict(budget=2048, chunk=512, stabilizers=256, n_loc=100))
QUICK = dict(lengths="256,512", decode_tokens=4,
             settings=dict(budget=64, chunk=32, stabilizers=16, n_loc=16))
GPU_LENGTHS = "32768,65536,131072"
NO_EVICT = "locret-noevict"  # locret's heads scoring with budget = prompt: nothing is evicted
INT8 = "locret-int8"  # locret with K and V stored as int8 (--kv-int8)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token in every global layer and KV head (sliding-window layers hold a
    window, whatever the length)."""
    layers, heads = len(config.global_layers), config.num_key_value_heads
    return 2 * layers * heads * config.head_dim * dtype.itemsize


# ---- CPU: one fresh process per grid point ----

def engine_point(p: dict) -> dict:
    """Our engine: the pool and memory estimate predicted first, then generate's measurements."""
    model = load_model(p["folder"], "cpu", DTYPES[p["dtype"]])
    # Speed and memory only: full attention may run past the model's trained window, as
    # transformers' does.
    config = model.config
    config.max_position_embeddings = max(config.max_position_embeddings,
                                         p["length"] + p["decode_tokens"])
    settings = Settings(**p["settings"])
    if settings.policy == "locret":  # heads attached only here: others must not pay for them
        load_heads(model, p["heads"])
    prompt = random_prompt(model.config.vocab_size, p["length"], p["seed"])
    capacity = pool_capacity(settings, len(prompt), p["decode_tokens"])
    predicted = pool_bytes(settings, model.config, capacity, model.lm_head.weight.dtype)
    estimate_bytes = estimate(model, settings, capacity).total
    loaded = rss_bytes()
    # no stop ids: exactly decode_tokens
    _, stats = generate(model, prompt, settings, p["decode_tokens"])
    return dict(pool_capacity=capacity, predicted_pool_bytes=predicted, pool_bytes=stats.pool_bytes,
                estimate_bytes=estimate_bytes, kept_after_prefill=stats.kept_after_prefill,
                rss_loaded_bytes=loaded, peak_bytes=rss_bytes("VmHWM"),
                **speeds(stats.prompt_tokens, stats.prefill_seconds, stats.new_tokens,
                         stats.decode_seconds))


class Clock:
    """A transformers streamer that notes when the prompt, then each new token, is handed over."""

    def __init__(self):
        self.times = []

    def put(self, _):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_point(p: dict) -> dict:
    """transformers' own generate, sdpa attention, full KV cache, on the same folder and prompt."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        p["folder"], dtype=DTYPES[p["dtype"]], attn_implementation="sdpa").eval()
    prompt = torch.tensor([random_prompt(model.config.vocab_size, p["length"], p["seed"])])
    loaded, clock, n = rss_bytes(), Clock(), p["decode_tokens"]
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, streamer=clock, pad_token_id=0)
    t = clock.times
    return dict(rss_loaded_bytes=loaded, peak_bytes=rss_bytes("VmHWM"),
                **speeds(p["length"], t[1] - t[0], len(t) - 1, t[-1] - t[1]))


# --presses name -> kvpress class
KVPRESS = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "tova": "TOVAPress",
           "knorm": "KnormPress", "expected-attention": "ExpectedAttentionPress"}


def kvpress_point(p: dict) -> dict:
    """A kvpress press on transformers, as its pipeline runs it: the context (all but the n_loc
    tail) prefilled in one forward and each layer's cache compressed after it to the same budget,
    then the tail and greedy decoding at the true positions. Runs under the python of kvpress's
    own venv (--kvpress)."""
    import kvpress
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        p["folder"], dtype=DTYPES[p["dtype"]], attn_implementation="sdpa").eval()
    ids = torch.tensor([random_prompt(model.config.vocab_size, p["length"], p["seed"])])
    n_loc, budget = p["settings"]["n_loc"], p["settings"]["budget"]
    body = p["length"] - n_loc
    press = getattr(kvpress, KVPRESS[p["press"]])(compression_ratio=1 - budget / body)
    cache, loaded, n = transformers.DynamicCache(), rss_bytes(), p["decode_tokens"]
    with torch.inference_mode():
        t0 = time.perf_counter()
        with press(model):
            model.model(input_ids=ids[:, :body], past_key_values=cache)
        kept = cache.get_seq_length()
        positions = torch.arange(body, p["length"])[None]
        token = model(input_ids=ids[:, body:], past_key_values=cache, position_ids=positions,
                      logits_to_keep=1).logits[0, -1].argmax()
        t1 = time.perf_counter()
        for i in range(1, n):
            token = model(input_ids=token.view(1, 1), past_key_values=cache,
                          position_ids=torch.tensor([[p["length"] + i - 1]])).logits[0, -1].argmax()
        t2 = time.perf_counter()
    return dict(kept_after_prefill=kept + n_loc, rss_loaded_bytes=loaded,
                peak_bytes=rss_bytes("VmHWM"), **speeds(p["length"], t1 - t0, n, t2 - t1))


WORKERS = {"engine": engine_point, "transformers": transformers_point, "kvpress": kvpress_point}


def spawn(point: dict) -> dict:
    """Run one point in a fresh process (under `point["python"]` if given); it prints its
    measurements as a JSON line."""
    python = point.get("python", sys.executable)
    done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(point)],
                          capture_output=True, text=True)
    if done.returncode < 0:
        return {"error": f"killed by signal {-done.returncode}"}
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_settings(entry: ZooEntry | None, eviction: str, policy: str, args, length: int,
                 **choices) -> dict:
    """One run's settings: the grid's over the model's defaults, the flags' and `choices` over
    them, resolved (and checked) at `length`."""
    grid = QUICK if args.quick else GRID
    defaults = replace(default_settings(entry, policy, eviction), **grid["settings"])
    return asdict(resolve(defaults, chosen(args) | choices, length))


def cpu_points(args, folder: Path, entry: ZooEntry | None, heads: str | None,
               with_transformers: bool) -> list[dict]:
    """Per length, every run back to back, so that drift on a noisy machine hits them alike.
    Every point's settings are resolved here: bad ones fail before any point runs."""
    runs = [(policy, policy, {}) for policy in args.policies]
    runs += [(NO_EVICT, "locret", {"budget": None})] if args.heads_overhead else []
    runs += [(INT8, "locret", {"kv_int8": True})] if args.kv_int8 else []
    eviction = heads_eviction(heads)
    common = dict(folder=str(folder), heads=heads, dtype=args.dtype,
                  decode_tokens=args.decode_tokens, seed=args.seed)
    points = []
    for length in args.lengths:
        at = lambda policy, **more: run_settings(entry, eviction, policy, args, length, **more)
        for run, policy, choices in runs:
            choices = {k: length if k == "budget" else v for k, v in choices.items()}
            points.append(dict(common, run=run, worker="engine", length=length,
                               settings=at(policy, **choices)))
        if with_transformers:
            points.append(dict(common, run="transformers", worker="transformers", length=length,
                               settings=at("full")))
        for press in args.presses if args.kvpress else []:
            points.append(dict(common, run=f"kvpress-{press}", worker="kvpress", press=press,
                               python=args.kvpress, length=length,
                               settings=at("locret")))  # its budget and n_loc tail are ours
    return points


def cpu_bench(args, record) -> None:
    folder, entry = resolve_checkpoint(args.ckpt)
    heads = local_heads(args.heads, entry)
    if "locret" in args.policies or args.heads_overhead or args.kv_int8:
        if heads is None:
            raise LocretError(NEEDS_HEADS)
        # a missing or unfitting file: one error now
        load_heads(load_model(folder, "cpu", torch.float32), heads)
        heads = str(Path(heads).resolve())
    with_transformers = args.transformers and importlib.util.find_spec("transformers") is not None
    if args.transformers and not with_transformers:
        print("transformers is not installed: skipping its generate", file=sys.stderr)
    kv = kv_bytes_per_token(config_from_hf(read_config(folder)), DTYPES[args.dtype])
    name = entry.name if entry else folder.name
    for p in cpu_points(args, folder, entry, heads, with_transformers):
        policy = p.get("press", p["settings"]["policy"])
        budget = None if policy in ("full", "transformers") else p["settings"]["budget"]
        row = dict(model=name, run=p["run"], policy=policy, prompt_tokens=p["length"],
                   budget=budget, kv_bytes_per_token=kv, settings=p["settings"], **spawn(p))
        print(progress(row), file=sys.stderr, flush=True)
        record(row)


def progress(row: dict) -> str:
    what = row.get("error") or (
        f"peak {row['peak_bytes'] / 2**20:.0f} MiB, prefill {row['prefill_tok_s']:.0f} tok/s, "
        f"decode {row['decode_tok_s']:.1f} tok/s" if "peak_bytes" in row else "does not fit")
    return f"{row['model']} {row['run']} {row['prompt_tokens']} tokens: {what}"


# ---- GPU: published shapes, random weights, one process ----

def set_heads(model, heads: list | None) -> None:
    for layer, head in zip(model.model.layers, heads or [None] * len(model.model.layers)):
        layer.self_attn.retaining_head = head


@torch.inference_mode()
def timed_run(model, prompt: list[int], settings: Settings,
              new_tokens: int) -> tuple[int, float, float]:
    """Greedy generation with the GPU synchronised at each clock reading -> (pool bytes, prefill s,
    decode s)."""
    capacity = pool_capacity(settings, len(prompt), new_tokens)
    context = Context(model, settings, capacity, len(prompt))
    engine = context.engine
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = context.prefill(prompt)
    token = int(logits.argmax())  # waits for the GPU
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(engine.decode_step(token).argmax())
    return engine.pool.nbytes, t1 - t0, time.perf_counter() - t1


def gpu_point(model, heads: list, settings: Settings, length: int, args) -> dict:
    """One policy at one length: does it fit under the cap, how fast, how much of the GPU's peak
    it uses."""
    set_heads(model, heads if settings.policy == "locret" else None)
    prompt = random_prompt(model.config.vocab_size, length, args.seed)
    capacity = pool_capacity(settings, length, args.decode_tokens)
    row = dict(run=settings.policy, policy=settings.policy, prompt_tokens=length,
               budget=settings.budget if settings.evicts else None, pool_capacity=capacity,
               predicted_pool_bytes=pool_bytes(settings, model.config, capacity, torch.bfloat16),
               estimate_bytes=estimate(model, settings, capacity).total, settings=asdict(settings))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        runs = [timed_run(model, prompt, settings, args.decode_tokens) for _ in range(args.repeats)]
    except torch.cuda.OutOfMemoryError:
        return dict(row, fits=False)
    timed = repeated_speeds(length, args.decode_tokens, [run[1:] for run in runs])
    # 2 x parameters x tokens, embeddings and lm_head left out: per token, prefill runs neither
    # as a matmul
    params = sum(p.numel() for n, p in model.named_parameters()
                 if not n.startswith(("model.embed_tokens", "lm_head")))
    mfu = lambda tokens, seconds: 100 * 2 * params * tokens / seconds / (args.peak_tflops * 1e12)
    return dict(row, fits=True, pool_bytes=runs[0][0], peak_bytes=torch.cuda.max_memory_allocated(),
                **timed, prefill_mfu_pct=mfu(length, timed["prefill_seconds"]),
                decode_mfu_pct=mfu(args.decode_tokens - 1, timed["decode_seconds"]))


def gpu_bench(args, record) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.emulate_gib * 2**30 / total))
    for name, (hf, entry) in PUBLISHED_SHAPES.items():
        model = random_model(hf, "cuda")
        heads = model.retaining_heads
        runs = [resolve(default_settings(entry, policy), {}) for policy in args.policies]
        s = runs[0]
        warm = random_prompt(model.config.vocab_size, s.budget + 2 * s.chunk + s.n_loc, args.seed)
        # untimed, evicting twice: first uses (lazy CUDA modules, allocator growth) cost here
        for settings in runs:
            set_heads(model, heads if settings.policy == "locret" else None)
            timed_run(model, warm, settings, 2)
        kv = kv_bytes_per_token(model.config, torch.bfloat16)
        for length in args.lengths:
            for settings in runs:
                row = dict(model=name, kv_bytes_per_token=kv,
                           **gpu_point(model, heads, settings, length, args))
                print(progress(row), file=sys.stderr, flush=True)
                record(row)
        del model, heads
        torch.cuda.empty_cache()


# ---- reports ----

def speed_ratios(rows: list[dict]) -> list[dict]:
    """Per model and length: tok/s of locret over full (and both over transformers); the heads'
    prefill overhead."""
    ok = {(r["model"], r["run"], r["prompt_tokens"]): r for r in rows if "prefill_tok_s" in r}
    lines = []
    for model, n in dict.fromkeys((m, n) for m, _, n in ok):
        at = lambda run: ok.get((model, run, n))
        line = dict(model=model, prompt_tokens=n)
        presses = [run for m, run, length in ok
                   if (m, length) == (model, n) and run.startswith("kvpress-")]
        pairs = [("locret", "full"), ("locret", "transformers"), ("full", "transformers"),
                 *(("locret", press) for press in presses)]
        for a, b in pairs:
            if at(a) and at(b):
                for phase in ("prefill", "decode"):
                    line[f"{phase}_{a}_vs_{b}"] = at(a)[f"{phase}_tok_s"] / at(b)[f"{phase}_tok_s"]
        if at(NO_EVICT) and at("full"):
            overhead = at("full")["prefill_tok_s"] / at(NO_EVICT)["prefill_tok_s"] - 1
            line["heads_overhead_pct"] = 100 * overhead
        if len(line) > 2:
            lines.append(line)
    return lines


def memory_growth(rows: list[dict]) -> list[dict]:
    """Per model and run: peak memory growth from the shortest prompt to the longest, in %."""
    lines = []
    for model, run in dict.fromkeys((r["model"], r["run"]) for r in rows):
        peaks = sorted((r["prompt_tokens"], r["peak_bytes"]) for r in rows
                       if (r["model"], r["run"]) == (model, run) and "peak_bytes" in r)
        if len(peaks) > 1:
            lines.append(dict(model=model, run=run, from_tokens=peaks[0][0], to_tokens=peaks[-1][0],
                              growth_pct=100 * (peaks[-1][1] / peaks[0][1] - 1)))
    return lines


mib = lambda v: f"{v / 2**20:.1f}"
fixed = lambda digits: lambda v: f"{v:.{digits}f}"
COLUMNS = [  # (header, key, format); a column shows only where some row has a value
    ("model", "model", str), ("run", "run", str), ("prompt tokens", "prompt_tokens", str),
    ("budget", "budget", str), ("fits", "fits", lambda v: "yes" if v else "no"),
    ("pool MiB predicted", "predicted_pool_bytes", mib), ("pool MiB measured", "pool_bytes", mib),
    ("estimate MiB", "estimate_bytes", mib), ("RSS after load MiB", "rss_loaded_bytes", mib),
    ("peak MiB", "peak_bytes", mib), ("prefill tok/s", "prefill_tok_s", fixed(0)),
    ("decode tok/s", "decode_tok_s", fixed(1)), ("decode tok/s min", "decode_tok_s_min", fixed(1)),
    ("max", "decode_tok_s_max", fixed(1)), ("prefill MFU %", "prefill_mfu_pct", fixed(1)),
    ("decode MFU %", "decode_mfu_pct", fixed(2)), ("error", "error", str)]


def markdown(rows: list[dict], columns: list[tuple]) -> str:
    columns = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    if len({r.get("model") for r in rows}) == 1:
        columns = [c for c in columns if c[1] != "model"]
    cell = lambda r, key, fmt: "-" if r.get(key) is None else fmt(r[key])
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(rows: list[dict], ratios: list[dict], growth: list[dict]) -> str:
    per_model = dict.fromkeys((r["model"], r["kv_bytes_per_token"]) for r in rows)
    kv = "; ".join(f"{m} {b} B" for m, b in per_model)
    ratio_keys = list(dict.fromkeys(k for line in ratios for k in line
                                    if k not in ("model", "prompt_tokens")))
    title = lambda k: k.replace("_vs_", "/").replace("_pct", " %").replace("_", " ")
    ratio_columns = [COLUMNS[0], ("prompt tokens", "prompt_tokens", str),
                     *((title(k), k, fixed(2)) for k in ratio_keys)]
    growth_columns = [COLUMNS[0], COLUMNS[1], ("from tokens", "from_tokens", str),
                      ("to tokens", "to_tokens", str),
                      ("peak memory growth %", "growth_pct", lambda v: f"{v:+.1f}")]
    tables = [markdown(lines, columns) for lines, columns in
              ((rows, COLUMNS), (ratios, ratio_columns), (growth, growth_columns)) if lines]
    kv_line = f"KV bytes per token (2 x layers x KV heads x head dim x itemsize): {kv}"
    return "\n\n".join([kv_line, *tables]) + "\n"


def plot(rows: list[dict], path: Path, what: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    models = {r["model"] for r in rows}
    for model, run in dict.fromkeys((r["model"], r["run"]) for r in rows):
        points = sorted((r["prompt_tokens"], r["peak_bytes"] / 2**20) for r in rows
                        if (r["model"], r["run"]) == (model, run) and "peak_bytes" in r)
        if points:
            ax.plot(*zip(*points), marker="o", label=run if len(models) == 1 else f"{model} {run}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(f"peak memory, MiB ({what})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(device: str) -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, gpu=gpu)


def save(rows: list[dict], args: argparse.Namespace) -> None:
    """Write the JSON and the markdown table (--out as .md) of `rows`."""
    ratios, growth = speed_ratios(rows), memory_growth(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = {k: v for k, v in vars(args).items() if k != "worker"}
    out.write_text(json.dumps(dict(date=date.today().isoformat(), machine=machine(args.device),
                                   settings=flags, rows=rows, speed_ratios=ratios,
                                   memory_growth=growth), indent=1) + "\n")
    out.with_suffix(".md").write_text(report(rows, ratios, growth))


def main(args: argparse.Namespace) -> None:
    if args.worker:
        point = json.loads(args.worker)
        print(json.dumps(WORKERS[point["worker"]](point)), flush=True)
        return
    rows = []

    def record(row: dict) -> None:  # saved after every point: a stopped run keeps what it measured
        rows.append(row)
        save(rows, args)

    (gpu_bench if args.device == "cuda" else cpu_bench)(args, record)
    plot(rows, Path(args.plot), "allocated" if args.device == "cuda" else "RSS of the process")
    print(Path(args.out).with_suffix(".md").read_text())
    print(f"wrote {args.out}, {Path(args.out).with_suffix('.md')}, {args.plot}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"CPU: zoo name or HF-layout folder (default: {DEFAULT_MODEL})")
    p.add_argument("--heads", default=None,
                   help="retaining heads for locret (default: the zoo entry's)")
    p.add_argument("--lengths", default=None, help=f"prompt lengths in tokens (default: "
                   f"{GRID['lengths']}; --quick: {QUICK['lengths']}; cuda: {GPU_LENGTHS})")
    p.add_argument("--policies", default="full,locret,streamingllm",
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help=f"tokens generated per run, at least 2 (default: {GRID['decode_tokens']}; "
                   f"--quick: {QUICK['decode_tokens']})")
    g = p.add_argument_group("settings (CPU; cuda runs each shape at the paper's settings)")
    for flag, text in (("budget", "entries kept per KV head"), ("chunk", "prefill chunk in tokens"),
                       ("stabilizers", "most recent entries always kept, by default the "
                        "grid's share of the budget"),
                       ("n_loc", "last prompt tokens prefilled without eviction")):
        g.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None,
                       help=f"{text} (grid: {GRID['settings'][flag]}; "
                       f"--quick: {QUICK['settings'][flag]})")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    p.add_argument("--transformers", action="store_true", help="CPU: also run transformers' "
                   "generate (sdpa, full cache) on the same folder and prompts")
    p.add_argument("--kvpress", default=None, metavar="PYTHON",
                   help="CPU: also run kvpress's presses at the same budget, under this python "
                   "(a venv of its own with kvpress installed: its transformers pin differs)")
    p.add_argument("--presses", default="snapkv",
                   help=f"with --kvpress, from {', '.join(KVPRESS)} (default: %(default)s)")
    p.add_argument("--heads-overhead", action="store_true", help="CPU: also run locret with "
                   f"budget = prompt ({NO_EVICT}): the heads' cost over full")
    p.add_argument("--kv-int8", action="store_true",
                   help=f"CPU: also Locret with an int8 KV pool (run {INT8})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: --ckpt on the "
                   "grid; cuda: Llama-3.1-8B and Phi-3-mini shapes, random weights")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="CPU weights and cache "
                   "(default: bfloat16 where native, else float32); cuda: always bfloat16")
    p.add_argument("--emulate-gib", type=float, default=24,
                   help="cuda: memory cap in GiB (default: 24)")
    p.add_argument("--repeats", type=int, default=5, help="cuda: timed runs per point; the "
                   "median is reported, and decode's range (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989,
                   help="cuda: peak for MFU (default: 989, H100 bf16 dense)")
    p.add_argument("--out", default="bench/results/memory_speed.json",
                   help="JSON path; the table goes next to it as .md (default: %(default)s)")
    p.add_argument("--plot", default=None,
                   help="PNG of peak memory vs prompt length (default: --out as .png)")
    p.add_argument("--quick", action="store_true", help="a tiny grid, for tests")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one grid point, as JSON
    args = p.parse_args(argv)
    grid = QUICK if args.quick else GRID
    lengths = args.lengths or (GPU_LENGTHS if args.device == "cuda" else grid["lengths"])
    args.lengths = [int(x) for x in lengths.split(",")]
    args.decode_tokens = args.decode_tokens or grid["decode_tokens"]
    args.policies, args.presses = args.policies.split(","), args.presses.split(",")
    args.dtype = "bfloat16" if args.device == "cuda" else args.dtype or default_dtype("cpu")
    args.plot = args.plot or str(Path(args.out).with_suffix(".png"))
    if unknown := [x for x in args.policies if x not in POLICIES]:
        p.error(f"unknown policy: {', '.join(unknown)}")
    if unknown := [x for x in args.presses if x not in KVPRESS]:
        p.error(f"unknown press: {', '.join(unknown)} (choose from {', '.join(KVPRESS)})")
    if args.kvpress and not Path(args.kvpress).is_file():
        p.error(f"--kvpress {args.kvpress}: no such python")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (decode speed is measured after the first one)")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
