"""Merging the experts' factors of one weight into a single update ΔW_merged."""

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Literal

import torch

from mergekit_esm.algebra.scaling import eigenvalue_flattening, polarized_scale
from mergekit_esm.algebra.subspace import TaskFactors, seeded_gaussian, svd_subspace

Combination = Literal["essential", "tsv"]
# How many of its k directions each expert keeps (EsmSettings.expert_rank): "budget", all k that
# carry its update (the paper); "aligned", the leading aligned_rank of them; "auto", whitened,
# aligned where every expert's update fills its budget, the budget where one does not.
ExpertRank = Literal["budget", "aligned", "auto"]
# `expert_rank: auto` scales a target weight's merge made at the aligned rank by this, so that
# one α means about the same merge whichever rank a weight takes: α 1 at the aligned rank and
# α 3 at the budget were each the largest α that kept the base within the protocol's margin on
# both zoos' validation splits, and each expert keeps about as much of its own update at those
# two (docs/robustness.md, "Each expert at its best-aligned rank"). Tensors outside the target
# linears (norms, embeddings) are not merged here and take α × the experts' mean either way.
AUTO_ALIGNED_STRENGTH = 1 / 3


def polar_orthogonalize(x: torch.Tensor, keep_scale: bool, float64_retry: bool | None = None) -> torch.Tensor:
    """Closest matrix with orthonormal columns/rows (Procrustes): U Vᵀ for x = U Σ Vᵀ.

    keep_scale multiplies by mean(Σ), ESM's whitening that keeps the factor's overall size.
    Every kept direction gets weight 1, however small its σ, so accuracy is set by how well
    the smallest σ are resolved (concatenated bases of T experts overlap: σ_min/σ_max ~ 1e-4
    is common). Directions at numerical zero are left out, and out of the mean: their U, V
    are arbitrary, and a task that left a weight unchanged must not add them.

    float64 (the reference, and the CPU default of the methods other than ESM): from the
    eigen-decomposition of the smaller Gram matrix, about twice as fast as an SVD on CPU and
    within ~1e-9 of U Vᵀ. Lower precision (ESM's default, and every method's on a GPU): the
    Gram matrix would square the condition number and lose directions below
    ~3% of σ_max, so the scaled Newton iteration is used, which is matrix products and
    inverses, an order of magnitude faster than the SVD at d_ff widths on a GPU; on a GPU, in
    float64 where κ is too large for float32 (float64_retry; default: off the CPU); the SVD
    only where that iteration does not apply.
    """
    if x.dtype == torch.float64:
        return gram_polar(x, keep_scale)
    q = newton_polar(x)
    if float64_retry is None:
        float64_retry = x.device.type != "cpu"
    if q is None and float64_retry:
        # κ beyond what float32 resolves (0.1/eps ≈ 8e5) need not mean singular: the float64
        # iteration resolves it as the float32 one does smaller κ, far faster than the SVD,
        # which would also cut directions below ~1e-3·σ_max (docs/performance.md). Not on the
        # CPU, where float32 is chosen to save memory that the float64 copies would spend.
        q = newton_polar(x.double())
        q = None if q is None else q.to(x.dtype)
    if q is None:
        return svd_polar(x, keep_scale)
    return with_mean_sigma(q, x) if keep_scale else q


