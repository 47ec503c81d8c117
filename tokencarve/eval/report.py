"""Tables and figures from the harness's results (Markdown and PNG)."""

from __future__ import annotations

from pathlib import Path

from tokencarve.methods import names

COLOURS = {
    "none": "black",
    "tokencarve": "tab:blue",
    "information": "tab:orange",
    "attention": "tab:green",
    "fastv": "tab:red",
    "random": "tab:purple",
    "pool": "tab:brown",
    "volume": "tab:cyan",
    "volume-merge": "darkcyan",
    "volume-spatial": "navy",
    "dpp": "tab:olive",
    "divprune": "tab:pink",
    "debiased": "tab:gray",
}  # the same in every figure
LINE_STYLES = {
    "tokencarve": "o-",
    "information": "s--",
    "attention": "^--",
    "fastv": "v-",
    "random": "x:",
    "pool": "d-.",
    "volume": "P-",
    "volume-merge": "P--",
    "volume-spatial": "D-",
    "dpp": "*-",
    "divprune": "h--",
    "debiased": "o:",
}


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _by_setting(results: list[dict]) -> dict[tuple[str, int | float | str], dict]:
    return {(r["setting"]["method"], r["setting"]["keep"]): r["summary"] for r in results}


def _adaptive(keep) -> bool:
    return isinstance(keep, str)  # results hold an adaptive budget in its written form ("auto:64")


def _budget_order(keep) -> tuple:
    """Columns: fixed budgets from the largest, then adaptive ones from the largest mean."""
    if _adaptive(keep):
        return (1, -float(keep.split(",")[0].partition(":")[2] or 64))
    return (0, -keep)


def _tokens(keep, summary: dict) -> str:
    """A setting's budget in a table: adaptive ones with the mean count they kept."""
    if _adaptive(keep) and "mean_visual_tokens_kept" in summary:
        return f"{keep} (mean {summary['mean_visual_tokens_kept']:.1f})"
    return str(keep)


