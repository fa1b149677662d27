"""Which calibration text serves ESM best on the zoo: generic, self-written or in-task.

    python -m eval.compare_proxies [--workdir eval/workdir] [--alphas 1,2,3,auto]

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

from eval.compare import REPO, Zoo, _label
from eval.report import markdown_table, normalized

IN_TASK_EXAMPLES = 500


def in_task_proxies(data: dict[str, dict], tasks: list[str], folder: Path) -> dict[str, dict]:
    """Per expert: its `proxy` parameter, a JSONL in `folder` of its own training examples
    (prompt + answer). data: task → its splits' files, as the zoo builders return them."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = {}
    for task in tasks:
        path = folder / f"{task}.jsonl"
        if not path.exists():
            rows = [json.loads(line) for line in Path(data[task]["train"]).read_text().splitlines()]
            path.write_text("".join(json.dumps({"text": f"{r['prompt']} {r['target']}"}) + "\n" for r in rows[:IN_TASK_EXAMPLES]))
        parameters[task] = {"proxy": str(path.resolve())}
    return parameters


def generation_records(workdir: Path, samples: int, max_tokens: int) -> dict[str, float]:
    """Seconds each expert took to write its proxy, from the records `proxy: self` keeps in the cache."""
    records = {}
    for path in (workdir / "esm-cache" / "self-proxy").glob("*/generation.json"):
        record = json.loads(path.read_text())
        if (record["samples"], record["max_tokens"]) == (samples, max_tokens):
            records[Path(record["model"]).name] = record["seconds"]
    return records


def run(workdir: Path, alphas: list[float | str]) -> Path:
    """alphas: the fixed-α grid (chosen on validation per proxy), plus "auto" for an alpha: auto row."""
    zoo = Zoo(workdir)
    proxies = {
        "generic (builtin)": {"setting": {}, "per_model": None},
        "self-written (proxy: self)": {"setting": {"proxy": "self"}, "per_model": None},
        "in-task (training examples)": {"setting": {}, "per_model": in_task_proxies(zoo.models["data"], zoo.tasks, workdir / "proxies")},
    }
    rows_val, rows_test, chosen = {}, {}, {}
    timings = zoo.results.get("proxy_timings") or {}

    def scored(name: str, alpha, proxy: dict) -> tuple[dict, dict, str]:
        setting = {"alpha": alpha, **proxy["setting"]}
        label = f"esm[{_label(setting)}]" + ("[in-task]" if proxy["per_model"] else "")
        start = time.perf_counter()
        rows_val[f"{name}, α={alpha}"] = val = zoo.merged_val("esm", setting, label, proxy["per_model"])
        timings.setdefault(label, round(time.perf_counter() - start, 1))
        zoo.results.put(timings, "proxy_timings")
        return val, setting, label

    def tested(name: str, setting: dict, label: str, proxy: dict):
        rows_test[name] = zoo.merged_test("esm", setting, label, proxy["per_model"])[0]
        chosen[name] = f"alpha={setting['alpha']}"

    for name, proxy in proxies.items():
        best = None
        for alpha in [a for a in alphas if a != "auto"]:
            val, setting, label = scored(name, alpha, proxy)
            quality = normalized(val, zoo.expert_val)
            if best is None or quality > best[0]:
                best = (quality, setting, label)
        tested(name, *best[1:], proxy)
        if "auto" in alphas:
            tested(f"{name}, alpha: auto", *scored(name, "auto", proxy)[1:], proxy)
    generation = generation_records(workdir, 32, 512)
    report = (
        "ESM on the zoo under three calibration texts (same settings; 32 × 512 tokens per expert).\n\n"
        "Validation, every α:\n\n"
        + markdown_table(rows_val, zoo.expert_val, {}, ordered=False)
        + "\n\nTest split, fixed α chosen on validation per proxy (and alpha: auto):\n\n"
        + markdown_table(rows_test, zoo.expert_test, chosen, ordered=False)
        + "\n\nGeneration time for proxy: self, per expert (s): "
        + json.dumps(generation)
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
    parser.add_argument(
        "--alphas", default="1,2,3,auto", help="comma-separated α values, same for every proxy; `auto` adds an alpha: auto row"
    )
    args = parser.parse_args()
    run(args.workdir, [a if a == "auto" else float(a) for a in args.alphas.split(",")])


if __name__ == "__main__":
    main()
