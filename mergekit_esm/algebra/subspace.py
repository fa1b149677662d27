"""Per-task subspaces of a task matrix ΔW (d_out × d_in, PyTorch convention y = x Wᵀ).

Both decompositions return the same factor form, ΔW ≈ P̂ Â with orthonormal P̂, so the
merge step does not care which basis produced them. Everything in `algebra` computes in
the dtype of the task matrices it is given: the caller chooses the precision (`precision`).
"""

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class TaskFactors:
    """Rank-k factors of one expert's task matrix: ΔW ≈ basis @ coords."""

    basis: torch.Tensor  # P̂: d_out × k, orthonormal columns
    coords: torch.Tensor  # Â = P̂ᵀ ΔW: k × d_in
    eigenvalues: torch.Tensor  # the k leading eigenvalues λ₁ ≥ … ≥ λ_k ≥ 0 behind the basis
    norm: torch.Tensor  # ‖ΔW‖_F, i.e. ‖Pᵀ ΔW‖_F over the full basis (task-level scaling)
    # ΔW's rounding level as stored (storage_rounding_level): directions whose share of ΔW is
    # below it are noise of the checkpoint's precision, not the expert's update
    rounding: float = 0.0
    # how many of ΔW's directions stand above that level (rank_above_rounding); None: not
    # measured. Only the `rank` leading directions can carry the update.
    rank: int | None = None


