"""`mergekit-esm tune`: the paper's golden-section search over α on a labeled validation set.

Each trial merges with one α (the merged updates are cached, so a
trial costs only the final scaling, mergekit's write and the evaluation) and scores the
merge with lm-eval. Only the best model so far is kept on disk.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import tqdm
import yaml

from mergekit_esm.errors import EsmInputError
from mergekit_esm.strength.lm_eval_score import score
from mergekit_esm.strength.search import golden_section_max

# The paper searches its α in [0, 2]; ESM's α here is half of theirs (README, 'Recipe parameters'), so [0, 4].
# TSV-M and Iso-C/CTS have no such factor: their papers' searches stay within [0, 3].
DEFAULT_HIGH = {"esm": 4.0}
DEFAULT_HIGH_OTHERS = 3.0


@dataclass
class TuneResult:
    best_alpha: float
    trials: dict[float, dict[str, float]] = field(default_factory=dict)  # α → task → score

    def mean(self, alpha: float) -> float:
        scores = self.trials[alpha]
        return sum(scores.values()) / len(scores)


def _load_recipe(path: Path) -> dict:
    from mergekit_esm.methods import METHODS

    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise EsmInputError(f"cannot read recipe {path}: {error}") from None
    method = (recipe or {}).get("merge_method")
    if method not in METHODS:
        raise EsmInputError(
            f"tune searches α of {', '.join(METHODS)} recipes; {path} uses merge_method {method!r}"
        )
    return recipe


def _require_lm_eval() -> None:
    """Scoring needs the `eval` extra: say so before the first merge, not after it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EsmInputError(
            "tune scores merges with lm-eval, which is not installed: pip install 'mergekit-esm[eval]'"
        ) from None


def _prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "tune.json").exists():
        raise EsmInputError(f"output folder {out} exists and is not an earlier tune run: choose a new one")
    out.mkdir(parents=True, exist_ok=True)


def tune(
    recipe_path: Path,
    tasks: list[str],
    out: Path,
    *,
    include_path: Path | None = None,
    low: float = 0.0,
    high: float | None = None,
    tolerance: float = 0.01,
    max_trials: int = 15,
    limit: int | None = None,
    batch_size: int = 32,
    merge_options=None,
) -> TuneResult:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = _load_recipe(recipe_path)
    high = high if high is not None else DEFAULT_HIGH.get(recipe["merge_method"], DEFAULT_HIGH_OTHERS)
    if not 0 <= low < high:
        raise EsmInputError(f"the α range must satisfy 0 ≤ low < high; got [{low}, {high}]")
    _require_lm_eval()
    _prepare_output(out)
    options = merge_options or MergeOptions()
    trials_dir = out / ".trials"
    result = TuneResult(best_alpha=float("nan"))
    progress = tqdm.tqdm(total=max_trials, desc="tune α", unit="trial")

    def evaluate(alpha: float) -> float:
        trial = {**recipe, "parameters": {**(recipe.get("parameters") or {}), "alpha": alpha}}
        path = trials_dir / f"alpha_{alpha:.6f}"
        run_merge(MergeConfiguration.model_validate(trial), str(path), options)
        result.trials[alpha] = score(path, tasks, include_path, batch_size=batch_size, limit=limit)
        mean = result.mean(alpha)
        best = max(result.trials, key=result.mean)
        for other in trials_dir.iterdir():  # keep only the best model so far
            if other.name != f"alpha_{best:.6f}":
                shutil.rmtree(other, ignore_errors=True)
        progress.update(1)
        progress.set_postfix(alpha=f"{alpha:.3f}", score=f"{mean:.4f}", best=f"{best:.3f}")
        return mean

    try:
        result.best_alpha, _ = golden_section_max(evaluate, low, high, tolerance, max_trials)
        _write_report(result, recipe, tasks, out)
        best_model = trials_dir / f"alpha_{result.best_alpha:.6f}"
        shutil.rmtree(out / "model", ignore_errors=True)
        best_model.rename(out / "model")
    finally:  # empty after success; after a failure or Ctrl-C it holds trial merges nobody asked for
        progress.close()
        shutil.rmtree(trials_dir, ignore_errors=True)
    return result


def _write_report(result: TuneResult, recipe: dict, tasks: list[str], out: Path) -> None:
    alphas = sorted(result.trials)
    best = {**recipe, "parameters": {**(recipe.get("parameters") or {}), "alpha": round(result.best_alpha, 6)}}
    (out / "best_recipe.yml").write_text(yaml.safe_dump(best, sort_keys=False))
    (out / "tune.json").write_text(
        json.dumps({"best_alpha": result.best_alpha, "tasks": tasks, "trials": {str(a): result.trials[a] for a in alphas}}, indent=1)
    )
    lines = ["| α | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for a in alphas:
        mark = " **(best)**" if a == result.best_alpha else ""
        cells = " | ".join(f"{result.trials[a][t]:.4f}" for t in tasks)
        lines.append(f"| {a:.4f}{mark} | {cells} | {result.mean(a):.4f} |")
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(alphas, [result.mean(a) for a in alphas], "o-")
    ax.axvline(result.best_alpha, color="tab:red", linestyle="--", label=f"best α = {result.best_alpha:.3f}")
    ax.set_xlabel("α")
    ax.set_ylabel("mean score over " + ", ".join(tasks))
    ax.set_title(f"{recipe['merge_method']}: validation score vs α")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_vs_alpha.png", dpi=120)
    plt.close(fig)
