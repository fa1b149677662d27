"""Which calibration text serves ESM best on the zoo: generic, self-written or in-task.

    python -m eval.compare_proxies [--workdir eval/workdir] [--alphas 1,2,3]

Merges the zoo with ESM at the same settings and α grid under three proxies — the built-in
generic text, text each expert samples itself (`proxy: self`), and each expert's own training
prompts with answers (the in-task upper reference, which users rarely have) — scores each on
the validation split, then the best α per proxy once on the test split. Also times the
generation that `proxy: self` adds. Writes proxies.md in the workdir.
"""

import argparse
import json
import time
from pathlib import Path

from eval.compare import REPO, Zoo, _label, merge
from eval.report import markdown_table, normalized

IN_TASK_EXAMPLES = 500


def in_task_proxies(zoo: Zoo) -> dict[str, dict]:
    """Per expert: a JSONL of its own training examples (prompt + answer)."""
    folder = zoo.workdir / "proxies"
    folder.mkdir(exist_ok=True)
    parameters = {}
    for task in zoo.tasks:
        path = folder / f"{task}.jsonl"
        if not path.exists():
            rows = [json.loads(line) for line in Path(zoo.models["data"][task]["train"]).read_text().splitlines()]
            path.write_text("".join(json.dumps({"text": f"{r['prompt']} {r['target']}"}) + "\n" for r in rows[:IN_TASK_EXAMPLES]))
        parameters[task] = {"proxy": str(path.resolve())}
    return parameters


def run(workdir: Path, alphas: list[float]) -> Path:
    zoo = Zoo(workdir)
    proxies = {
        "generic (builtin)": {"setting": {}, "per_model": None},
        "self-written (proxy: self)": {"setting": {"proxy": "self"}, "per_model": None},
        "in-task (training examples)": {"setting": {}, "per_model": in_task_proxies(zoo)},
    }
    rows_val, rows_test, chosen = {}, {}, {}
    timings = zoo.results.get("proxy_timings") or {}
    for name, proxy in proxies.items():
        best = None
        for alpha in alphas:
            setting = {"alpha": alpha, **proxy["setting"]}
            label = f"esm[{_label(setting)}]" + ("[in-task]" if proxy["per_model"] else "")
            start = time.perf_counter()
            val = zoo.merged_val("esm", setting, label, proxy["per_model"])
            timings.setdefault(label, round(time.perf_counter() - start, 1))
            rows_val[f"{name}, α={alpha}"] = val
            quality = normalized(val, zoo.expert_val)
            if best is None or quality > best[0]:
                best = (quality, setting, label)
        _, setting, label = best
        path, _ = merge("esm", setting, zoo.models, workdir, proxy["per_model"])
        rows_test[name] = zoo.scored("test", label, path)
        chosen[name] = f"alpha={setting['alpha']}"
    zoo.results.put(timings, "proxy_timings")
    report = (
        "ESM on the zoo under three calibration texts (same settings; 32 × 512 tokens per expert).\n\n"
        "Validation, every α:\n\n"
        + markdown_table(rows_val, zoo.expert_val, {}, ordered=False)
        + "\n\nTest split, α chosen on validation per proxy:\n\n"
        + markdown_table(rows_test, zoo.expert_test, chosen)
        + "\n\nWall time per merge + validation scoring (s; the first α of a proxy includes its "
        "calibration, and for proxy: self the generation): "
        + json.dumps(timings)
        + "\n"
    )
    (workdir / "proxies.md").write_text(report)
    print(report)
    return workdir / "proxies.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--alphas", default="1,2,3", help="comma-separated α values (same for every proxy)")
    args = parser.parse_args()
    run(args.workdir, [float(a) for a in args.alphas.split(",")])


if __name__ == "__main__":
    main()
