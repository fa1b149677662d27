"""What the rank rule (algebra.merge.rank_above_rounding) costs per expert and layer, timed
alone on a model's weight shapes, for two kinds of expert.

    python -m eval.bench_rank_sketch [--hidden 576 --intermediate 1536 --kv 192 --experts 4 --layers 30]

Defaults: SmolLM2-135M's shapes, 4 experts (the first zoo). The two experts:
- "clear": ΔW 10⁴ times its rounding level in every direction, as in a float32 checkpoint
  (the first stage settles it; the level lies too far below ΔW for the sketch's Gram matrix,
  so from the sketch's singular values);
- "near the level": bench_scale's random experts, a base of scale 0.02 and a perturbation of
  0.002 both rounded to bfloat16, whose weakest directions lie a few times above bfloat16's
  rounding level, so gate/up_proj go through the wider sketch.
Prints each weight's time and the total for the merge.
"""

import argparse
import time

import torch

from mergekit_esm.algebra import rank_above_rounding, storage_rounding_level


def _experts(d_out: int, d_in: int) -> dict[str, tuple[torch.Tensor, float]]:
    """name → (ΔW in float32, its rounding level)."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(d_out, d_in, generator=g) * 0.02).bfloat16()
    expert = (base.float() + torch.randn(d_out, d_in, generator=g) * 0.002).bfloat16()
    near = storage_rounding_level(float(base.float().square().mean().sqrt()), (d_out, d_in), torch.bfloat16)
    return {"clear": (torch.randn(d_out, d_in, generator=g) * 1e-3, 1e-7),
            "near the level": (expert.float() - base.float(), near)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="k/v_proj output width")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    h, f = args.hidden, args.intermediate
    shapes = {"q_proj": (h, h), "k_proj": (args.kv, h), "v_proj": (args.kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    per_layer: dict[str, float] = {}
    for name, (d_out, d_in) in shapes.items():
        k = min(d_out // args.experts, d_in)
        for kind, (delta, level) in _experts(d_out, d_in).items():
            rank_above_rounding(delta, level, k)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                count = rank_above_rounding(delta, level, k)
            seconds = (time.perf_counter() - start) / args.repeats
            per_layer[kind] = per_layer.get(kind, 0.0) + seconds
            print(f"{name:10s} {d_out:6d} × {d_in:6d}, k {k:5d}, {kind:15s}: {1000 * seconds:8.1f} ms (count {count})")
    for kind, seconds in per_layer.items():
        print(f"{kind}: per expert and layer {seconds:.3f} s; {args.experts} experts × {args.layers} layers: "
              f"{seconds * args.experts * args.layers:.1f} s")


if __name__ == "__main__":
    main()
