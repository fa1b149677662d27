"""Robustness protocol: experts' tasks against what the merge keeps of the base, on both zoos
and for every number of merged experts T.

    python -m eval.robustness [--zoos community,synthetic] [--stages sweep,subsets] [--subsets 5]

Stages, each cached in <workdir>/robustness/results.json so that a rerun resumes:
1. references: the base on every task and on retention (eval/retention.py); each expert on
   its own task and on retention.
2. sweep (strength against retention): every method over its grid (eval/compare.py GRIDS)
   merging the whole zoo, scored on the validation splits (tasks, quiz) and the held-out
   prose. Gives the tasks-vs-retention curves and the setting chosen on validation (best
   mean normalized accuracy, as in `make compare`).
   ablation: ESM with one of its parts off at a time (ABLATIONS), each over α, the same way.
   auto: `alpha: auto` for this package's methods, the same way (where it lands on the curves).
   chosen: each method at its setting chosen on validation, all experts, scored on the test
   splits; merged into an empty cache so that its wall time and peak memory are the whole
   merge's, calibration included, all methods in one run.
3. subsets (Hitit et al., arXiv 2511.21437): for T = 2 … N, seeded random subsets of the
   zoo's experts, each merged with every method at its default (the shipped recipe), at
   its setting chosen in stage 2, with --with-auto this package's methods at `alpha: auto`,
   with --with-in-task-proxy their default calibrated on each expert's own training
   examples, and with --subset-strengths the methods named at other strengths (their
   tasks-vs-retention curves at each T), scored on the test splits and retention (--draws:
   only the subsets named).
Merged models are deleted once scored (only the scores are kept); each subset's ESM cache
is deleted with it.

Writes eval/results/robustness.md (tables), robustness_by_T.png, pareto_<zoo>.png,
pareto_<zoo>_esm_ablation.png and pareto_<zoo>_by_T.png (the strength curves per T).
"""

import argparse
import itertools
import json
import random
import shutil
from pathlib import Path

import yaml

from eval.compare import GRIDS, REPO, Results, _label, merge, recipe_file
from eval.report import normalized
from eval.retention import QUIZ_TASK, heldout_nll, write_quiz_task
from eval.score import score, write_task_configs

METHODS = ["esm", "tsv", "iso_c", "regmean", "task_arithmetic", "ties", "della"]
DEFAULT = "default"
# the settings a subset is merged at; "in-task proxy": the default with each expert's own
# training examples as its calibration text (`proxy: in-task` here, per-model proxies in the recipe)
IN_TASK_PROXY, IN_TASK = "in-task proxy", "in-task"
SUBSET_SETTINGS = (DEFAULT, "chosen", "auto", IN_TASK_PROXY)
# Retention kept "within the margin of the base": quiz at most 15 points below the base's,
# held-out NLL at most 0.25 nats above it (fine-tuning one expert often loses more).
QUIZ_MARGIN, NLL_MARGIN = 0.15, 0.25
RESULTS = REPO / "eval" / "results"
# ESM's parts, each switched off alone, swept over α against the frontier (not judged at one
# point): curve name → the recipe parameters that differ from ESM's defaults. First the
# paper's raw polarized scaling, then ordered by how much each part changes the update's
# spectrum, the first suspects for what a merge forgets.
ABLATIONS = {
    "esm, paper's scaling": {"preserve_norm": False},
    "esm, no whitening": {"whiten_factors": False},
    "esm, no dimension scaling": {"dimension_exponent": 0.0},
    "esm, svd basis": {"basis": "svd"},
    "esm, no layer scaling": {"layer_exponent": 0.0},
    "esm, paper's task scaling": {"task_exponent": 2.0},  # the paper's p = 2 (off by default)
    "esm, no flattening": {"gamma": 0.0},
    # TSV-M's combination on the essential subspaces without eigenvalue flattening: there
    # flattening weighs each direction by its activation-shift eigenvalue, whose spread an LLM's
    # massive activations make far wider than ΔW's singular values' (the svd basis's)
    "esm, unwhitened without flattening": {"whiten_factors": False, "gamma": 0.0},
    # the paper's rank ⌊d_out/T⌋ (capped at d_in) against the default ⌊min(d_out, d_in)/T⌋;
    # they differ for gate/up_proj only
    "esm, paper's rank": {"rank_rule": "output"},
    # not a part: each expert's whitened directions at its own spectrum's scale, the fix
    # tried for a LoRA expert's few strong directions, which whitening cuts to the mean
    "esm, expert spectrum scale": {"spectrum_exponent": 1.0},
    # not a part: each expert keeps only the leading directions that best align its whitened
    # block with its own ΔW, the fix tried for what whitening's equal weights cost at small T
    "esm, aligned rank": {"expert_rank": "aligned"},
    # not a part: both of the above. At the aligned rank a LoRA keeps its one or two strong
    # directions, which whitening cuts to the mean weight, a far smaller share of its update
    # than a full fine-tune keeps; its block at its own spectrum's scale evens the experts'
    # shares out (eval/scale_inflation.py --members, eval/results/lora_shares_community.md)
    "esm, aligned rank and spectrum scale": {"expert_rank": "aligned", "spectrum_exponent": 1.0},
    # not a part: the essential subspaces by a full eigendecomposition (the paper's) against
    # the default subspace iteration
    "esm, exact subspace": {"subspace_solver": "exact"},
    # not a part: float64, the reference, against the default float32
    "esm, float64": {"precision": "float64"},
    # not a part: the proxy budget's floor (8 windows of 512 tokens) against 4, which is what the
    # rule of 4 tokens per kept direction asks for at 1.1B widths and T = 4
    "esm, 4 proxy windows": {"proxy_samples": 4},
}
ABLATION_ALPHAS = tuple(s["alpha"] for s in GRIDS["esm"])  # ESM's own grid, the same budget


