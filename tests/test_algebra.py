"""The merge math against brute force, the papers' dense formulas and hand computations,
on small random inputs (float64)."""

import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from mergekit_esm.algebra import (
    common_and_task_specific_merge,
    eigenvalue_flattening,
    essential_subspace,
    isotropic_merge,
    layer_scales,
    merge_task_factors,
    polar_orthogonalize,
    polarized_scale,
    rank_above_rounding,
    storage_rounding_level,
    svd_subspace,
    task_singular_vectors_merge,
    with_rounding_level,
)
from mergekit_esm.algebra.merge import (
    AUTO_ALIGNED_STRENGTH,
    aligned_rank,
    carrying_directions,
    fills_budget,
    common_space_split,
    concatenate_factors,
    newton_polar,
    sketch_dtype,
)
from mergekit_esm.algebra.regression import regression_mean
from mergekit_esm.algebra.subspace import InputMoment, TaskFactors, leading_eigh, seeded_gaussian
from mergekit_esm.methods.esm import EsmSettings
from tests import reference_svd_family as reference
from tests.reference_esm import esm_weight

D = torch.float64


def _moment(x):
    return InputMoment(x.shape[0], moment=x.T @ x)


def _with_singular_values(shape, sigma, seed):
    """(x, U Vᵀ): a random d_out × d_in matrix with the given singular values, and its polar factor."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(sigma), generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(sigma), generator=g, dtype=D))
    return (u * sigma) @ v.T, u @ v.T


def _random_inputs(seed, t=3, d_out=12, d_in=10, n=40):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(d_out, d_in, generator=g, dtype=D) for _ in range(t)]
    xs = [torch.randn(n, d_in, generator=g, dtype=D) * torch.linspace(0.1, 2, d_in, dtype=D) for _ in range(t)]
    return deltas, xs


@pytest.mark.parametrize("rank", [1, 4, 7, 10])
def test_esd_truncation_error_is_the_dropped_eigenvalues(rank):
    (delta,), (x,) = _random_inputs(0, t=1)
    n = x.shape[0]
    f = essential_subspace(delta, _moment(x), rank)
    # brute force: the full spectrum of ΔOᵀΔO/(n−1) from the activations themselves
    shift = x @ delta.T
    full = torch.linalg.eigvalsh(shift.T @ shift / (n - 1)).flip(0)
    error = torch.linalg.matrix_norm(x @ (delta - f.basis @ f.coords).T) ** 2
    assert torch.allclose(error, (n - 1) * full[rank:].sum(), rtol=1e-9, atol=1e-9)
    assert torch.allclose(f.eigenvalues, full[:rank], rtol=1e-9, atol=1e-12)
    assert torch.allclose(f.basis.T @ f.basis, torch.eye(rank, dtype=D), atol=1e-12)
    assert torch.allclose(f.norm, torch.linalg.matrix_norm(delta))


@pytest.mark.parametrize("wide", [False, True])
def test_randomized_essential_subspace_comes_within_two_percent_of_the_exact_truncation_error(wide):
    """The randomized solver against the identity above: its subspace leaves at most 2% more of
    the activation shift out than the exact one (the target its block width and power steps
    were chosen for), on inputs whose scales decay over two decades, in float64, for S itself
    and for a wide output's Gram matrix; its basis is orthonormal and its Ritz values lie at or
    below the exact eigenvalues (Cauchy interlacing)."""
    g = torch.Generator().manual_seed(11)
    d_out, d_in = (768, 256) if wide else (256, 512)
    delta = torch.randn(d_out, d_in, generator=g, dtype=D)
    x = torch.randn(2048, d_in, generator=g, dtype=D) * torch.logspace(0, -2, d_in, dtype=D)
    rank = min(d_out, d_in) // 4
    exact = essential_subspace(delta, _moment(x), rank)
    fast = essential_subspace(delta, _moment(x), rank, solver="randomized")
    error = lambda f: torch.linalg.matrix_norm(x @ (delta - f.basis @ f.coords).T) ** 2
    assert error(exact) <= error(fast) <= 1.02 * error(exact)
    assert torch.allclose(fast.basis.T @ fast.basis, torch.eye(rank, dtype=D), atol=1e-10)
    assert torch.all(fast.eigenvalues <= exact.eigenvalues * (1 + 1e-9))


def test_randomized_leading_eigh_is_exact_on_a_matrix_of_rank_count_and_falls_back_where_its_block_is_half():
    """A PSD matrix of rank `count`: the block spans its range, so the Ritz pairs are its
    eigenpairs. Where the block (count + count/4) would exceed half the matrix, the exact
    solver runs and the result is the exact one, bit for bit."""
    g = torch.Generator().manual_seed(12)
    b = torch.randn(300, 40, generator=g, dtype=D) * torch.logspace(0, -3, 40, dtype=D)
    values, vectors = leading_eigh(b @ b.T, 40, "randomized")
    exact_values, exact_vectors = leading_eigh(b @ b.T, 40)
    assert torch.allclose(values, exact_values, rtol=1e-8, atol=0)
    assert torch.allclose((vectors.T @ exact_vectors).abs(), torch.eye(40, dtype=D), atol=1e-6)
    small = b[:60] @ b[:60].T
    assert all(torch.equal(a, e) for a, e in zip(leading_eigh(small, 30, "randomized"), leading_eigh(small, 30)))


def test_esd_beats_svd_on_the_inputs_it_sees():
    (delta,), (x,) = _random_inputs(1, t=1)
    esd = essential_subspace(delta, _moment(x), 3)
    svd = svd_subspace(delta, 3)
    err = lambda f: torch.linalg.matrix_norm(x @ (delta - f.basis @ f.coords).T)
    assert err(esd) < err(svd)
    frob = lambda f: torch.linalg.matrix_norm(delta - f.basis @ f.coords)
    assert frob(svd) < frob(esd)  # SVD is optimal for the Frobenius norm instead


def test_svd_basis_without_scaling_is_tsv_m():
    deltas, _ = _random_inputs(2)
    k = 12 // 3
    merged = merge_task_factors(
        [svd_subspace(d, k) for d in deltas],
        gamma=0.0,
        task_exponent=0.0,
        dimension_exponent=0.0,
        combination="tsv",
    )
    assert torch.allclose(merged, reference.tsv_m(deltas, k), atol=1e-10)


@pytest.mark.parametrize(
    "gamma,p_task,p_dim", [(0.15, 2.0, 2.0), (0.0, 0.0, 0.0), (0.15, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 2.0), (0.5, 1.0, 3.0)]
)
def test_essential_merge_matches_direct_formula(gamma, p_task, p_dim):
    deltas, xs = _random_inputs(3)
    k = 12 // 3
    factors = [essential_subspace(d, _moment(x), k) for d, x in zip(deltas, xs)]
    merged = merge_task_factors(factors, gamma=gamma, task_exponent=p_task, dimension_exponent=p_dim)
    assert torch.allclose(merged, esm_weight(deltas, xs, k, gamma, p_task, p_dim), atol=1e-10)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0])
def test_expert_spectrum_scale_on_orthogonal_experts_in_closed_form(exponent):
    """Experts in mutually orthogonal output and input subspaces, of ranks 1, 2 and 3 and
    very different spectra (a LoRA-like few strong directions beside weak full ones): both
    polar factors split into the experts' own, so ESM's whitened update is
    m·Σ_t c_t P_t polar(A_t), m = mean σ of A_cat, c_t = (rms σ_t / mean)^q renormalized to
    Σ k_t c_t² = Σ k_t. With q = 1 an expert's share of its own update is proportional to its
    spectrum's mean/rms ratio (1 for a flat one), instead of to 1/σ as with q = 0."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=D))
    blocks, spectra = [(0, 1), (1, 3), (3, 6)], [[9.0], [0.5, 0.2], [1.0, 0.7, 0.3]]
    factors, expected_parts = [], []
    for (start, stop), sigma in zip(blocks, spectra):
        basis = u[:, start:stop]
        coords = torch.tensor(sigma, dtype=D)[:, None] * v[:, start:stop].T
        factors.append(TaskFactors(basis, coords, torch.tensor(sigma, dtype=D) ** 2, torch.linalg.matrix_norm(coords)))
        expected_parts.append((basis @ v[:, start:stop].T, len(sigma), math.sqrt(sum(x * x for x in sigma) / len(sigma))))
    mean_sigma = sum(sum(s) for s in spectra) / 6
    rms = torch.tensor([r for _, _, r in expected_parts], dtype=D)
    c = (rms / rms.mean()) ** exponent
    counts = torch.tensor([k for _, k, _ in expected_parts], dtype=D)
    c = c * ((counts.sum() / (counts * c**2).sum()) ** 0.5)
    expected = mean_sigma * sum(ci * part for ci, (part, _, _) in zip(c, expected_parts))

    merged = merge_task_factors(
        factors, gamma=0.0, task_exponent=0.0, dimension_exponent=0.0, spectrum_exponent=exponent
    )
    assert torch.allclose(merged, expected, atol=1e-10)
    if exponent == 1.0:
        shares = torch.tensor([float((merged * (f.basis @ f.coords)).sum() / f.coords.square().sum()) for f in factors], dtype=D)
        flatness = torch.tensor([sum(s) / len(s) for s in spectra], dtype=D) / rms
        assert torch.allclose(shares / flatness, (shares / flatness)[0].expand(3), rtol=1e-9)


