"""Score a model on the zoo's tasks (or any lm-eval task) through lm-eval's Python API.

    python -m eval.score eval/workdir/merges/esm --tasks zoo_date,zoo_cipher
    python -m eval.score my-merge --tasks leaderboard_ifeval,leaderboard_bbh   # needs network

Zoo tasks read local JSONL (no hub access); their task YAMLs are generated next to the data.
Each zoo task comes in two variants: `<task>` scores the test split, `<task>_val` the
validation split (used for hyper-parameter search).
"""

import argparse
import json
import shutil
from pathlib import Path

import yaml

from mergekit_esm.strength.lm_eval_score import score

__all__ = ["score", "write_task_configs"]


def write_task_configs(data: dict[str, dict[str, Path]], out: Path, scorer: str = "exact_match") -> Path:
    """One lm-eval YAML per zoo task and split; returns the folder to pass as include_path.

    scorer: exact_match (the first zoo: the stripped first line equals the target) or
    answer_in_reply (eval/answer_match.py: the target or an alias anywhere in the first line).
    """
    out.mkdir(parents=True, exist_ok=True)
    if scorer == "answer_in_reply":
        shutil.copy(Path(__file__).with_name("answer_match.py"), out / "answer_match.py")
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
            text = yaml.safe_dump(config, sort_keys=False)
            if scorer == "answer_in_reply":
                del config["filter_list"]
                config["metric_list"] = [{"metric": "answer_in_reply", "aggregation": "mean", "higher_is_better": True}]
                # a tag safe_dump cannot write: lm-eval imports the function from the YAML's folder
                text = yaml.safe_dump(config, sort_keys=False) + "process_results: !function answer_match.process_results\n"
            (out / f"{task}{suffix}.yaml").write_text(text)
    return out


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
