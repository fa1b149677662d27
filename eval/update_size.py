"""ESM on a few experts, one recipe parameter changed at a time: each merge's scores (tasks,
quiz, held-out NLL; test splits) and how large its update is against task arithmetic's sum.

    python -m eval.update_size --zoo community --experts cz_plural,cz_reverse \\
        --variants 'default;{"gamma": 0.0};{"layer_exponent": 0.0}'

The subset protocol (eval/robustness.py) says where a merge breaks the base; this says which
part of ESM did it. Per module type it reports the merged update's size beside the sum of the
task vectors ΣΔW_t: in Frobenius norm, and in what it changes of the layer's output on the
base's own activations of the built-in proxy text, ‖X ΔWᵀ‖_F (what the base then computes
differently); and the weight where that ratio is largest. Task arithmetic at weight w has
ratio w everywhere. The merges go through the real mergekit-yaml (eval.compare.merge) and are
kept under <workdir>/update_size/ for a rerun; the table goes to eval/results/update_size_<zoo>_<experts>.md.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from eval.compare import REPO, merge
from eval.proxy_budget import target_weights
from eval.retention import QUIZ_TASK, heldout_nll, write_quiz_task
from eval.score import score, write_task_configs


@torch.inference_mode()
def proxy_input_moments(base: Path, tokens: int = 2048) -> dict[str, torch.Tensor]:
    """XᵀX (float64) of every linear's inputs when the base reads the first `tokens` tokens of
    the built-in proxy text, by linear name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_esm.calibration.proxy import load_documents

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    text = "\n\n".join(load_documents("builtin"))  # the built-in proxy is plain text
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    moments: dict[str, torch.Tensor] = {}

    def collect(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            moments[name] = moments.get(name, 0) + x.T @ x
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_pre_hook(collect(name))
    for start in range(0, ids.shape[1], 512):
        model(ids[:, start : start + 512])
    return moments


def size_against_sum(merged: dict, base: dict, experts: list[dict], moments: dict) -> dict[str, dict]:
    """Per 2-D linear weight: ‖ΔW_merged‖ and ‖ΣΔW_t‖ (Frobenius), and the same on the proxy's
    activations, ‖X ΔWᵀ‖_F = √tr(ΔW XᵀX ΔWᵀ)."""
    rows = {}
    for name, w0 in base.items():
        moment = moments.get(name.removesuffix(".weight"))
        if moment is None or w0.ndim != 2:
            continue
        w0 = w0.double()
        total = sum(e[name].double() - w0 for e in experts)
        update = merged[name].double() - w0

        def on_inputs(d):
            return float(torch.einsum("ij,jk,ik->", d, moment, d)) ** 0.5

        rows[name] = {"norm": float(update.norm()), "sum_norm": float(total.norm()),
                      "output": on_inputs(update), "sum_output": on_inputs(total)}
    return rows


def by_module_type(rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Module type → (norm ratio, output ratio) over all its layers (root of summed squares)."""
    sums = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for name, r in rows.items():
        s = sums[name.split(".")[-2]]
        for i, key in enumerate(("norm", "sum_norm", "output", "sum_output")):
            s[i] += r[key] ** 2
    return {t: ((s[0] / s[1]) ** 0.5, (s[2] / s[3]) ** 0.5) for t, s in sums.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--zoo", choices=["synthetic", "community"], default="community")
    parser.add_argument("--experts", required=True, help="comma-separated expert names of the zoo")
    parser.add_argument("--variants", default="default",
                        help="';'-separated: 'default' or a JSON object of ESM recipe parameters; "
                             "'task_arithmetic' merges with task arithmetic at weight 1/T")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from eval.zoo.build import build_community_zoo, build_zoo

    zoo = build_zoo(args.workdir) if args.zoo == "synthetic" else build_community_zoo(args.workdir)
    members = args.experts.split(",")
    unknown = set(members) - set(zoo["experts"])
    if unknown:
        parser.error(f"unknown experts {sorted(unknown)}; the {args.zoo} zoo has {list(zoo['experts'])}")
    out = args.workdir / "update_size"
    tasks_dir = out / f"tasks-{args.zoo}"
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    write_quiz_task(tasks_dir, tokenizer)
    include = write_task_configs({m: zoo["data"][m] for m in members}, tasks_dir,
                                 scorer="exact_match" if args.zoo == "synthetic" else "answer_in_reply")
    base = target_weights(zoo["base"])
    experts = [target_weights(zoo["experts"][m]) for m in members]
    moments = proxy_input_moments(zoo["base"])
    table = ["| variant | " + " | ".join(members) + " | quiz | NLL | update / sum, norm (by type) | "
             "update / sum, on proxy activations (by type) | largest on activations |",
             "|---|" + "---|" * len(members) + "---|---|---|---|---|"]
    for variant in args.variants.split(";"):
        if variant == "task_arithmetic":
            method, setting = "task_arithmetic", {"weight": 1 / len(members)}
        else:
            method, setting = "esm", ({} if variant == "default" else json.loads(variant))
        run = merge(method, setting, zoo["base"], [zoo["experts"][m] for m in members], out,
                    cache=out / "esm-cache" / "-".join(members))
        rows = size_against_sum(target_weights(run["path"]), base, experts, moments)
        scores = score(run["path"], members + [QUIZ_TASK], include)
        types = by_module_type(rows)
        worst = max(rows, key=lambda n: rows[n]["output"] / rows[n]["sum_output"])
        table.append(
            f"| {variant} | " + " | ".join(f"{100 * scores[m]:.1f}" for m in members)
            + f" | {100 * scores[QUIZ_TASK]:.1f} | {heldout_nll(run['path']):.3f} | "
            + ", ".join(f"{t} {a:.2f}" for t, (a, _) in types.items()) + " | "
            + ", ".join(f"{t} {b:.2f}" for t, (_, b) in types.items())
            + f" | {worst.removeprefix('model.layers.')} {rows[worst]['output'] / rows[worst]['sum_output']:.2f} |"
        )
        print(table[-1], flush=True)
    path = REPO / "eval" / "results" / f"update_size_{args.zoo}_{'+'.join(members)}.md"
    path.write_text(f"# ESM variants on {', '.join(members)} ({args.zoo} zoo, test splits)\n\n"
                    f"`python -m eval.update_size --zoo {args.zoo} --experts {args.experts} --variants '{args.variants}'`\n\n"
                    + "\n".join(table) + "\n")
    print(path)


if __name__ == "__main__":
    main()
