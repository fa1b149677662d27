"""`merge_method: iso_c` — Iso-C, isotropic merging in common subspace (Marczak et al., ICML 2025)."""

from collections.abc import Sequence

import torch

from mergekit_esm.algebra.merge import isotropic_merge
from mergekit_esm.methods.base import MergeSettings, MethodDefinition


class IsoCSettings(MergeSettings):
    pass


def merge_weight(settings: IsoCSettings, deltas: Sequence[torch.Tensor], rank=None, inputs=None) -> torch.Tensor:
    return isotropic_merge(deltas)


METHOD = MethodDefinition(
    name="iso_c",
    pretty_name="Iso-C (isotropic merging in common subspace)",
    reference_url="https://arxiv.org/abs/2502.04959",
    formula="W = W0 + α·σ̄·U·Vᵀ for Σ_t ΔW_t = U·diag(σ)·Vᵀ, σ̄ = mean(σ)",
    settings_type=IsoCSettings,
    merge_weight=merge_weight,
    default_rank=lambda settings, d_out, d_in, experts: None,
)