def moment_sqrt(input_moment: torch.Tensor) -> torch.Tensor:
    """R with R Rᵀ = XᵀX (symmetric square root; XᵀX may be singular when n < d_in)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(input_moment)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


@dataclass
class InputMoment:
    """One expert's inputs X (n × d_in) to one weight, held as the smallest of three forms:
    X itself (n < d_in, e.g. few proxy tokens into down_proj's wide input), XᵀX (d_in × d_in),
    or, for an input that only one weight reads, that weight's activation-shift moment
    ΔOᵀΔO = ΔW XᵀX ΔWᵀ (d_out × d_out; down_proj, whose d_out is a quarter to a third of its
    d_in). ESD needs nothing more of an input than ΔW XᵀX ΔWᵀ, which the last form already is.

    X and XᵀX are stored in float32 (half the memory while T experts' statistics wait for the
    merge of their layer), the shift moment in the precision it was summed in (see
    calibration.layerwise); the solvers work in the task matrix's dtype.
    """

    n_tokens: int
    moment: torch.Tensor | None = None  # XᵀX
    tokens: torch.Tensor | None = None  # X
    shift: torch.Tensor | None = None  # ΔW XᵀX ΔWᵀ of the one weight reading this input
    _factors: dict = field(default_factory=dict, repr=False)

    @property
    def rank_bound(self) -> int:
        """The size of the eigenproblem these statistics give for a wide output: min(n, d_in),
        the most directions X can reveal (the rows of `factor`); d_out for the shift moment,
        which is that eigenproblem's matrix."""
        held = next(t for t in (self.tokens, self.moment, self.shift) if t is not None)
        return held.shape[0]

    def reveals_subspace(self, rank: int) -> bool:
        """Whether these tokens can reveal a k-dimensional essential subspace: X has at most
        one direction per token, so with fewer than k (an expert MLP of a mixture-of-experts
        layer that its router seldom chose on the proxy) part of the basis would be arbitrary.
        ESM gives such a weight's expert ΔW's k leading left singular vectors instead: the
        subspace ESD finds when inputs are isotropic (XᵀX ∝ I), i.e. no preference among input
        directions where the proxy shows none."""
        return self.n_tokens >= max(rank, 2)

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """F (rank_bound × d_in) with FᵀF = XᵀX: X itself, or √XᵀX. Computed once per dtype and
        shared by the weights reading this input (q/k/v, gate/up)."""
        if self.shift is not None:
            raise ValueError("inputs held as one weight's shift moment ΔW XᵀX ΔWᵀ have no factor of XᵀX")
        if dtype not in self._factors:
            self._factors[dtype] = (
                self.tokens.to(dtype) if self.tokens is not None else moment_sqrt(self.moment.to(dtype))
            )
        return self._factors[dtype]

    def gram_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start:stop of XᵀX in `dtype` (RegMean reads its Gram a block of rows at a time,
        so no `dtype` copy of a whole d_in × d_in moment is made)."""
        if self.shift is not None:
            raise ValueError("inputs held as one weight's shift moment ΔW XᵀX ΔWᵀ have no XᵀX")
        if self.tokens is not None:
            x = self.factor(dtype)
            return x[:, start:stop].T @ x
        return self.moment[start:stop].to(dtype)

    def output_covariance(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW XᵀX ΔWᵀ (d_out × d_out), without forming √XᵀX."""
        if self.shift is not None:
            if self.shift.shape[0] != delta.shape[0]:
                raise ValueError(f"shift moment of {self.shift.shape[0]} outputs given for a weight with {delta.shape[0]}")
            return self.shift.to(delta.dtype)
        if self.tokens is not None:
            shift = delta @ self.factor(delta.dtype).T
            return shift @ shift.T
        return delta @ self.moment.to(delta.dtype) @ delta.T


# Column block width of the symmetric sums: wide enough for the matrix products to run at
# full speed, narrow enough that skipping the blocks below the diagonal saves most of half.
GRAM_BLOCK = 512


def add_gram_upper_(gram: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """gram += xᵀx on and above the diagonal, one column block at a time; the blocks below the
    diagonal are left stale until `fill_lower_from_upper_`.

    XᵀX is symmetric, so half its multiply-adds are redundant, and torch has no syrk to skip
    them: skipping the blocks below the diagonal saves most of half the time of
    `addmm_(x.T, x)` on wide inputs (docs/performance.md).
    """
    for start in range(0, gram.shape[0], block):
        stop = start + block
        gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
    return gram


def fill_lower_from_upper_(gram: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Mirror what `add_gram_upper_` summed into the blocks below the diagonal, in place (a
    14336² sum has no room for a transposed copy)."""
    for start in range(0, gram.shape[0], block):
        stop = start + block
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


def _descending_eigh(symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)  # reads the lower triangle only
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


SubspaceSolver = Literal["exact", "randomized"]
# Power steps of the randomized solver (its block is count + max(count/4, 16) wide): the fewest
# that leave at most 2% more truncation error than the exact subspace on decaying spectra
# (test_randomized_essential_subspace_…; two steps did not; docs/performance.md).
RANDOMIZED_STEPS = 3


@functools.lru_cache(maxsize=4)
def seeded_gaussian(rows: int, cols: int) -> torch.Tensor:
    """A rows × cols standard Gaussian matrix, seeded, in float32 (faster to draw than float64,
    and as Gaussian for a sketch), on the CPU: the same numbers on every machine and run.

    Kept per shape: a layer asks for the same few shapes once per expert and weight, and at 8B
    widths a draw took longer than the product it feeds on a GPU (docs/performance.md).
    Read-only: callers copy it to their device and dtype."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


def leading_eigh(
    symmetric: torch.Tensor, count: int, solver: SubspaceSolver = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` leading eigenpairs of a symmetric positive semi-definite matrix: eigenvalues
    descending, clamped at 0, and eigenvectors as columns.

    exact: one full eigendecomposition (O(d³), most of it the tridiagonal reduction, which
    runs at memory speed). randomized: subspace iteration (Halko, Martinsson and Tropp, SIAM
    Review 53, 2011, algorithm 4.4) on a seeded Gaussian block a quarter wider than `count`,
    then Rayleigh–Ritz on the block: matrix products and a QR per step, and one eigh of the
    block's size. Its subspace carries slightly less of the matrix's trace than the exact one
    (a near-tie at the cut can fall either side); where the block would be more than half of
    d, nothing is gained and the exact solver runs.
    """
    d = symmetric.shape[0]
    width = count + max(count // 4, 16)
    if solver == "exact" or 2 * width > d:
        eigenvalues, eigenvectors = _descending_eigh(symmetric)
        return eigenvalues[:count], eigenvectors[:, :count]
    block = seeded_gaussian(width, d).T.to(symmetric.device, symmetric.dtype)
    for _ in range(RANDOMIZED_STEPS):
        block = torch.linalg.qr(symmetric @ block).Q
    ritz_values, ritz_vectors = _descending_eigh(block.T @ symmetric @ block)
    return ritz_values[:count], block @ ritz_vectors[:, :count]


def activation_shift_spectrum(
    delta: torch.Tensor, inputs: InputMoment, vectors: int, solver: SubspaceSolver = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading `vectors` eigenpairs of S = ΔW (XᵀX) ΔWᵀ / (n−1), the uncentered covariance
    of ΔO = X ΔWᵀ: eigenvalues descending, clamped at 0; eigenvectors as columns.

    S has min(d_out, m) eigenvalues that can be nonzero, m = min(n, d_in) ≥ rank(S). The
    smaller of two equivalent eigenproblems is solved: S itself (d_out × d_out), or, for a wide
    output (gate/up_proj, d_out > m), the m × m Gram matrix YᵀY of Y = ΔW Fᵀ (FᵀF = XᵀX), whose
    eigenvectors V give S's as Y V / σ. That is O(d_out·m²) instead of O(d_out³); in token
    space when X is held. There, only the wanted vectors are formed and orthonormalized.
    `solver`: leading_eigh's.
    """
    n = inputs.n_tokens
    if n < 2:
        raise ValueError(f"need at least 2 proxy tokens, got {n}")
    if delta.shape[0] <= inputs.rank_bound:
        eigenvalues, eigenvectors = leading_eigh(inputs.output_covariance(delta), vectors, solver)
        return eigenvalues / (n - 1), eigenvectors
    y = delta @ inputs.factor(delta.dtype).T
    eigenvalues, v = leading_eigh(y.T @ y, vectors, solver)
    sigma = eigenvalues.sqrt()
    # σ = 0 (rounding made the eigenvalue ≤ 0, e.g. inputs of lower rank than k): the column
    # stays Y v, which QR turns into some unit vector orthogonal to the rest. Dividing by a σ
    # clamped just above 0 can overflow to Inf; the NaN basis that follows sent a GPU merge
    # to an SVD that did not return.
    u = y @ (v / torch.where(sigma > 0, sigma, 1.0))
    # Y V / σ is orthonormal up to rounding that grows as σ → 0; QR restores it exactly and
    # keeps every direction's sign (R's diagonal is positive where Y V / σ is accurate).
    q, r = torch.linalg.qr(u)
    return eigenvalues / (n - 1), q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def essential_subspace(
    delta: torch.Tensor, inputs: InputMoment, rank: int, solver: SubspaceSolver = "exact"
) -> TaskFactors:
    """ESD: keep the k directions of the output space that carry most of the activation shift.

    Truncation error is exact with the exact solver: ‖X (ΔW − P̂Â)ᵀ‖_F² = (n−1) Σ_{i>k} λ_i;
    the randomized one comes within a bound of it (leading_eigh).
    """
    available = min(delta.shape[0], inputs.rank_bound)
    if rank > available:
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in, n) = {available}")
    eigenvalues, basis = activation_shift_spectrum(delta, inputs, vectors=rank, solver=solver)
    return TaskFactors(
        basis=basis,
        coords=basis.T @ delta,
        eigenvalues=eigenvalues,
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