def test_factors_may_arrive_as_a_stream():
    """The pre-pass hands merge_task_factors a generator (one expert's factors alive at a time)."""
    deltas, xs = _random_inputs(10)
    factors = [essential_subspace(d, _moment(x), 4) for d, x in zip(deltas, xs)]
    settings = dict(gamma=0.15, task_exponent=2.0, dimension_exponent=2.0)
    assert torch.equal(merge_task_factors(iter(factors), **settings), merge_task_factors(factors, **settings))


def test_polarized_scale_by_hand():
    got = polarized_scale(torch.tensor([1.0, 3.0], dtype=D), 2.0)
    assert torch.allclose(got, torch.tensor([0.25, 2.25], dtype=D))  # ([1,3]/2)^2
    assert torch.equal(polarized_scale(torch.tensor([1.0, 3.0]), 0.0), torch.ones(2))
    assert torch.equal(polarized_scale(torch.zeros(3), 2.0), torch.ones(3))  # no 0/0
    assert polarized_scale(torch.tensor([0.0, 2.0], dtype=D), -2.0).tolist() == [0.0, 1.0 / 4]


def test_eigenvalue_flattening_by_hand():
    e = eigenvalue_flattening(torch.tensor([4.0, 1.0], dtype=D), 0.5)
    raw = torch.tensor([1.6, 0.4], dtype=D).sqrt()  # (λ / 2.5)^0.5
    assert torch.allclose(e, raw / raw.mean())
    assert torch.allclose(e.mean(), torch.tensor(1.0, dtype=D))


def test_layer_scales_by_hand_compare_only_the_same_module_type():
    norms = {"q_proj": {0: 1.0, 1: 3.0}, "down_proj": {0: 10.0, 1: 10.0, 2: 40.0}}
    beta = layer_scales(norms, 2.0)
    assert beta[("q_proj", 0)] == pytest.approx(0.25) and beta[("q_proj", 1)] == pytest.approx(2.25)
    assert beta[("down_proj", 0)] == pytest.approx((10 / 20) ** 2)
    assert beta[("down_proj", 2)] == pytest.approx((40 / 20) ** 2)
    assert all(v == 1.0 for v in layer_scales(norms, 0.0).values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["Gram route", "Newton route falls back"])
def test_polar_orthogonalize_ignores_null_directions(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 3, generator=g, dtype=D) @ torch.randn(3, 6, generator=g, dtype=D)).to(dtype)  # rank 3
    q = polar_orthogonalize(x, keep_scale=False)
    assert torch.linalg.matrix_rank(q) == 3
    s = torch.linalg.svdvals(q)
    assert torch.allclose(s[:3], torch.ones(3, dtype=dtype), atol=1e-5 if dtype == torch.float32 else 1e-10)
    full = polar_orthogonalize(torch.randn(8, 6, generator=g, dtype=D), keep_scale=False)
    assert torch.allclose(full.T @ full, torch.eye(6, dtype=D), atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60)], ids=["square", "tall", "wide"])
