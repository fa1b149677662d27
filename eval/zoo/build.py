"""Build an expert zoo: base (from GGUF), task data, one fine-tuned expert per task.

    python -m eval.zoo.build --workdir eval/workdir [--zoo community]

Everything is cached under the workdir; a killed build resumes where it stopped.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from eval.zoo.base import build_base
from eval.zoo.finetune import finetune
from eval.zoo.tasks import TASKS, split_examples, write_task_data

STEPS = 120  # enough for every zoo task to reach near-perfect validation accuracy (see README)


def build_zoo(workdir: Path, steps: int = STEPS, device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    timings = {}
    t = time.perf_counter()
    base = build_base(workdir / "models" / "base")
    data = write_task_data(workdir / "data")
    timings["base_and_data_s"] = round(time.perf_counter() - t, 1)
    experts = {}
    for name, task in TASKS.items():
        t = time.perf_counter()
        experts[name] = finetune(base, split_examples(task)["train"], workdir / "models" / name, steps=steps, device=device)
        timings[f"finetune_{name}_s"] = round(time.perf_counter() - t, 1)
    return {"base": base, "experts": experts, "data": data, "timings": timings}


def build_community_zoo(workdir: Path, device: str | None = None) -> dict:
    """The second zoo (community.py): same base, six experts trained by their own recipes."""
    from transformers import AutoTokenizer

    from eval.zoo import community

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = build_base(workdir / "models" / "base")
    data = community.write_task_data(workdir / "data", AutoTokenizer.from_pretrained(base))
    experts, timings = {}, {}
    for name, recipe in community.RECIPES.items():
        t = time.perf_counter()
        rows = [json.loads(line) for line in data[name]["train"].read_text().splitlines()]
        experts[name] = finetune(
            base, rows, workdir / "models" / name, steps=recipe.steps, batch_size=recipe.batch_size,
            lr=recipe.lr, lora_rank=recipe.lora_rank, device=device,
        )
        timings[f"finetune_{name}_s"] = round(time.perf_counter() - t, 1)
    return {"base": base, "experts": experts, "data": data, "timings": timings}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("eval/workdir"))
    parser.add_argument("--steps", type=int, default=STEPS, help="first zoo: steps per expert")
    parser.add_argument("--zoo", choices=["synthetic", "community"], default="synthetic")
    args = parser.parse_args()
    zoo = build_zoo(args.workdir, args.steps) if args.zoo == "synthetic" else build_community_zoo(args.workdir)
    print(zoo["timings"])


if __name__ == "__main__":
    main()
