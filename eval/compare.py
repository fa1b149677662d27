"""Main job: the expert zoo merged with ESM, the SVD-family methods, RegMean / RegMean++ and
mergekit's built-in methods, scored; plus the paper's ESM ablation.

    python -m eval.compare [--workdir eval/workdir] [--methods esm,ties] [--no-ablation]

Stages (each cached under the workdir, so a rerun resumes): build the zoo (base from GGUF +
one fine-tuned expert per task) → for every method (and every ablation row), merge with each
setting of its grid through `mergekit-yaml` (recipes in recipes/zoo/ and recipes/ablation/)
and score the validation split → keep the setting with the best mean normalized validation
accuracy → score it once on the test split → results.md (both tables) and results.png
(chart) in the workdir.
"""

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from eval.report import bar_chart, markdown_table, normalized
from eval.retention import retention, write_quiz_task
from eval.score import score, write_task_configs
from eval.zoo.build import build_zoo
from eval.zoo.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]

# The same search budget for every method with a strength knob (5 settings): its scale and,
# where it has one, its sparsity. Methods without knobs get their one setting. TSV-M and
# Iso-C/CTS had no measured LLM scale, so their α grid spans 10× around their papers'
# default 1; on the zoo it left Iso-C/CTS at its top edge (README). ESM's grid spans 6×
# around its first measurements.
ESM_ALPHAS = [{"alpha": a} for a in (0.5, 1.0, 1.5, 2.0, 3.0)]
SVD_FAMILY_ALPHAS = [{"alpha": a} for a in (0.3, 0.6, 1.0, 1.7, 3.0)]
# RegMean's update is a weighted mean of the task vectors (about 1/T of task arithmetic's
# sum), so α 1 may be weak on LLM experts: the grid spans α 1 (RegMean itself) to 3 at the
# method's default non_diagonal_ratio, and tries two others at α 2, out of 0.1 (RegMean's
# authors on T5), 0.5 and 0.95 (RegMean++'s on CLIP). A new ratio reruns the calibration; a
# new α only rewrites the output.
def _regmean_grid(default_ratio: float, other_ratios: tuple[float, float]) -> list[dict]:
    return [{"alpha": a, "non_diagonal_ratio": default_ratio} for a in (1.0, 2.0, 3.0)] + [
        {"alpha": 2.0, "non_diagonal_ratio": r} for r in other_ratios
    ]


GRIDS = {
    "esm": ESM_ALPHAS,
    "tsv": SVD_FAMILY_ALPHAS,
    "iso_c": SVD_FAMILY_ALPHAS,
    "iso_cts": SVD_FAMILY_ALPHAS,
    "regmean": _regmean_grid(0.5, (0.1, 0.95)),
    "regmean_plus_plus": _regmean_grid(0.95, (0.5, 0.1)),
    "task_arithmetic": [{"weight": w} for w in (0.3, 0.5, 0.7, 1.0, 1.3)],
    "ties": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "dare_ties": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "breadcrumbs": [{"weight": w, "density": d} for w, d in ((1.0, 0.8), (1.0, 0.95), (0.7, 0.9), (1.0, 0.9), (1.3, 0.9))],
    "della": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "sce": [{"select_topk": k} for k in (0.1, 0.3, 0.5, 0.7, 1.0)],
    "model_stock": [{}],
    "linear": [{}],
}

# The paper's ablation (basis × scaling), rows as in its table; each row searches α over
# ESM's grid. The last row is plain ESM, so it reuses the esm results.
ABLATION = {
    "SVD, no scaling": "svd_no_scaling",
    "SVD + scaling": "svd_all_scaling",
    "ESD, no scaling": "esd_no_scaling",
    "ESD + layer scaling": "esd_layer_scaling",
    "ESD + all scaling": "esm",
}
GRIDS.update({name: ESM_ALPHAS for name in ABLATION.values() if name not in GRIDS})


def recipe_file(name: str) -> Path:
    zoo = REPO / "recipes" / "zoo" / f"{name}.yml"
    return zoo if zoo.exists() else REPO / "recipes" / "ablation" / f"{name}.yml"


