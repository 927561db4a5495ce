"""Statistics for the accuracy tables: Wilson and exact (Clopper-Pearson) intervals of a policy's
accuracy, paired sign tests of one policy against another on the same items (every policy answers
the same seeded items), and Fieller intervals of one policy's accuracy as a share of full
attention's on the same items."""
import math


def budget_share(budget: int, length: int) -> str:
    """A budget as a share of its prompt, as the tables print it ("0.125")."""
    return f"{budget / length:.4g}"


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion, in percent (never +-0 at 0/n or n/n)."""
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, center - half), 100 * min(1.0, center + half)


def binomial_at_most(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(k + 1))


def exact_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95% interval of a proportion, in percent: the p at which
    successes or more (fewer) is just as likely as alpha / 2, found by bisection."""
    def solve(falls_below) -> float:  # the p in [0, 1] where a decreasing test flips
        low, high = 0.0, 1.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (low, mid) if falls_below(mid) else (mid, high)
        return (low + high) / 2

    k = successes
    lower = 0.0 if k == 0 else solve(lambda p: binomial_at_most(k - 1, n, p) < 1 - alpha / 2)
    upper = 1.0 if k == n else solve(lambda p: binomial_at_most(k, n, p) < alpha / 2)
    return 100 * lower, 100 * upper


def sign_test(higher: int, lower: int) -> float:
    """Exact two-sided p-value that items scored higher and lower are equally likely (ties left
    out)."""
    return min(1.0, 2 * binomial_at_most(min(higher, lower), higher + lower, 0.5))


def share_interval(ours: list[float], theirs: list[float], z: float = 1.96
                   ) -> tuple[float, float] | None:
    """Fieller's 95% interval of mean(ours) / mean(theirs) for paired scores: every r with
    |mean(ours - r * theirs)| within z standard errors (normal approximation), floored at 0 (a
    share is never negative). None when unbounded (theirs too near zero)."""
    n = len(ours)
    if n < 2:
        return None
    mx, my = sum(ours) / n, sum(theirs) / n
    # variances and covariance of the two means
    sxx = sum((x - mx) ** 2 for x in ours) / (n - 1) / n
    syy = sum((y - my) ** 2 for y in theirs) / (n - 1) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(ours, theirs)) / (n - 1) / n
    a, b, c = my * my - z * z * syy, -2 * (mx * my - z * z * sxy), mx * mx - z * z * sxx
    if a <= 0:
        return None
    root = math.sqrt(max(0.0, b * b - 4 * a * c))
    return max(0.0, (-b - root) / (2 * a)), (-b + root) / (2 * a)


def share_text(ours: list[float], theirs: list[float]) -> str:
    """"share (lo-hi)" in percent, or "-" when full attention scored too little to bound it."""
    bounds = share_interval(ours, theirs)
    if bounds is None:
        return "-"
    return f"{100 * sum(ours) / sum(theirs):.0f}% ({100 * bounds[0]:.0f}-{100 * bounds[1]:.0f})"


def paired(rows: list[dict], policy: str) -> list[dict]:
    """`policy` against every other policy at the same budget and against full attention, per
    (task, length, budget), on the items both answered: their summed scores, the items where
    `policy` scored higher and lower, the sign test's p, and against full attention its share of
    full attention's score (Fieller 95%)."""
    scores: dict[tuple, dict[int, float]] = {}
    for r in rows:
        key = (r["task"], r["length"], r["budget"], r["policy"])
        scores.setdefault(key, {})[r["index"]] = r["score"]
    table = []
    for (task, length, budget, name), ours in scores.items():
        if name != policy:
            continue
        for (task2, length2, budget2, other), theirs in scores.items():
            if ((task2, length2) != (task, length) or other == policy
                    or (budget2 != budget and other != "full")):
                continue
            items = sorted(ours.keys() & theirs.keys())
            higher = sum(ours[i] > theirs[i] for i in items)
            lower = sum(ours[i] < theirs[i] for i in items)
            table.append({"task": task, "length": length, "budget": budget_share(budget, length),
                          "policy": policy, "against": other, "n": len(items),
                          "score": sum(ours[i] for i in items),
                          "their_score": sum(theirs[i] for i in items), "higher": higher,
                          "lower": lower, "p": sign_test(higher, lower),
                          "share_of_full": share_text([ours[i] for i in items],
                                                      [theirs[i] for i in items])
                          if other == "full" else "-"})
    return table
