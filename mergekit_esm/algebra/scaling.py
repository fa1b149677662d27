"""ESM's scaling levels. Each is a ratio to the mean raised to a power; power 0 turns it off."""

from collections.abc import Mapping
from typing import Hashable

import torch


def polarized_scale(norms: torch.Tensor, exponent: float) -> torch.Tensor:
    """(norm / mean(norm))^p: sharpen (p > 0) the contrast between strong and weak parts.

    Used for tasks (p over ‖Â_t‖), input dimensions (over column norms of A_cat) and layers
    (over ‖ΔW_merged‖ of one module type). A zero norm gets scale 0 (it scales nothing);
    all-zero norms get scale 1, so nothing is divided by zero.
    """
    mean = norms.mean()
    if exponent == 0 or mean == 0:
        return torch.ones_like(norms)
    ratio = norms / mean
    return torch.where(ratio > 0, ratio.clamp_min(torch.finfo(ratio.dtype).tiny) ** exponent, 0.0)


def eigenvalue_flattening(
    eigenvalues: torch.Tensor, gamma: float, coordinate_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """e = (λ / mean λ)^γ, renormalised to mean 1 (authors' implementation, γ = 0.15).
    Basis columns and coordinate rows are both scaled by e, so direction i's part of the
    update by e_i².

    A small γ lets strong directions stay a little stronger without letting one dominate.
    coordinate_norms (‖row i of Â‖; preserve_norm): renormalised instead so that the expert's
    update keeps its norm, Σ e_i⁴‖a_i‖² = Σ ‖a_i‖². The mean counts every direction alike, so
    the near-null directions of a low-rank expert stored in finite precision (a merged LoRA,
    whose other directions hold the weights' rounding noise) pull it down and inflate the
    expert's real directions: 6× for a rank-16 LoRA at k = 96 (docs/robustness.md).
    """
    e = polarized_scale(eigenvalues, gamma)
    if coordinate_norms is not None:
        energy = (coordinate_norms**2).sum()
        scaled = (e**4 * coordinate_norms**2).sum()
        return e * (energy / scaled) ** 0.25 if scaled > 0 else torch.ones_like(e)
    mean = e.mean()
    return e / mean if mean > 0 else torch.ones_like(e)


def layer_scales(
    norms: Mapping[Hashable, Mapping[int, float]], exponent: float, preserve_norm: bool = False
) -> dict[tuple[Hashable, int], float]:
    """β_ℓ per (module type, layer): polarized scale over all layers of the same module type.

    Only layers of one type are compared, so q_proj never competes with down_proj.
    preserve_norm: scale the β of one module type so that the scaled updates keep their total
    Frobenius norm, Σ β_ℓ²‖ΔW_ℓ‖² = Σ ‖ΔW_ℓ‖² (as merge_task_factors does for tasks and
    dimensions).
    """
    result = {}
    for module_type, by_layer in norms.items():
        layers = sorted(by_layer)
        values = torch.tensor([by_layer[i] for i in layers], dtype=torch.float64)
        betas = polarized_scale(values, exponent)
        scaled = torch.linalg.vector_norm(betas * values)
        if preserve_norm and scaled > 0:
            betas = betas * torch.linalg.vector_norm(values) / scaled
        for layer, beta in zip(layers, betas.tolist()):
            result[(module_type, layer)] = beta
    return result
