"""`merge_method: regmean` — RegMean, regression mean (Jin et al., ICLR 2023, arXiv 2212.09849).

Each target linear becomes the least-squares fit to all experts' outputs on their own proxy
inputs (algebra/regression.py); everything else is averaged, as in the paper."""

from collections.abc import Sequence

import torch
from pydantic import Field

from mergekit_esm.algebra.regression import regression_mean
from mergekit_esm.algebra.subspace import InputMoment
from mergekit_esm.methods.base import CalibratedSettings, MethodDefinition, Strength


class RegMeanSettings(CalibratedSettings):
    alpha: Strength = Field(
        1.0,
        description="Global strength α: W = W0 + α·(W_RegMean − W0), or 'auto'. α = 1 is RegMean itself.",
    )
    # Chosen on the first zoo's validation split (docs/design.md, "RegMean and RegMean++"):
    # 0.5 kept more of the experts' tasks than 0.1 (the RegMean authors' T5 setting,
    # bloomberg/dataless-model-merging) at α 1 and α 2, with about the same retention at α 1;
    # 0.95 kept the least. FusionBench's GPT-2 config (the one decoder LM there) uses 0.6.
    non_diagonal_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Factor on the off-diagonal entries of each expert's input Gram XᵀX/n "
        "(0: each input coordinate weighted by its mean square alone; 1: RegMean unshrunk). "
        "Default 0.5, chosen on validation data (docs/design.md).",
    )


def merge_weight(
    settings: RegMeanSettings, deltas: Sequence[torch.Tensor], rank=None, inputs: Sequence[InputMoment] = ()
) -> torch.Tensor:
    return regression_mean(deltas, inputs, settings.non_diagonal_ratio)


METHOD = MethodDefinition(
    name="regmean",
    pretty_name="RegMean (regression mean)",
    reference_url="https://arxiv.org/abs/2212.09849",
    formula="W = W0 + α·(W_M − W0), W_Mᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, G̃_t each expert's input Gram "
    "XᵀX/n on its proxy text with off-diagonal entries × non_diagonal_ratio",
    settings_type=RegMeanSettings,
    merge_weight=merge_weight,
    default_rank=lambda settings, d_out, d_in, experts: None,
    calibrates=lambda settings: True,
    needs_input_gram=True,
)