def test_newton_polar_matches_the_svd_polar_factor(shape):
    """The float32 route (scaled Newton on the QR-reduced square factor) against U Vᵀ and
    mean σ from a float64 SVD, on a matrix with σ_min/σ_max = 1e-3."""
    sigma = torch.logspace(0, -3, min(shape), dtype=D)
    x, polar_factor = _with_singular_values(shape, sigma, seed=11)
    inverse = torch.linalg.inv_ex
    with mock.patch.object(torch.linalg, "inv_ex", wraps=inverse) as steps:
        assert newton_polar(x.float()) is not None  # the Newton route, not its fallback
    assert steps.call_count <= 7  # Byers–Xu scaling: 6 steps where Frobenius scaling took ~10
    q = polar_orthogonalize(x.float(), keep_scale=True).double()
    expected = polar_factor * sigma.mean()
    assert (q - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("condition", [1e1, 1e2])
def test_newton_polar_stops_at_the_first_iterate_within_rounding_of_the_polar_factor(condition):
    """The returned iterate is within r·eps of U Vᵀ (spectral norm) and the one before it was
    not: no inverse is spent past the rounding level, none is missing."""
    x, polar_factor = _with_singular_values((64, 64), torch.logspace(0, -math.log10(condition), 64, dtype=D), seed=13)
    iterates = []
    inverse = torch.linalg.inv_ex

    def recorded(q):
        iterates.append(q.clone())
        return inverse(q)

    with mock.patch.object(torch.linalg, "inv_ex", side_effect=recorded):
        q = newton_polar(x)
    tolerance = 64 * torch.finfo(D).eps
    error = lambda a: float(torch.linalg.matrix_norm(a - polar_factor, ord=2))
    assert error(q) <= tolerance
    assert error(iterates[-1]) > tolerance


def test_a_factor_too_ill_conditioned_for_float32_newton_is_resolved_in_float64_not_cut_by_the_svd():
    """κ = 1e6 (> 0.1/eps of float32): the GPU route retries the Newton iteration in float64 and
    matches U Vᵀ of the given float32 matrix, every direction kept; the SVD it replaces would
    drop those below σ_max·d·eps."""
    x = _with_singular_values((48, 48), torch.logspace(0, -6, 48, dtype=D), seed=12)[0].float()
    assert newton_polar(x) is None  # beyond float32's reach
    uu, sigma, vh = torch.linalg.svd(x.double())
    assert sigma[-1] > 0 and sigma[0] / sigma[-1] > 0.1 / torch.finfo(torch.float32).eps
    with mock.patch("mergekit_esm.algebra.merge.svd_polar", side_effect=AssertionError("SVD route")):
        q = polar_orthogonalize(x, keep_scale=True, float64_retry=True)
    assert q.dtype == torch.float32
    expected = (uu @ vh) * sigma.mean()
    assert (q.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_an_expert_that_left_a_weight_unchanged_gives_a_finite_merge():
    deltas, xs = _random_inputs(5)
    deltas[1] = torch.zeros_like(deltas[1])
    factors = [essential_subspace(d, _moment(x), 4) for d, x in zip(deltas, xs)]
    merged = merge_task_factors(factors, gamma=0.15, task_exponent=2.0, dimension_exponent=2.0)
    assert torch.isfinite(merged).all() and merged.abs().sum() > 0
    # the unchanged expert adds nothing: same result as merging the other two alone
    alone = merge_task_factors([factors[0], factors[2]], gamma=0.15, task_exponent=0.0, dimension_exponent=0.0)
    with_zero = merge_task_factors(factors, gamma=0.15, task_exponent=0.0, dimension_exponent=0.0)
    assert torch.allclose(alone, with_zero, atol=1e-9)


def test_wide_output_path_equals_the_direct_eigenproblem():
    """gate/up_proj (d_out > d_in) use the thin SVD of ΔW·√XᵀX: same subspace as eigh(S)."""
    (delta,), (x,) = _random_inputs(6, t=1, d_out=30, d_in=8, n=50)
    n = x.shape[0]
    f = essential_subspace(delta, _moment(x), 5)
    shift = x @ delta.T
    lam, vec = torch.linalg.eigh(shift.T @ shift / (n - 1))
    lam, vec = lam.flip(0), vec.flip(1)
    assert torch.allclose(f.eigenvalues, lam[:5], rtol=1e-9)
    projector = vec[:, :5] @ vec[:, :5].T
    assert torch.allclose(f.basis @ f.basis.T, projector, atol=1e-9)
    assert torch.allclose(f.basis @ f.coords, projector @ delta, atol=1e-9)
    with pytest.raises(ValueError, match="exceeds min"):
        essential_subspace(delta, _moment(x), 9)


@pytest.mark.parametrize(
    "d_out,d_in,n",
    [(12, 10, 40), (30, 8, 50), (12, 40, 9), (30, 40, 9), (30, 40, 25)],
    ids=["square-ish", "wide output", "few tokens", "wide output, token space", "wide output, few tokens"],
)
def test_every_eigenproblem_route_gives_the_brute_force_subspace(d_out, d_in, n):
    """S's eigenproblem is solved in output space (d_out²), in input space (√XᵀX) or in token
    space (X held when n < d_in): all must give the eigenpairs of ΔOᵀΔO/(n−1) and an
    orthonormal basis; X, XᵀX and ΔOᵀΔO held must agree."""
    (delta,), (x,) = _random_inputs(8, t=1, d_out=d_out, d_in=d_in, n=n)
    shift = x @ delta.T
    lam, vec = torch.linalg.eigh(shift.T @ shift / (n - 1))
    lam, vec = lam.flip(0), vec.flip(1)
    rank = min(d_out, d_in, n) // 2
    projector = vec[:, :rank] @ vec[:, :rank].T
    held = {"XᵀX": _moment(x)}
    if n < d_in:  # calibration holds X only when it is the smaller
        held["X"] = InputMoment(n, tokens=x)
    held["ΔOᵀΔO"] = InputMoment(n, shift=shift.T @ shift)
    for form, inputs in held.items():
        f = essential_subspace(delta, inputs, rank)
        assert torch.allclose(f.eigenvalues, lam[:rank], rtol=1e-8), form
        assert torch.allclose(f.basis.T @ f.basis, torch.eye(rank, dtype=D), atol=1e-10), form
        assert torch.allclose(f.basis @ f.basis.T, projector, atol=1e-8), form


@pytest.mark.parametrize("d_out,d_in,n", [(64, 32, 256), (32, 32, 256), (32, 64, 256), (256, 96, 512)])
def test_float32_precision_agrees_with_the_float64_reference(d_out, d_in, n):
    """`precision: float32` (the GPU default) against float64 on the same float32 statistics:
    each expert's subspace captures the same activation shift (relative 1e-5), and the merged
    weight agrees to 5e-3 of its largest entry (measured ≤ 1e-3: the polar factors amplify
    directions with σ_min/σ_max ~ 3e-4 in these concatenated bases)."""
    deltas, xs = _random_inputs(9, t=4, d_out=d_out, d_in=d_in, n=n)
    xs = [x * torch.logspace(-1, 1, d_in, dtype=D) for x in xs]  # anisotropic, like LLM activations
    k = min(d_out // 4, d_in)
    factors = {
        dtype: [essential_subspace(d.to(dtype), InputMoment(n, moment=(x.T @ x).float()), k) for d, x in zip(deltas, xs)]
        for dtype in (torch.float64, torch.float32)
    }
    for f32, f64, d, x in zip(factors[torch.float32], factors[torch.float64], deltas, xs):
        captured = [torch.linalg.matrix_norm(x @ (b.double() @ b.double().T @ d).T) for b in (f32.basis, f64.basis)]
        assert abs(captured[0] / captured[1] - 1) <= 1e-5
    merged = {
        dtype: merge_task_factors(f, gamma=0.15, task_exponent=2.0, dimension_exponent=2.0) for dtype, f in factors.items()
    }
    error = (merged[torch.float32].double() - merged[torch.float64]).abs().max()
    assert error <= 5e-3 * merged[torch.float64].abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_experts_merge_as_if_truncated_at_their_rank_by_the_fast_route(dtype):
    """LoRA-like experts (ΔW_t = B_t A_t of rank 3 < k = 16): the k − 3 other directions of
    each essential subspace are arbitrary vectors of ΔW's null space. They take no part: the
    merge equals the merge at rank 3 (float64 reference), its columns lie in span(B_1..B_T),
    and the float32 polar factors take the Newton route — kept, those directions made the
    concatenated factors singular and sent them to the SVD (30 s for an 8B gate/up_proj on a
    GPU instead of 3 s)."""
    g = torch.Generator().manual_seed(21)
    d_out, d_in, n, t, r = 64, 48, 512, 4, 3
    bs = [torch.randn(d_out, r, generator=g, dtype=D) for _ in range(t)]
    as_ = [torch.randn(r, d_in, generator=g, dtype=D) for _ in range(t)]
    x = torch.randn(n, d_in, generator=g, dtype=D) * torch.logspace(-1, 1, d_in, dtype=D)

    def merged(precision, rank):
        moment = InputMoment(n, moment=(x.T @ x).to(precision))
        factors = [essential_subspace((b @ a).to(precision), moment, rank) for b, a in zip(bs, as_)]
        with mock.patch("mergekit_esm.algebra.merge.svd_polar", side_effect=AssertionError("SVD route")):
            return merge_task_factors(factors, gamma=0.15, task_exponent=2.0, dimension_exponent=2.0).double()

    reference = merged(torch.float64, r)
    result = merged(dtype, d_out // t)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    assert (result - reference).abs().max() <= tolerance * reference.abs().max()
    columns, _ = torch.linalg.qr(torch.cat(bs, dim=1))
    assert (result - columns @ (columns.T @ result)).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_storage_rounding_level_bounds_a_checkpoints_rounding_error(stored):
    """The spectral norm of W rounded to its checkpoint's dtype minus W lies below the level,
    and not far below it (the level is the edge of that noise's spectrum, not a loose bound)."""
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(3), dtype=D) * 0.02
    error = torch.linalg.matrix_norm(w.to(stored).double() - w, ord=2)
    level = storage_rounding_level(float(w.square().mean().sqrt()), tuple(w.shape), stored)
    assert level / 4 < error < level


@pytest.mark.parametrize("massive", [1.0, 1e3])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_merged_lora_stored_in_finite_precision_merges_as_its_exact_low_rank_update(stored, massive):
    """Experts W0 + B_t A_t (rank 3) saved in float32 or bfloat16: ΔW = rank 3 + rounding
    noise in every other direction. With the checkpoint's rounding level and ΔW's rank above
    it, the float64 merge equals the merge of the exact rank-3 updates, and the float32 merge
    equals the float64 one, also when one input coordinate is 10³ times the others (an LLM's
    massive activation), which squares into eigenvalues no solver resolves. Without the rank
    (the share-of-ΔW test alone) that case keeps a noise direction; without the level, float64
    whitens the noise into the update."""
    g = torch.Generator().manual_seed(22)
    d_out, d_in, n, t, r = 64, 48, 512, 3, 3
    w0 = (torch.randn(d_out, d_in, generator=g, dtype=D) * 0.05).to(stored).double()
    exact = [torch.randn(d_out, r, generator=g, dtype=D) @ torch.randn(r, d_in, generator=g, dtype=D) * 0.01
             for _ in range(t)]
    deltas = [(w0 + u).to(stored).double() - w0 for u in exact]
    x = torch.randn(n, d_in, generator=g, dtype=D) * torch.logspace(-1, 1, d_in, dtype=D)
    x[:, 0] *= massive
    level = storage_rounding_level(float(w0.square().mean().sqrt()), (d_out, d_in), stored)
    k = d_out // t
    assert [rank_above_rounding(u, level, k) for u in deltas] == [r] * t

    def merged(tasks, precision, rounding, with_rank=True):
        moment = InputMoment(n, moment=(x.T @ x).to(torch.float32))
        factors = (
            replace(essential_subspace(u.to(precision), moment, k), rounding=rounding,
                    rank=rank_above_rounding(u, rounding, k) if with_rank and rounding else None)
            for u in tasks
        )
        return merge_task_factors(factors, gamma=0.15, task_exponent=2.0, dimension_exponent=2.0).double()

    reference = merged(exact, D, 0.0)
    scale = reference.abs().max()
    noise = 10 * torch.finfo(stored).eps * scale  # what rounding moved the kept directions by
    assert (merged(deltas, D, level) - reference).abs().max() <= noise
    assert (merged(deltas, torch.float32, level) - reference).abs().max() <= noise + 1e-4 * scale
    assert (merged(deltas, D, 0.0) - reference).abs().max() > 0.1 * scale
    if massive > 1:
        assert (merged(deltas, D, level, with_rank=False) - reference).abs().max() > 0.1 * scale


def _spectrum_plus_noise(sigma: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """A 96 × 80 matrix with singular values `sigma` along random directions, plus noise of
    spectral norm 0.9 × `level` in every direction (a merged LoRA stored with rounding)."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, r = 96, 80, sigma.numel()
    noise = torch.randn(d_out, d_in, generator=g, dtype=D)
    noise *= 0.9 * level / torch.linalg.matrix_norm(noise, ord=2)
    u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=D))
    return (u * sigma) @ v.T + noise


@pytest.mark.parametrize("rank", [0, 5, 29, 40])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("level", [1e-6, 1e-11])
def test_rank_above_rounding_counts_singular_values_above_the_level(rank, transpose, level):
    """Against ΔW's own singular values: a rank-r matrix plus noise of spectral norm just below
    the level counts r directions (capped at `directions`), through each stage: the Cholesky
    test that all `directions` stand above the level (r ≥ directions), the small sketch's
    count (r ≤ (directions − 8)/2), the wider sketch (r = 29, one short of 30 directions) and
    one wider than ΔW is tall (80 directions: 168 columns); ΔW tall or wide; a level where
    the sketch's Gram matrix resolves it (1e-6 of ΔW's largest singular value) and one where
    it does not (1e-11: counted from the sketch's singular values)."""
    # singular values from 0.1 down to 10× the level
    sigma = torch.logspace(-1, math.log10(10 * level), rank, dtype=D) if rank else torch.zeros(0, dtype=D)
    delta = _spectrum_plus_noise(sigma, level, seed=5)
    delta = delta.T if transpose else delta
    for directions in (8, 30, 80):
        assert rank_above_rounding(delta, level, directions) == min(rank, directions)
        if level > 1e-7:  # float32 itself rounds ΔW at ~1e-8 of its largest singular value
            assert rank_above_rounding(delta.float(), level, directions) == min(rank, directions)


def test_rank_above_rounding_leaves_its_kept_sketch_columns_as_drawn():
    """The sketch's Gaussian columns are drawn once per shape and kept (`seeded_gaussian`); a
    float32 ΔW on the CPU multiplies them without a copy, so counting must not write to them,
    and a second count must see the same numbers as a fresh seeded draw."""
    delta = _spectrum_plus_noise(torch.logspace(-1, -3, 12, dtype=D), 1e-6, seed=7).float()
    first = rank_above_rounding(delta, 1e-6, 8)
    kept = seeded_gaussian(8, max(delta.shape))
    assert torch.equal(kept, torch.randn(8, max(delta.shape), generator=torch.Generator().manual_seed(0)))
    assert rank_above_rounding(delta, 1e-6, 8) == first == 8


def test_rank_above_rounding_one_strong_direction_short_of_all():
    """ΔW with `directions` − 1 strong directions (≥ 1000× the level) and noise below it: the
    sketch's first `directions` − 1 columns pass the Cholesky test and the last fails, which
    bounds the count from below by `directions` − 1, not `directions`."""
    level, directions = 1e-6, 30
    delta = _spectrum_plus_noise(torch.logspace(-1, -3, directions - 1, dtype=D), level, seed=6)
    assert rank_above_rounding(delta, level, directions) == directions - 1


def test_auto_precision_is_float32_for_esm_and_float64_on_cpu_for_the_others():
    from mergekit_esm.methods.regmean import RegMeanSettings
    from mergekit_esm.methods.tsv import TsvSettings

    assert EsmSettings().compute_dtype("cpu") == torch.float32
    assert EsmSettings().compute_dtype("cuda:0") == torch.float32
    assert EsmSettings(precision="float64").compute_dtype("cpu") == torch.float64
    for other in (TsvSettings(), RegMeanSettings()):
        assert other.compute_dtype("cpu") == torch.float64
        assert other.compute_dtype("cuda:0") == torch.float32


@pytest.mark.parametrize("shape", [(12, 10), (10, 12)])
def test_tsv_m_matches_its_dense_formula(shape):
    deltas, _ = _random_inputs(7, t=4, d_out=shape[0], d_in=shape[1])
    k = min(shape) // 4
    assert torch.allclose(task_singular_vectors_merge(deltas, k), reference.tsv_m(deltas, k), atol=1e-10)


def test_tsv_m_factors_at_full_rank_without_orthogonalization_are_task_arithmetic():
    deltas, _ = _random_inputs(8, t=3)
    p_cat, a_cat = concatenate_factors([svd_subspace(d, 10) for d in deltas])
    assert torch.allclose(p_cat @ a_cat, sum(deltas), atol=1e-10)
    # and the orthogonalization is what makes TSV-M differ from it
    assert not torch.allclose(task_singular_vectors_merge(deltas, 10), sum(deltas), atol=1e-3)


@pytest.mark.parametrize("shape", [(12, 10), (9, 14)])
def test_iso_c_matches_its_dense_formula_and_has_a_flat_spectrum(shape):
    deltas, _ = _random_inputs(9, t=3, d_out=shape[0], d_in=shape[1])
    merged = isotropic_merge(deltas)
    assert torch.allclose(merged, reference.iso_c(deltas), atol=1e-10)
    s = torch.linalg.svdvals(merged)
    assert torch.allclose(s, torch.full_like(s, float(s.mean())), rtol=1e-10)
    assert torch.allclose(s.mean(), torch.linalg.svdvals(sum(deltas)).mean(), rtol=1e-10)


@pytest.mark.parametrize("fraction,t", [(0.8, 4), (0.5, 3), (0.2, 2), (1.0, 3)])
def test_iso_cts_matches_its_dense_formula(fraction, t):
    deltas, _ = _random_inputs(10, t=t, d_out=20, d_in=16)
    merged = common_and_task_specific_merge(deltas, fraction)
    assert torch.allclose(merged, reference.iso_cts(deltas, fraction), atol=1e-9)
    s = torch.linalg.svdvals(merged)
    assert torch.allclose(s, torch.full_like(s, float(s.mean())), rtol=1e-9)  # full rank, flat


@pytest.mark.parametrize("rank,t,fraction", [(576, 4, 0.8), (10, 4, 0.8), (7, 3, 0.5), (5, 2, 1.0)])
def test_common_space_split_fills_the_rank(rank, t, fraction):
    common, per_task = common_space_split(rank, t, fraction)
    assert common + t * per_task == rank and common >= 0 and per_task >= 0
    assert abs(common - rank * fraction) <= t  # close to the asked share


def test_esd_basis_without_whitening_keeps_tsv_m_combination():
    """whiten_factors=False merges ESD factors as TSV-M merges SVD factors (σ kept, polar
    factors on both sides); True is ESM's mean-σ whitening of both factors."""
    from mergekit_esm.algebra import essential_subspace
    from mergekit_esm.algebra.merge import merge_task_factors
    from mergekit_esm.algebra.subspace import InputMoment
    from mergekit_esm.methods.esm import EsmSettings, merge_weight

    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(12, 10, generator=g, dtype=D) for _ in range(3)]
    inputs = [InputMoment(40, tokens=torch.randn(40, 10, generator=g, dtype=D)) for _ in range(3)]
    off = dict(gamma=0.0, task_exponent=0.0, dimension_exponent=0.0)
    for whiten, combination in ((True, "essential"), (False, "tsv")):
        settings = EsmSettings(whiten_factors=whiten, expert_rank="budget", **off)
        expected = merge_task_factors(
            (essential_subspace(d, i, 4) for d, i in zip(deltas, inputs)), **off, combination=combination
        )
        assert torch.allclose(merge_weight(settings, deltas, 4, inputs), expected, atol=1e-12)
    unwhitened = merge_weight(EsmSettings(whiten_factors=False, **off), deltas, 4, inputs)
    assert not torch.allclose(unwhitened, merge_weight(EsmSettings(**off), deltas, 4, inputs), atol=1e-6)


def test_tsv_combination_of_essential_factors_keeps_each_experts_product():
    """TSV-M's combination takes σ from the coordinate rows' norms: on an essential subspace's
    coordinates Â = P̂ᵀΔW, whose rows are not orthogonal, it must first write the factors in
    singular form, or one expert alone comes out as another matrix than P̂Â."""
    from mergekit_esm.algebra.merge import in_singular_form

    (delta,), (x,) = _random_inputs(1, t=1)
    factors = essential_subspace(delta, _moment(x), 4)
    gram = factors.coords @ factors.coords.T
    assert not torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-6)  # the case that needs it
    merged = merge_task_factors([factors], gamma=0.0, task_exponent=0.0, dimension_exponent=0.0, combination="tsv")
    assert torch.allclose(merged, factors.basis @ factors.coords, atol=1e-10)

    g = torch.Generator().manual_seed(5)
    p_cat, a_cat = torch.randn(12, 7, generator=g, dtype=D), torch.randn(7, 10, generator=g, dtype=D)
    p, a = in_singular_form(p_cat, a_cat, [3, 4])
    for block in (slice(0, 3), slice(3, 7)):
        assert torch.allclose(p[:, block] @ a[block], p_cat[:, block] @ a_cat[block], atol=1e-12)
        rows = a[block] @ a[block].T
        assert torch.allclose(rows, torch.diag(torch.diagonal(rows)), atol=1e-12)


def test_esm_finds_its_subspaces_with_the_solver_its_settings_name():
    """merge_weight hands `subspace_solver` to every expert's essential subspace: at a width
    where the randomized solver runs (k = 16 of 128), the default merge is the randomized
    one, and `exact` the full eigendecomposition's."""
    from mergekit_esm.algebra import essential_subspace
    from mergekit_esm.algebra.merge import merge_task_factors
    from mergekit_esm.methods.esm import merge_weight

    g = torch.Generator().manual_seed(13)
    deltas = [torch.randn(128, 96, generator=g, dtype=D) for _ in range(3)]
    inputs = [InputMoment(400, tokens=torch.randn(400, 96, generator=g, dtype=D)) for _ in range(3)]
    off = {"gamma": 0.0, "task_exponent": 0.0, "dimension_exponent": 0.0, "expert_rank": "auto"}
    merged = {}
    for solver in ("randomized", "exact"):
        expected = merge_task_factors((essential_subspace(d, i, 16, solver) for d, i in zip(deltas, inputs)), **off)
        merged[solver] = merge_weight(EsmSettings(subspace_solver=solver, **off), deltas, 16, inputs)
        assert torch.allclose(merged[solver], expected, atol=1e-12)
    assert torch.equal(merge_weight(EsmSettings(**off), deltas, 16, inputs), merged["randomized"])
    assert not torch.allclose(merged["randomized"], merged["exact"], atol=1e-6)


def test_polarized_coordinates_preserve_the_norm_and_keep_the_papers_proportions():
    """preserve_norm rescales each level to the norm before it; the proportions between tasks
    and between columns stay those of the paper's raw ratios."""
    from mergekit_esm.algebra.merge import polarized_coordinates

    g = torch.Generator().manual_seed(5)
    coords = [torch.randn(3, 6, generator=g, dtype=D) * scale for scale in (0.1, 1.0, 10.0)]
    norms = torch.stack([torch.linalg.matrix_norm(c) for c in coords])
    paper = polarized_coordinates([c.clone() for c in coords], norms, 2.0, 2.0, preserve_norm=False)
    kept = polarized_coordinates([c.clone() for c in coords], norms, 2.0, 2.0, preserve_norm=True)
    unscaled = torch.linalg.matrix_norm(torch.cat(coords))
    assert torch.allclose(torch.linalg.matrix_norm(kept), unscaled, rtol=1e-12)
    assert torch.linalg.matrix_norm(paper) > 10 * unscaled  # the raw ratios inflate it here
    assert torch.allclose(kept / torch.linalg.matrix_norm(kept), paper / torch.linalg.matrix_norm(paper), atol=1e-12)
    # by hand: task scales (‖A_t‖/mean)², then column scales (‖col‖/mean)²
    s = (norms / norms.mean()) ** 2
    a = torch.cat([c * si for c, si in zip(coords, s)])
    cols = torch.linalg.vector_norm(a, dim=0)
    assert torch.allclose(paper, a * (cols / cols.mean()) ** 2, rtol=1e-12)


def test_layer_scales_preserving_the_norm_keep_the_total_and_the_proportions():
    from mergekit_esm.algebra.scaling import layer_scales

    norms = {"q": {0: 1.0, 1: 2.0, 2: 8.0}}
    paper = layer_scales(norms, 2.0)
    kept = layer_scales(norms, 2.0, preserve_norm=True)
    total = sum((kept[("q", l)] * n) ** 2 for l, n in norms["q"].items())
    assert total == pytest.approx(sum(n**2 for n in norms["q"].values()))
    assert kept[("q", 2)] / kept[("q", 0)] == pytest.approx(paper[("q", 2)] / paper[("q", 0)])
    assert paper[("q", 2)] == pytest.approx((8 / (11 / 3)) ** 2)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("held", ["tokens", "moment"])
def test_regression_mean_solves_regmeans_normal_equations(ratio, held):
    """Against the dense solve of (Σ G̃_t) Wᵀ = Σ G̃_t ΔW_tᵀ, statistics held either way and
    read in blocks narrower than d_in; inputs with very different scales per coordinate."""
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(40, 9, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 9, dtype=torch.float64) for _ in range(3)]
    moments = [InputMoment(40, tokens=x) if held == "tokens" else InputMoment(40, moment=x.T @ x) for x in xs]
    grams = [x.T @ x / 40 for x in xs]
    grams = [ratio * gm + (1 - ratio) * torch.diag(torch.diag(gm)) for gm in grams]
    expected = torch.linalg.solve(sum(grams), sum(gm @ d.T for gm, d in zip(grams, deltas))).T
    assert torch.allclose(regression_mean(deltas, moments, ratio, ridge=0.0, block=4), expected, rtol=0, atol=1e-10)
    # the default ridge (1e-7 of each coordinate's mean square) moves it by ~1e-7 × conditioning
    assert torch.allclose(regression_mean(deltas, moments, ratio, block=4), expected, rtol=0, atol=1e-5)


def test_regression_mean_falls_back_to_the_mean_where_no_input_reaches():
    """Fewer tokens than inputs, and an input coordinate that is zero on every token: the solve
    still succeeds (the ridge), and the unseen column is the task vectors' columns averaged
    with each expert's mean square input as weight."""
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        x[:, 7] = 0
    got = regression_mean(deltas, [InputMoment(3, tokens=x) for x in xs], 1.0)
    assert torch.isfinite(got).all()
    squares = [x.pow(2).mean() for x in xs]
    expected = (squares[0] * deltas[0][:, 7] + squares[1] * deltas[1][:, 7]) / sum(squares)
    assert torch.allclose(got[:, 7], expected, atol=1e-9)


def test_regression_mean_grows_its_ridge_where_rounding_left_the_gram_indefinite():
    """A moment with a negative eigenvalue of 1e-5·mean(diag) (what float32 rounding can leave
    of a singular XᵀX): the ridge grows until Cholesky succeeds, and the result is finite."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    moment = q @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, -1e-5], dtype=torch.float64)) @ q.T
    deltas = [torch.ones(2, 6, dtype=torch.float64), 2 * torch.ones(2, 6, dtype=torch.float64)]
    got = regression_mean(deltas, [InputMoment(1, moment=moment)] * 2, 1.0)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, 1.5 * torch.ones(2, 6, dtype=torch.float64))  # equal Grams: the mean


def test_norm_preserving_flattening_ignores_near_null_directions():
    """preserve_norm: flattening keeps the expert's norm, Σ e⁴‖a‖² = Σ ‖a‖², and a low-rank
    expert's noise directions do not inflate its real ones as the mean-1 rule lets them."""
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.rand(4, generator=g, dtype=D) + 1, torch.full((12,), 1e-28, dtype=D)])
    norms = lam.sqrt()
    e = eigenvalue_flattening(lam, 0.15, norms)
    assert torch.allclose((e**4 * norms**2).sum(), (norms**2).sum())
    assert e[:4].max() < 1.2  # the four real directions keep about their own size
    assert eigenvalue_flattening(lam, 0.15)[:4].min() > 2.5  # the mean-1 rule inflates them
    assert torch.allclose(eigenvalue_flattening(lam, 0.0, norms), torch.ones(16, dtype=D))


