"""What the rank rule's sketch (algebra.merge.rank_above_rounding) costs per expert and layer,
timed alone on a model's weight shapes.

    python -m eval.bench_rank_sketch [--hidden 576 --intermediate 1536 --kv 192 --experts 4 --layers 30]

Defaults: SmolLM2-135M's shapes, 4 experts (the first zoo). Prints each weight's time and the
total for the merge.
"""

import argparse
import time

import torch

from mergekit_esm.algebra import rank_above_rounding


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
    per_layer = 0.0
    for name, (d_out, d_in) in shapes.items():
        delta = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0)) * 1e-3
        k = min(d_out // args.experts, d_in)
        rank_above_rounding(delta, 1e-7, k)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            rank_above_rounding(delta, 1e-7, k)
        seconds = (time.perf_counter() - start) / args.repeats
        per_layer += seconds
        print(f"{name:10s} {d_out:6d} × {d_in:6d}, k {k:5d}: {1000 * seconds:8.1f} ms")
    print(f"per expert and layer {per_layer:.3f} s; {args.experts} experts × {args.layers} layers: "
          f"{per_layer * args.experts * args.layers:.1f} s")


if __name__ == "__main__":
    main()