def with_mean_sigma(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x's polar factor q scaled by x's mean singular value, trace(qᵀx) / rank."""
    return q * ((q * x).sum() / min(x.shape))


def newton_polar(x: torch.Tensor, max_steps: int = 40) -> torch.Tensor | None:
    """U Vᵀ by the scaled Newton iteration Q ← (ζQ + (ζQ)⁻ᵀ)/2 on the square R of x = Q₀R
    (for a tall x), with Byers and Xu's scaling (SIAM J. Matrix Anal. Appl. 30, 2008):
    ζ from estimates of σ_max and σ_min, backward stable.

    Stops as soon as the iterate just formed is within the rounding level r·eps of U Vᵀ
    (r = min(x.shape)), judged by quadratic convergence: ‖Q_{k+1} − UVᵀ‖ ≤ ½‖Q_k⁻¹‖·‖Q_k − UVᵀ‖²
    (Higham, Functions of Matrices, 2008, Thm. 8.12), with ‖Q_k − UVᵀ‖ ≈ ‖Q_{k+1} − Q_k‖ and
    ‖Q_k⁻¹‖ ≈ 1 there, so ‖Q_{k+1} − Q_k‖_F² ≤ r·eps bounds it (the Frobenius norm from above).
    That is one inverse fewer than testing the change against √eps and then taking one more
    step, as this did before: 6 instead of 7 for float32 bases of d = 2048 and 5632, with the
    same error (eval/results/polar_cpu.md).

    Each direction is resolved to about κ·eps, as by an SVD. None (use the SVD, which leaves
    out directions at numerical zero) when κ = σ_max/σ_min exceeds 0.1/eps, i.e. x is rank-
    deficient to within a few rounding errors, or when the iteration does not converge.
    """
    if x.shape[0] < x.shape[1]:
        q = newton_polar(x.T, max_steps)
        return None if q is None else q.T
    eps = torch.finfo(x.dtype).eps
    # q is updated in place: a square x is copied, not changed under the caller
    basis, q = torch.linalg.qr(x) if x.shape[0] > x.shape[1] else (None, x.clone())
    tolerance = q.shape[0] * eps
    for step in range(max_steps):
        inverse, info = torch.linalg.inv_ex(q)
        if info != 0:
            return None
        if step == 0:
            largest, smallest = float(spectral_norm(q)), 1 / float(spectral_norm(inverse))
            if not largest * eps < 0.1 * smallest:  # also false for inf / nan
                return None
            zeta = 1 / (largest * smallest) ** 0.5
        elif step == 1:
            zeta = (2 * (largest * smallest) ** 0.5 / (largest + smallest)) ** 0.5
        else:
            zeta = 1 / ((zeta + 1 / zeta) / 2) ** 0.5
        # the increment Q_{k+1} − Q_k = (Q⁻ᵀ/ζ + (ζ − 2)Q)/2, formed in the inverse's memory
        increment = inverse.T.mul_(0.5 / zeta).add_(q, alpha=zeta / 2 - 1)
        del inverse
        q.add_(increment)
        if float(torch.linalg.matrix_norm(increment)) ** 2 <= tolerance:
            return q if basis is None else basis @ q
    return None


def spectral_norm(a: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """σ_max(a), from below, by power iteration on aᵀa: matrix-vector products only (an SVD
    of a 14336² factor costs more than the whole polar iteration)."""
    v = torch.randn(a.shape[1], generator=torch.Generator(a.device).manual_seed(0), dtype=a.dtype, device=a.device)
    v /= torch.linalg.vector_norm(v)
    for _ in range(steps):
        v = a.T @ (a @ v)
        norm = torch.linalg.vector_norm(v)
        v /= norm
    return norm.sqrt()


def svd_polar(x: torch.Tensor, keep_scale: bool) -> torch.Tensor:
    """polar_orthogonalize's SVD route: U Vᵀ over the directions above numerical zero (times
    their mean σ with keep_scale), where the Newton iteration does not apply."""
    u, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    if sigma.numel() == 0 or sigma[0] <= 0:
        return torch.zeros_like(x)
    kept = sigma > sigma[0] * max(x.shape) * torch.finfo(x.dtype).eps
    q = u[:, kept] @ vh[kept]
    return q * sigma[kept].mean() if keep_scale else q


def gram_polar(x: torch.Tensor, keep_scale: bool) -> torch.Tensor:
    """polar_orthogonalize's float64 route: U Vᵀ from the eigen-decomposition of the smaller
    Gram matrix, over the directions above numerical zero (times their mean σ with keep_scale)."""
    tall = x.shape[0] >= x.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x if tall else x @ x.T)  # eigh reads one triangle
    if eigenvalues.numel() == 0 or eigenvalues[-1] <= 0:
        return torch.zeros_like(x)
    # eigenvalues ascend, so the kept ones are a suffix: v is a view, not a copy (memory at d_ff²)
    first = int((eigenvalues <= eigenvalues[-1] * max(x.shape) * torch.finfo(x.dtype).eps).sum())
    v, sigma = eigenvectors[:, first:], eigenvalues[first:].sqrt()
    # x (xᵀx)^{-1/2} restricted to the kept directions, without forming the square r × r matrix
    q = ((x @ v) / sigma) @ v.T if tall else v @ ((v.T @ x) / sigma[:, None])
    return q * sigma.mean() if keep_scale else q


def storage_rounding_level(weight_rms: float, shape: tuple[int, int], stored: torch.dtype) -> float:
    """Largest share of a task matrix ΔW = W_t − W0 that rounding W_t to its checkpoint's
    dtype can make, in any one output direction: the spectral norm of a d_out × d_in matrix of
    independent errors of at most half an ulp (eps·|w|/2) each, rms(W)·eps/2·(√d_out + √d_in)
    (the edge of its singular value spectrum).

    A merged LoRA stored in float32 or bfloat16 has rank r plus this noise in every other
    direction. Measured against the solver's eps alone (float64), the noise passed as signal:
    whitening gave each of those directions the weight of a real one."""
    d_out, d_in = shape
    return 0.5 * torch.finfo(stored).eps * weight_rms * (d_out**0.5 + d_in**0.5)


def rank_above_rounding(delta: torch.Tensor, level: float, directions: int) -> int:
    """How many of ΔW's singular values stand above the checkpoint's rounding level, counted
    up to `directions` (more are not needed): the rank of a merged LoRA's update, whatever the
    rounding noise in its other directions.

    The essential subspace cannot tell this by itself: its eigenproblem squares ΔW's spread,
    and with an LLM's massive activations (one input coordinate 10³–10⁴ times the rest) the
    noise directions' eigenvalues fall below what the eigensolver resolves, even in float64.
    Their eigenvectors then lean towards the real directions and pass the share-of-ΔW test,
    and the whitening weighs each like a real one (docs/design.md, "The math"). A Gaussian
    sketch Y = ΔW Ω (Ω: d_in × m) squares nothing: the noise N (‖N‖₂ ≤ level) gives Y
    singular values of at most τ = level·(√d_in + √m) ≥ level·‖Ω‖₂, a direction of a rank-r
    ΔW with singular value σ one of at least σ·(√m − √r), which is ≥ σ·0.4·√m for m ≥ 2r + 8,
    so directions ten times above the level count and no noise direction does. ΔW is
    sketched along its longer side (its transpose has the same singular values), so Y is
    the smaller matrix. With a fixed seed, and in a precision chosen from ΔW's size and the
    level (not from the working precision): the count is the same in either working precision
    and on every run.

    In stages, cheapest first, as most experts are full fine-tunes whose every direction
    stands above the level (each stage's cost: `python -m eval.bench_rank_sketch`):
    1. a sketch of m = `directions` columns: σ_j(Y) ≤ σ_j(ΔW)·‖Ω‖₂, so if all m of Y's
       singular values exceed τ, ΔW has at least `directions` above the level;
    2. else that sketch's own count c, when m ≥ 2c + 8 (a LoRA's rank);
    3. else the count from m = 2·`directions` + 8 columns, reusing the first sketch's, also
       where m exceeds ΔW's shorter side (Y wider than tall): a narrower Y would lose the
       weakest of a full-rank ΔW's directions, and ΔW's own singular values would have no
       margin above the level (a merged LoRA's rounding noise reaches it).
    Y's singular values come from its smaller Gram matrix (YᵀY or YYᵀ; all above τ: one
    Cholesky of YᵀY − τ²I) where squaring keeps τ² above float64's rounding of it, as for ΔW
    in bfloat16 and most float32 checkpoints; from Y itself where the level lies too far below
    ΔW for that.

    The sketch products run in float32 where their rounding stays far below τ (`sketch_dtype`:
    bfloat16 and float16 checkpoints, and float32 ones whose ΔW is small against W), else in
    float64; the counting is in float64 either way.
    """
    wide = delta if delta.shape[1] >= delta.shape[0] else delta.T
    rows, cols = wide.shape
    directions = min(directions, rows)
    if directions == 0:
        return 0
    row_norm = float(torch.linalg.vector_norm(wide, dim=1).max())
    wide = wide.to(sketch_dtype(row_norm, level, rows, cols, 2 * directions + 8))

    def sketch(m: int, known: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Y = ΔW Ω for Ω's first m columns (the same columns for every m: drawn row by row of
        Ωᵀ), reusing the columns of Y already `known`; with its noise bound τ."""
        omega = seeded_gaussian(m, cols)  # Ωᵀ: the same first columns for every m
        start = 0 if known is None else known.shape[1]
        y = (wide @ omega[start:].T.to(wide.device, wide.dtype)).double()
        return (y if known is None else torch.cat([known, y], dim=1)), level * (cols**0.5 + m**0.5)

    def count_above(y: torch.Tensor, noise: float, small_only: bool = False) -> int:
        """#σ(Y) > τ. small_only: exact only when all are above, or when the count is small
        enough for stage 2 (else any count > (m − 8)/2)."""
        m = y.shape[1]
        # rounding moves the Gram matrix's eigenvalues by at most ~n·eps·‖Y‖_F² (n: the
        # longer side, summed over); within a quarter of τ² only directions within ~12% of
        # τ can change sides, where the count is a matter of convention anyway
        if max(y.shape) * torch.finfo(torch.float64).eps * float(y.square().sum()) > 0.25 * noise**2:
            return int((torch.linalg.svdvals(y) > noise).sum())
        gram = y.T @ y if m <= y.shape[0] else y @ y.T
        gram.diagonal().sub_(noise**2)
        if small_only:
            # a leading minor of order i that is not positive definite: Y's first i − 1
            # columns alone have i − 1 singular values above τ, so Y has at least as many
            failed = int(torch.linalg.cholesky_ex(gram).info)
            if failed == 0 or failed - 1 > (m - 8) // 2:
                return m if failed == 0 else failed - 1
        return int((torch.linalg.eigvalsh(gram) > 0).sum())

    known = None
    if directions < rows:
        known, noise = sketch(directions)
        count = count_above(known, noise, small_only=True)
        if count == directions or directions >= 2 * count + 8:
            return count
    return min(count_above(*sketch(2 * directions + 8, known)), directions)