@pytest.mark.parametrize("transpose", [False, True])
def test_rank_above_rounding_in_float32_near_a_bfloat16_level_counts_as_float64(transpose):
    """A level like a bfloat16 checkpoint's (1e-3 of ΔW's largest singular value) lets the
    sketch run in float32; the counts are those of ΔW's own singular values, at every stage."""
    level = 1e-4
    for rank, directions in ((40, 30), (29, 30), (5, 30), (40, 80)):
        sigma = torch.logspace(-1, math.log10(10 * level), rank, dtype=D)
        delta = _spectrum_plus_noise(sigma, level, seed=7)
        delta = delta.T if transpose else delta
        chosen = []

        def recorded(*args):
            chosen.append(sketch_dtype(*args))
            return chosen[-1]

        with mock.patch("mergekit_esm.algebra.merge.sketch_dtype", recorded):
            assert rank_above_rounding(delta, level, directions) == min(rank, directions)
        assert chosen == [torch.float32]


def test_sketch_dtype_is_float32_only_where_its_rounding_stays_far_below_the_level():
    rows, cols, m = 2048, 5632, 2824
    # rows of a weight of rms 0.02 and a fine-tune's ΔW of rms 2e-3 (TinyLlama's gate_proj)
    weight_rms, row_norm = 0.02, 2e-3 * cols**0.5
    for stored, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        level = storage_rounding_level(weight_rms, (cols, rows), stored)
        assert sketch_dtype(row_norm, level, rows, cols, m) == expected
    # a float32 checkpoint whose ΔW is a tenth of W: float32 rounding of Y reaches its level
    level = storage_rounding_level(weight_rms, (cols, rows), torch.float32)
    assert sketch_dtype(row_norm, level, rows, cols, m) == torch.float64
    # and one whose ΔW is 10⁻⁴ of W is sketched in float32
    assert sketch_dtype(row_norm * 1e-3, level, rows, cols, m) == torch.float32


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (576, 576), (192, 576)])
def test_default_rank_rules_by_hand(shape):
    """'output' (the paper): ⌊d_out/T⌋ at most d_in; 'shorter' (TSV-M's): ⌊min/T⌋, so the T
    experts' directions together fit in the shorter side (the polar factors stay that small)."""
    from mergekit_esm.methods import METHODS

    d_out, d_in = shape
    esm = METHODS["esm"]
    assert esm.default_rank(EsmSettings(rank_rule="output"), d_out, d_in, 4) == min(d_out // 4, d_in)
    shorter = esm.default_rank(EsmSettings(), d_out, d_in, 4)
    assert shorter == min(d_out, d_in) // 4 and 4 * shorter <= min(d_out, d_in)
    assert shorter == METHODS["tsv"].default_rank(None, d_out, d_in, 4)


def test_whitened_update_keeps_its_size_whatever_the_flattening_under_preserve_norm():
    """One expert whose spectrum sits in one direction (a LoRA meeting massive activations):
    whitened, its update is mean(σ)·U Vᵀ over its directions whatever γ (flattening only sets
    proportions), where the authors' mean-1 rule grows it with γ; without preserve_norm that
    rule stays (the paper's raw scaling)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=D))
    sigma = torch.tensor([5.0, 0.05, 0.02, 0.01], dtype=D)
    factors = svd_subspace(u @ torch.diag(sigma) @ v.T, 4)
    expected = sigma.mean() * u @ v.T  # U Vᵀ with the signs svd_subspace gives
    expected = expected * torch.sign((expected * (factors.basis @ factors.coords)).sum())

    def merged(gamma, preserve_norm):
        return merge_task_factors([factors], gamma=gamma, task_exponent=0.0, dimension_exponent=0.0,
                                  preserve_norm=preserve_norm)

    for gamma in (0.0, 0.15, 0.5):
        assert torch.allclose(merged(gamma, True), expected, atol=1e-10)
    # the mean-1 rule: e ≈ (2.3, 0.6, 0.5, 0.5) at γ 0.15, so mean(σ·e) ≈ 2.3·mean(σ)
    assert torch.linalg.matrix_norm(merged(0.15, False)) > 2 * torch.linalg.matrix_norm(expected)


def test_whitened_sizes_undo_flattening_along_the_polar_factor():
    """Two overlapping experts: each whitened factor is its polar factor times ⟨Q, X₀⟩/r, X₀
    the concatenated factor without flattening (brute force with the SVD)."""
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(9, 7, generator=g, dtype=D) @ torch.diag(torch.logspace(0, -3, 7, dtype=D)) for _ in range(2)]
    deltas[1] = deltas[1] + 0.5 * deltas[0]
    factors = [svd_subspace(d, 3) for d in deltas]
    e = torch.cat([eigenvalue_flattening(f.eigenvalues, 0.15) for f in factors])
    p0, a0 = concatenate_factors(factors)
    p, a = p0 * e, a0 * e[:, None]

    def polar_factor(x):
        left, _, right = torch.linalg.svd(x, full_matrices=False)
        return left @ right

    qp, qa = polar_factor(p), polar_factor(a)
    expected = qp * (qp * p0).sum() / 6 @ (qa * (qa * a0).sum() / 6)
    got = merge_task_factors(factors, gamma=0.15, task_exponent=0.0, dimension_exponent=0.0, preserve_norm=True)
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_aligned_rank_is_the_brute_force_best_aligned_whitened_truncation(seed):
    """For ΔW's SVD basis, aligned_rank is the j whose whitened truncation U_j V_jᵀ has the
    largest cosine with ΔW, found by trying every j; merged alone with it, the whitened update
    keeps that cosine squared of ΔW (its share ⟨M, ΔW⟩/‖ΔW‖²), more than the full budget keeps."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(24, generator=g, dtype=D).sort(descending=True).values ** (2 + 2 * seed)
    delta, _ = _with_singular_values((30, 24), sigma, seed)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    cosines = torch.stack([(u[:, :j] @ vh[:j] * delta).sum() / (math.sqrt(j) * delta.norm()) for j in range(1, 25)])
    best = int(cosines.argmax()) + 1
    assert aligned_rank(s) == best
    assert 1 < best < 24  # the spectra decay enough to leave weak directions out, not all but one

    off = {"gamma": 0.0, "task_exponent": 0.0, "dimension_exponent": 0.0}
    factors = svd_subspace(delta, 24)
    aligned = merge_task_factors([factors], expert_rank="aligned", **off)
    budget = merge_task_factors([factors], **off)
    share = lambda m: float((m * delta).sum() / delta.norm() ** 2)  # noqa: E731
    assert torch.linalg.matrix_rank(aligned) == best
    assert share(aligned) == pytest.approx(float(cosines.max()) ** 2, rel=1e-10)
    assert share(aligned) > share(budget)


def test_aligned_rank_with_spectrum_scale_weighs_only_the_kept_directions():
    """With both, each expert's block is scaled by the rms σ of the directions it keeps, not of
    its whole budget: the merge is the spectrum-scaled merge of the experts truncated to their
    aligned ranks by hand. On orthogonal experts a low-rank one (a LoRA: one strong direction)
    keeps a far smaller share of its update than a full fine-tune with the aligned rank alone,
    and about as large a one with the spectrum scale."""
    off = {"gamma": 0.0, "task_exponent": 0.0, "dimension_exponent": 0.0}
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(30, 24, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=D))
    spectra = [torch.tensor([8.0, 0.5], dtype=D), torch.linspace(1.0, 0.05, 12, dtype=D) ** 2]
    deltas, factors, truncated, start = [], [], [], 0
    for sigma in spectra:
        block = slice(start, start + len(sigma))
        start += len(sigma)
        deltas.append((u[:, block] * sigma) @ v[:, block].T)
        factors.append(svd_subspace(deltas[-1], len(sigma)))
        j = aligned_rank(sigma)
        truncated.append(TaskFactors(factors[-1].basis[:, :j], factors[-1].coords[:j], factors[-1].eigenvalues[:j], factors[-1].norm))
    both = merge_task_factors(factors, expert_rank="aligned", spectrum_exponent=1.0, **off)
    assert torch.allclose(both, merge_task_factors(truncated, spectrum_exponent=1.0, **off), atol=1e-12)

    share = lambda m, d: float((m * d).sum() / d.norm() ** 2)  # noqa: E731
    aligned = merge_task_factors(factors, expert_rank="aligned", **off)
    lora, full = (share(aligned, d) for d in deltas)
    assert lora < full / 3
    lora, full = (share(both, d) for d in deltas)
    assert lora == pytest.approx(full, rel=0.25)


