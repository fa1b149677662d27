"""Per-task subspaces of a task matrix ΔW (d_out × d_in, PyTorch convention y = x Wᵀ).

Both decompositions return the same factor form, ΔW ≈ P̂ Â with orthonormal P̂, so the
merge step does not care which basis produced them.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskFactors:
    """Rank-k factors of one expert's task matrix: ΔW ≈ basis @ coords."""

    basis: torch.Tensor  # P̂: d_out × k, orthonormal columns
    coords: torch.Tensor  # Â = P̂ᵀ ΔW: k × d_in
    eigenvalues: torch.Tensor  # the k leading eigenvalues λ₁ ≥ … ≥ λ_k ≥ 0 behind the basis
    norm: torch.Tensor  # ‖ΔW‖_F, i.e. ‖Pᵀ ΔW‖_F over the full basis (task-level scaling)


def activation_shift_spectrum(
    delta: torch.Tensor, input_moment: torch.Tensor, n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of S = ΔW (XᵀX) ΔWᵀ / (n−1), the uncentered covariance of ΔO = X ΔWᵀ.

    Returns (eigenvalues descending, clamped at 0; eigenvectors as columns), float64.
    Only XᵀX is needed, so the proxy tokens never have to be held at once.
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 proxy tokens, got {n_tokens}")
    d = delta.to(torch.float64)
    cov = d @ input_moment.to(torch.float64) @ d.T / (n_tokens - 1)
    cov = (cov + cov.T) / 2  # exact symmetry for eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


def essential_subspace(
    delta: torch.Tensor, input_moment: torch.Tensor, n_tokens: int, rank: int
) -> TaskFactors:
    """ESD: keep the k directions of the output space that carry most of the activation shift.

    Truncation error is exact: ‖X (ΔW − P̂Â)ᵀ‖_F² = (n−1) Σ_{i>k} λ_i.
    """
    eigenvalues, eigenvectors = activation_shift_spectrum(delta, input_moment, n_tokens)
    basis = eigenvectors[:, :rank]
    d = delta.to(torch.float64)
    return TaskFactors(
        basis=basis,
        coords=basis.T @ d,
        eigenvalues=eigenvalues[:rank],
        norm=torch.linalg.matrix_norm(d),
    )


def svd_subspace(delta: torch.Tensor, rank: int) -> TaskFactors:
    """TSV-M's per-task factors: the k leading left singular vectors (eigenvalues σ²)."""
    d = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return TaskFactors(
        basis=u[:, :rank],
        coords=s[:rank, None] * vh[:rank],
        eigenvalues=s[:rank] ** 2,
        norm=torch.linalg.vector_norm(s),
    )
