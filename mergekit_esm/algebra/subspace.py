"""Per-task subspaces of a task matrix ΔW (d_out × d_in, PyTorch convention y = x Wᵀ).

Both decompositions return the same factor form, ΔW ≈ P̂ Â with orthonormal P̂, so the
merge step does not care which basis produced them. Everything in `algebra` computes in
the dtype of the task matrices it is given: the caller chooses the precision (`precision`).
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TaskFactors:
    """Rank-k factors of one expert's task matrix: ΔW ≈ basis @ coords."""

    basis: torch.Tensor  # P̂: d_out × k, orthonormal columns
    coords: torch.Tensor  # Â = P̂ᵀ ΔW: k × d_in
    eigenvalues: torch.Tensor  # the k leading eigenvalues λ₁ ≥ … ≥ λ_k ≥ 0 behind the basis
    norm: torch.Tensor  # ‖ΔW‖_F, i.e. ‖Pᵀ ΔW‖_F over the full basis (task-level scaling)


def moment_sqrt(input_moment: torch.Tensor) -> torch.Tensor:
    """R with R Rᵀ = XᵀX (symmetric square root; XᵀX may be singular when n < d_in)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(input_moment)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


@dataclass
class InputMoment:
    """One expert's inputs X (n × d_in) to one weight, held as whichever is smaller: X itself
    (n < d_in, e.g. few proxy tokens into down_proj's wide input) or XᵀX (d_in × d_in).

    Stored in float32 (half the memory while T experts' statistics wait for the merge of
    their layer); the solvers work in the task matrix's dtype.
    """

    n_tokens: int
    moment: torch.Tensor | None = None  # XᵀX
    tokens: torch.Tensor | None = None  # X
    _factors: dict = field(default_factory=dict, repr=False)

    @property
    def rank_bound(self) -> int:
        """Rows of `factor`: min(n, d_in), the most directions these inputs can reveal."""
        return self.tokens.shape[0] if self.tokens is not None else self.moment.shape[0]

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """F (rank_bound × d_in) with FᵀF = XᵀX: X itself, or √XᵀX. Computed once per dtype and
        shared by the weights reading this input (q/k/v, gate/up)."""
        if dtype not in self._factors:
            self._factors[dtype] = (
                self.tokens.to(dtype) if self.tokens is not None else moment_sqrt(self.moment.to(dtype))
            )
        return self._factors[dtype]

    def output_covariance(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW XᵀX ΔWᵀ (d_out × d_out), without forming √XᵀX."""
        if self.tokens is not None:
            shift = delta @ self.factor(delta.dtype).T
            return shift @ shift.T
        return delta @ self.moment.to(delta.dtype) @ delta.T


def _descending_eigh(symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)  # reads the lower triangle only
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


def activation_shift_spectrum(delta: torch.Tensor, inputs: InputMoment) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of S = ΔW (XᵀX) ΔWᵀ / (n−1), the uncentered covariance of ΔO = X ΔWᵀ.

    Returns (eigenvalues descending, clamped at 0; eigenvectors as columns) with
    min(d_out, m) pairs, m = min(n, d_in) ≥ rank(S). The smaller of two equivalent
    eigenproblems is solved: S itself (d_out × d_out), or, for a wide output (gate/up_proj,
    d_out > m), the m × m Gram matrix YᵀY of Y = ΔW Fᵀ (FᵀF = XᵀX), whose eigenvectors V give
    S's as Y V / σ. That is O(d_out·m²) instead of O(d_out³); in token space when X is held.
    """
    n = inputs.n_tokens
    if n < 2:
        raise ValueError(f"need at least 2 proxy tokens, got {n}")
    if delta.shape[0] <= inputs.rank_bound:
        eigenvalues, eigenvectors = _descending_eigh(inputs.output_covariance(delta))
        return eigenvalues / (n - 1), eigenvectors
    y = delta @ inputs.factor(delta.dtype).T
    eigenvalues, v = _descending_eigh(y.T @ y)
    # σ = 0 (rounding made the eigenvalue ≤ 0, e.g. inputs of lower rank than k): the column
    # stays Y v, which QR turns into some unit vector orthogonal to the rest. Dividing by a σ
    # clamped just above 0 can overflow to Inf; the NaN basis that follows sent a GPU merge
    # to an SVD that did not return.
    u = y @ (v / torch.where(eigenvalues > 0, eigenvalues.sqrt(), 1.0))
    # Y V / σ is orthonormal up to rounding that grows as σ → 0; QR restores it exactly and
    # keeps every direction's sign (R's diagonal is positive where Y V / σ is accurate).
    q, r = torch.linalg.qr(u)
    return eigenvalues / (n - 1), q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def essential_subspace(delta: torch.Tensor, inputs: InputMoment, rank: int) -> TaskFactors:
    """ESD: keep the k directions of the output space that carry most of the activation shift.

    Truncation error is exact: ‖X (ΔW − P̂Â)ᵀ‖_F² = (n−1) Σ_{i>k} λ_i.
    """
    eigenvalues, eigenvectors = activation_shift_spectrum(delta, inputs)
    if rank > eigenvectors.shape[1]:
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in, n) = {eigenvectors.shape[1]}")
    basis = eigenvectors[:, :rank]
    return TaskFactors(
        basis=basis,
        coords=basis.T @ delta,
        eigenvalues=eigenvalues[:rank],
        norm=torch.linalg.matrix_norm(delta),
    )


def svd_subspace(delta: torch.Tensor, rank: int) -> TaskFactors:
    """TSV-M's per-task factors: the k leading left singular vectors (eigenvalues σ²)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return TaskFactors(
        basis=u[:, :rank],
        coords=s[:rank, None] * vh[:rank],
        eigenvalues=s[:rank] ** 2,
        norm=torch.linalg.vector_norm(s),
    )
