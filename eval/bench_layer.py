"""Where one decoder layer's ESM merge spends its time: per weight, and per linear-algebra call.

    python -m eval.bench_layer --shape 1b                  # CPU
    python -m eval.bench_layer --shape 8b --cuda           # GPU

No checkpoints and no calibration forward: each expert's task matrices are random (full rank,
like a full fine-tune) and its input statistics come from random tokens whose columns decay
over four decades (activations are far from isotropic), n = 16,384 tokens as the default proxy
gives, held in the form calibration holds them (XᵀX; down_proj's as ΔW XᵀX ΔWᵀ, formed before
the clock starts). The merge itself is the one mergekit-yaml runs (`esm`'s merge_weight at
`precision`). It prints each weight's wall time, then torch.profiler's table of the costliest calls (device
time on a GPU), which is what eval/bench_scale cannot separate from reading and writing.
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig

from eval.bench_polar import timed
from eval.bench_scale import SHAPES, layer_tensors
from mergekit_esm.algebra.subspace import InputMoment
from mergekit_esm.calibration.layerwise import held_form
from mergekit_esm.methods.esm import METHOD, EsmSettings


# the weights that read the same input share its statistics, as in the pipeline
INPUT_GROUP = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention output",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp output"}


def layer_weights(shape: dict) -> dict[str, tuple[int, int, str]]:
    """name → (d_out, d_in, input group) of one LLaMA decoder layer."""
    shapes = {name.split(".")[-2]: s for name, s in layer_tensors(LlamaConfig(**shape), 0).items()}
    return {weight: (*shapes[weight], group) for weight, group in INPUT_GROUP.items()}


def input_moment(d_in: int, n: int, device: str, g: torch.Generator) -> InputMoment:
    scale = torch.logspace(0, -2, d_in, device=device)[torch.randperm(d_in, generator=g, device=device)]
    x = torch.randn(n, d_in, generator=g, device=device) * scale
    return InputMoment(n, moment=x.T @ x) if n >= d_in else InputMoment(n, tokens=x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    settings = EsmSettings(precision=args.precision)
    dtype = settings.compute_dtype(device)
    weights = layer_weights(SHAPES[args.shape])
    groups = {group: d_in for _, d_in, group in weights.values()}
    moments = [{group: input_moment(d, args.tokens, device, g) for group, d in groups.items()} for _ in range(args.experts)]
    name = torch.cuda.get_device_name(0) if args.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"one `{args.shape}` layer, {args.experts} experts, n = {args.tokens}, {args.precision}, {name}\n")

    readers = collections.Counter(group for *_, group in weights.values())

    def merge_inputs(weight: str) -> tuple[list[torch.Tensor], list[InputMoment]]:
        """Task matrices and statistics in the form calibration holds them (held_form): a
        weight that alone reads its input (down_proj) gets ΔW XᵀX ΔWᵀ, formed in calibration."""
        d_out, d_in, group = weights[weight]
        deltas = [torch.randn(d_out, d_in, generator=g, device=device, dtype=dtype) * 1e-3 for _ in moments]
        held = [m[group] for m in moments]
        if readers[group] == 1 and held_form(args.tokens, d_in, d_out, dtype.itemsize) == "shift":
            held = [InputMoment(args.tokens, shift=i.output_covariance(d)) for d, i in zip(deltas, held)]
        return deltas, held

    def merge(weight: str, deltas: list[torch.Tensor], held: list[InputMoment]) -> torch.Tensor:
        rank = METHOD.default_rank(settings, *weights[weight][:2], len(deltas))
        return METHOD.merge_weight(settings, deltas, rank, held)

    merge("k_proj", *merge_inputs("k_proj"))  # warm-up: library initialisation is not the layer's cost
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.cuda else [])
    total = 0.0
    print("| weight | d_out × d_in | seconds |\n|---|---|---|")
    with profile(activities=activities) as prof:
        for weight, (d_out, d_in, _) in weights.items():
            _, seconds = timed(merge, weight, *merge_inputs(weight))
            total += seconds
            print(f"| {weight} | {d_out} × {d_in} | {seconds:.2f} |", flush=True)
    print(f"| layer | | {total:.2f} |\n")
    sort = "self_cuda_time_total" if args.cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