def overall_table(results: list[dict]) -> str:
    """Methods x budgets, overall accuracy in %; the stock model in its own row."""
    table = _by_setting(results)
    budgets = sorted({k for m, k in table if m != "none"}, key=_budget_order)
    methods = [m for m in dict.fromkeys(m for m, _ in table) if m != "none"]
    head = [f"{b}" if _adaptive(b) else f"{b} tokens" for b in budgets]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(budgets) + 1) + "|"]
    for (method, keep), summary in table.items():
        if method == "none":
            lines.insert(
                2, "| none (every token) | " + " | ".join([_percent(summary["overall"])] * len(budgets)) + " |"
            )
    for method in methods:
        cells = [_percent(table[(method, b)]["overall"]) if (method, b) in table else "" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the methods a new selection is held against: the paper's and the published baselines
REFERENCE_METHODS = (*names("paper"), *names("baseline"))


def retention_table(results: list[dict], caption_task: str = "caption") -> str:
    """Per method and budget: overall and caption accuracy as a share of the stock model's, and the
    task where the method falls furthest below the best reference method (REFERENCE_METHODS) at the
    same budget (points; <= 0 means it is at least as good on every task; an adaptive budget has no
    reference methods, so none)."""
    table = _by_setting(results)
    stock = next((summary for (method, _), summary in table.items() if method == "none"), None)
    if stock is None:
        return "(no uncompressed run to compare with)"
    tasks = sorted(stock["tasks"])
    lines = [
        "| method | tokens | overall, % of uncompressed | captions, % of uncompressed | worst task vs best reference method |",
        "|---|---|---|---|---|",
    ]
    for (method, keep), summary in table.items():
        if method == "none":
            continue
        references = [table[(m, keep)] for m in REFERENCE_METHODS if (m, keep) in table]
        gaps = {
            t: max(r["tasks"].get(t, 0.0) for r in references) - summary["tasks"].get(t, 0.0)
            for t in tasks
            if references
        }
        worst = max(gaps, key=gaps.get) if gaps else ""
        caption = (
            _percent(summary["tasks"][caption_task] / stock["tasks"][caption_task])
            if stock["tasks"].get(caption_task)
            else ""
        )
        gap = f"{worst} {100 * gaps[worst]:+.1f}" if gaps else ""
        lines.append(
            f"| {method} | {_tokens(keep, summary)} | {_percent(summary['overall'] / stock['overall'])} | {caption} "
            f"| {gap} |"
        )
    return "\n".join(lines)


def task_table(results: list[dict]) -> str:
    """One row per setting: accuracy per task, POPE F1 of the yes/no tasks, information figures."""
    tasks = sorted({t for r in results for t in r["summary"]["tasks"]})
    yes_no = sorted({t for r in results for t in r["summary"]["yes_no"]})
    head = ["method", "tokens", "overall", *tasks, *(f"{t} F1" for t in yes_no), "eff. rank", "nuclear norm"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        s, setting = r["summary"], r["setting"]
        cells = [
            setting["method"],
            _tokens(setting["keep"], s) if setting["keep"] is not None else "all",
            _percent(s["overall"]),
            *(_percent(s["tasks"][t]) if t in s["tasks"] else "" for t in tasks),
            *(_percent(s["yes_no"][t]["f1"]) if t in s["yes_no"] else "" for t in yes_no),
            f"{s['information']['effective_rank']:.1f}",
            f"{s['information']['nuclear_norm']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # an optional extra
        raise SystemExit("plots need matplotlib: pip install 'tokencarve[render]'") from error
    return plt


def _mean_kept(keep, summary: dict) -> float:
    """Where a setting sits on the token axis: the mean count it kept (a fixed count's own figure
    where an older results.json has none)."""
    return summary.get("mean_visual_tokens_kept", keep)


def accuracy_plot(results: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy vs the mean visual tokens kept per image, one line per method and kind of budget
    (adaptive budgets dotted, with hollow markers, in the method's colour); the stock model as a
    dashed black line."""
    plt = _pyplot()
    table = _by_setting(results)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(m for m, _ in table):
        if method == "none":
            continue
        for adaptive in (False, True):
            points = sorted(
                (_mean_kept(k, s), 100 * s["overall"])
                for (m, k), s in table.items()
                if m == method and _adaptive(k) == adaptive
            )
            if not points:
                continue
            x, y = zip(*points)
            if adaptive:  # the method's marker, hollow, on a dotted line
                marker = LINE_STYLES.get(method, "o-")[0]
                label = f"{method}, adaptive (auto)"
                ax.plot(x, y, marker, linestyle=":", markerfacecolor="none", color=COLOURS.get(method), label=label)
            else:
                ax.plot(x, y, LINE_STYLES.get(method, "o-"), color=COLOURS.get(method), label=method)
    for (method, keep), summary in table.items():
        if method == "none":
            ax.axhline(100 * summary["overall"], color="black", linestyle="--", linewidth=1, label="none (every token)")
    ax.set_xscale("log", base=2)
    # ticks at the counts; fractions and adaptive budgets sit at the mean count they kept
    budgets = sorted({k for m, k in table if m != "none" and isinstance(k, int)})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    _finish(plt, fig, ax, path, "visual tokens kept per image (mean)", title or "Accuracy vs visual tokens kept")


def information_plot(results: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy against the effective rank of the layer-K visual hidden states, one colour per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(r["setting"]["method"] for r in results):
        rows = [r for r in results if r["setting"]["method"] == method]
        x = [r["summary"]["information"]["effective_rank"] for r in rows]
        y = [100 * r["summary"]["overall"] for r in rows]
        ax.plot(
            x, y, LINE_STYLES.get(method, "*"), color=COLOURS.get(method), label=method, markersize=7, linewidth=0.8
        )
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(str(r["setting"]["keep"]), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _finish(
        plt,
        fig,
        ax,
        path,
        "effective rank of the visual hidden states entering layer K",
        title or "Information kept vs accuracy (labels: tokens kept)",
    )


def _finish(plt, fig, ax, path, xlabel: str, title: str) -> None:
    """Labels, grid and legend shared by the figures (accuracy on the y axis), then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
