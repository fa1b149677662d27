"""Where an ESM merge spends its time, stage by stage, in the real pipeline (mergekit-yaml).

    python -m eval.bench_stages --shape 1b --layers 2 --precision float32      # CPU
    python -m eval.bench_stages --shape 8b --layers 2 --cuda                    # GPU

Writes bench_scale's random LLaMA-shaped checkpoints (base + 4 experts), runs `esm` on them
in this process, and wraps the pre-pass's stages with timers that synchronise the GPU, so
each stage is charged its own device work (cProfile charges queued GPU work to whichever
call waits for it, and on the device image's Python it also mixes in other threads' calls).
Prints seconds, calls and peak memory per stage (RssAnon and RSS sampled every 5 ms: RSS also
counts the pages of input files kept mapped, which anonymous memory leaves out), the peak of
anonymous memory in each layer (its calibration and merge: a peak that climbs with depth is
memory left behind), and the time per layer from the progress bar.
"""

import argparse
import collections
import functools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

import mergekit_esm.algebra.merge as merge
import mergekit_esm.algebra.subspace as subspace
import mergekit_esm.calibration.layerwise as layerwise
import mergekit_esm.integration.prepare as prepare
import mergekit_esm.methods.esm as esm
from eval.bench_scale import SHAPES, esm_parameter, write_checkpoints, write_recipe

seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()
peak_mib: dict[str, int] = collections.defaultdict(int)  # anonymous
peak_rss_mib: dict[str, int] = collections.defaultdict(int)
running: list[str] = []  # the stages now running, outermost first
layer_peaks_mib: list[int] = []
LAYER_STAGE = "merge of a layer's weights"
TOTAL = "mergekit-yaml, all"
OUTSIDE = "outside the pre-pass (checks, mergekit's phase)"


def _memory_mib() -> tuple[int, int]:
    """(anonymous, total) resident memory."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["RssAnon"].split()[0]) // 1024, int(fields["VmRSS"].split()[0]) // 1024


def _sample_memory() -> None:
    layer_peak = 0
    while True:
        now, rss = _memory_mib()
        layer_peak = max(layer_peak, now)
        stages = list(running)
        for stage in stages + ([OUTSIDE] if stages == [TOTAL] else []):
            peak_mib[stage] = max(peak_mib[stage], now)
            peak_rss_mib[stage] = max(peak_rss_mib[stage], rss)
        if len(layer_peaks_mib) < calls[LAYER_STAGE]:  # a layer's merge ended: its peak is final
            layer_peaks_mib.append(layer_peak)
            layer_peak = now
        time.sleep(0.005)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(stage: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _synchronize()
        running.append(stage)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _synchronize()
            seconds[stage] += time.perf_counter() - start
            running.remove(stage)
            calls[stage] += 1

    return wrapper


def _timed_generator(stage: str, function):
    """Times each item's production (a layer's calibration), not the consumer's work."""

    def wrapper(*args, **kwargs):
        items, step = function(*args, **kwargs), _timed(stage, next)
        while True:
            try:
                yield step(items)
            except StopIteration:
                return

    return wrapper


# (module, attribute, stage): the functions are looked up through these modules at call time
STAGES = [
    (prepare, "merged_updates", "pre-pass (calibration and merge)"),
    (prepare, "layer_input_moments", "calibration: forward and statistics"),
    (layerwise.LayerStack, "load_layer", "· load an expert's layer"),
    (layerwise.LayerStack, "run_layer", "· the layer's forward over all windows, statistics included"),
    (layerwise._InputCollector, "__call__", "· · statistics of one input and window"),
    (prepare, "merge_layer", LAYER_STAGE),
    (prepare.TaskMatrices, "__init__", "· read base weight"),
    (prepare.TaskMatrices, "__getitem__", "· read expert weight − base"),
    (esm, "essential_subspace", "· essential subspace (eigh)"),
    (merge, "rank_above_rounding", "· ΔW's rank above the rounding level (sketch)"),
    (subspace, "moment_sqrt", "· · √XᵀX for wide outputs"),
    (merge, "polar_orthogonalize", "· polar factors"),
    (merge, "newton_polar", "· · Newton route (a wide factor counts twice)"),
    (merge, "svd_polar", "· · SVD route (fallback)"),
    (prepare, "save_file", "write merged updates to the cache"),
    (prepare, "trim_heap", "return free heap pages (malloc_trim)"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--precision", choices=["auto", "float64", "float32"], default="auto")
    parser.add_argument("--proxy-samples", type=int, default=None, help="ESM's `proxy_samples` (512-token windows per expert; default: the plugin's, from the rank)")
    parser.add_argument("--esm", type=esm_parameter, action="append", default=[], metavar="KEY=VALUE",
                        help="another ESM recipe parameter, e.g. subspace_solver=randomized (repeatable)")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    for module, name, stage in STAGES:
        wrap = _timed_generator if name == "layer_input_moments" else _timed
        setattr(module, name, wrap(stage, getattr(module, name)))

    root = Path(tempfile.mkdtemp(prefix="bench-stages-", dir=args.workdir))
    _, models = write_checkpoints(root, SHAPES[args.shape], args.layers, args.experts)
    recipe = write_recipe(root / "esm.yml", "esm", models[0], models[1:],
                          {"precision": args.precision, **({"proxy_samples": args.proxy_samples} if args.proxy_samples else {}),
                           **dict(args.esm)})
    os.environ["MERGEKIT_ESM_CACHE"] = str(root / "cache")
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    threading.Thread(target=_sample_memory, daemon=True).start()
    start = time.perf_counter()
    flags = ["--cuda"] if args.cuda else []
    running.append(TOTAL)
    mergekit_yaml([str(recipe), str(root / "out"), *flags, "--out-shard-size", "500M"], standalone_mode=False)
    total = time.perf_counter() - start
    time.sleep(0.05)  # the sampler's last look
    running.remove(TOTAL)
    device = torch.cuda.get_device_name(0) if args.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n`{args.shape}` shape, {args.layers} layers, {args.experts} experts, precision {args.precision}, "
        f"{args.proxy_samples or 'the default number of'} × 512 proxy tokens per expert"
        f"{''.join(f', {k}: {v}' for k, v in args.esm)}, {device}\n"
    )
    print("| stage | seconds | calls | peak anonymous MiB | peak RSS MiB |\n|---|---|---|---|---|")
    print(f"| {TOTAL} | {total:.1f} | 1 | {peak_mib[TOTAL]} | {peak_rss_mib[TOTAL]} |")
    print(f"| {OUTSIDE} | | | {peak_mib[OUTSIDE]} | {peak_rss_mib[OUTSIDE]} |")
    for _, _, stage in STAGES:
        if calls[stage]:
            print(f"| {stage} | {seconds[stage]:.2f} | {calls[stage]} | {peak_mib[stage]} | {peak_rss_mib[stage]} |")
    print(f"\nPeak anonymous MiB of each layer (its calibration and merge): {layer_peaks_mib}")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
