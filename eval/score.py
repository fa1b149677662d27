"""Score a model on the zoo's tasks (or any lm-eval task) through lm-eval's Python API.

    python -m eval.score eval/workdir/merges/esm --tasks zoo_date,zoo_cipher
    python -m eval.score my-merge --tasks leaderboard_ifeval,leaderboard_bbh   # needs network

Zoo tasks read local JSONL (no hub access); their task YAMLs are generated next to the data.
Each zoo task comes in two variants: `<task>` scores the test split, `<task>_val` the
validation split (used for hyper-parameter search).
"""

import argparse
import json
import os
from pathlib import Path

import yaml

METRIC = "exact_match,strip"


def write_task_configs(data: dict[str, dict[str, Path]], out: Path) -> Path:
    """One lm-eval YAML per zoo task and split; returns the folder to pass as include_path."""
    out.mkdir(parents=True, exist_ok=True)
    for task, splits in data.items():
        for suffix, split in (("", "test"), ("_val", "validation")):
            config = {
                "task": task + suffix,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(Path(splits[split]).resolve())}},
                "test_split": "test",
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
                "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0},
            }
            (out / f"{task}{suffix}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def score(
    model: str | Path,
    tasks: list[str],
    include_path: Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Accuracy per task (exact match after stripping whitespace for zoo tasks)."""
    if include_path:  # local JSONL only: never ask the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    result = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model), "dtype": "float32"},
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    scores = {}
    for task in tasks:
        metrics = result["results"][task]
        key = METRIC if METRIC in metrics else next(k for k in metrics if k != "alias" and "stderr" not in k)
        scores[task] = float(metrics[key])
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", type=Path, default=None, help="folder of task YAMLs (zoo: eval/workdir/tasks)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(score(args.model, args.tasks.split(","), args.include_path, args.batch_size, args.limit), indent=2))


if __name__ == "__main__":
    main()
