"""The comparison report: a markdown table and a PNG bar chart from scored results."""

from pathlib import Path


def normalized(scores: dict[str, float], expert_scores: dict[str, float]) -> float:
    """Mean over tasks of merged accuracy / the task's own expert accuracy."""
    ratios = [scores[t] / expert_scores[t] for t in expert_scores if expert_scores[t] > 0]
    return sum(ratios) / len(ratios) if ratios else 0.0


def markdown_table(
    rows: dict[str, dict[str, float]],
    expert_scores: dict[str, float],
    settings: dict[str, str],
    ordered: bool = True,
    retention: dict[str, dict[str, float]] | None = None,
) -> str:
    """rows: label → {task: accuracy}; expert_scores: task → own expert's accuracy.

    ordered: best first; otherwise the rows keep their given order (the ablation table).
    retention: label → {"quiz", "nll"} (eval/retention.py), shown as two more columns."""
    tasks = list(expert_scores)
    head = "| model | setting (chosen on validation) | " + " | ".join(tasks) + " | mean | mean normalized |"
    extra = 2 if retention is not None else 0
    if extra:
        head += " quiz | held-out NLL |"
    lines = [head, "|" + "---|" * (len(tasks) + 4 + extra)]
    labels = sorted(rows, key=lambda r: -normalized(rows[r], expert_scores)) if ordered else list(rows)
    for label in labels:
        scores = rows[label]
        cells = " | ".join(f"{100 * scores[t]:.1f}" for t in tasks)
        mean = 100 * sum(scores[t] for t in tasks) / len(tasks)
        line = f"| {label} | {settings.get(label, '')} | {cells} | {mean:.1f} | {100 * normalized(scores, expert_scores):.1f} |"
        if extra:
            kept = retention.get(label)
            line += f" {100 * kept['quiz']:.1f} | {kept['nll']:.3f} |" if kept else " | |"
        lines.append(line)
    own = " | ".join(f"{100 * expert_scores[t]:.1f}" for t in tasks)
    lines.append(
        f"| each task's own expert | | {own} | {100 * sum(expert_scores.values()) / len(tasks):.1f} | 100.0 |"
        + " | |" * (extra // 2)
    )
    return "\n".join(lines)


def bar_chart(rows: dict[str, dict[str, float]], expert_scores: dict[str, float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(rows, key=lambda r: -normalized(rows[r], expert_scores))
    values = [100 * normalized(rows[r], expert_scores) for r in labels]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4))
    bars = ax.bar(labels, values, color=["tab:red" if l.startswith("esm") else "tab:blue" for l in labels])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("mean normalized accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, max(105, max(values, default=0) + 10))
    plt.xticks(rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