def esm_cache_dir(workdir: Path, members: list[str]) -> Path:
    """Where one set of members' merged updates are cached (removed when their merges are done)."""
    return workdir / "robustness" / "esm-cache" / "-".join(members)


def esm_cache(workdir: Path, members: list[str]) -> Path:
    """esm_cache_dir, made, with its self-written samples in one store shared by every set:
    they are keyed by the model that wrote them, so each model writes its samples once for the
    whole protocol, and removing a set's cache removes only the link to them."""
    cache = esm_cache_dir(workdir, members)
    shared = workdir / "robustness" / "self-proxy"
    shared.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "self-proxy").exists():
        (cache / "self-proxy").symlink_to(shared.resolve(), target_is_directory=True)
    return cache


def default_setting(method: str) -> dict:
    """What a user gets without choosing, in the terms of the method's grid: this package's
    parameter defaults for its methods; for mergekit's, the values of the shipped recipe
    (recipes/zoo/<method>.yml), which mergekit requires a user to set."""
    from mergekit_esm.methods import METHODS as OURS

    if method in OURS:
        fields = OURS[method].settings_type.model_fields
        return {key: fields[key].default for key in GRIDS[method][0]}
    recipe = yaml.safe_load(recipe_file(method).read_text())["parameters"]
    return {key: recipe[key] for key in GRIDS[method][0] if key in recipe}


def full_setting(method: str, setting: dict) -> dict:
    """`setting` with every parameter it leaves to this package's defaults filled in (mergekit's
    own methods take theirs from the recipe, which `setting` already is)."""
    from mergekit_esm.methods import METHODS as OURS

    if method not in OURS:
        return dict(setting)
    return {key: field.default for key, field in OURS[method].settings_type.model_fields.items()} | setting


# Fixes that changed what a setting merges without changing the setting: (name, method, the
# partial settings it touched). A stored merge records the fixes that applied to it when it was
# made (`fixes_applying`); one that lacks a fix that applies today is merged again, as one
# whose settings changed is.
FIXES = (
    # commit 4b35d65: TSV-M's combination writes each expert's factors in singular form first
    ("singular form", "esm", ({"whiten_factors": False}, {"basis": "svd"})),
)


def fixes_applying(method: str, setting: dict) -> list[str]:
    """The FIXES that touch a merge by `method` at the full `setting`, by name."""
    return [name for name, fixed, touched in FIXES
            if fixed == method and any(all(setting.get(k) == v for k, v in part.items()) for part in touched)]


def acting(setting: dict) -> dict:
    """The part of a full setting that acts on the merge: `alpha: auto`'s own options do
    nothing at a numeric α, so a merge recorded before one of them existed is still today's."""
    if setting.get("alpha") == "auto":
        return setting
    return {key: value for key, value in setting.items() if not key.startswith("auto_alpha_")}


def sweep_settings(method: str) -> dict[str, dict]:
    """label → setting: the method's grid, plus its default where the grid lacks it."""
    settings = {_label(s): s for s in GRIDS[method]}
    default = default_setting(method)
    settings.setdefault(_label(default), default)
    return settings


def strength_key(method: str) -> str:
    """The parameter that sets a method's strength: α for this package's methods, the task
    vectors' weight for mergekit's."""
    return "alpha" if "alpha" in default_setting(method) else "weight"


def strength_label(key: str, value: float) -> str:
    """The subset protocol's key for a merge at one strength: "alpha 2", "weight 0.7"."""
    return f"{key} {value:g}"


def strength_settings(method: str, values: tuple[float, ...]) -> dict[str, dict]:
    """label ("alpha 2") → the method's default with its strength at each value other than the
    default's: the points of its tasks-vs-retention curve in the subset protocol."""
    default, key = default_setting(method), strength_key(method)
    return {strength_label(key, v): {**default, key: v} for v in values if v != default[key]}


