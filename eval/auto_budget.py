"""`alpha: auto`'s retention budget: which α each candidate rule would choose, against the
strength sweep's scores.

    python -m eval.auto_budget [--zoos community,synthetic] [--draws A+B,...] [--workdir eval/workdir]

For each zoo, all experts merged with ESM's defaults, and each subset named in --draws
(the merged updates and the self-written samples come from the robustness protocol's cache
when they are there, and are left there): every expert's own
loss increase on text the base wrote (what it forgot), and the merge's distinctive-token
criterion and retention cost over a grid of α, in one pass. Then the α each budget rule
allows and picks on that grid (auto refines further between grid points), next to the
validation scores that `eval.robustness --stages sweep` measured at the grid's α.

Writes eval/results/auto_budget.md and auto_budget.json.
"""

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from eval.compare import REPO, Results
from eval.report import normalized
from eval.robustness import RESULTS, ZooScores, esm_cache
from mergekit_esm.strength.auto import best_within_budget, retention_budget, retention_cost

ALPHAS = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
ALL = "all experts"
DAMAGE_THRESHOLDS = (0.5, 1.0, 2.0)  # nats
# The base gave its sampled token p > 1/2, so that token was also its greedy choice: damage
# there is what changes the base's greedy answers (the quiz's), which the mean over sampled
# text dilutes with high-entropy tokens.
CONFIDENT_LOSS = math.log(2)
# the product's two rules (auto_alpha_budget), and the median beside them
RULES = {
    "mean": lambda costs: retention_budget(costs, "mean"),
    "median": statistics.median,
    "least": lambda costs: retention_budget(costs, "least"),
}


def mean_cost(c: dict) -> float:
    """mean loss increase (today's)"""
    return c["cost"]


def damaged_share(threshold: float):
    def share(c: dict) -> float:
        return c["damaged"][str(threshold)]

    share.__doc__ = f"share of tokens worse by > {threshold:g} nats"
    return share


def confident_cost(c: dict) -> float:
    """mean loss increase on the base's confident tokens (p > 1/2)"""
    return c["confident_cost"]


def confident_lost(c: dict) -> float:
    """share of the base's confident tokens that fall below p = 1/2"""
    return c["confident_lost"]


STATISTICS = [mean_cost, *(damaged_share(t) for t in DAMAGE_THRESHOLDS), confident_cost, confident_lost]


def measure(zoo: str, members: list[str] | None, workdir: Path) -> dict:
    """Per-expert forgetting, and the criterion and cost of W0 + α·update for every α of ALPHAS."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from eval.zoo.build import build_community_zoo, build_zoo
    from mergekit_esm.integration.preflight import preflight
    from mergekit_esm.integration.prepare import cache_root, prepare, self_written_windows
    from mergekit_esm.strength.auto import (
        distinctive_token_loss,
        model_token_losses,
        self_prediction_losses,
        DISTINCTIVE_MARGIN,
    )
    from mergekit_esm.weights import checked_reader

    models = build_zoo(workdir) if zoo == "synthetic" else build_community_zoo(workdir)
    members = members or list(models["experts"])
    os.environ["MERGEKIT_ESM_CACHE"] = str(esm_cache(workdir, members))
    config = {
        "merge_method": "esm",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["experts"][m])} for m in members],
        "parameters": {"alpha": 3.0},  # any number: the merged updates do not depend on α
        "dtype": "float32",
    }
    prepared = prepare(preflight(MergeConfiguration.model_validate(config), MergeOptions()))
    inputs, s = prepared.inputs, prepared.inputs.settings
    root = cache_root(s.cache_dir)
    written = lambda model: self_written_windows(inputs, model, root, s.auto_alpha_samples, s.auto_alpha_max_tokens)
    windows = {e: written(e) for e in inputs.experts}
    base_windows = written(inputs.base)
    losses_of = lambda model, ws: model_token_losses(checked_reader(model, inputs.device), inputs.layout, ws, inputs.device)
    own = {e: losses_of(e, windows[e]) for e in windows}
    judged = {**windows, inputs.base: base_windows}
    merged = self_prediction_losses(prepared, judged, [0.0, *ALPHAS])
    base = merged.pop(0.0)
    base_own = base.pop(inputs.base)
    names = dict(zip(inputs.experts, members))

    confident = base_own < CONFIDENT_LOSS

    def costs(losses) -> dict:
        """Mean loss increase on the base's text, the share of its tokens made worse by more
        than each threshold (damage concentrated on a few tokens, which the mean hides), and
        both restricted to the base's confident tokens (its greedy choices)."""
        rise = losses - base_own
        return {
            "cost": retention_cost(losses, base_own),
            "damaged": {str(t): float((rise > t).float().mean()) for t in DAMAGE_THRESHOLDS},
            "confident_cost": retention_cost(losses[confident], base_own[confident]),
            "confident_lost": float((losses[confident] > CONFIDENT_LOSS).float().mean()),
        }

    forgetting = {names[e]: costs(losses_of(e, base_windows)) for e in windows}
    rows = {}
    for alpha, losses in merged.items():
        rows[alpha] = {**costs(losses.pop(inputs.base)),
                       "criterion": distinctive_token_loss(losses, base, own, DISTINCTIVE_MARGIN)}
    return {"forgetting": forgetting, "alphas": rows}