def with_rounding_level(factors: TaskFactors, delta: torch.Tensor, level: float, directions: int) -> TaskFactors:
    """`factors` of ΔW = `delta` marked with its checkpoint's rounding level and the number of
    its directions above it (rank_above_rounding, up to `directions`), which decide in
    `carrying_directions` which directions take part. Level 0 (exact inputs): no rule."""
    return replace(factors, rounding=level, rank=rank_above_rounding(delta, level, directions) if level > 0 else None)


def sketch_dtype(row_norm: float, level: float, rows: int, cols: int, columns: int) -> torch.dtype:
    """float32 for rank_above_rounding's sketch Y = ΔW Ω (ΔW: rows × cols, its longest row of
    norm `row_norm`; Ω: cols × `columns` Gaussian) where a float32 product's rounding error
    stays below a tenth of the noise bound τ = level·(√cols + √columns); float64 otherwise.

    Each entry of Y is a dot product of length cols with error ~u·√cols·‖ΔW row‖ (u = eps/2;
    the probabilistic bound of Higham and Mary, SIAM J. Sci. Comput. 41, 2019), independent
    across entries, so the error matrix's spectral norm, which bounds how far any singular
    value of Y moves, is at most u·√cols·max‖ΔW row‖·(√rows + √columns). That is far below τ
    for bfloat16 and float16 checkpoints (levels 2¹³–2¹⁶ times float32's), and for a float32
    checkpoint only when ΔW is small against W.

    On a CPU float32 halves the sketch's time; on a consumer GPU, whose float64 rate is 1/64 of
    its float32 rate, it is what makes the rule affordable for bfloat16 models.
    """
    u = torch.finfo(torch.float32).eps / 2
    error = u * cols**0.5 * row_norm * (rows**0.5 + columns**0.5)
    return torch.float32 if error <= 0.1 * level * (cols**0.5 + columns**0.5) else torch.float64


