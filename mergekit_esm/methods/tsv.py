"""`merge_method: tsv` — TSV-M, task singular vectors merging (Gargiulo et al., CVPR 2025)."""

from collections.abc import Sequence
from typing import Optional

import torch
from pydantic import Field

from mergekit_esm.algebra.merge import task_singular_vectors_merge
from mergekit_esm.methods.base import MergeSettings, MethodDefinition, Strength, shorter_side_rank


class TsvSettings(MergeSettings):
    alpha: Strength = Field(
        1.0, description="Global strength α (TSV-M's default 1), or 'auto'."
    )
    rank: Optional[int] = Field(
        None, ge=1, description="Singular directions kept per expert and weight; default ⌊min(d_out, d_in) / T⌋."
    )


def merge_weight(settings: TsvSettings, deltas: Sequence[torch.Tensor], rank: Optional[int], inputs=None) -> torch.Tensor:
    return task_singular_vectors_merge(deltas, rank)


METHOD = MethodDefinition(
    name="tsv",
    pretty_name="TSV-M (Task Singular Vectors: Merging)",
    reference_url="https://arxiv.org/abs/2412.00081",
    formula="W = W0 + α·polar(U_cat)·Σ_cat·polar(V_cat)ᵀ over each expert's top-k SVD factors",
    settings_type=TsvSettings,
    merge_weight=merge_weight,
    default_rank=lambda settings, d_out, d_in, experts: shorter_side_rank(d_out, d_in, experts),
)