def report(measured: dict, results: Results) -> str:
    lines = [
        "# `alpha: auto`'s retention budget: what each rule would choose",
        "",
        "Command: `python -m eval.auto_budget --draws cz_plural+cz_sort,zoo_acronym+zoo_swap,"
        "cz_subtract+cz_reverse+cz_chat,zoo_date+zoo_cipher+zoo_acronym,cz_add+cz_plural,cz_plural+cz_reverse`",
        "(about 5 minutes a merge on 2 cores where the merged updates are cached, plus each model's",
        "samples once: they are shared with the robustness protocol).",
        "ESM's defaults. Criterion: mean loss on the experts' distinctive tokens (nats; lower is",
        "better for the experts); cost: the merge's mean loss increase on text the base wrote;",
        "confident tokens: those the base gave p > 1/2 (its greedy choices), their mean loss",
        "increase, and the share of them the model no longer gives p > 1/2 (lost).",
        "Scores: validation splits from `eval.robustness --stages sweep` for all experts, test",
        "splits from its subset stage for a subset (normalized tasks · quiz · NLL), where that α",
        "was merged. The rule picks on this grid; `alpha: auto` refines between grid points.",
        "",
    ]
    for zoo, draws in measured.items():
        base = results.get(zoo, "base", "validation")
        lines += [f"## {zoo}", "", f"Base (validation): quiz {100 * base['quiz']:.1f}, NLL {base['nll']:.3f}.", ""]
        for draw, m in draws.items():
            lines += [f"### {draw}", "", "What each expert cost the base's text (mean loss increase; share of tokens "
                      "made worse by more than " + ", ".join(f"{t:g}" for t in DAMAGE_THRESHOLDS) + " nats):", ""]
            lines += [f"- {e}: {c['cost']:+.3f}; " + ", ".join(f"{100 * v:.1f}%" for v in c["damaged"].values())
                      + f"; on confident tokens {c['confident_cost']:+.3f}, {100 * c['confident_lost']:.1f}% lost"
                      for e, c in m["forgetting"].items()]
            lines += ["", "| α | criterion | cost | damaged shares | confident tokens: cost, lost | tasks · quiz · NLL |",
                      "|---|---|---|---|---|---|"]
            for alpha, r in m["alphas"].items():
                shares = ", ".join(f"{100 * v:.1f}%" for v in r["damaged"].values())
                lines.append(f"| {float(alpha):g} | {r['criterion']:.3f} | {r['cost']:+.3f} | {shares} | "
                             f"{r['confident_cost']:+.3f}, {100 * r['confident_lost']:.1f}% | "
                             f"{scored(results, zoo, draw, float(alpha))} |")
            lines += ["", "| budget on | mean expert's | median expert's | least-forgetting expert's |", "|---|---|---|---|"]
            rows = {float(a): r for a, r in m["alphas"].items()}
            for statistic in STATISTICS:
                picks = []
                for reduce in RULES.values():
                    budget = reduce([statistic(c) for c in m["forgetting"].values()])
                    alpha = best_within_budget({a: r["criterion"] for a, r in rows.items()},
                                               {a: statistic(r) for a, r in rows.items()}, budget)
                    picks.append(f"α {alpha:g} (budget {budget:.3g})")
                lines.append(f"| {statistic.__doc__} | " + " | ".join(picks) + " |")
            lines.append("")
    return "\n".join(lines)


def scored(results: Results, zoo: str, draw: str, alpha: float) -> str:
    """ESM's measured scores at α (validation for all experts, test for a subset at its
    default α), or nothing where that α was not merged."""
    if draw == ALL:
        row, experts = results.get(zoo, "sweep", "esm", f"alpha={alpha}"), ZooScores(zoo, results).expert_scores("validation")
    else:
        row = results.get(zoo, "subsets", str(draw.count("+") + 1), draw, "esm", "default")
        row = row if row and row["setting"]["alpha"] == alpha else None
        experts = {t: s for t, s in ZooScores(zoo, results).expert_scores("test").items() if t in draw.split("+")}
    if not row:
        return ""
    return f"{100 * normalized(row['tasks'], experts):.1f} · {100 * row['quiz']:.1f} · {row['nll']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", default="community,synthetic")
    parser.add_argument("--draws", default="", help="comma-separated subsets, e.g. cz_plural+cz_sort")
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    args = parser.parse_args()
    store = RESULTS / "auto_budget.json"
    measured = json.loads(store.read_text()) if store.exists() else {}
    results = Results(args.workdir / "robustness" / "results.json")
    draws = [d for d in args.draws.split(",") if d]
    for zoo in args.zoos.split(","):
        experts = set(ZooScores(zoo, results).tasks)
        for draw in [ALL] + [d for d in draws if set(d.split("+")) <= experts]:
            if draw not in measured.get(zoo, {}):
                members = None if draw == ALL else draw.split("+")
                measured.setdefault(zoo, {})[draw] = measure(zoo, members, args.workdir)
                store.write_text(json.dumps(measured, indent=1))
    (RESULTS / "auto_budget.md").write_text(report(measured, results))
    print((RESULTS / "auto_budget.md").read_text())


if __name__ == "__main__":
    main()
