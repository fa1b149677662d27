"""ESM against TIES on the first zoo's real merge (SmolLM2-135M, 4 experts), one run, empty caches.

    python -m eval.zoo_speed [--runs esm,ties,esm] [--workdir eval/workdir] [--out eval/results/zoo_speed.md]

Each method at its defaults (the shipped recipes in recipes/zoo/), through mergekit-yaml in a
fresh process, ESM into an empty cache so that calibration is timed. `--runs` lists the runs
in order, each `method` or `method:precision` (e.g. `esm:float32`), with its wall time and peak
anonymous memory (bench_scale's measure: page cache of the mapped inputs not counted); the default, ESM first,
then TIES, then ESM again, shows drift on a shared machine as the two ESM times differing.
The report names OMP_WAIT_POLICY when it is set: PASSIVE (kind to jobs sharing the cores)
slows MKL's eigensolver and inverses at these widths, so ESM more than TIES
(docs/performance.md).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from eval.compare import REPO, merge
from eval.robustness import default_setting
from eval.zoo.build import build_zoo


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "zoo_speed.md")
    parser.add_argument("--runs", default="esm,ties,esm", help="comma-separated method or method:precision")
    args = parser.parse_args()
    models = build_zoo(args.workdir)
    experts = list(models["experts"].values())
    times = []
    with tempfile.TemporaryDirectory(prefix="zoo-speed-") as scratch:
        for i, spec in enumerate(args.runs.split(",")):
            method, _, precision = spec.partition(":")
            setting = {**default_setting(method), **({"precision": precision} if precision else {})}
            root = Path(scratch) / str(i)
            run = merge(method, setting, models["base"], experts, root, cache=root / "cache")
            times.append((spec, round(run["wall_s"], 1), run["peak_anon_mib"]))
            print(*times[-1], flush=True)
    ties = next(s for m, s, _ in times if m == "ties")
    policy = os.environ.get("OMP_WAIT_POLICY")
    text = (f"# ESM against TIES on the first zoo's merge (4 experts, SmolLM2-135M), "
            f"`{'OMP_WAIT_POLICY=' + policy + ' ' if policy else ''}python -m eval.zoo_speed --runs {args.runs}`\n\n"
            "| run | method | wall s (mergekit-yaml, calibration included) | / TIES | peak anonymous RSS MiB |\n"
            "|---|---|---|---|---|\n"
            + "".join(f"| {i + 1} | {m} | {s} | {s / ties:.2f}× | {mib} |\n" for i, (m, s, mib) in enumerate(times))
            + f"\n<!-- {json.dumps(times)} -->\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
