"""How ESM's scaling and combination treat one weight's experts: the merged update's norm,
and how much of each expert's own task vector it keeps.

    python -m eval.scale_inflation [--weight model.layers.29.mlp.gate_proj.weight] [--zoo community] [--by-size]

Reads the base and the zoo's experts from <workdir>/models and merges the one weight with the
SVD basis (no calibration needed; scaling and combination act the same on ESD factors).
First table: each combination of task and dimension scaling, with the paper's raw ratios and
with `preserve_norm`: the Frobenius norms beside each task vector's and their sum. Second
table: task arithmetic's sum, TSV-M, and ESM's combination (whitened or not, scaling on or
off), each with its norm and each expert's share ⟨ΔW_merged, ΔW_t⟩ / ‖ΔW_t‖² (task
arithmetic's is about 1 for unrelated experts): an expert whose share is near 0 is left out.
--by-size: instead, those shares per number of experts T, averaged over every subset of T.
--members a+b: both tables for those experts merged alone.
--alignment: instead, per expert, the rank whose whitened truncation best aligns with its ΔW
(`expert_rank: aligned`) and that cosine, against the cosine at the default rank for T = 2–6.
"""

import argparse
import itertools
from pathlib import Path

import torch
from safetensors import safe_open

from eval.compare import REPO
from mergekit_esm.algebra import rank_above_rounding, svd_subspace, with_rounding_level
from mergekit_esm.algebra.merge import aligned_rank, merge_task_factors, storage_rounding_level, truncation_alignment
from mergekit_esm.methods.esm import EsmSettings, default_rank


