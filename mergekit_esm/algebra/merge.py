"""Merging the experts' factors of one weight into a single update ΔW_merged."""

from collections.abc import Sequence
from typing import Literal

import torch

from mergekit_esm.algebra.scaling import eigenvalue_flattening, polarized_scale
from mergekit_esm.algebra.subspace import TaskFactors

Combination = Literal["essential", "tsv"]


def polar_orthogonalize(x: torch.Tensor, keep_scale: bool) -> torch.Tensor:
    """Closest matrix with orthonormal columns/rows (Procrustes): U Vᵀ for x = U Σ Vᵀ.

    keep_scale multiplies by mean(Σ), ESM's whitening that keeps the factor's overall size.
    Singular triplets at numerical zero are left out (and out of the mean): their U, V are
    arbitrary, and a task that left a weight unchanged must not add random directions.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(x)
    kept = s > s[0] * max(x.shape) * torch.finfo(s.dtype).eps
    q = u[:, kept] @ vh[kept]
    return q * s[kept].mean() if keep_scale else q


def merge_task_factors(
    factors: Sequence[TaskFactors],
    *,
    gamma: float,
    task_exponent: float,
    dimension_exponent: float,
    combination: Combination = "essential",
) -> torch.Tensor:
    """ESM §2: flatten, scale tasks and input dimensions, concatenate, orthogonalize, multiply.

    combination="essential" (ESM): P̃ Ã with both concatenated factors polar-whitened.
    combination="tsv" (TSV-M): polar(P_cat) diag(σ) polar(B) where A_cat = diag(σ) B has unit
    rows; with SVD factors and every scaling off this is exactly TSV-M.
    An expert that left this weight unchanged takes no part: its basis would be arbitrary.
    """
    shape = (factors[0].basis.shape[0], factors[0].coords.shape[1])
    factors = [f for f in factors if f.norm > 0]
    if not factors:
        return torch.zeros(shape, dtype=torch.float64)
    bases, coords = [], []
    for f in factors:
        e = eigenvalue_flattening(f.eigenvalues, gamma)
        bases.append(f.basis * e)
        coords.append(f.coords * e[:, None])
    task = polarized_scale(torch.stack([f.norm for f in factors]), task_exponent)
    p_cat = torch.cat(bases, dim=1)
    a_cat = torch.cat([c * s for c, s in zip(coords, task)], dim=0)
    a_cat = a_cat * polarized_scale(torch.linalg.vector_norm(a_cat, dim=0), dimension_exponent)

    if combination == "essential":
        return polar_orthogonalize(p_cat, keep_scale=True) @ polar_orthogonalize(
            a_cat, keep_scale=True
        )
    sigma = torch.linalg.vector_norm(a_cat, dim=1)
    unit_rows = a_cat / torch.where(sigma > 0, sigma, 1.0)[:, None]
    return (polar_orthogonalize(p_cat, keep_scale=False) * sigma) @ polar_orthogonalize(
        unit_rows, keep_scale=False
    )