def subsets(n_experts: int, size: int, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct subsets of `size` experts out of n (all of them when there are fewer),
    drawn with a seed that depends only on (n, size, seed): the same draw on every machine.

    The first `count` of one seeded permutation, so a larger count keeps every subset of a
    smaller one and a protocol run extended with more subsets reuses the merges already scored
    (random.sample(every, count) draws a different sequence once the count passes 5 where there
    are more than 21 subsets to choose from)."""
    every = list(itertools.combinations(range(n_experts), size))
    if count >= len(every):
        return every
    return sorted(random.Random(f"subsets-{n_experts}-{size}-{seed}").sample(every, len(every))[:count])


def subsets_per_size(n_experts: int, per_size: int) -> dict[int, list[tuple[int, ...]]]:
    """T → subsets for T = 2 … n: `per_size` each where the zoo allows, one at T = n."""
    return {size: subsets(n_experts, size, per_size) for size in range(2, n_experts + 1)}


class ZooScores:
    """One zoo's cached scores: what the report reads, without the models."""

    def __init__(self, name: str, results: Results):
        self.name, self.results = name, results
        self.tasks = list(results.get(name, "expert") or {})

    def expert_scores(self, split: str) -> dict[str, float]:
        return {t: self.results.get(self.name, "expert", t, split)["tasks"][t] for t in self.tasks}

    def chosen(self, method: str) -> dict | None:
        """The method's setting with the best mean normalized validation accuracy in the sweep."""
        experts = self.expert_scores("validation")
        rows = {label: self.results.get(self.name, "sweep", method, label) for label in sweep_settings(method)}
        rows = {k: v for k, v in rows.items() if v is not None}
        if not rows:
            return None
        return sweep_settings(method)[max(rows, key=lambda k: normalized(rows[k]["tasks"], experts))]


class ZooRun(ZooScores):
    """One zoo: its models, its lm-eval tasks (with the quiz) and the protocol's cached scores."""

    def __init__(self, name: str, workdir: Path, results: Results):
        from transformers import AutoTokenizer

        from eval.zoo.build import build_community_zoo, build_zoo

        super().__init__(name, results)
        self.workdir = workdir
        models = build_zoo(workdir) if name == "synthetic" else build_community_zoo(workdir)
        self.base, self.experts, self.data = models["base"], models["experts"], models["data"]
        self.tasks = list(self.experts)
        scorer = "exact_match" if name == "synthetic" else "answer_in_reply"
        tasks_dir = workdir / "robustness" / "tasks"
        write_quiz_task(tasks_dir, AutoTokenizer.from_pretrained(self.base))
        self.include = write_task_configs(models["data"], tasks_dir, scorer=scorer)

    def evaluate(self, key: tuple, model: Path, tasks: list[str], split: str, fresh: bool = False) -> dict:
        """Accuracy per task, quiz and held-out NLL on the split, cached under key (fresh: score
        again whatever is cached, for a merge that was just redone)."""
        cached = None if fresh else self.results.get(self.name, *key)
        if cached is None:
            suffix = "" if split == "test" else "_val"
            names = [t + suffix for t in tasks] + [QUIZ_TASK + suffix]
            raw = {n.removesuffix("_val"): v for n, v in score(model, names, self.include).items()}
            cached = {"tasks": {t: raw[t] for t in tasks}, "quiz": raw[QUIZ_TASK], "nll": heldout_nll(model)}
            self.results.put(cached, self.name, *key)
        return cached

    def references(self, splits: tuple[str, ...] = ("validation", "test")) -> None:
        for split in splits:
            self.evaluate(("base", split), self.base, self.tasks, split)
            for task, path in self.experts.items():
                self.evaluate(("expert", task, split), path, [task], split)

    def merged(self, key: tuple, method: str, setting: dict, members: list[str], split: str,
               empty_cache: bool = False) -> dict:
        """Merge the members with the method (unless cached), score, delete the merge.
        empty_cache: merge without the cached merged updates of earlier settings, so that the
        recorded time and peak memory are the whole merge's."""
        cached = self.results.get(self.name, *key)
        # a "default" key outlives a change of the defaults: the full settings it was merged
        # with are kept, and a merge whose settings differ from today's is redone, as is one
        # made before a fix that applies to it
        recorded = full_setting(method, setting)
        fixes = fixes_applying(method, recorded)
        if (cached is not None and acting(cached.get("setting", recorded)) == acting(recorded)
                and cached.get("fixes", []) == fixes):
            return cached
        per_model = None
        if setting.get("proxy") == IN_TASK:
            from eval.compare_proxies import in_task_proxies

            proxies = in_task_proxies(self.data, members, self.workdir / "robustness" / "proxies")
            per_model, setting = [proxies[m] for m in members], {k: v for k, v in setting.items() if k != "proxy"}
        if empty_cache:
            cache = esm_cache_dir(self.workdir, [*members, "empty"])
            shutil.rmtree(cache, ignore_errors=True)
        else:
            cache = esm_cache(self.workdir, members)
        run = merge(method, setting, self.base, [self.experts[m] for m in members],
                    self.workdir / "robustness", per_model, cache=cache)
        path = run["path"]
        scores = {**self.evaluate(key, path, members, split, fresh=True), "merge_s": round(run["wall_s"], 1), "setting": recorded,
                  **({"fixes": fixes} if fixes else {}), **({"peak_anon_mib": run["peak_anon_mib"]} if "peak_anon_mib" in run else {})}
        if setting.get("alpha") == "auto":  # the α it chose, from the model card
            card = (path / "README.md").read_text()
            line = next(l for l in card.splitlines() if l.startswith("| α chosen by alpha: auto |"))
            scores["alpha"] = float(line.split("|")[2].split()[0])
        self.results.put(scores, self.name, *key)
        shutil.rmtree(path)
        if empty_cache:
            shutil.rmtree(cache, ignore_errors=True)
        return scores

    def sweep(self, methods: list[str], default_only: frozenset[str] = frozenset(),
              extra_alphas: tuple[float, ...] = ()) -> None:
        """Each method over its grid (only its default for those in default_only), and for
        methods with an α the extra α values (where a curve has not turned at the grid's end)."""
        members = self.tasks  # the merged updates stay cached for the ablation, which removes them
        for method in methods:
            settings = sweep_settings(method)
            if method in default_only:
                settings = {_label(default_setting(method)): default_setting(method)}
            elif "alpha" in default_setting(method):
                settings |= {_label({"alpha": a}): {"alpha": a} for a in extra_alphas}
            for label, setting in settings.items():
                self.merged(("sweep", method, label), method, setting, members, "validation")

    def ablation(self, names: list[str], alphas: tuple[float | str, ...] = ABLATION_ALPHAS) -> None:
        """Each ESM variant in `names` over `alphas`, all experts, validation (ESM itself is
        swept in `sweep`)."""
        members = self.tasks
        for name in names:
            row = ABLATIONS[name]
            for alpha in alphas:
                setting = {**row, "alpha": alpha}
                self.merged(("sweep", name, _label(setting)), "esm", setting, members, "validation")
        shutil.rmtree(esm_cache_dir(self.workdir, members), ignore_errors=True)

    def auto(self, methods: list[str]) -> None:
        """`alpha: auto` for each of this package's methods, all experts, validation."""
        from mergekit_esm.methods import METHODS as OURS

        for method in (m for m in methods if m in OURS):
            self.merged(("auto", method), method, {"alpha": "auto"}, self.tasks, "validation")

    def chosen_on_test(self, methods: list[str]) -> None:
        """Each method at its setting chosen on validation (needs its sweep), all experts,
        test splits, timed from an empty cache."""
        for method in methods:
            setting = self.chosen(method)
            if setting is None:
                print(f"{self.name}: no validation sweep of {method} yet (--stages sweep); skipped")
                continue
            self.merged(("chosen", method, _label(setting)), method, setting, self.tasks, "test", empty_cache=True)

    def protocol(self, methods: list[str], per_size: int, with_chosen: bool, sizes: set[int] | None = None,
                 with_auto: bool = False, only: set[str] | None = None, in_task_proxy: bool = False,
                 ablations: dict[str, dict] | None = None, strengths: dict[str, tuple[float, ...]] | None = None) -> None:
        """Seeded subsets of every size T (only those in `sizes` if given; of those only the
        ones named in `only`, members joined by "+", if given), each merged with every method
        at its default (and its chosen setting, and `alpha: auto` for this package's methods
        if with_auto, and their default on each expert's own training examples as the proxy
        if in_task_proxy), test splits. `ablations` (label → ESM settings): ESM is also merged
        at each, and on the in-task proxy too if in_task_proxy. `strengths` (method → values):
        each of those methods also at each strength, its other settings at their defaults (its
        tasks-vs-retention curve at this T)."""
        from mergekit_esm.methods import METHODS as OURS

        drawn = {size: draws for size, draws in subsets_per_size(len(self.tasks), per_size).items()
                 if sizes is None or size in sizes}
        names = {"+".join(self.tasks[i] for i in draw) for draws in drawn.values() for draw in draws}
        if only is not None:  # names of another zoo's experts are that zoo's to check
            only = {n for n in only if set(n.split("+")) <= set(self.tasks)}
            if not only <= names:
                raise SystemExit(f"{self.name}: --draws names subsets not drawn at these T: {sorted(only - names)}; "
                                 f"drawn: {sorted(names)}")
        for size, draws in drawn.items():
            for draw in draws:
                members = [self.tasks[i] for i in draw]
                if only is not None and "+".join(members) not in only:
                    continue
                for method in methods:
                    settings = {DEFAULT: default_setting(method)}
                    chosen = self.chosen(method) if with_chosen else None
                    if chosen is not None and chosen != settings[DEFAULT]:
                        settings["chosen"] = chosen
                    if with_auto and method in OURS:
                        settings["auto"] = {"alpha": "auto"}
                    settings.update(strength_settings(method, (strengths or {}).get(method, ())))
                    rows = (ablations or {}) if method == "esm" else {}
                    settings.update(rows)
                    if in_task_proxy and method in OURS and "proxy" in OURS[method].settings_type.model_fields:
                        calibrated = {DEFAULT: settings[DEFAULT], **rows}
                        settings.update({(IN_TASK_PROXY if which == DEFAULT else f"{which}, {IN_TASK_PROXY}"):
                                         {**setting, "proxy": IN_TASK} for which, setting in calibrated.items()})
                    for which, setting in settings.items():
                        key = ("subsets", str(size), "+".join(members), method, which)
                        self.merged(key, method, setting, members, "test")
                shutil.rmtree(esm_cache_dir(self.workdir, members), ignore_errors=True)


def summarize(run: ZooScores, methods: list[str]) -> tuple[str, dict]:
    """Markdown tables for one zoo, and the per-T means used by the plot."""
    lines = [f"## Zoo: {run.name} ({len(run.tasks)} experts: {', '.join(run.tasks)})", ""]
    base = run.results.get(run.name, "base", "test")
    if base is None:  # only validation was scored (no subset protocol yet)
        return "\n".join(lines + sweep_table(run)), {}
    experts = run.expert_scores("test")
    chosen = run.results.get(run.name, "chosen") or {}
    lines.append(
        f"Base (test): quiz {100 * base['quiz']:.1f}%, held-out NLL {base['nll']:.3f}. Experts on their own "
        "task: " + ", ".join(f"{t} {100 * experts[t]:.1f}%" for t in run.tasks) + ". Experts' retention: "
        + ", ".join(f"{t} quiz {100 * run.results.get(run.name, 'expert', t, 'test')['quiz']:.0f}% / NLL "
                    f"{run.results.get(run.name, 'expert', t, 'test')['nll']:.2f}" for t in run.tasks) + "."
    )
    if chosen:
        lines += ["", f"### Setting chosen on validation, all {len(run.tasks)} experts, test splits", "",
                  "Each merged into an empty cache in one run: wall time and peak anonymous memory of the "
                  "whole mergekit-yaml run, calibration included.", "",
                  "| method | setting | norm. acc | quiz | NLL | merge s | peak MiB | "
                  + " | ".join(run.tasks) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(run.tasks)]
        for method, rows in chosen.items():
            for label, r in rows.items():
                lines.append(f"| {method} | {label} | {100 * normalized(r['tasks'], experts):.1f} | {100 * r['quiz']:.1f} | "
                             f"{r['nll']:.3f} | {r['merge_s']} | {r.get('peak_anon_mib', '')} | "
                             + " | ".join(f"{100 * r['tasks'][t]:.1f}" for t in run.tasks) + " |")
    lines += ["", "### Subset protocol (test splits)", "",
              "norm. acc = mean over the subset's tasks of merged / own expert accuracy; beats TA = share of "
              f"subsets where norm. acc exceeds task arithmetic's default; retained = share with quiz ≥ base − "
              f"{100 * QUIZ_MARGIN:.0f} points and NLL ≤ base + {NLL_MARGIN} nats.", "",
              "| T | subsets | method | setting | norm. acc | quiz | NLL | beats TA | retained |", "|---|---|---|---|---|---|---|---|---|"]
    by_size = run.results.get(run.name, "subsets") or {}
    curves = {}
    for size in sorted(by_size, key=int):
        draws = by_size[size]
        for method in methods:
            for which in SUBSET_SETTINGS:
                rows = [(d, draws[d][method][which]) for d in draws if which in draws[d].get(method, {})]
                if not rows:
                    continue
                accs = [normalized(r["tasks"], {t: experts[t] for t in r["tasks"]}) for _, r in rows]
                ta = [draws[d].get("task_arithmetic", {}).get(DEFAULT) for d, _ in rows]
                beats = [a > normalized(t["tasks"], {k: experts[k] for k in t["tasks"]}) for a, t in zip(accs, ta) if t]
                kept = [r["quiz"] >= base["quiz"] - QUIZ_MARGIN and r["nll"] <= base["nll"] + NLL_MARGIN for _, r in rows]
                quiz = sum(r["quiz"] for _, r in rows) / len(rows)
                nll = sum(r["nll"] for _, r in rows) / len(rows)
                acc = sum(accs) / len(accs)
                curves.setdefault((method, which), []).append((int(size), acc, quiz, nll))
                beat = f"{sum(beats)}/{len(beats)}" if beats and method != "task_arithmetic" else "–"
                lines.append(f"| {size} | {len(rows)} | {method} | {which} | {100 * acc:.1f} | {100 * quiz:.1f} | "
                             f"{nll:.3f} | {beat} | {sum(kept)}/{len(kept)} |")
    return "\n".join(lines + strength_table(run, methods) + sweep_table(run)), curves


def strength_curves(run: ZooScores, methods: list[str]) -> dict[int, dict[str, tuple[int, list[tuple]]]]:
    """T → method → (subsets, [(strength, norm. acc, quiz, NLL, is default)]): each method's
    tasks-vs-retention curve at T from the subset protocol's strength settings (--subset-strengths).
    Every point of every curve at one T is the mean over the same subsets: those of that T where
    some method was merged at a strength other than its default. A method takes part where it
    has its default and at least one other strength in all of them."""
    test = run.expert_scores("test")
    keys = {method: strength_key(method) for method in methods}
    prefixes = {method: key + " " for method, key in keys.items()}
    curves = {}
    for size, draws in (run.results.get(run.name, "subsets") or {}).items():
        swept = [d for d in draws if any(which.startswith(prefixes[m]) for m in methods for which in draws[d].get(m, {}))]
        for method in methods if swept else ():
            labels = [w for w in draws[swept[0]].get(method, {}) if w == DEFAULT or w.startswith(prefixes[method])]
            labels = [w for w in labels if all(w in draws[d].get(method, {}) for d in swept)]
            if DEFAULT not in labels or len(labels) < 2:
                continue
            points, default = [], default_setting(method)[keys[method]]
            for which in labels:
                rows = [draws[d][method][which] for d in swept]
                value = default if which == DEFAULT else float(which.removeprefix(prefixes[method]))
                points.append((value, sum(normalized(r["tasks"], {t: test[t] for t in r["tasks"]}) for r in rows) / len(rows),
                               sum(r["quiz"] for r in rows) / len(rows), sum(r["nll"] for r in rows) / len(rows), which == DEFAULT))
            curves.setdefault(int(size), {})[method] = (len(swept), sorted(points))
    return curves


def tasks_at_nll(points: list[tuple], nll: float) -> float | None:
    """The experts' tasks a strength curve (strength_curves' points, in strength order) keeps
    at held-out NLL `nll`, interpolated linearly between the two strengths whose NLL brackets
    it (the first such pair); None outside the curve's range.

    The quiz moves in steps of one question of 40 (2.5 points, 1.25 over two subsets), so
    strict dominance between two curves' points seldom shows; NLL is continuous and the
    retention measure each curve can be read at."""
    for (_, acc0, _, nll0, _), (_, acc1, _, nll1, _) in zip(points, points[1:]):
        if min(nll0, nll1) <= nll <= max(nll0, nll1):
            return acc0 if nll1 == nll0 else acc0 + (acc1 - acc0) * (nll - nll0) / (nll1 - nll0)
    return None


def strength_table(run: ZooScores, methods: list[str]) -> list[str]:
    """strength_curves as a table, each point with the other methods' points at its T that
    dominate it, and what each other method's curve keeps of the tasks at its NLL."""
    curves = strength_curves(run, methods)
    if not curves:
        return []
    lines = ["", "### Strength curves per T (test splits)", "",
             "Each point: the mean over the same subsets of that T (the subsets column) of the method at that "
             "strength, its other settings at their defaults. dominated by: another method's point at the same T "
             "that keeps at least as much on all three measures and more on one. others at this NLL: each other "
             "method's curve read at this point's NLL (tasks, linear between its two strengths that bracket it; "
             "blank outside its range).", "",
             "| T | subsets | method | strength | norm. acc | quiz | NLL | dominated by | others at this NLL |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = {method: strength_key(method) for method in methods}
    for size in sorted(curves):
        points = {(m, strength_label(keys[m], p[0])): p[1:4] for m, (_, ps) in curves[size].items() for p in ps}
        for method, (count, ps) in curves[size].items():
            for value, acc, quiz, nll, is_default in ps:
                by = dominating((acc, quiz, nll), {k: v for k, v in points.items() if k[0] != method})
                read = {other: tasks_at_nll(curve, nll) for other, (_, curve) in curves[size].items() if other != method}
                at_nll = ", ".join(f"{other} {100 * a:.1f}" for other, a in read.items() if a is not None)
                lines.append(f"| {size} | {count} | {method} | {strength_label(keys[method], value)}{' (default)' if is_default else ''} | "
                             f"{100 * acc:.1f} | {100 * quiz:.1f} | {nll:.3f} | {', '.join(by)} | {at_nll} |")
    return lines


def plot_strength_curves(run: ZooScores, methods: list[str], path: Path) -> None:
    """One column per T with strength curves: experts' tasks against the quiz (top) and the
    held-out NLL (bottom), ★ at each method's default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = strength_curves(run, methods)
    if not curves:
        return
    base = run.results.get(run.name, "base", "test")
    fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 8), squeeze=False)
    for column, size in zip(axes.T, sorted(curves)):
        for ax in column:
            ax.set_prop_cycle(color=OTHER_COLORS)
        for method, (count, points) in curves[size].items():
            for ax, i, scale in ((column[0], 2, 100), (column[1], 3, 1)):
                color = "tab:red" if method == "esm" else None
                line, = ax.plot([100 * p[1] for p in points], [scale * p[i] for p in points], "o-", label=method, color=color)
                for p in points:
                    if p[4]:
                        ax.plot(100 * p[1], scale * p[i], "*", markersize=14, color=line.get_color())
        column[0].axhline(100 * base["quiz"], color="grey", linestyle="--", label="base")
        column[1].axhline(base["nll"], color="grey", linestyle="--", label="base")
        column[0].set_title(f"T = {size} (mean of {count} subset{'s' if count > 1 else ''})", fontsize=9)
        column[0].set_ylabel("quiz (%): higher keeps more")
        column[1].set_ylabel("held-out NLL: lower keeps more")
        for ax in column:
            ax.set_xlabel("subset's tasks, mean normalized accuracy (%)")
        column[0].legend(fontsize=7)
    fig.suptitle(f"{run.name} zoo, test splits: strength curves per T (★ = default)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(run: ZooScores) -> list[str]:
    """The strength sweeps, ESM's ablation rows and alpha: auto, all experts, validation."""
    sweep = run.results.get(run.name, "sweep") or {}
    if not sweep:
        return []
    val_base = run.results.get(run.name, "base", "validation")
    val_experts = run.expert_scores("validation")
    lines = ["", f"### Strength sweep, all {len(run.tasks)} experts merged (validation splits)", "",
             f"Base (validation): quiz {100 * val_base['quiz']:.1f}%, NLL {val_base['nll']:.3f}. Experts (validation), "
             "own task / quiz / NLL: " + ", ".join(
                 f"{t} {100 * val_experts[t]:.1f}% / {100 * run.results.get(run.name, 'expert', t, 'validation')['quiz']:.1f}% / "
                 f"{run.results.get(run.name, 'expert', t, 'validation')['nll']:.2f}" for t in run.tasks) + ".", "",
             "dominated by: a setting of another method (or ablation row) that keeps at least as much on all "
             "three measures and more on one.", "",
             "| method | setting | norm. acc | quiz | NLL | merge s | dominated by |", "|---|---|---|---|---|---|---|"]
    auto = {method: {f"alpha: auto (chose {r['alpha']:.3g})": r} for method, r in (run.results.get(run.name, "auto") or {}).items()}
    points = {(method, label): (normalized(r["tasks"], val_experts), r["quiz"], r["nll"])
              for source in (sweep, auto) for method, rows in source.items() for label, r in rows.items()}
    for source in (sweep, auto):
        for method, rows in source.items():
            for label, r in rows.items():
                acc, quiz, nll = points[method, label]
                others = {key: point for key, point in points.items() if key[0] != method}
                by = dominating((acc, quiz, nll), others)
                shown = label + (" (default)" if method in GRIDS and label == _label(default_setting(method)) else "")
                lines.append(f"| {method} | {shown} | {100 * acc:.1f} | {100 * quiz:.1f} | {nll:.3f} | "
                             f"{r.get('merge_s', '')} | {', '.join(by[:3]) + (' …' if len(by) > 3 else '')} |")
    return lines


def dominating(point: tuple[float, float, float], others: dict[tuple[str, str], tuple[float, float, float]]) -> list[str]:
    """'method label' of every point in `others` that dominates `point` = (tasks, quiz, NLL):
    at least as good on all three (higher tasks and quiz, lower NLL) and better on one."""
    acc, quiz, nll = point
    return [f"{m} {label}" for (m, label), (a, q, n) in others.items()
            if a >= acc and q >= quiz and n <= nll and (a, q, -n) != (acc, quiz, -nll)]


# ESM is drawn in red; every other curve takes the next of the other tab10 colours
OTHER_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                "tab:olive", "tab:cyan"]


def plot_by_size(curves_by_zoo: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = [z for z in curves_by_zoo if curves_by_zoo[z]]
    if not zoos:
        return
    fig, axes = plt.subplots(len(zoos), 3, figsize=(14, 3.8 * len(zoos)), squeeze=False)
    for ax in axes.flat:
        ax.set_prop_cycle(color=OTHER_COLORS)
    for row, zoo in zip(axes, zoos):
        for (method, which), points in sorted(curves_by_zoo[zoo].items()):
            points.sort()
            style = "-" if which == DEFAULT else ":"
            for ax, i, scale in zip(row, (1, 2, 3), (100, 100, 1)):
                ax.plot([p[0] for p in points], [scale * p[i] for p in points], style, marker="o",
                        label=f"{method} ({which})", color="tab:red" if method == "esm" else None)
        for ax, title in zip(row, ("norm. accuracy on the subset's tasks (%)", "quiz (%)", "held-out NLL (nats)")):
            ax.set_title(f"{zoo}: {title}", fontsize=9)
            ax.set_xlabel("T (experts merged)")
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(run: ZooScores, curves: list[str], path: Path, title: str) -> None:
    """Experts' tasks against quiz and against held-out NLL, one line per swept curve (★ default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = run.results.get(run.name, "sweep") or {}
    if not any(sweep.get(c) for c in curves):
        return
    experts = run.expert_scores("validation")
    base = run.results.get(run.name, "base", "validation")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax in axes:
        ax.set_prop_cycle(color=OTHER_COLORS)
    for curve in curves:
        rows = sweep.get(curve) or {}
        points = sorted((normalized(r["tasks"], experts), r["quiz"], r["nll"], label) for label, r in rows.items())
        if not points:
            continue
        default = _label(default_setting(curve)) if curve in GRIDS else None
        color = "tab:red" if curve == "esm" else None
        for ax, i, scale in ((axes[0], 1, 100), (axes[1], 2, 1)):
            line, = ax.plot([100 * p[0] for p in points], [scale * p[i] for p in points], "o-", label=curve, color=color)
            for p in points:
                if p[3] == default:
                    ax.plot(100 * p[0], scale * p[i], "*", markersize=14, color=line.get_color())
    for method, r in (run.results.get(run.name, "auto") or {}).items():
        if method in curves:
            x = 100 * normalized(r["tasks"], experts)
            axes[0].plot(x, 100 * r["quiz"], "D", markersize=9, markerfacecolor="none", label=f"{method}, alpha: auto")
            axes[1].plot(x, r["nll"], "D", markersize=9, markerfacecolor="none", label=f"{method}, alpha: auto")
    axes[0].axhline(100 * base["quiz"], color="grey", linestyle="--", label="base")
    axes[1].axhline(base["nll"], color="grey", linestyle="--", label="base")
    axes[0].set_ylabel("quiz (%): higher keeps more")
    axes[1].set_ylabel("held-out NLL: lower keeps more")
    for ax in axes:
        ax.set_xlabel("experts' tasks, mean normalized accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name} zoo, all {len(run.tasks)} experts, validation: {title} (★ = default)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Results, methods: list[str] = METHODS) -> Path:
    """Tables and plots of every zoo with scores in `results` (not only this run's), for
    `methods` (every method's merges, whichever this run merged)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = [ZooScores(name, results) for name in ("community", "synthetic") if results.get(name, "expert")]
    sections, curves = [], {}
    for run in runs:
        text, curves[run.name] = summarize(run, methods)
        sections.append(text)
        plot_pareto(run, methods, RESULTS / f"pareto_{run.name}.png", "strength sweeps")
        plot_pareto(run, ["esm", *ABLATIONS, "tsv"], RESULTS / f"pareto_{run.name}_esm_ablation.png",
                    "ESM with one part off at a time, over α")
        plot_strength_curves(run, methods, RESULTS / f"pareto_{run.name}_by_T.png")
    plot_by_size(curves, RESULTS / "robustness_by_T.png")
    out = RESULTS / "robustness.md"
    out.write_text("# Robustness protocol (`make robustness`)\n\n" + "\n\n".join(sections) + "\n")
    (RESULTS / "robustness.json").write_text(json.dumps({r.name: results.get(r.name) for r in runs}, indent=1))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--zoos", default="community,synthetic")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--stages", default="sweep,ablation,auto,chosen,subsets",
                        help="comma-separated: sweep, ablation, auto, chosen, subsets, report")
    parser.add_argument("--subsets", type=int, default=5, help="subsets per T (fewer where the zoo has fewer)")
    parser.add_argument("--sizes", default="", help="comma-separated T values for the subset stage (default: 2 … N)")
    parser.add_argument("--draws", default="", help="comma-separated subsets, members joined by '+' (e.g. "
                        "zoo_date+zoo_swap): the subset stage merges only these of the seeded draws")
    parser.add_argument("--with-auto", action="store_true", help="the subset stage also merges this package's "
                        "methods at alpha: auto (several merges' time per subset)")
    parser.add_argument("--with-in-task-proxy", action="store_true", help="the subset stage also merges this "
                        "package's calibrated methods at their default on each expert's own training examples "
                        "as its proxy (what a user with task data can do)")
    parser.add_argument("--ablation-alphas", default=",".join(map(str, ABLATION_ALPHAS)),
                        help="comma-separated α values each ablation row is merged at ('auto': alpha: auto)")
    parser.add_argument("--with-ablations", default="", help="comma-separated ESM ablation rows the subset "
                        "stage also merges, each at --ablation-alphas (and on the in-task proxy too with "
                        "--with-in-task-proxy)")
    parser.add_argument("--subset-strengths", default="", help="the subset stage also merges these methods at "
                        "these strengths (α, or mergekit's weight), for their curves at each T: "
                        "'esm=2,4;tsv=0.3,0.6,1.7'")
    parser.add_argument("--extra-alphas", default="", help="comma-separated α values swept beyond the grid "
                        "(methods with an α)")
    parser.add_argument("--default-only", default="", help="comma-separated methods swept at their default only")
    rows = {name.removeprefix("esm, "): name for name in ABLATIONS}
    parser.add_argument("--ablations", default=",".join(rows), help=f"comma-separated ESM ablation rows, of: {', '.join(rows)}")
    args = parser.parse_args()
    try:
        ablation_alphas = tuple(a if a == "auto" else float(a) for a in args.ablation_alphas.split(","))
    except ValueError:
        parser.error(f"--ablation-alphas {args.ablation_alphas!r}: expected numbers or 'auto', e.g. '1,2,auto'")
    with_ablations = list(filter(None, args.with_ablations.split(",")))
    unknown = set(args.ablations.split(",") + with_ablations) - set(rows)
    if unknown:
        parser.error(f"unknown ablation rows {sorted(unknown)}; choose from {list(rows)}")
    try:
        strengths = {m.strip(): tuple(float(v) for v in values.split(","))
                     for m, values in (part.split("=") for part in filter(None, args.subset_strengths.split(";")))}
    except ValueError:
        parser.error(f"--subset-strengths {args.subset_strengths!r}: expected 'method=v1,v2;method=v3', e.g. 'esm=2,4;tsv=0.3,1.7'")
    methods = args.methods.split(",")
    if set(strengths) - set(methods):
        parser.error(f"--subset-strengths names methods not in --methods: {sorted(set(strengths) - set(methods))}")
    subset_ablations = {f"{r}, α {a if a == 'auto' else format(a, 'g')}": {**ABLATIONS[rows[r]], "alpha": a}
                        for r in with_ablations for a in ablation_alphas}
    results = Results(args.workdir / "robustness" / "results.json")
    runs = [ZooRun(name, args.workdir, results) for name in args.zoos.split(",")]
    stages = args.stages.split(",")
    only = set(args.draws.split(",")) if args.draws else None
    stray = [n for n in only or () if not any(set(n.split("+")) <= set(r.tasks) for r in runs)]
    if stray:
        zoos = "; ".join(r.name + ": " + ", ".join(r.tasks) for r in runs)
        parser.error(f"--draws {stray}: not a subset of one zoo's experts ({zoos})")
    for run in runs:
        run.references(("validation", "test") if {"subsets", "chosen"} & set(stages) else ("validation",))
        if "sweep" in stages:
            run.sweep(methods, frozenset(filter(None, args.default_only.split(","))),
                      tuple(float(a) for a in filter(None, args.extra_alphas.split(","))))
            report(results)
        if "ablation" in stages:
            run.ablation([rows[r] for r in args.ablations.split(",")], ablation_alphas)
            report(results)
        if "auto" in stages:
            run.auto(methods)
            report(results)
        if "chosen" in stages:
            run.chosen_on_test(methods)
            report(results)
        if "subsets" in stages:
            sizes = {int(t) for t in args.sizes.split(",")} if args.sizes else None
            run.protocol(methods, args.subsets, with_chosen="sweep" in stages, sizes=sizes, with_auto=args.with_auto,
                         only=only, in_task_proxy=args.with_in_task_proxy, ablations=subset_ablations,
                         strengths=strengths)
    print(report(results).read_text())


if __name__ == "__main__":
    main()