def aligned_rank(row_norms: torch.Tensor) -> int:
    """The j whose leading j directions, whitened, best align with the expert's own update:
    argmax_j Σ_{i≤j} r_i / √j for the directions' shares r_i = ‖â_i‖ of ΔW.

    Whitened at their mean weight, j orthogonal directions of singular values s_i make the
    update c·Σ u_i v_iᵀ, whose cosine with ΔW is Σ_{i≤j} s_i / (√j‖s‖) and whose share of ΔW,
    ⟨M, ΔW⟩/‖ΔW‖² at c = mean s_i, is that cosine squared. Adding direction j+1 raises it only
    while s_{j+1} exceeds about half the kept directions' mean: weaker ones cost the update
    more norm than they add to the expert. Exact for orthogonal rows (the SVD basis); an
    essential subspace's rows are nearly so."""
    if row_norms.numel() == 0:
        return 0
    return int(truncation_alignment(row_norms.double()).argmax()) + 1


def truncation_alignment(row_norms: torch.Tensor) -> torch.Tensor:
    """Σ_{i≤j} r_i / √j for every j: aligned_rank's criterion, ‖ΔW‖ times the cosine of the
    whitened truncation at j directions with ΔW (for orthogonal rows)."""
    return row_norms.cumsum(0) / torch.arange(1, row_norms.numel() + 1, dtype=row_norms.dtype).sqrt()


