"""Timing on this machine: the best of repeated calls, the matmul rate the benchmarks set their
FLOP rates against, and a generation's speeds (the median of repeated runs)."""
import time

import torch


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(size: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of a square torch.mm of side `size` in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def speeds(prompt_tokens: int, prefill_s: float, new_tokens: int, decode_s: float) -> dict:
    """Seconds and tok/s of a generation; decoding's count the steps after the first new token,
    which comes from the prefill."""
    return dict(prefill_seconds=prefill_s, decode_seconds=decode_s,
                prefill_tok_s=prompt_tokens / prefill_s, decode_tok_s=(new_tokens - 1) / decode_s)


def repeated_speeds(prompt_tokens: int, new_tokens: int,
                    timings: list[tuple[float, float]]) -> dict:
    """speeds() of the run with the median prefill and the run with the median decode among
    repeated (prefill s, decode s), with the decode tok/s range over all of them."""
    median = lambda i: sorted(timings, key=lambda t: t[i])[(len(timings) - 1) // 2][i]
    decode = [(new_tokens - 1) / t[1] for t in timings]
    return dict(speeds(prompt_tokens, median(0), new_tokens, median(1)), repeats=len(timings),
                decode_tok_s_min=min(decode), decode_tok_s_max=max(decode))
