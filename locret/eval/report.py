"""An eval run's reports from its result rows: the accuracy-vs-budget table (markdown, csv, plot),
the first policy paired against the others, accuracy by the kind of value asked, and the
multiquestion suite's shared-against-separate table."""
import csv
import math
from pathlib import Path

import numpy as np

from .stats import budget_share, paired, wilson
from .tasks import is_text_task

# (table column, result field) averaged over a group's rows
FIDELITY = (("ll_gap", "ll_gap"), ("top1_agree", "top1_agreement"),
            ("needle_kept", "needle_retention"), ("compression", "compression"),
            ("prefill_tok_s", "prefill_tps"), ("decode_tok_s", "decode_tps"))


def budget_fraction(row: dict) -> str:
    """A row's budget as a share of its prompt ("-" for full attention, which keeps everything)."""
    return "-" if row["policy"] == "full" else budget_share(row["budget"], row["length"])


def ci95(scores: list[float]) -> str:
    """The Wilson 95% interval of the scores' mean, in percent: "lo-hi"."""
    return "{:.0f}-{:.0f}".format(*wilson(sum(scores), len(scores)))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def grouped(rows: list[dict], key) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def task_cell(rows: list[dict], task: str) -> float:
    """A task's accuracy in percent; for a text task, perplexity per answer token."""
    of_task = [r for r in rows if r["task"] == task]
    if not of_task:
        return float("nan")
    if is_text_task(task):
        tokens = sum(r["answer_tokens"] for r in of_task)
        return math.exp(-sum(r["log_likelihood"] for r in of_task) / tokens)
    return 100 * mean([r["score"] for r in of_task])


def summarize(rows: list[dict], tasks: list[str], by_length: bool = False) -> list[dict]:
    """One line per (policy, budget fraction[, length]): per-task accuracy (perplexity for text
    tasks), the mean accuracy with its Wilson interval and n, fidelity, cost."""
    key = lambda r: (r["policy"], budget_fraction(r)) + ((r["length"],) if by_length else ())
    table = []
    for k, group in grouped(rows, key).items():
        line = {"policy": k[0], "budget": k[1]} | ({"length": k[2]} if by_length else {})
        line |= {task: task_cell(group, task) for task in tasks}
        scored = [r["score"] for r in group if not is_text_task(r["task"])]
        line |= {"n": len(scored), "mean": 100 * mean(scored),
                 "ci95": ci95(scored) if scored else "-"}
        for name, field in FIDELITY:
            line[name] = mean([r[field] for r in group if not math.isnan(r[field])])
        line["pool_mib"] = max(r["pool_bytes"] for r in group) / 2**20
        table.append(line)
    return table


def summarize_by_kind(rows: list[dict]) -> list[dict]:
    """One line per (length, kind of value asked, policy, budget fraction), over the rows that name
    a kind (the held-out suite's): accuracy with its Wilson interval and n, needle tokens kept."""
    groups = grouped([r for r in rows if r.get("kind")],
                     lambda r: (r["length"], r["kind"], r["policy"], budget_fraction(r)))
    table = []
    for (length, kind, policy, fraction), group in sorted(groups.items(), key=lambda g: g[0][:2]):
        scores = [r["score"] for r in group]
        kept = [r["needle_retention"] for r in group if not math.isnan(r["needle_retention"])]
        table.append({"length": length, "kind": kind, "policy": policy, "budget": fraction,
                      "n": len(scores), "accuracy": 100 * mean(scores), "ci95": ci95(scores),
                      "needle_kept": mean(kept)})
    return table


def summarize_multi_question(rows: list[dict]) -> list[dict]:
    """One line per (policy, budget fraction, mode): accuracy over all questions with its Wilson
    interval, seconds per document, and how much faster shared is than separate."""
    groups = grouped(rows, lambda r: (r["policy"], budget_fraction(r), r["mode"]))
    table = []
    for (policy, fraction, mode), group in groups.items():
        scores = [x for r in group for x in r["scores"]]
        kept = [x for r in group for x in r["needle_kept"]]
        seconds = mean([r["seconds"] for r in group])
        separate = mean([r["seconds"] for r in groups[(policy, fraction, "separate")]])
        table.append({"policy": policy, "budget": fraction, "mode": mode, "n": len(scores),
                      "accuracy": 100 * mean(scores), "ci95": ci95(scores),
                      "needle_kept": float(np.nanmean(kept)),
                      "seconds_per_doc": seconds, "speedup": separate / seconds})
    return table


def markdown(table: list[dict]) -> str:
    columns = list(table[0])
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(line[c]) for c in columns) + " |" for line in table]
    return "\n".join(md) + "\n"


def write_table(table: list[dict], out: Path, plotted: bool = True) -> list[str]:
    """<out>/table.md, table.csv and (`plotted`) accuracy_vs_budget.png; the names written."""
    (out / "table.md").write_text(markdown(table))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    if plotted:
        plot(table, out / "accuracy_vs_budget.png")
    return ["table.md", "table.csv"] + (["accuracy_vs_budget.png"] if plotted else [])


def write_paired(rows: list[dict], policies: list[str], out: Path) -> list[str]:
    """<out>/paired.md: the first of the evicting `policies` against the others and full attention,
    item by item (sign tests); nothing when there is nothing to pair."""
    scored = [r for r in rows if not is_text_task(r["task"])]
    table = paired(scored, policies[0]) if policies else []
    if table:
        (out / "paired.md").write_text(markdown(table))
    return ["paired.md"] if table else []


def write_by_kind(rows: list[dict], out: Path) -> list[str]:
    """<out>/by_kind.md (summarize_by_kind); nothing when no row names a kind."""
    table = summarize_by_kind(rows)
    if table:
        (out / "by_kind.md").write_text(markdown(table))
    return ["by_kind.md"] if table else []


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(line["policy"] for line in table):
        mine = [line for line in table if line["policy"] == policy]
        if policy == "full":
            ax.axhline(mine[0]["mean"], color="black", linestyle="--", label="full")
        else:
            points = sorted((float(line["budget"]), line["mean"]) for line in mine)
            ax.plot(*zip(*points), marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget / prompt length")
    ax.set_ylabel("mean accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