def carrying_directions(factors: TaskFactors, aligned: bool = False) -> torch.Tensor:
    """Which of an expert's k directions take part in the merge: the leading
    `factors.rank` (rank_above_rounding: at most as many as ΔW has above its checkpoint's
    rounding level), and of those, the ones with a positive eigenvalue whose share of ΔW,
    ‖row of Â‖, is above ΔW's rounding level: the solver's (‖ΔW‖·max(shape)·eps of the working
    dtype) and the checkpoint's (factors.rounding, from storage_rounding_level), whichever is
    larger.

    The rest are arbitrary vectors of a null space: a low-rank task matrix (every LoRA expert)
    or rounding that made an eigenvalue ≤ 0 (inputs of lower rank than k). Kept, they would
    make the concatenated factors singular — every direction gets weight 1 in the polar factor —
    and send it to the slow SVD route; a merged LoRA's rounding noise, kept, gets the weight of
    a real direction. Directions that the proxy barely excites but that carry part of ΔW stay,
    as ESM keeps k per expert.

    aligned: of those, only the leading aligned_rank ones (`expert_rank: aligned`).
    """
    d_out, d_in = factors.basis.shape[0], factors.coords.shape[1]
    row_norms = torch.linalg.vector_norm(factors.coords, dim=1)
    floor = (factors.norm * max(d_out, d_in) * torch.finfo(factors.coords.dtype).eps).clamp_min(factors.rounding)
    kept = (factors.eigenvalues > 0) & (row_norms > floor)
    if factors.rank is not None:
        kept[factors.rank :] = False
    return leading_aligned(kept, row_norms) if aligned else kept


def fills_budget(factors: TaskFactors, kept: torch.Tensor) -> bool:
    """Whether an expert's update fills its k directions, as a full fine-tune's does and a
    merged LoRA's of rank below k does not: ΔW has at least k directions above its
    checkpoint's rounding level (rank_above_rounding), or, where that was not measured (exact
    inputs), all k directions carry it. Not that all k carry it where it was measured: an
    essential subspace's trailing directions can hold almost none of a full-rank ΔW (the
    proxy's massive activations), which says nothing of ΔW's rank."""
    k = factors.basis.shape[1]
    return factors.rank >= k if factors.rank is not None else bool(kept.all())


def leading_aligned(kept: torch.Tensor, row_norms: torch.Tensor) -> torch.Tensor:
    """Of the directions marked in `kept`, the leading aligned_rank of them (`row_norms`: each
    direction's share of ΔW)."""
    carrying = kept.nonzero().flatten()
    kept = kept.clone()
    kept[carrying[aligned_rank(row_norms[carrying]) :]] = False
    return kept