def test_esm_expert_rank_reaches_merge_task_factors():
    """Each `expert_rank` reaches merge_task_factors; the default is auto, which on full-rank
    experts is not the budget."""
    from mergekit_esm.methods.esm import merge_weight

    deltas, xs = _random_inputs(5, t=2, d_out=16, d_in=12)
    deltas = [d @ torch.diag(torch.logspace(0, -3, 12, dtype=D)) for d in deltas]
    inputs = [_moment(x) for x in xs]
    off = {"gamma": 0.0, "task_exponent": 0.0, "dimension_exponent": 0.0}
    for rule in ("budget", "aligned", "auto"):
        factors = (essential_subspace(d, i, 6, "exact") for d, i in zip(deltas, inputs))
        expected = merge_task_factors(factors, expert_rank=rule, **off)
        merged = merge_weight(EsmSettings(expert_rank=rule, subspace_solver="exact", **off), deltas, 6, inputs)
        assert torch.allclose(merged, expected, atol=1e-12)
    assert EsmSettings().expert_rank == "auto"
    assert not torch.allclose(merge_weight(EsmSettings(**off), deltas, 6, inputs),
                              merge_weight(EsmSettings(expert_rank="budget", **off), deltas, 6, inputs), atol=1e-6)


def _full_and_low_rank_experts(seed: int, low_rank: int | None):
    """Three 20 × 16 task matrices with decaying spectra: full rank, or the last of rank
    `low_rank` (a merged LoRA); their SVD factors at k = 6."""
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(20, 16, generator=g, dtype=D) @ torch.diag(torch.logspace(0, -2, 16, dtype=D)) for _ in range(3)]
    if low_rank is not None:
        deltas[-1] = torch.randn(20, low_rank, generator=g, dtype=D) @ torch.randn(low_rank, 16, generator=g, dtype=D)
    return deltas, [svd_subspace(d, 6) for d in deltas]


