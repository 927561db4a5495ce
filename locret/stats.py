"""Statistics for the accuracy tables: Wilson intervals of a policy's accuracy, and paired sign tests of one
policy against another on the same items (every policy answers the same seeded items)."""
import math


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion, in percent (never +-0 at 0/n or n/n)."""
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, center - half), 100 * min(1.0, center + half)


def sign_test(higher: int, lower: int) -> float:
    """Exact two-sided p-value that items scored higher and lower are equally likely (ties left out)."""
    n = higher + lower
    tail = sum(math.comb(n, i) for i in range(min(higher, lower) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(rows: list[dict], policy: str) -> list[dict]:
    """`policy` against every other policy at the same budget and against full attention, per (task, length,
    budget), on the items both answered: their summed scores, the items where `policy` scored higher and
    lower, and the sign test's p."""
    scores: dict[tuple, dict[int, float]] = {}
    for r in rows:
        scores.setdefault((r["task"], r["length"], r["budget"], r["policy"]), {})[r["index"]] = r["score"]
    table = []
    for (task, length, budget, name), ours in scores.items():
        if name != policy:
            continue
        for (task2, length2, budget2, other), theirs in scores.items():
            if (task2, length2) != (task, length) or other == policy or (budget2 != budget and other != "full"):
                continue
            items = sorted(ours.keys() & theirs.keys())
            higher = sum(ours[i] > theirs[i] for i in items)
            lower = sum(ours[i] < theirs[i] for i in items)
            table.append({"task": task, "length": length, "budget": f"{budget / length:.4g}", "policy": policy,
                          "against": other, "n": len(items), "score": sum(ours[i] for i in items),
                          "their_score": sum(theirs[i] for i in items), "higher": higher, "lower": lower,
                          "p": sign_test(higher, lower)})
    return table
