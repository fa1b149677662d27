"""How many directions of each expert take part in ESM's merge, per weight, in float64 and
float32, with and without the rank rule (algebra.merge.rank_above_rounding); how far the
float32 merged update lies from the float64 one; and how much of each expert's activation
shift (ESD's objective, tr PᵀSP over the kept directions) float32's subspace captures against
float64's: subspaces that split a cluster of nearly equal eigenvalues at the cut k differently
capture the same shift, yet whitening merges them differently.

    python -m eval.kept_directions [--zoo community] [--layers 0,3,6,9,12,15]

Runs the base on the built-in proxy text (8 windows of 512 tokens, ESM's default budget),
captures each target linear's inputs with hooks, and applies the merge's own functions to the
zoo's checkpoints weight by weight. A merged LoRA of rank r should keep exactly r directions;
a full fine-tune keeps k = ⌊d_out / T⌋. Prints one line per weight where some expert keeps a
different number than its rank above the rounding level, or where the precisions disagree.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from eval.compare import REPO
from mergekit_esm.algebra import (
    essential_subspace,
    merge_task_factors,
    rank_above_rounding,
    storage_rounding_level,
)
from mergekit_esm.algebra.merge import carrying_directions
from mergekit_esm.algebra.subspace import InputMoment
from mergekit_esm.calibration.proxy import load_documents, token_windows
from mergekit_esm.methods.esm import EsmSettings

# each target linear and the module whose input it reads (q/k/v share one, gate/up another)
WEIGHTS = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
}


def layer_inputs(base: Path, layers: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) → the base's inputs to that module on the proxy text, float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    for layer in layers:
        for module in set(WEIGHTS.values()):
            model.model.layers[layer].get_submodule(module).register_forward_pre_hook(
                lambda _, args, key=(layer, module): captured.setdefault(key, []).append(args[0][0].double())
            )
    with torch.no_grad():
        for window in token_windows(load_documents("builtin"), tokenizer, 8, 512):
            model(torch.tensor([window]))
    return {key: torch.cat(parts) for key, parts in captured.items()}


def _captured(basis: torch.Tensor, delta: torch.Tensor, moment: torch.Tensor) -> float:
    """tr PᵀSP, S = ΔW XᵀX ΔWᵀ, in float64: the activation shift the directions P capture."""
    shift = basis.T @ delta
    return float(torch.einsum("ki,ij,kj->", shift, moment, shift))


def study_arguments(description: str) -> argparse.Namespace:
    """The command line of a study over a zoo's real experts: --workdir, --zoo, --layers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, default=REPO / "eval" / "workdir")
    parser.add_argument("--zoo", default="community", choices=["community", "synthetic"])
    parser.add_argument("--layers", default="0,3,6,9,12,15")
    return parser.parse_args()


def open_zoo(args: argparse.Namespace) -> tuple[list[int], dict, object, dict]:
    """(layers, the base's inputs per (layer, module), the base's and each expert's checkpoint
    opened with safetensors), the zoo built or read from its cache."""
    from eval.zoo.build import build_community_zoo, build_zoo

    models = (build_community_zoo if args.zoo == "community" else build_zoo)(args.workdir)
    layers = [int(x) for x in args.layers.split(",")]
    base = safe_open(Path(models["base"]) / "model.safetensors", "pt")
    experts = {name: safe_open(Path(path) / "model.safetensors", "pt") for name, path in models["experts"].items()}
    return layers, layer_inputs(models["base"], layers), base, experts


def default_merge_arguments() -> dict:
    """merge_task_factors' keyword arguments at ESM's defaults."""
    settings = EsmSettings()
    return dict(gamma=settings.gamma, task_exponent=settings.task_exponent,
                dimension_exponent=settings.dimension_exponent, preserve_norm=settings.preserve_norm)


def main():
    args = study_arguments(__doc__.splitlines()[0])
    layers, inputs, base, experts = open_zoo(args)
    merge_args = default_merge_arguments()
    print(f"{args.zoo} zoo, experts {list(experts)}; columns: expert kept float64 / float32 "
          "(rank above the rounding level) without → with the rank rule")
    for layer in layers:
        for weight, module in WEIGHTS.items():
            x = inputs[(layer, module)]
            moment = InputMoment(n_tokens=x.shape[0], moment=(x.T @ x).float())
            name = f"model.layers.{layer}.{weight}.weight"
            w0 = base.get_tensor(name)
            k = min(w0.shape[0] // len(experts), w0.shape[1])
            rms = float(w0.double().square().mean().sqrt())
            stored = {e: f.get_tensor(name) for e, f in experts.items()}  # each checkpoint read once
            levels = {e: storage_rounding_level(rms, tuple(w0.shape), w.dtype) for e, w in stored.items()}
            delta64 = {e: w.double() - w0.double() for e, w in stored.items()}
            counts, merged, bases = {}, {}, {}
            for dtype in (torch.float64, torch.float32):
                factors = []
                for expert, w in stored.items():
                    delta = w.to(dtype) - w0.to(dtype)  # in the working precision, as the merge has it
                    rank = rank_above_rounding(delta, levels[expert], k)
                    f = replace(essential_subspace(delta, moment, k), rounding=levels[expert])
                    ruled = replace(f, rank=rank)
                    counts.setdefault(expert, {})[dtype] = (
                        int(carrying_directions(f).sum()), int(carrying_directions(ruled).sum()), rank)
                    factors.append(ruled)
                    bases.setdefault(expert, {})[dtype] = ruled.basis[:, carrying_directions(ruled)].double()
                merged[dtype] = merge_task_factors(factors, **merge_args).double()
            moment64 = moment.moment.double()
            shares = [_captured(bases[e][torch.float32], delta64[e], moment64) / reference for e in experts
                      if (reference := _captured(bases[e][torch.float64], delta64[e], moment64)) > 0]
            captured = min(shares, default=1.0)
            moved = float((merged[torch.float32] - merged[torch.float64]).norm() / merged[torch.float64].norm())
            odd = [f"{e} {c[torch.float64][0]}/{c[torch.float32][0]} ({c[torch.float64][2]}) → "
                   f"{c[torch.float64][1]}/{c[torch.float32][1]}"
                   for e, c in counts.items() if len({c[torch.float64][0], c[torch.float32][0], c[torch.float64][2]}) > 1]
            print(f"layer {layer:2d} {weight:17s} float32 vs float64 merged update (with the rule): "
                  f"{moved:.4f}, least shift captured by float32 / float64 {captured:.6f}  {'; '.join(odd)}", flush=True)


if __name__ == "__main__":
    main()
