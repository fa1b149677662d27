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

# The ridge λ_t = ridge · mean(diag G_t) added to each expert's Gram, so that Σ_t G̃_t is
# positive definite wherever the inputs leave it singular (fewer tokens than d_in; an input
# coordinate that is zero on every token; non_diagonal_ratio 1 on rank-deficient inputs).
# Why RIDGE = 1e-7: XᵀX is held in float32, whose rounding (6e-8 of each entry) moves its
# eigenvalues by about 6e-8·mean(diag G); directions below that are noise the statistics do
# not resolve, so a ridge of that size changes nothing they do resolve (1e-6 moved RegMean++
# by 1.4e-5 on the test zoo, 1e-7 by 1.8e-6), while a float64 Cholesky needs far less
# (d·eps64·‖G‖₂ ≤ d²·1.1e-16·mean(diag G) = 2.3e-8·mean(diag G) at Llama-3-8B's d_ff).
# Where the rounding left Σ_t G̃_t indefinite beyond that, the ridge grows tenfold until the
# factorization exists, up to MAX_RIDGE. Added per expert (G_t + λ_t I, with λ_t ΔW_tᵀ on the
# right), it makes directions that no expert's inputs reach fall back to the λ-weighted mean of
# the task vectors, RegMean's own answer for isotropic inputs, rather than to the base.
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
    A_t = G̃_t + λ_t I, G̃_t = r·G_t + (1 − r)·Diag(G_t), r = `non_diagonal_ratio`.

    r = 0 weights each input coordinate's column by its mean square (diagonal RegMean);
    r = 1 is RegMean unshrunk. Always float64, whatever the statistics' precision: the
    normal equations square the inputs' condition number. Solved by Cholesky, never an
    inverse. Memory: Σ_t A_t and Σ_t A_t ΔW_tᵀ in float64, one expert's ΔW_t at a time, each
    Gram read `block` rows at a time (the statistics stay in their stored dtype).
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
            rows = moment.gram_rows(start, stop, torch.float64).div_(moment.n_tokens)
            diagonal[start:stop] = rows[:, start:stop].diagonal()
            if r:
                total[start:stop].add_(rows, alpha=r)
                rhs[start:stop].addmm_(rows, delta.T, alpha=r)
        # the diagonal this expert adds beyond r·G_t: the rest of its own, and its ridge
        added = ridge * diagonal.mean()
        weight = diagonal.mul_(1 - r).add_(added)
        total.diagonal().add_(weight)
        rhs.addcmul_(weight[:, None], delta.T)
        del delta, diagonal, weight, added
    factor, failed = torch.linalg.cholesky_ex(total)
    del total
    if failed:
        if ridge * 10 > MAX_RIDGE:
            raise ValueError(
                f"RegMean's input Gram is not positive definite even with a ridge of {ridge:g}·mean(diag G): "
                "the proxy inputs to this weight are degenerate (zero on every token?)"
            )
        del factor, rhs
        return regression_mean(deltas, inputs, r, ridge * 10, block)
    return torch.cholesky_solve(rhs, factor).T
