"""Main job: the expert zoo merged with ESM and with mergekit's built-in methods, scored.

    python -m eval.compare [--workdir eval/workdir]

Stages (each cached under the workdir, so a rerun resumes): build the zoo (base from GGUF +
one fine-tuned expert per task) → for every method, merge with each setting of its grid
through `mergekit-yaml` (recipes in recipes/zoo/) and score the validation split → keep the
setting with the best mean normalized validation accuracy → score it once on the test split
→ results.md (table) and results.png (chart) in the workdir.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from eval.report import bar_chart, markdown_table, normalized
from eval.score import score, write_task_configs
from eval.zoo.build import build_zoo
from eval.zoo.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]

# The same search budget for every method with a strength knob (5 settings): its scale and,
# where it has one, its sparsity. Methods without knobs get their one setting.
GRIDS = {
    "esm": [{"alpha": a} for a in (0.5, 1.0, 1.5, 2.0, 3.0)],
    "task_arithmetic": [{"weight": w} for w in (0.3, 0.5, 0.7, 1.0, 1.3)],
    "ties": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "dare_ties": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "breadcrumbs": [{"weight": w, "density": d} for w, d in ((1.0, 0.8), (1.0, 0.95), (0.7, 0.9), (1.0, 0.9), (1.3, 0.9))],
    "della": [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (1.0, 0.7), (0.7, 0.5), (1.0, 0.5), (1.3, 0.5))],
    "sce": [{"select_topk": k} for k in (0.1, 0.3, 0.5, 0.7, 1.0)],
    "model_stock": [{}],
    "linear": [{}],
}


def _label(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def merge(method: str, setting: dict, zoo: dict, workdir: Path) -> tuple[Path, float]:
    """Merge through the real mergekit-yaml from recipes/zoo/<method>.yml; cached by recipe."""
    config = yaml.safe_load((REPO / "recipes" / "zoo" / f"{method}.yml").read_text())
    config["base_model"] = str(zoo["base"].resolve())
    config["models"] = [{"model": str(zoo["experts"][t].resolve())} for t in TASKS]
    config["parameters"] = {**(config.get("parameters") or {}), **setting}
    text = yaml.safe_dump(config, sort_keys=False)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = workdir / "merges" / method / key
    if (out / "config.json").exists():
        return out, 0.0
    recipe = workdir / "recipes" / f"{method}-{key}.yml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(text)
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(workdir / "esm-cache"), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("mergekit-yaml")
    flags = ["--cuda"] if _cuda() else []
    start = time.perf_counter()
    result = subprocess.run([str(exe), str(recipe), str(out), *flags], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{method} {setting} failed:\n{result.stderr[-3000:]}")
    return out, time.perf_counter() - start


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Results:
    """Scores kept in results.json so that an interrupted comparison resumes."""

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
        node = self.data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def run(workdir: Path, methods: list[str]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    results = Results(workdir / "results.json")
    timings = results.get("timings") or {}
    start = time.perf_counter()
    zoo = build_zoo(workdir)
    timings.setdefault("zoo_s", round(time.perf_counter() - start, 1))
    include = write_task_configs(zoo["data"], workdir / "tasks")
    tasks = list(TASKS)
    val_tasks = [t + "_val" for t in tasks]

    def scored(split: str, label: str, model: Path, names: list[str]) -> dict[str, float]:
        cached = results.get(split, label)
        if cached is None:
            raw = score(model, names, include)
            cached = {n.removesuffix("_val"): v for n, v in raw.items()}
            results.put(cached, split, label)
        return cached

    t = time.perf_counter()
    expert_val = {t_: scored("val", f"expert:{t_}", zoo["experts"][t_], [t_ + "_val"])[t_] for t_ in tasks}
    expert_test = {t_: scored("test", f"expert:{t_}", zoo["experts"][t_], [t_])[t_] for t_ in tasks}
    base_test = scored("test", "base", zoo["base"], tasks)
    timings.setdefault("score_base_and_experts_s", round(time.perf_counter() - t, 1))

    test_rows, settings = {"base (no merge)": base_test}, {}
    for method in methods:
        t = time.perf_counter()
        best = None
        for setting in GRIDS[method]:
            label = f"{method}[{_label(setting)}]"
            val = results.get("val", label)
            if val is None:
                path, merge_s = merge(method, setting, zoo, workdir)
                results.put(round(merge_s, 1), "merge_s", label)
                val = scored("val", label, path, val_tasks)
            quality = normalized(val, expert_val)
            if best is None or quality > best[0]:
                best = (quality, setting, label)
        _, setting, label = best
        path, _ = merge(method, setting, zoo, workdir)
        test_rows[method] = scored("test", label, path, tasks)
        settings[method] = _label(setting)
        for other in (workdir / "merges" / method).iterdir():  # keep only the chosen merge
            if other != path:
                shutil.rmtree(other)
        timings.setdefault(f"{method}_search_and_test_s", round(time.perf_counter() - t, 1))
    results.put(timings, "timings")

    table = markdown_table(test_rows, expert_test, settings)
    chart = bar_chart(test_rows, expert_test, workdir / "results.png", "Zoo merges (test split): ESM vs mergekit")
    report = workdir / "results.md"
    report.write_text(
        "Test accuracy (%) per task; mean normalized = mean of merged / own expert. "
        "Settings chosen on the validation split.\n\n" + table + f"\n\n![chart]({chart.name})\n\nTimings (s): "
        + json.dumps(timings) + "\n"
    )
    print(report.read_text())
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--methods", default=",".join(GRIDS), help="comma-separated subset of: " + ", ".join(GRIDS))
    args = parser.parse_args()
    run(args.workdir, args.methods.split(","))


if __name__ == "__main__":
    main()