def read(model: Path, name: str) -> torch.Tensor:
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def task_vectors(base: Path, experts: dict[str, Path], name: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each expert's ΔW (float64), and its rounding level as its checkpoint stores it."""
    w0 = read(base, name).double()
    rms = float(w0.square().mean().sqrt())
    deltas, levels = {}, {}
    for e, path in experts.items():
        stored = read(path, name)
        deltas[e] = stored.double() - w0
        levels[e] = storage_rounding_level(rms, tuple(w0.shape), stored.dtype)
    return deltas, levels


def svd_factors(deltas: dict[str, torch.Tensor], levels: dict[str, float], rank: int):
    """Each expert's SVD factors with ESM's rounding and rank rules (as methods/esm.py)."""
    for e, d in deltas.items():
        yield with_rounding_level(svd_subspace(d, rank), d, levels[e], rank)


def rank_per_expert(deltas: dict[str, torch.Tensor]) -> int:
    return default_rank(EsmSettings(), *next(iter(deltas.values())).shape, len(deltas))


def inflation_table(deltas: dict[str, torch.Tensor], name: str) -> str:
    rank = rank_per_expert(deltas)
    gamma = EsmSettings().gamma
    lines = [f"`{name}`, rank {rank} per expert, γ = {gamma}", "",
             "task vectors' norms: " + ", ".join(f"{e} {d.norm():.3f}" for e, d in deltas.items()),
             f"sum of the task vectors: {torch.stack(list(deltas.values())).sum(0).norm():.3f}", "",
             "| task exponent | dimension exponent | ‖ΔW_merged‖, paper's ratios | ‖ΔW_merged‖, preserve_norm |",
             "|---|---|---|---|"]
    for task_exponent, dimension_exponent in ((2.0, 2.0), (2.0, 0.0), (0.0, 2.0), (0.0, 0.0)):
        norms = [
            merge_task_factors((svd_subspace(d, rank) for d in deltas.values()), gamma=gamma,
                               task_exponent=task_exponent, dimension_exponent=dimension_exponent,
                               preserve_norm=preserve).norm()
            for preserve in (False, True)
        ]
        lines.append(f"| {task_exponent:g} | {dimension_exponent:g} | {norms[0]:.2f} | {norms[1]:.2f} |")
    return "\n".join(lines)


def merge_variants() -> dict[str, dict | None]:
    """The merges the share tables compare: merge_task_factors' arguments (None: task arithmetic's sum)."""
    esm = EsmSettings()
    off = dict(gamma=0.0, task_exponent=0.0, dimension_exponent=0.0)
    scaled = dict(gamma=esm.gamma, dimension_exponent=esm.dimension_exponent, preserve_norm=True)
    return {
        "task arithmetic (sum)": None,
        "TSV-M": dict(off, combination="tsv"),
        "whitened, no scaling": dict(off),
        "whitened, ESM's scaling (paper's task scaling)": dict(scaled, task_exponent=2.0),
        "whitened, ESM's defaults": dict(scaled, task_exponent=0.0),
        "whitened, ESM's defaults, expert spectrum scale": dict(scaled, task_exponent=0.0, spectrum_exponent=1.0),
        "whitened, ESM's defaults, aligned rank": dict(scaled, task_exponent=0.0, expert_rank="aligned"),
        "whitened, ESM's defaults, aligned rank and expert spectrum scale":
            dict(scaled, task_exponent=0.0, expert_rank="aligned", spectrum_exponent=1.0),
        "unwhitened, ESM's scaling": dict(scaled, task_exponent=2.0, combination="tsv"),
        "unwhitened, no task scaling": dict(scaled, task_exponent=0.0, combination="tsv"),
    }


def merged_update(kwargs: dict | None, deltas: dict[str, torch.Tensor], levels: dict[str, float], rank: int) -> torch.Tensor:
    """One weight merged as merge_variants() describes it, on the SVD basis at `rank`."""
    if kwargs is None:
        return torch.stack(list(deltas.values())).sum(0)
    return merge_task_factors(svd_factors(deltas, levels, rank), **kwargs)


def kept_shares(merged: torch.Tensor, deltas: dict[str, torch.Tensor]) -> list[float]:
    """Each expert's share of its own task vector in the merged update, ⟨ΔW_merged, ΔW_t⟩/‖ΔW_t‖²."""
    return [float((merged * d).sum() / (d * d).sum()) for d in deltas.values()]


def share_table(deltas: dict[str, torch.Tensor], levels: dict[str, float], name: str) -> str:
    rank = rank_per_expert(deltas)
    lines = [f"`{name}`, rank {rank} per expert", "",
             "| merge | ‖ΔW_merged‖ | " + " | ".join(deltas) + " |", "|---|---|" + "---|" * len(deltas)]
    for label, kwargs in merge_variants().items():
        merged = merged_update(kwargs, deltas, levels, rank)
        shares = kept_shares(merged, deltas)
        lines.append(f"| {label} | {merged.norm():.3f} | " + " | ".join(f"{x:.2f}" for x in shares) + " |")
    return "\n".join(lines)


def share_by_size_table(deltas: dict[str, torch.Tensor], levels: dict[str, float], name: str) -> str:
    """Per number of experts T, the mean kept share over every subset of T experts and its
    members, for task arithmetic, TSV-M and ESM's combination at its defaults (α = 1): whether
    a fixed α means the same strength at every T, and with `expert_rank: aligned`. ESM's whitening gives each of the k = d/T
    kept directions the mean σ, which more and weaker directions (small T) pull down; TSV-M
    keeps each direction's own σ, so it keeps more of each expert the fewer are merged."""
    compared = ("task arithmetic (sum)", "TSV-M", "whitened, ESM's defaults", "whitened, ESM's defaults, aligned rank")
    variants = {label: merge_variants()[label] for label in compared}
    lines = [f"`{name}`: mean share ⟨ΔW_merged, ΔW_t⟩/‖ΔW_t‖² over every subset of T experts and its members "
             "(SVD basis at ESM's default rank for T; ESM at α = 1, before layer scaling)", "",
             "| T | subsets | rank | task arithmetic | TSV-M | ESM's defaults | ESM / TSV-M | ESM, aligned rank | aligned / TSV-M |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in range(2, len(deltas) + 1):
        totals = dict.fromkeys(variants, 0.0)
        subsets = list(itertools.combinations(deltas, size))
        for members in subsets:
            chosen = {e: deltas[e] for e in members}
            rank = rank_per_expert(chosen)
            for label, kwargs in variants.items():
                totals[label] += sum(kept_shares(merged_update(kwargs, chosen, levels, rank), chosen))
        ta, tsv, esm_share, aligned = (totals[label] / (len(subsets) * size) for label in compared)
        lines.append(f"| {size} | {len(subsets)} | {rank} | {ta:.3f} | {tsv:.3f} | {esm_share:.3f} | {esm_share / tsv:.2f} "
                     f"| {aligned:.3f} | {aligned / tsv:.2f} |")
    return "\n".join(lines)


def alignment_table(deltas: dict[str, torch.Tensor], levels: dict[str, float], name: str) -> str:
    """Per expert: aligned_rank on ΔW's singular values, and the cosine of the whitened
    truncation U_j V_jᵀ with ΔW, Σ_{i≤j} s_i / (√j ‖s‖), there and at the default rank
    ⌊min(d_out, d_in)/T⌋, each at most the directions ΔW has above its rounding level (as ESM
    keeps them: a merged LoRA's rank)."""
    shape = next(iter(deltas.values())).shape
    ranks = {t: default_rank(EsmSettings(), *shape, t) for t in range(2, 7)}
    lines = [f"`{name}`: cosine of the whitened truncation at j directions with ΔW", "",
             "| expert | aligned j | cosine at it | " + " | ".join(f"T = {t} (j = {k})" for t, k in ranks.items()) + " |",
             "|---|---|---|" + "---|" * len(ranks)]
    for e, d in deltas.items():
        s = torch.linalg.svdvals(d)[: rank_above_rounding(d, levels[e], min(d.shape))]
        cosine = truncation_alignment(s) / s.norm()
        j = aligned_rank(s)
        lines.append(f"| {e} | {j} | {cosine[j - 1]:.2f} | " + " | ".join(f"{cosine[min(k, s.numel()) - 1]:.2f}" for k in ranks.values()) + " |")
    return "\n".join(lines)


def main():
    from eval.zoo import community, tasks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--zoo", choices=["community", "synthetic"], default="community")
    parser.add_argument("--weight", default="model.layers.29.mlp.gate_proj.weight")
    parser.add_argument("--by-size", action="store_true",
                        help="instead: each method's mean kept share per number of experts T, over every subset")
    parser.add_argument("--alignment", action="store_true",
                        help="instead: each expert's best-aligned rank and the whitened truncation's cosine with ΔW")
    parser.add_argument("--members", default="",
                        help="both tables for these experts only, joined by '+' (e.g. cz_add+cz_plural), "
                             "at the default rank for their number")
    args = parser.parse_args()
    names = community.TASKS if args.zoo == "community" else tasks.TASKS
    if args.members:
        stray = set(args.members.split("+")) - set(names)
        if stray:
            parser.error(f"--members {sorted(stray)}: not experts of the {args.zoo} zoo ({', '.join(names)})")
        names = args.members.split("+")
    models = args.workdir / "models"
    deltas, levels = task_vectors(models / "base", {t: models / t for t in names}, args.weight)
    if args.alignment:
        print(alignment_table(deltas, levels, args.weight))
        return
    if args.by_size:
        print(share_by_size_table(deltas, levels, args.weight))
        return
    print(inflation_table(deltas, args.weight), "", share_table(deltas, levels, args.weight), sep="\n")


if __name__ == "__main__":
    main()
