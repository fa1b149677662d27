"""How close each expert's essential subspace is to its singular one, and why eigenvalue
flattening weighs them so differently.

    python -m eval.subspace_overlap [--zoo synthetic] [--layers 2,15,28]

Each expert of a zoo runs the built-in proxy text (8 windows of 512 tokens, ESM's default
budget); per weight its inputs' moment XᵀX gives the essential subspace of k = ⌊min(d_out,
d_in)/T⌋ directions (the exact solver, float64), compared with ΔW's k leading left singular
vectors. Per weight, averaged over the experts:
- span: ‖P̂ᵀU_k‖²_F / k, the share of the two subspaces in common (1: the same);
- ‖ΔW‖² captured by each: ‖P̂ᵀΔW‖²_F / ‖ΔW‖²_F (the SVD's is the most any k directions can);
- between experts: the same share for each pair of experts' subspaces, ESD and SVD;
- spread: λ₁/λ_k of the activation shift against σ₁²/σ_k², and max/min of eigenvalue
  flattening's weights e (γ 0.15) over each, which TSV-M's combination keeps in the update;
- sink: the ESD span shared with the subspace found without each window's first token.
"""

import argparse
import itertools
from pathlib import Path

import torch
from safetensors.torch import load_file

from eval.compare import REPO
from eval.kept_directions import WEIGHTS, layer_inputs
from eval.zoo.community import RECIPES
from eval.zoo.tasks import TASKS
from mergekit_esm.algebra import essential_subspace, svd_subspace
from mergekit_esm.algebra.scaling import eigenvalue_flattening
from mergekit_esm.algebra.subspace import InputMoment

ZOOS = {"synthetic": list(TASKS), "community": list(RECIPES)}
WINDOW_TOKENS = 512  # layer_inputs' proxy windows (8 of 512 tokens, stacked)


def shared_span(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.T @ b).square().sum()) / a.shape[1]


def spread(factors) -> float:
    """λ₁/λ_k of the directions behind a subspace."""
    return float(factors.eigenvalues[0] / factors.eigenvalues[-1])


def flattening_spread(factors) -> float:
    """max/min of eigenvalue flattening's weights (γ 0.15, kept norm) over the directions."""
    e = eigenvalue_flattening(factors.eigenvalues, 0.15, factors.coords.norm(dim=1))
    return float(e.max() / e.min())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="synthetic", choices=sorted(ZOOS))
    parser.add_argument("--layers", default="2,15,28")
    parser.add_argument("--out", default=str(REPO / "eval/results/subspace_overlap.md"))
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    models = REPO / "eval/workdir/models"
    experts = ZOOS[args.zoo]
    base = load_file(models / "base" / "model.safetensors")
    rows = {}
    for name in experts:
        inputs, weights = layer_inputs(models / name, layers), load_file(models / name / "model.safetensors")
        for (layer, module), x in inputs.items():
            for weight in (w for w, reads in WEIGHTS.items() if reads == module):
                key = f"model.layers.{layer}.{weight}.weight"
                delta = (weights[key] - base[key]).double()
                k = min(delta.shape) // len(experts)
                esd = essential_subspace(delta, InputMoment(x.shape[0], moment=x.T @ x), k)
                without_sink = x.view(-1, WINDOW_TOKENS, x.shape[1])[:, 1:].reshape(-1, x.shape[1])
                esd_no_sink = essential_subspace(delta, InputMoment(without_sink.shape[0], moment=without_sink.T @ without_sink), k)
                svd = svd_subspace(delta, k)
                energy = float(delta.square().sum())
                rows.setdefault((layer, weight), []).append(dict(
                    esd=esd.basis, svd=svd.basis, span=shared_span(esd.basis, svd.basis),
                    esd_energy=float(esd.coords.square().sum()) / energy, svd_energy=float(svd.coords.square().sum()) / energy,
                    esd_spread=spread(esd), svd_spread=spread(svd),
                    esd_e=flattening_spread(esd), svd_e=flattening_spread(svd),
                    sink=shared_span(esd.basis, esd_no_sink.basis)))
    lines = [f"# Essential against singular subspaces: zoo {args.zoo} ({', '.join(experts)})", "",
             f"`python -m eval.subspace_overlap --zoo {args.zoo} --layers {args.layers}`; means over the experts.", "",
             "| layer | weight | span shared | ‖ΔW‖² ESD | ‖ΔW‖² SVD | between experts ESD | between experts SVD | λ₁/λ_k | σ₁²/σ_k² | e max/min ESD | e max/min SVD | span kept without first tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mean = lambda r, f: sum(x[f] for x in r) / len(r)
    for (layer, weight), r in sorted(rows.items()):
        between = {b: sum(shared_span(p[b], q[b]) for p, q in itertools.combinations(r, 2)) / max(1, len(r) * (len(r) - 1) // 2)
                   for b in ("esd", "svd")}
        lines.append(f"| {layer} | {weight} | {mean(r, 'span'):.3f} | {mean(r, 'esd_energy'):.3f} | {mean(r, 'svd_energy'):.3f} | "
                     f"{between['esd']:.3f} | {between['svd']:.3f} | {mean(r, 'esd_spread'):.3g} | {mean(r, 'svd_spread'):.3g} | "
                     f"{mean(r, 'esd_e'):.2f} | {mean(r, 'svd_e'):.2f} | {mean(r, 'sink'):.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