def merge_task_factors(
    factors: Iterable[TaskFactors],
    *,
    gamma: float,
    task_exponent: float,
    dimension_exponent: float,
    combination: Combination = "essential",
    preserve_norm: bool = False,
    spectrum_exponent: float = 0.0,
    expert_rank: ExpertRank = "budget",
) -> torch.Tensor:
    """ESM §2: flatten, scale tasks and input dimensions, concatenate, orthogonalize, multiply.

    preserve_norm: after task and after dimension scaling A_cat's Frobenius norm is restored,
    and with TSV-M's combination eigenvalue flattening keeps each expert's norm, so that
    flattening and polarized scaling shift weight between directions, tasks and dimensions
    without changing the total. The paper's raw ratios r^p average E[r^p] ≥ 1, which grows with how much the norms
    differ: experts trained with different budgets inflate the update by orders of magnitude.

    combination="essential" (ESM): P̃ Ã with both concatenated factors polar-whitened.
    combination="tsv" (TSV-M): polar(P_cat) diag(σ) polar(B) where A_cat = diag(σ) B has unit
    rows, each expert's factors first written in singular form (in_singular_form); with SVD
    factors and every scaling off this is exactly TSV-M.
    spectrum_exponent (essential only; 0 is ESM): whitening gives every kept direction the
    same weight, so an expert whose update sits in a few strong directions (a LoRA) keeps a far
    smaller share of it than one spread over many. With q > 0 each expert's block of the
    whitened update is scaled by expert_spectrum_scale: its own directions' rms singular value,
    as a ratio to the others', to the power q. With q = 1 an expert keeps a share of its own
    update proportional to its spectrum's mean/rms ratio (1 if flat), about the same for every
    expert as with TSV-M, instead of one proportional to 1/σ.
    expert_rank: "budget" (the paper), each expert keeps every direction that carries its
    update (carrying_directions); "aligned", only the leading ones that best align its whitened
    block with its own update; "auto", with the essential combination, aligned when every
    expert's update fills its budget (fills_budget: full fine-tunes) and the merge scaled by
    AUTO_ALIGNED_STRENGTH, the budget when one does not (a merged LoRA of rank below k, or an
    update mostly below its checkpoint's rounding level). At the aligned rank a LoRA keeps its
    one or two directions at the whitened weight of each of a full fine-tune's many, a small
    share of its update (docs/robustness.md).
    An expert that left this weight unchanged takes no part: its basis would be arbitrary.
    `factors` is consumed one at a time; each expert's factors are kept (as the concatenation
    needs them anyway) until every expert is known to fill its budget or not.
    """
    experts = []  # (factors, its carrying directions at the budget)
    for f in factors:
        shape, like = (f.basis.shape[0], f.coords.shape[1]), f.basis
        kept = carrying_directions(f)
        if kept.any():
            experts.append((f, kept, fills_budget(f, kept)))
        del f
    # auto: only whitening weighs weak directions as strong ones; TSV-M's combination keeps the σ
    auto_aligned = expert_rank == "auto" and combination == "essential" and all(fills for *_, fills in experts)
    aligned = expert_rank == "aligned" or auto_aligned
    strength = AUTO_ALIGNED_STRENGTH if auto_aligned else 1.0
    bases, coords, norms, spectra, flattening = [], [], [], [], []
    while experts:
        f, kept, _ = experts.pop(0)
        if aligned:
            kept = leading_aligned(kept, torch.linalg.vector_norm(f.coords, dim=1))
        if not kept.all():
            f = TaskFactors(f.basis[:, kept], f.coords[kept], f.eigenvalues[kept], f.norm)
        # the expert's own spectrum, before flattening and scaling reshape it
        spectra.append((torch.linalg.matrix_norm(f.coords), f.coords.shape[0]))
        # flattened to mean 1 over the directions that take part, so a rank-r expert
        # weighs as if it had been truncated at r (authors' mean-1 rule). TSV-M's
        # combination keeps the σ, so there flattening must keep the expert's norm
        # (preserve_norm); whitened, the size is restored after the polar factors instead.
        keep_norm = preserve_norm and combination == "tsv"
        row_norms = torch.linalg.vector_norm(f.coords, dim=1) if keep_norm else None
        e = eigenvalue_flattening(f.eigenvalues, gamma, row_norms)
        bases.append(f.basis * e)
        coords.append(f.coords * e[:, None])
        norms.append(f.norm)
        flattening.append(e)
    if not bases:
        return like.new_zeros(shape)
    p_cat = torch.cat(bases, dim=1)
    del bases
    a_cat = polarized_coordinates(coords, torch.stack(norms), task_exponent, dimension_exponent, preserve_norm)
    del coords

    if combination == "essential":
        if preserve_norm:
            e = torch.cat(flattening)
            p_whitened = with_unflattened_sigma(polar_orthogonalize(p_cat, keep_scale=False), p_cat, e, dim=1)
            a_whitened = with_unflattened_sigma(polar_orthogonalize(a_cat, keep_scale=False), a_cat, e, dim=0)
        else:
            p_whitened = polar_orthogonalize(p_cat, keep_scale=True)
            a_whitened = polar_orthogonalize(a_cat, keep_scale=True)
        if spectrum_exponent != 0:
            p_whitened *= expert_spectrum_scale(spectra, spectrum_exponent).to(p_whitened)
        return (p_whitened @ a_whitened).mul_(strength)
    return singular_vector_merge(*in_singular_form(p_cat, a_cat, [e.numel() for e in flattening]), isotropic=False)


