"""Scoring a model folder on lm-eval tasks through lm-eval's Python API (needs the `eval` extra)."""

import os
from pathlib import Path

from mergekit_esm.errors import EsmInputError

# Exact match after stripping whitespace (the zoo's tasks); other tasks use their first metric.
PREFERRED_METRIC = "exact_match,strip"


def score(
    model: str | Path,
    tasks: list[str],
    include_path: Path | str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Each task's main metric (higher is better) for the model in `model`."""
    if include_path:  # local task YAMLs over local data: never ask the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import torch
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EsmInputError("scoring needs lm-eval: pip install 'mergekit-esm[eval]'") from None

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EsmInputError(
            f"lm-eval does not know the task(s) {', '.join(unknown)}: check the names, or pass the "
            "folder of your task YAMLs with --include-path"
        )
    result = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model), "dtype": "float32"},
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    scores = {}
    for task in tasks:
        metrics = result["results"][task]
        key = PREFERRED_METRIC if PREFERRED_METRIC in metrics else next(
            k for k in metrics if "," in k and "stderr" not in k  # "metric,filter"; not alias or name
        )
        scores[task] = float(metrics[key])
    return scores
