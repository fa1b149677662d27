"""Strength α on the zoo: score vs α (validation and test) for ESM and TSV-M, where
`alpha: auto` lands, and auto against the best labeled α and the default.

    python -m eval.alpha_study [--workdir eval/workdir]

Reuses compare's merges and cached scores (results.json); writes alpha_study.md and
alpha_study.png in the workdir.
"""

import argparse
import json
from pathlib import Path

from eval.compare import REPO, Zoo, _label
from eval.report import normalized

CURVES = {"esm": (1.0, 2.0, 3.0, 4.0), "tsv": (1.0, 1.7, 3.0)}
DEFAULTS = {"esm": 3.0, "tsv": 1.0}


def _chosen_alpha(model: Path) -> float:
    card = (model / "README.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith("| α chosen by alpha: auto |"))
    return float(line.split("|")[2].split()[0])


def run(workdir: Path) -> Path:
    zoo = Zoo(workdir)

    def both(method: str, setting: dict) -> tuple[float, float, Path]:
        label = f"{method}[{_label(setting)}]"
        val = zoo.merged_val(method, setting, label)
        path = zoo.merge(method, setting)["path"]
        test = zoo.scored("test", label, path)
        return 100 * normalized(val, zoo.expert_val), 100 * normalized(test, zoo.expert_test), path

    curves, autos, lines = {}, {}, []
    for method, alphas in CURVES.items():
        curves[method] = {a: both(method, {"alpha": a})[:2] for a in alphas}
        val, test, path = both(method, {"alpha": "auto"})
        autos[method] = (_chosen_alpha(path), val, test)
        best = max(curves[method], key=lambda a: curves[method][a][0])
        default = DEFAULTS[method]
        lines += [
            f"### {method}",
            "",
            "| α | " + " | ".join(f"{a:g}" for a in alphas) + " |",
            "|---|" + "---|" * len(alphas),
            "| validation | " + " | ".join(f"{curves[method][a][0]:.1f}" for a in alphas) + " |",
            "| test | " + " | ".join(f"{curves[method][a][1]:.1f}" for a in alphas) + " |",
            "",
            f"- alpha: auto chose α = {autos[method][0]:.3g}: validation {val:.1f}, test {test:.1f}",
            f"- best α on validation ({best:g}): test {curves[method][best][1]:.1f}",
            f"- default α ({default:g}): test {curves[method][default][1]:.1f}"
            if default in curves[method]
            else f"- default α ({default:g}): not on this grid",
            "",
        ]
    report = "Mean normalized accuracy (%) vs α on the zoo.\n\n" + "\n".join(lines)
    (workdir / "alpha_study.md").write_text(report)
    (workdir / "alpha_study.json").write_text(
        json.dumps({"curves": {m: {str(a): v for a, v in c.items()} for m, c in curves.items()}, "auto": autos}, indent=1)
    )
    _plot(curves, autos, workdir / "alpha_study.png")
    print(report)
    return workdir / "alpha_study.md"


def _plot(curves, autos, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), sharey=True)
    for ax, (method, curve) in zip(axes, curves.items()):
        alphas = sorted(curve)
        ax.plot(alphas, [curve[a][0] for a in alphas], "o-", label="validation")
        ax.plot(alphas, [curve[a][1] for a in alphas], "s--", label="test")
        ax.axvline(autos[method][0], color="tab:red", linestyle=":", label=f"alpha: auto = {autos[method][0]:.2f}")
        ax.set_title(method)
        ax.set_xlabel("α")
        ax.legend()
    axes[0].set_ylabel("mean normalized accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    run(parser.parse_args().workdir)


if __name__ == "__main__":
    main()
