"""`merge_method: esm` — Essential Subspace Merging (Li et al., CVPR 2026, arXiv 2602.20208).

The formulas and where this implementation differs from the authors' code: docs/design.md."""

from collections.abc import Sequence
from itertools import repeat
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field

from mergekit_esm.algebra import essential_subspace, merge_task_factors, svd_subspace, with_rounding_level
from mergekit_esm.algebra.merge import ExpertRank
from mergekit_esm.algebra.subspace import InputMoment, SubspaceSolver
from mergekit_esm.methods.base import CalibratedSettings, MethodDefinition, Strength, shorter_side_rank


class EsmSettings(CalibratedSettings):
    alpha: Strength = Field(
        3.0,
        description="Global strength α: W = W0 + α·β_ℓ·ΔW_merged, or 'auto'. α=1 is the merged "
        "update as ESM builds it, without the authors' ViT factor 2 (α=1 here is their α=0.5). "
        "Default 3: the largest α of the grid that keeps the base within the retention margin on "
        "both zoos' validation splits, at the budget rank and (as aligned's α 1) at the aligned rank "
        "that expert_rank: auto takes for full fine-tunes (docs/robustness.md, 'The defaults chosen').",
    )
    rank: Optional[int] = Field(
        None, ge=1, description="Directions kept per expert and weight; default ⌊min(d_out, d_in) / T⌋ (see rank_rule)."
    )
    rank_rule: Literal["output", "shorter"] = Field(
        "shorter",
        description="Default rank (when `rank` is not set): 'shorter' (default), ⌊min(d_out, d_in)/T⌋ "
        "(TSV-M's: all experts together keep no more directions than one ΔW can have); 'output', "
        "⌊d_out/T⌋ at most d_in (the paper). They differ only where d_out > d_in (gate/up_proj), "
        "whose d_out × d_out orthogonalization 'shorter' replaces by a d_in × d_in one: far less "
        "time at wide MLPs, with the same scores on both zoos (docs/robustness.md, docs/performance.md).",
    )
    expert_rank: ExpertRank = Field(
        "auto",
        description="How many of its k directions each expert keeps, per weight. 'auto' (default, "
        "a deviation from the paper): 'aligned' where every expert's update fills its k directions "
        "(full fine-tunes), at a third of the strength so that α means about the same merge of the "
        "target linears in both (norms and embeddings take α × the experts' mean either way); "
        "'budget' where one does not (a merged LoRA of rank below k). 'budget' (the paper): "
        "all k that carry its update. 'aligned': the leading j whose whitened block is most aligned "
        "with the expert's own ΔW (argmax_j Σ_{i≤j}‖â_i‖/√j), on its own α scale (its α 1 is "
        "auto's α 3 on the target linears). Whitening weighs every kept direction alike, so directions far weaker than "
        "the rest add more to the update's norm than to its share of the expert; with few experts "
        "(k = d/T large) they are most of the kept ones. At the aligned rank a LoRA's one or two "
        "directions keep a far smaller share of its update than a full fine-tune's many, hence "
        "the budget there (docs/robustness.md).",
    )
    gamma: float = Field(0.15, ge=0, description="Eigenvalue flattening exponent γ; 0 turns it off.")
    task_exponent: float = Field(
        0.0,
        description="Task-level polarized scaling exponent; 0 = off (default; the paper's 2 weighs "
        "experts by their task vectors' norms, i.e. by their training budget, and lost tasks and "
        "retention on both zoos: docs/robustness.md).",
    )
    spectrum_exponent: float = Field(
        0.0,
        ge=0,
        description="Expert-level scale after whitening: each expert's part of the whitened update "
        "times (its directions' rms singular value / the others')^q, total norm kept. 0 = off (the "
        "paper: every kept direction of every expert weighs alike, so a LoRA's few strong directions "
        "are cut to the mean); 1 = about the same share of each expert's own update.",
    )
    dimension_exponent: float = Field(
        2.0, description="Input-dimension-level polarized scaling exponent; 0 = off."
    )
    layer_exponent: float = Field(2.0, description="Layer-level polarized scaling exponent; 0 = off.")
    preserve_norm: bool = Field(
        True,
        description="Polarized scaling (task, dimension, layer) shifts weight without changing "
        "the update's total Frobenius norm: each level's scales are renormalized, and eigenvalue "
        "flattening leaves the whitened factors' mean singular values as they are without it. "
        "false: the paper's raw ratios, whose mean grows with how much the experts' norms differ "
        "(experts trained with different budgets gave an unusable model at every α), and its "
        "mean-1 flattening, which grew a merge of two LoRA experts past their sum (docs/robustness.md).",
    )
    basis: Literal["esd", "svd"] = Field(
        "esd",
        description="esd: essential subspace from proxy activations (ESM); svd: singular "
        "vectors of ΔW merged the TSV-M way (the paper's SVD ablation rows).",
    )
    subspace_solver: SubspaceSolver = Field(
        "randomized",
        description="esd basis: how each expert's essential subspace is found. 'randomized' "
        "(default): subspace iteration on a seeded block a quarter wider than k (matrix products "
        "and QRs), within 2% of the exact subspace's truncation error and faster where k is small "
        "against the matrix; the same scores as 'exact' on both zoos. 'exact': a full "
        "eigendecomposition, the paper's (docs/performance.md, docs/robustness.md).",
    )
    whiten_factors: bool = Field(
        True,
        description="esd basis: orthogonalize both concatenated factors at their mean singular "
        "value (ESM). false: keep each direction's weight as TSV-M does (polar factors with "
        "A_cat's row norms as singular values); an ablation switch.",
    )
    OUTSIDE_UPDATE_KEY: ClassVar[frozenset[str]] = CalibratedSettings.OUTSIDE_UPDATE_KEY | {"layer_exponent"}
    # float32 scores as float64 on both zoos once directions are capped at ΔW's rank above the
    # rounding level, and takes less time (docs/performance.md)
    CPU_PRECISION: ClassVar[torch.dtype] = torch.float32


