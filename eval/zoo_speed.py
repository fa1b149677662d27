"""ESM against TIES on the first zoo's real merge (SmolLM2-135M, 4 experts), one run, empty caches.

    python -m eval.zoo_speed [--workdir eval/workdir] [--out eval/results/zoo_speed.md]

Each method at its defaults (the shipped recipes in recipes/zoo/), through mergekit-yaml in a
fresh process, ESM into an empty cache so that calibration is timed; ESM first, then TIES,
then ESM again, so drift on a shared machine shows as the two ESM times differing.
"""

import argparse
import json
import tempfile
from pathlib import Path

from eval.compare import REPO, merge
from eval.robustness import default_setting
from eval.zoo.build import build_zoo


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "zoo_speed.md")
    args = parser.parse_args()
    models = build_zoo(args.workdir)
    experts = list(models["experts"].values())
    times = []
    with tempfile.TemporaryDirectory(prefix="zoo-speed-") as scratch:
        for run, method in enumerate(("esm", "ties", "esm")):
            root = Path(scratch) / str(run)
            _, seconds = merge(method, default_setting(method), models["base"], experts, root, cache=root / "cache")
            times.append((method, round(seconds, 1)))
            print(method, seconds, flush=True)
    esm = [s for m, s in times if m == "esm"]
    ties = next(s for m, s in times if m == "ties")
    text = (f"# ESM against TIES on the first zoo's merge (4 experts, SmolLM2-135M), `python -m eval.zoo_speed`\n\n"
            "| run | method | wall s (mergekit-yaml, calibration included) |\n|---|---|---|\n"
            + "".join(f"| {i + 1} | {m} | {s} |\n" for i, (m, s) in enumerate(times))
            + f"\nESM/TIES: {esm[0] / ties:.2f}× and {esm[1] / ties:.2f}×.\n\n<!-- {json.dumps(times)} -->\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
