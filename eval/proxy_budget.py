"""How many proxy tokens ESM needs: the zoo merged with fewer proxy windows than the default 32.

    python -m eval.proxy_budget [--workdir eval/workdir] [--samples 4,8,16,32] [--alpha 3]

Calibration (every expert's forward pass and XᵀX sums) costs in proportion to the proxy
tokens n = 512 × `proxy_samples` per expert, and on CPU it is about 40% of a large merge's
time (`eval/bench_stages`). This merges the zoo with ESM at a fixed α under the built-in
generic proxy cut to each window count, all else at its defaults, each in an empty cache (so
its merge time includes calibration); scores the validation and test splits; and measures
how far each merged update (output − base over the target weights) lies from the one at the
largest count: relative Frobenius distance, and per weight the cosine and ratio of norms.
Writes proxy_budget.md in the workdir.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from eval.compare import REPO, Zoo, _label, merge
from eval.report import markdown_table


def target_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The decoder's linear weights of a saved model (float64)."""
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if ".layers." in name and name.endswith("_proj.weight"):
                    weights[name] = f.get_tensor(name).double()
    return weights


def update_agreement(merged: Path, reference: Path, base: Path) -> dict[str, float]:
    """How close the merged update U = merged − base is to the reference's U_ref: the
    relative distance ‖U − U_ref‖_F / ‖U_ref‖_F over all target weights together, and per
    weight the cosine between U and U_ref (median, smallest) and the ratio of their norms."""
    w0, w, w_ref = target_weights(base), target_weights(merged), target_weights(reference)
    updates = {n: (w[n] - w0[n], w_ref[n] - w0[n]) for n in w0}
    diff = sum(float(((u - r) ** 2).sum()) for u, r in updates.values())
    size = sum(float((r**2).sum()) for _, r in updates.values())
    cosine = [float((u * r).sum() / (u.norm() * r.norm())) for u, r in updates.values()]
    ratio = [float(u.norm() / r.norm()) for u, r in updates.values()]
    return {
        "distance": round((diff / size) ** 0.5, 3),
        "median cosine": round(statistics.median(cosine), 3),
        "smallest cosine": round(min(cosine), 3),
        "norm ratio range": [round(min(ratio), 3), round(max(ratio), 3)],
    }


def run(workdir: Path, samples: list[int], alpha: float) -> Path:
    zoo = Zoo(workdir)
    rows_val, rows_test, merge_s, paths = {}, {}, {}, {}
    for count in samples:
        setting = {"alpha": alpha, "proxy_samples": count}
        label = f"esm[{_label(setting)}]"
        name = f"{count} × 512 tokens"
        recorded = zoo.results.get("proxy_budget_merge_s", label)
        with tempfile.TemporaryDirectory(prefix="proxy-budget-cache-") as cache:
            run = merge("esm", setting, zoo.models["base"], [zoo.models["experts"][t] for t in zoo.tasks], workdir, cache=Path(cache))
        paths[count] = run["path"]
        if recorded is None:  # 0.0 means the merge was already on disk: keep the first timing
            zoo.results.put(round(run["wall_s"], 1), "proxy_budget_merge_s", label)
        merge_s[name] = zoo.results.get("proxy_budget_merge_s", label)
        rows_val[name] = zoo.scored("val", label, paths[count])
        rows_test[name] = zoo.scored("test", label, paths[count])
    reference = max(samples)
    agreement = {
        f"{c} × 512 tokens": update_agreement(paths[c], paths[reference], zoo.models["base"])
        for c in samples
        if c != reference
    }
    report = (
        f"ESM on the zoo at α = {alpha} with the built-in generic proxy cut to fewer 512-token windows "
        "per expert (`proxy_samples`); everything else at its defaults (precision float64 on CPU).\n\n"
        "Validation:\n\n"
        + markdown_table(rows_val, zoo.expert_val, {}, ordered=False)
        + "\n\nTest:\n\n"
        + markdown_table(rows_test, zoo.expert_test, {}, ordered=False)
        + f"\n\nMerged update against the one at {reference} windows (output − base over the target weights: "
        "relative Frobenius distance of all of them together; per weight, cosine and ratio of norms): "
        + json.dumps(agreement, ensure_ascii=False)
        + "\n\nMerge wall time, calibration included (s): "
        + json.dumps(merge_s, ensure_ascii=False)
        + "\n"
    )
    (workdir / "proxy_budget.md").write_text(report)
    print(report)
    return workdir / "proxy_budget.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--samples", default="4,8,16,32", help="comma-separated proxy_samples values")
    parser.add_argument("--alpha", type=float, default=3.0, help="fixed α (make compare's choice for ESM on the zoo)")
    args = parser.parse_args()
    run(args.workdir, [int(s) for s in args.samples.split(",")], args.alpha)


if __name__ == "__main__":
    main()
