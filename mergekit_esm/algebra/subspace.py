"""Per-task subspaces of a task matrix ΔW (d_out × d_in, PyTorch convention y = x Wᵀ).

Both decompositions return the same factor form, ΔW ≈ P̂ Â with orthonormal P̂, so the
merge step does not care which basis produced them.
"""

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class TaskFactors:
    """Rank-k factors of one expert's task matrix: ΔW ≈ basis @ coords."""

    basis: torch.Tensor  # P̂: d_out × k, orthonormal columns
    coords: torch.Tensor  # Â = P̂ᵀ ΔW: k × d_in
    eigenvalues: torch.Tensor  # the k leading eigenvalues λ₁ ≥ … ≥ λ_k ≥ 0 behind the basis
    norm: torch.Tensor  # ‖ΔW‖_F, i.e. ‖Pᵀ ΔW‖_F over the full basis (task-level scaling)


def moment_sqrt(input_moment: torch.Tensor) -> torch.Tensor:
    """R with R Rᵀ = XᵀX (symmetric square root, float64; XᵀX may be singular when n < d_in).

    Computed once per expert, layer and input and shared by the weights reading that input.
    """
    g = input_moment.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((g + g.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


@dataclass
class InputMoment:
    """One expert's inputs to one weight: XᵀX (d_in × d_in) over n_tokens proxy tokens."""

    moment: torch.Tensor
    n_tokens: int

    @cached_property
    def root(self) -> torch.Tensor:
        """√XᵀX, computed once and shared by the weights reading this input (q/k/v, gate/up)."""
        return moment_sqrt(self.moment)


def activation_shift_spectrum(
    delta: torch.Tensor,
    input_moment: torch.Tensor,
    n_tokens: int,
    moment_root: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of S = ΔW (XᵀX) ΔWᵀ / (n−1), the uncentered covariance of ΔO = X ΔWᵀ.

    Returns (eigenvalues descending, clamped at 0; eigenvectors as columns), float64, with
    min(d_out, d_in) pairs: S has rank ≤ d_in. Only XᵀX is needed, so the proxy tokens never
    have to be held at once. For a wide output (d_out > d_in, e.g. gate/up_proj) the thin SVD
    of ΔW·R (R Rᵀ = XᵀX, d_out × d_in) replaces the d_out × d_out eigenproblem: same
    eigenpairs, O(d_out·d_in²) instead of O(d_out³).
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 proxy tokens, got {n_tokens}")
    d = delta.to(torch.float64)
    d_out, d_in = d.shape
    if d_out > d_in:
        root = moment_sqrt(input_moment) if moment_root is None else moment_root
        u, s, _ = torch.linalg.svd(d @ root, full_matrices=False)
        return s**2 / (n_tokens - 1), u
    cov = d @ input_moment.to(torch.float64) @ d.T / (n_tokens - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)  # exact symmetry for eigh
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


def essential_subspace(
    delta: torch.Tensor,
    input_moment: torch.Tensor,
    n_tokens: int,
    rank: int,
    moment_root: torch.Tensor | None = None,
) -> TaskFactors:
    """ESD: keep the k directions of the output space that carry most of the activation shift.

    Truncation error is exact: ‖X (ΔW − P̂Â)ᵀ‖_F² = (n−1) Σ_{i>k} λ_i.
    """
    eigenvalues, eigenvectors = activation_shift_spectrum(delta, input_moment, n_tokens, moment_root)
    if rank > eigenvectors.shape[1]:
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {eigenvectors.shape[1]}")
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
