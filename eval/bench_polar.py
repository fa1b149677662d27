"""Benchmark of the orthogonalization behind every ESM merge: polar factor of a concatenated basis.

    python -m eval.bench_polar --sizes 1024,2048            # CPU
    python -m eval.bench_polar --sizes 4096,14336 --cuda    # GPU: q/o/down_proj and 8B gate/up_proj

The matrix is what ESM orthogonalizes for gate/up_proj: T = 4 orthonormal d × d/4 bases, each
column weighted by its flattened eigenvalue (γ = 0.15 over a 1e-6 spectrum), side by side, so
d × d with σ_min/σ_max ~ 1e-4. Each route of `polar_orthogonalize` is timed (after one warm-up
on a small matrix) and compared with the float64 Gram route where that fits (--reference-max).
Error = max |Q − Q_ref| / max |Q_ref| with mean-σ scaling. LU inverses: the Newton routes' steps.
"""

import argparse
import time
from unittest import mock

import torch

from mergekit_esm.algebra.merge import gram_polar, newton_polar, polar_orthogonalize, svd_polar, with_mean_sigma


def concatenated_basis(d: int, tasks: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = []
    for _ in range(tasks):
        q, _ = torch.linalg.qr(torch.randn(d, d // tasks, generator=g, device=device))
        e = torch.logspace(0, -6, d // tasks, device=device) ** 0.15
        blocks.append(q * (e / e.mean()))
    return torch.cat(blocks, dim=1)


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--reference-max", type=int, default=4096, help="largest d run in float64 (the reference)")
    parser.add_argument("--svd-max", type=int, default=4096, help="largest d timed with the SVD route")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    # (route, function, largest d it runs at): the first route is the float64 reference
    routes = [
        ("float64 Gram eigh (CPU default)", lambda x: gram_polar(x.double(), keep_scale=True), args.reference_max),
        ("float32 Newton (GPU default)", lambda x: polar_orthogonalize(x.float(), keep_scale=True), None),
        ("float32 SVD", lambda x: svd_polar(x.float(), keep_scale=True), args.svd_max),
        ("float64 Newton (GPU, where κ is too large for float32)",
         lambda x: with_mean_sigma(newton_polar(x.double()), x.double()), None),
    ]
    for _, fn, _ in routes:
        fn(concatenated_basis(256, 4, device))
    name = torch.cuda.get_device_name(0) if args.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"polar factor of a concatenated basis (4 tasks), {name}\n")
    print("| d | route | seconds | LU inverses | error vs float64 |\n|---|---|---|---|---|")
    for d in (int(s) for s in args.sizes.split(",")):
        x = concatenated_basis(d, 4, device).double()
        reference = None
        for index, (route, fn, largest) in enumerate(routes):
            if largest is not None and d > largest:
                continue
            with mock.patch.object(torch.linalg, "inv_ex", wraps=torch.linalg.inv_ex) as inverses:
                q, seconds = timed(fn, x)
            if index == 0:
                reference, error = q, ""
            else:
                error = "" if reference is None else f"{float((q.double() - reference).abs().max() / reference.abs().max()):.1e}"
            print(f"| {d} | {route} | {seconds:.2f} | {inverses.call_count or ''} | {error} |", flush=True)
            del q


if __name__ == "__main__":
    main()