def _label(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def merge(
    method: str,
    setting: dict,
    base: Path,
    experts: list[Path],
    workdir: Path,
    model_parameters: list[dict] | None = None,
    cache: Path | None = None,
) -> dict:
    """Merge through the real mergekit-yaml from the method's recipe; cached by recipe.
    Returns {path, wall_s, peak_rss_mib, peak_anon_mib}: wall_s 0 and no peaks when cached.

    model_parameters: each expert's per-model parameters (e.g. its own proxy), in order.
    cache: ESM's cache folder (default: the workdir's; an empty one times calibration too)."""
    from eval.bench_scale import MEASURE, reported_peaks

    config = yaml.safe_load(recipe_file(method).read_text())
    config["base_model"] = str(base.resolve())
    config["models"] = [
        {"model": str(e.resolve()), **({"parameters": model_parameters[i]} if model_parameters else {})}
        for i, e in enumerate(experts)
    ]
    config["parameters"] = {**(config.get("parameters") or {}), **setting}
    text = yaml.safe_dump(config, sort_keys=False)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = workdir / "merges" / method / key
    if (out / "config.json").exists():
        return {"path": out, "wall_s": 0.0}
    recipe = workdir / "recipes" / f"{method}-{key}.yml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(text)
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(cache or workdir / "esm-cache"), "HF_HUB_OFFLINE": "1"}
    flags = ["--cuda"] if _cuda() else []
    start = time.perf_counter()
    # mergekit-yaml's own entry point, run by bench_scale's wrapper that reports peak memory
    result = subprocess.run([sys.executable, "-c", MEASURE, str(recipe), str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{method} {setting} failed:\n{result.stderr[-3000:]}")
    return {"path": out, "wall_s": wall, **reported_peaks(result.stderr)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Results:
    """Scores kept in results.json so that an interrupted comparison resumes.

    Every write re-reads the file under a lock and adds to it, so studies that run at the
    same time (compare, compare_proxies, alpha_study) do not overwrite each other's scores.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, *keys):
        node = self.data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                return None
        return node

    def put(self, value, *keys):
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
            node = self.data
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
            scratch = self.path.with_suffix(".tmp")
            scratch.write_text(json.dumps(self.data, indent=1))
            os.replace(scratch, self.path)


class Zoo:
    """The built zoo, its task YAMLs and the cached scores (results.json) of a workdir."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.results = Results(workdir / "results.json")
        self.timings = self.results.get("timings") or {}
        start = time.perf_counter()
        self.models = build_zoo(workdir)
        self.timings.setdefault("zoo_s", round(time.perf_counter() - start, 1))
        self.include = write_task_configs(self.models["data"], workdir / "tasks")
        write_quiz_task(self.include, AutoTokenizer.from_pretrained(self.models["base"]))
        self.tasks = list(TASKS)
        t = time.perf_counter()
        experts = self.models["experts"]
        self.expert_val = {x: self.scored("val", f"expert:{x}", experts[x], [x])[x] for x in self.tasks}
        self.expert_test = {x: self.scored("test", f"expert:{x}", experts[x], [x])[x] for x in self.tasks}
        self.base_test = self.scored("test", "base", self.models["base"])
        self.retained("base", self.models["base"])
        self.timings.setdefault("score_base_and_experts_s", round(time.perf_counter() - t, 1))

    def scored(self, split: str, label: str, model: Path, tasks: list[str] | None = None) -> dict[str, float]:
        """Accuracy per task (default: all) on the split ("val" or "test"), cached under the label."""
        cached = self.results.get(split, label)
        if cached is None:
            tasks = tasks or self.tasks
            names = [t + "_val" for t in tasks] if split == "val" else tasks
            raw = score(model, names, self.include)
            cached = {n.removesuffix("_val"): v for n, v in raw.items()}
            self.results.put(cached, split, label)
        return cached

    def retained(self, label: str, model: Path) -> dict[str, float]:
        """What the model keeps of the base (eval/retention.py, test split), cached under the label."""
        cached = self.results.get("retention", label)
        if cached is None:
            cached = retention(model, self.include, "test")
            self.results.put(cached, "retention", label)
        return cached

    def merge(self, method: str, setting: dict, model_parameters: dict[str, dict] | None = None) -> dict:
        """All of the zoo's experts merged (model_parameters: task → that expert's parameters)."""
        experts = [self.models["experts"][t] for t in self.tasks]
        per_model = [model_parameters[t] for t in self.tasks] if model_parameters else None
        return merge(method, setting, self.models["base"], experts, self.workdir, per_model)

    def merged_val(self, method: str, setting: dict, label: str, model_parameters=None) -> dict[str, float]:
        val = self.results.get("val", label)
        if val is None:
            run = self.merge(method, setting, model_parameters)
            self.results.put(round(run["wall_s"], 1), "merge_s", label)
            val = self.scored("val", label, run["path"])
        return val

    def merged_test(self, method: str, setting: dict, label: str, model_parameters=None) -> tuple[dict[str, float], Path]:
        """Test scores of a merge (merged only when not cached) and its folder (the method's
        merges folder when the scores were cached)."""
        path = self.workdir / "merges" / method
        test = self.results.get("test", label)
        if test is None or self.results.get("retention", label) is None:
            path = self.merge(method, setting, model_parameters)["path"]
            test = self.scored("test", label, path)
            self.retained(label, path)
        return test, path


def run(workdir: Path, methods: list[str], ablation: bool) -> Path:
    zoo = Zoo(workdir)
    results, timings = zoo.results, zoo.timings
    expert_val, expert_test, base_test = zoo.expert_val, zoo.expert_test, zoo.base_test

    retained = {"base (no merge)": zoo.retained("base", zoo.models["base"])}

    def search(method: str) -> tuple[dict[str, float], str]:
        """Best setting of the method's grid on validation; its test scores and label."""
        t = time.perf_counter()
        best = None
        for setting in GRIDS[method]:
            label = f"{method}[{_label(setting)}]"
            val = zoo.merged_val(method, setting, label)
            quality = normalized(val, expert_val)
            if best is None or quality > best[0]:
                best = (quality, setting, label)
        _, setting, label = best
        test, path = zoo.merged_test(method, setting, label)
        retained[method] = results.get("retention", label)
        if path.parent.name == method:  # merged just now: keep only the chosen merge
            for other in path.parent.iterdir():
                if other != path:
                    shutil.rmtree(other)
        timings.setdefault(f"{method}_search_and_test_s", round(time.perf_counter() - t, 1))
        results.put(timings, "timings")
        return test, _label(setting)

    test_rows, settings = {"base (no merge)": base_test}, {}
    for method in methods:
        test_rows[method], settings[method] = search(method)
    report = (
        "Test accuracy (%) per task; mean normalized = mean of merged / own expert. "
        "Settings chosen on the validation split. Quiz and held-out NLL: what the merge keeps of the "
        "base (eval/retention.py; higher quiz and lower NLL keep more).\n\n"
        + markdown_table(test_rows, expert_test, settings, retention=retained)
    )
    chart = bar_chart(test_rows, expert_test, workdir / "results.png", "Zoo merges (test split): ESM vs others")
    report += f"\n\n![chart]({chart.name})\n"
    if ablation:
        rows, row_settings = {}, {}
        for title, name in ABLATION.items():
            rows[title], row_settings[title] = search(name)
        report += (
            "\n### ESM ablation (basis × scaling; α chosen on validation per row)\n\n"
            + markdown_table(rows, expert_test, row_settings, ordered=False)
            + "\n"
        )
    report += "\nTimings (s): " + json.dumps(timings) + "\n"
    (workdir / "results.md").write_text(report)
    print(report)
    return workdir / "results.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    methods = [m for m in GRIDS if m not in ABLATION.values() or m == "esm"]
    parser.add_argument("--methods", default=",".join(methods), help="comma-separated subset of: " + ", ".join(methods))
    parser.add_argument("--no-ablation", action="store_true", help="skip the ESM ablation rows")
    args = parser.parse_args()
    run(args.workdir, args.methods.split(","), ablation=not args.no_ablation)


if __name__ == "__main__":
    main()