@pytest.mark.parametrize("seed", range(3))
def test_expert_rank_auto_is_the_aligned_merge_at_a_third_where_every_expert_fills_its_budget(seed):
    """Full-rank experts: auto is exactly the aligned merge times AUTO_ALIGNED_STRENGTH (α 3 under
    auto is aligned's α 1); with one rank-2 expert (fewer directions than k = 6 carry its
    update) it is exactly the budget merge, every expert at its budget."""
    off = {"gamma": 0.15, "task_exponent": 0.0, "dimension_exponent": 2.0, "preserve_norm": True}
    _, full = _full_and_low_rank_experts(seed, None)
    auto = merge_task_factors(full, expert_rank="auto", **off)
    aligned = merge_task_factors(full, expert_rank="aligned", **off)
    assert torch.allclose(auto, AUTO_ALIGNED_STRENGTH * aligned, rtol=0, atol=1e-13)
    assert not torch.allclose(aligned, merge_task_factors(full, expert_rank="budget", **off), atol=1e-3)

    _, mixed = _full_and_low_rank_experts(seed, 2)
    assert int(carrying_directions(mixed[-1]).sum()) == 2
    auto = merge_task_factors(mixed, expert_rank="auto", **off)
    assert torch.equal(auto, merge_task_factors(mixed, expert_rank="budget", **off))
    assert not torch.allclose(auto, merge_task_factors(mixed, expert_rank="aligned", **off), atol=1e-3)


