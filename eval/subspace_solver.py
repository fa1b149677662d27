"""How close ESM's randomized subspace solver comes to the exact one on a zoo's real experts:
per weight, the least share of an expert's activation shift (ESD's objective, tr PᵀSP over
the k kept directions) that the randomized subspace captures against the exact one, and how
far the merged update moves (relative Frobenius distance), both in float32, the working
precision, at the default rank, with the rank rule (`with_rounding_level`) as in the merge.

    python -m eval.subspace_solver [--zoo community] [--layers 0,3,6,9,12,15]

Inputs as in eval.kept_directions: the base's inputs to each linear on the built-in proxy
text (8 windows of 512 tokens). Prints one line per weight and a summary line.
"""


from eval.kept_directions import (
    WEIGHTS,
    _captured,
    default_merge_arguments,
    open_zoo,
    study_arguments,
)
from mergekit_esm.algebra import (
    essential_subspace,
    merge_task_factors,
    storage_rounding_level,
    with_rounding_level,
)
from mergekit_esm.algebra.subspace import InputMoment
from mergekit_esm.methods.base import shorter_side_rank


def main():
    args = study_arguments(__doc__.splitlines()[0])
    layers, inputs, base, experts = open_zoo(args)
    merge_args = default_merge_arguments()
    print(f"{args.zoo} zoo, {len(experts)} experts {list(experts)}, float32, k = ⌊min(d_out, d_in)/T⌋")
    least_shares, distances = [], []
    for layer in layers:
        for weight, module in WEIGHTS.items():
            x = inputs[(layer, module)]
            moment = InputMoment(n_tokens=x.shape[0], moment=(x.T @ x).float())
            name = f"model.layers.{layer}.{weight}.weight"
            w0 = base.get_tensor(name).float()
            k = shorter_side_rank(*w0.shape, len(experts))
            factors = {"exact": [], "randomized": []}
            shares = []
            rms = float(w0.double().square().mean().sqrt())
            for f in experts.values():
                stored = f.get_tensor(name)
                delta = stored.float() - w0
                level = storage_rounding_level(rms, tuple(w0.shape), stored.dtype)
                for solver, found in factors.items():
                    found.append(with_rounding_level(essential_subspace(delta, moment, k, solver), delta, level, k))
                reference = _captured(factors["exact"][-1].basis.double(), delta.double(), moment.moment.double())
                if reference > 0:
                    shares.append(_captured(factors["randomized"][-1].basis.double(), delta.double(),
                                            moment.moment.double()) / reference)
            merged = {solver: merge_task_factors(found, **merge_args).double() for solver, found in factors.items()}
            distance = float((merged["randomized"] - merged["exact"]).norm() / merged["exact"].norm())
            least_shares.append(min(shares, default=1.0))
            distances.append(distance)
            print(f"layer {layer:2d} {weight:17s} k {k:4d}: least shift captured, randomized / exact "
                  f"{least_shares[-1]:.5f}; merged update moved {distance:.4f}", flush=True)
    print(f"all weights: least share {min(least_shares):.5f}, median {sorted(least_shares)[len(least_shares) // 2]:.5f}; "
          f"merged update moved at most {max(distances):.4f}, median {sorted(distances)[len(distances) // 2]:.4f}")


if __name__ == "__main__":
    main()