def in_singular_form(p_cat: torch.Tensor, a_cat: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's block (P_t, A_t) of the concatenated factors (`counts`: its directions)
    rewritten as (P_t U, Σ Vᵀ) for A_t = U Σ Vᵀ: the same product P_t A_t, with orthogonal
    coordinate rows.

    TSV-M's combination (singular_vector_merge) takes each direction's weight σ from the norm
    of its coordinate row and orthogonalizes the unit rows, which reproduces an expert's own
    update only where its rows are orthogonal, as ΔW's singular vectors' are. An essential
    subspace's coordinates Â = P̂ᵀΔW are not (their Gram P̂ᵀΔWΔWᵀP̂ is not diagonal), nor are
    any rows after dimension scaling; combined as they were, even one expert alone came out
    as another matrix (tests/test_algebra.py)."""
    bases, coords = [], []
    for p, a in zip(p_cat.split(list(counts), dim=1), a_cat.split(list(counts), dim=0)):
        u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
        bases.append(p @ u)
        coords.append(sigma[:, None] * vh)
    return torch.cat(bases, dim=1), torch.cat(coords, dim=0)


def with_unflattened_sigma(q: torch.Tensor, x: torch.Tensor, flattening: torch.Tensor, dim: int) -> torch.Tensor:
    """Polar factor q of a flattened factor x (its directions along `dim` scaled by
    `flattening`), times the mean singular value of x with the flattening undone, measured along
    q: ⟨q, x₀⟩/⟨q, q⟩ for x₀ = x·diag(1/e) (columns, dim=1) or diag(1/e)·x (rows, dim=0).

    Whitening gives every direction the factor's mean σ, so that mean sets the update's size.
    The authors' mean-1 rule keeps mean(e) = 1, not mean(σ·e): where an expert's spectrum sits
    in one direction (a LoRA whose update meets an LLM's massive activations), its strongest
    direction takes a large e and the whitened update outgrew the experts' sum
    (docs/robustness.md, "Two LoRA experts"). Measured on x₀, flattening sets proportions
    only, as preserve_norm has every scaling level do. For q = polar(x₀) this is x₀'s mean σ.
    A zero q (nothing above numerical zero) stays zero.
    """
    rank = q.square().sum()
    if rank == 0:
        return q
    directions = (q * x).sum(dim=1 - dim) / flattening.to(x)
    return q * (directions.sum() / rank)


def expert_spectrum_scale(spectra: Sequence[tuple[torch.Tensor, int]], exponent: float) -> torch.Tensor:
    """Per kept direction, its expert's scale after whitening: the polarized scale of the
    experts' rms singular values ‖A_t‖_F/√k_t, renormalized so that Σ_t k_t s_t² = Σ_t k_t (a
    whitened update of orthogonal experts keeps its Frobenius norm; scaling shifts weight
    between experts, as the other levels do with preserve_norm). `spectra`: (‖A_t‖_F, k_t) per
    expert, in the order of the concatenated directions."""
    energy = torch.stack([norm.double() for norm, _ in spectra])
    counts = torch.tensor([k for _, k in spectra], dtype=torch.float64)
    scale = polarized_scale(energy / counts.sqrt(), exponent)
    weighted = (counts * scale**2).sum()
    scale = scale * (counts.sum() / weighted).sqrt() if weighted > 0 else torch.ones_like(scale)
    return scale.repeat_interleave(counts.long())


def polarized_coordinates(
    coords: list[torch.Tensor], norms: torch.Tensor, task_exponent: float, dimension_exponent: float, preserve_norm: bool
) -> torch.Tensor:
    """A_cat: each expert's coordinates scaled by its task scale (from `norms`, the task
    vectors' norms), concatenated, then scaled per input dimension (column). The coordinate
    tensors are scaled in place.

    preserve_norm: after each level, A_cat is brought back to the Frobenius norm it had
    before that level, so scaling changes the weights' proportions and not their total.
    """
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.matrix_norm(c) for c in coords]))
    for c, s in zip(coords, polarized_scale(norms, task_exponent)):
        c.mul_(s)
    a_cat = torch.cat(coords, dim=0)
    if preserve_norm:
        _rescale_to_norm_(a_cat, before)
    before = torch.linalg.matrix_norm(a_cat)
    a_cat.mul_(polarized_scale(torch.linalg.vector_norm(a_cat, dim=0), dimension_exponent))
    if preserve_norm:
        _rescale_to_norm_(a_cat, before)
    return a_cat


def _rescale_to_norm_(x: torch.Tensor, norm: torch.Tensor) -> None:
    current = torch.linalg.matrix_norm(x)
    if current > 0:
        x.mul_(norm / current)


def concatenate_factors(factors: Sequence[TaskFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """[P_1 … P_T] and [A_1; …; A_T]. Without orthogonalization, P_cat A_cat = Σ_t P_t A_t."""
    return torch.cat([f.basis for f in factors], dim=1), torch.cat([f.coords for f in factors], dim=0)


def singular_vector_merge(p_cat: torch.Tensor, a_cat: torch.Tensor, *, isotropic: bool) -> torch.Tensor:
    """polar(P_cat) · diag(σ) · polar(B), where A_cat = diag(σ) B has unit rows.

    The combination step of TSV-M (σ = the kept singular values) and, with isotropic=True,
    of Iso-CTS (every σ replaced by their mean, a flat spectrum).
    """
    sigma = torch.linalg.vector_norm(a_cat, dim=1)
    unit_rows = a_cat / torch.where(sigma > 0, sigma, 1.0)[:, None]
    if isotropic:
        sigma = torch.full_like(sigma, float(sigma.mean()))
    return (polar_orthogonalize(p_cat, keep_scale=False) * sigma) @ polar_orthogonalize(
        unit_rows, keep_scale=False
    )


def task_singular_vectors_merge(deltas: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): each ΔW_t's top-k SVD factors, concatenated,
    both sides orthogonalized, singular values kept. Unchanged experts take no part."""
    factors = [svd_subspace(d, rank) for d in deltas]
    factors = [f for f in factors if f.norm > 0]
    if not factors:
        return torch.zeros_like(deltas[0])
    return singular_vector_merge(*concatenate_factors(factors), isotropic=False)


def isotropic_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): σ̄ U Vᵀ for Σ_t ΔW_t = U Σ Vᵀ, σ̄ = mean(σ).

    σ̄ averages the non-zero singular values; the paper averages all min(d_out, d_in) of
    them, which is the same for full-rank sums (every full fine-tune) and avoids adding
    arbitrary null directions for rank-deficient ones (e.g. LoRA experts).
    """
    total = None
    for d in deltas:  # one task matrix at a time (they may be read on demand)
        total = d.clone() if total is None else total.add_(d)
    return polar_orthogonalize(total, keep_scale=True)


def common_space_split(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) with common + n_tasks·per_task = rank.

    As the Iso-CTS code does: the common part takes ⌊fraction·rank⌋, rounded so that the
    rest divides equally among the tasks.
    """
    per_task = round((rank - int(rank * common_fraction)) / n_tasks)
    per_task = min(per_task, rank // n_tasks)
    return rank - per_task * n_tasks, per_task


def common_and_task_specific_merge(deltas: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): the top singular directions of Σ_t ΔW_t (the
    common subspace) plus, per task, the top directions of ΔW_t outside it; both sides
    orthogonalized; spectrum flattened to its mean."""
    d = [x for x in deltas if x.any()]
    if not d:
        return torch.zeros_like(deltas[0])
    common, per_task = common_space_split(min(d[0].shape), len(d), common_fraction)
    u, s, vh = torch.linalg.svd(torch.stack(d).sum(dim=0), full_matrices=False)
    u_c = u[:, :common]
    bases, coords = [u_c], [s[:common, None] * vh[:common]]
    for x in d:
        residual = svd_subspace(x - u_c @ (u_c.T @ x), per_task)
        bases.append(residual.basis)
        coords.append(residual.coords)
    return singular_vector_merge(torch.cat(bases, dim=1), torch.cat(coords, dim=0), isotropic=True)
