"""RegMean's closed form (Jin et al., ICLR 2023): the linear weight whose outputs come closest,
in least squares, to every expert's outputs on that expert's own inputs.

For y = x Wᵀ and expert t's inputs X_t (n_t × d_in), min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²_F / n_t is
solved by Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ with G_t = X_tᵀX_t / n_t. The same weights applied to
the task vectors give the same merge (Σ_t G_t (W_t − W0)ᵀ = Σ_t G_t W_tᵀ − (Σ_t G_t) W0ᵀ), so
ΔW_merged = W_merged − W0 and α scales it like every other method's update.
"""

from collections.abc import Sequence

import torch

from mergekit_esm.algebra.subspace import GRAM_BLOCK, InputMoment

# The ridge: each expert's Gram gets `ridge`·Diag(G_t) more diagonal, so that Σ_t G̃_t is
# positive definite wherever the inputs leave it singular (fewer tokens than d_in; a
# non_diagonal_ratio of 1 on rank-deficient inputs). Relative to each input coordinate's own
# mean square, not to one global scale: LLM activations span decades between coordinates, and
# a ridge of 1e-7 of the mean diagonal moved a random test's merge by 7e-4 where the
# coordinates' mean squares spanned 10^4. In those units (the Gram scaled to a unit diagonal)
# the float32 rounding of the held XᵀX is 6e-8 of each entry, so a ridge of 1e-7 sits at the
# noise floor of the statistics and changes nothing they resolve (the test zoo's RegMean++
# merge stays within 6e-7 of the ridge-free reference), while float64 Cholesky, whose error
# depends on the scaled matrix, needs far less. Where the rounding left Σ_t G̃_t indefinite
# beyond that (ratio 1 on singular inputs), the ridge grows tenfold until the factorization
# exists, up to MAX_RIDGE. An input coordinate that is exactly zero on every token of an expert
# gets ridge·mean(diag G_t) instead, so that a column no expert's inputs reach is the
# mean-square-weighted mean of the task vectors' columns (RegMean's answer for isotropic
# inputs) rather than undetermined.
RIDGE = 1e-7
MAX_RIDGE = 1e-2


def regression_mean(
    deltas: Sequence[torch.Tensor],
    inputs: Sequence[InputMoment],
    non_diagonal_ratio: float,
    ridge: float = RIDGE,
    block: int = GRAM_BLOCK,
) -> torch.Tensor:
    """ΔW_merged (d_out × d_in, float64) = [(Σ_t A_t)⁻¹ Σ_t A_t ΔW_tᵀ]ᵀ with
    A_t = G̃_t + ridge·Diag(G_t), G̃_t = r·G_t + (1 − r)·Diag(G_t), r = `non_diagonal_ratio`.

    r = 0 weights each input coordinate's column by its mean square (diagonal RegMean);
    r = 1 is RegMean unshrunk. Always float64, whatever the statistics' precision: the
    normal equations square the inputs' condition number. Solved by Cholesky, never an
    inverse. Memory: Σ_t A_t (factored in place) and Σ_t A_t ΔW_tᵀ in float64, one expert's
    ΔW_t at a time, each Gram read `block` rows at a time (the statistics stay in their
    stored dtype).
    """
    r = non_diagonal_ratio
    total = rhs = None
    for delta, moment in zip(deltas, inputs):
        delta = delta.to(torch.float64)
        d_in = delta.shape[1]
        if total is None:
            total = torch.zeros(d_in, d_in, dtype=torch.float64, device=delta.device)
            rhs = torch.zeros(d_in, delta.shape[0], dtype=torch.float64, device=delta.device)
        diagonal = torch.empty(d_in, dtype=torch.float64, device=delta.device)
        for start in range(0, d_in, block):
            stop = min(start + block, d_in)
            # a new tensor, never the held moment divided in place
            rows = moment.gram_rows(start, stop, torch.float64) / moment.n_tokens
            diagonal[start:stop] = rows[:, start:stop].diagonal()
            if r:
                total[start:stop].add_(rows, alpha=r)
                rhs[start:stop].addmm_(rows, delta.T, alpha=r)
        # the diagonal this expert adds beyond r·G_t: the rest of its own, and its ridge
        unseen = diagonal == 0
        weight = diagonal.mul(1 - r + ridge).masked_fill_(unseen, ridge * float(diagonal.mean()))
        total.diagonal().add_(weight)
        rhs.addcmul_(weight[:, None], delta.T)
        del delta, diagonal, weight, unseen
    # Factored in place: Σ_t A_t is symmetric, so its transpose is the same matrix laid out
    # column-major, as LAPACK factors it without a copy (a second d_in² float64 matrix is
    # 1.5 GiB at Llama-3-8B's d_ff).
    factor = total.mT
    failed = torch.empty((), dtype=torch.int32, device=total.device)
    torch.linalg.cholesky_ex(factor, out=(factor, failed))
    del total
    if failed:
        if ridge * 10 > MAX_RIDGE:
            raise ValueError(
                f"RegMean's input Gram is not positive definite even with a ridge of {ridge:g}·Diag(G): "
                "the proxy inputs to this weight are degenerate"
            )
        del factor, rhs
        return regression_mean(deltas, inputs, r, ridge * 10, block)
    return torch.cholesky_solve(rhs, factor).T
