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
    Computed from the eigen-decomposition of the smaller Gram matrix (xᵀx or x xᵀ), about
    twice as fast as an SVD of x on CPU; in float64 it agrees with U Vᵀ to ~1e-9.
    Directions at numerical zero (σ² ≤ σ²_max·size·eps) are left out, and out of the mean:
    their U, V are arbitrary, and a task that left a weight unchanged must not add them.
    """
    x = x.to(torch.float64)
    tall = x.shape[0] >= x.shape[1]
    gram = x.T @ x if tall else x @ x.T
    eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    if eigenvalues.numel() == 0 or eigenvalues[-1] <= 0:
        return torch.zeros_like(x)
    kept = eigenvalues > eigenvalues[-1] * max(x.shape) * torch.finfo(x.dtype).eps
    v, sigma = eigenvectors[:, kept], eigenvalues[kept].sqrt()
    inverse_root = (v / sigma) @ v.T  # (gram)^{-1/2} on the kept directions
    q = x @ inverse_root if tall else inverse_root @ x
    return q * sigma.mean() if keep_scale else q


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
