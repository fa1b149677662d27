"""`merge_method: iso_cts` — Iso-CTS, isotropic merging in common and task-specific
subspaces (Marczak et al., ICML 2025)."""

from collections.abc import Sequence

import torch
from pydantic import Field

from mergekit_esm.algebra.merge import common_and_task_specific_merge
from mergekit_esm.methods.base import MergeSettings, MethodDefinition


class IsoCtsSettings(MergeSettings):
    common_space_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Iso-CTS: share of min(d_out, d_in) given to the common subspace of Σ_t ΔW_t "
        "(the rest is split equally among the experts' own directions); paper default 0.8.",
    )


def merge_weight(settings: IsoCtsSettings, deltas: Sequence[torch.Tensor], rank=None, inputs=None) -> torch.Tensor:
    return common_and_task_specific_merge(deltas, settings.common_space_fraction)


METHOD = MethodDefinition(
    name="iso_cts",
    pretty_name="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    reference_url="https://arxiv.org/abs/2502.04959",
    formula="W = W0 + α·σ̄·polar(U_cat)·polar(V_cat)ᵀ over the top directions of Σ_t ΔW_t plus "
    "each expert's top directions outside them",
    settings_type=IsoCtsSettings,
    merge_weight=merge_weight,
    default_rank=lambda settings, d_out, d_in, experts: None,
)