def test_an_expert_fills_its_budget_by_its_rank_above_rounding_not_by_which_directions_carry():
    """A full-rank ΔW whose k-th direction of the basis carries nothing (an essential subspace's
    trailing direction under massive activations) still fills its budget when its rank above
    the rounding level was measured; a rank-2 ΔW does not; unmeasured, the carrying count decides."""
    deltas, factors = _full_and_low_rank_experts(1, 2)
    full, lora = factors[0], factors[2]
    hollow = replace(full, coords=torch.cat([full.coords[:-1], torch.zeros_like(full.coords[-1:])]))
    assert not carrying_directions(hollow).all()
    assert fills_budget(with_rounding_level(hollow, deltas[0], 1e-12, 6), carrying_directions(hollow))
    assert not fills_budget(hollow, carrying_directions(hollow))
    assert not fills_budget(with_rounding_level(lora, deltas[2], 1e-12, 6), carrying_directions(lora))
    assert fills_budget(full, carrying_directions(full))


def test_expert_rank_auto_ignores_an_expert_that_left_the_weight_unchanged():
    """An expert whose ΔW is zero at this weight (a LoRA that did not target it) takes no part,
    so the others, all full rank, are merged at the aligned rank as if it were absent."""
    off = {"gamma": 0.15, "task_exponent": 0.0, "dimension_exponent": 2.0, "preserve_norm": True}
    deltas, full = _full_and_low_rank_experts(0, None)
    untouched = svd_subspace(torch.zeros_like(deltas[0]), 6)
    with_zero = merge_task_factors([*full[:2], untouched], expert_rank="auto", **off)
    assert torch.allclose(with_zero, merge_task_factors(full[:2], expert_rank="auto", **off), atol=1e-13)
    assert torch.allclose(with_zero, AUTO_ALIGNED_STRENGTH * merge_task_factors(full[:2], expert_rank="aligned", **off), atol=1e-13)