def merge_weight(
    settings: EsmSettings,
    deltas: Sequence[torch.Tensor],
    rank: Optional[int],
    inputs: Optional[Sequence[InputMoment]],
) -> torch.Tensor:
    # generators: one expert's task matrix and factors in memory at a time. An expert whose
    # proxy tokens cannot reveal k directions (an expert MLP its router seldom chose) takes
    # ΔW's SVD basis, ESD's subspace for isotropic inputs (docs/design.md, "Mixture-of-experts layers").
    # The checkpoint's rounding level: TaskMatrices knows each expert's stored dtype (read the
    # expert first); plain tensors, as in the tests, are taken as exact.
    rounding = getattr(deltas, "rounding_level", lambda index: 0.0)

    def expert_factors(index: int, delta: torch.Tensor, moment: Optional[InputMoment]):
        if settings.basis == "esd" and moment.reveals_subspace(rank):
            found = essential_subspace(delta, moment, rank, settings.subspace_solver)
        else:
            found = svd_subspace(delta, rank)
        return with_rounding_level(found, delta, rounding(index), rank)

    factors = (
        expert_factors(t, d, i) for t, (d, i) in enumerate(zip(deltas, inputs if settings.basis == "esd" else repeat(None)))
    )
    return merge_task_factors(
        factors,
        gamma=settings.gamma,
        task_exponent=settings.task_exponent,
        dimension_exponent=settings.dimension_exponent,
        preserve_norm=settings.preserve_norm,
        spectrum_exponent=settings.spectrum_exponent,
        expert_rank=settings.expert_rank,
        combination="essential" if settings.basis == "esd" and settings.whiten_factors else "tsv",
    )


def default_rank(settings: EsmSettings, d_out: int, d_in: int, experts: int) -> int:
    # ΔW has rank ≤ min(d_out, d_in): directions beyond that carry nothing (ESM.md's
    # ⌊d_out/T⌋ exceeds d_in for gate/up_proj when T is small).
    if settings.rank_rule == "shorter":
        return shorter_side_rank(d_out, d_in, experts)
    return max(1, min(d_out // experts, d_in))


METHOD = MethodDefinition(
    name="esm",
    pretty_name="ESM (Essential Subspace Merging)",
    reference_url="https://arxiv.org/abs/2602.20208",
    formula="W = W0 + α·β_ℓ·ΔW_merged, ΔW_merged from each expert's essential subspace of its "
    "activation shift on proxy text, polarized scaling, then orthogonalization",
    settings_type=EsmSettings,
    merge_weight=merge_weight,
    default_rank=default_rank,
    calibrates=lambda settings: settings.basis == "esd",
)
