"""Benchmark at scale: ESM against mergekit `ties` on random LLaMA-shaped checkpoints.

    python -m eval.bench_scale --shape test                 # hidden 512: depth L and 2L
    python -m eval.bench_scale --shape 1b --layers 4,8      # TinyLlama-1.1B widths
    python -m eval.bench_scale --shape 8b --cuda            # Llama-3-8B shape, on a GPU machine

For each depth it writes a base and T experts (bf16 safetensors, one shard per layer, written
tensor by tensor so the generator stays small; experts = base + a random full-rank
perturbation), times reading every input tensor once (the disk limit), then runs `ties` and
`esm` (defaults: built-in proxy, its default number of 512-token windows) each in a fresh `mergekit-yaml` process
with an empty cache, recording wall time, peak RSS and peak GPU memory. The page cache is
dropped before each measurement when the user may (root), so every run reads from disk.
Prints a markdown table and writes it, with the raw rows, to --out.
Where a merge's time goes: eval/bench_stages (stage by stage) and eval/bench_layer.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from eval.byte_tokenizer import byte_tokenizer

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),  # SmolLM2-135M (the zoos' base)
    "test": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3-8B
}

# Runs mergekit-yaml in this process and reports its peak memory on stderr. Besides the peak
# RSS (ru_maxrss) it samples RssAnon: RSS also counts the pages of the memory-mapped
# safetensors files that mergekit's loader keeps open, which is page cache the kernel can
# reclaim, not memory the merge holds.
MEASURE = """
import resource, sys, threading, time, torch
from mergekit.scripts.run_yaml import main
peak_anon = 0
def sample():
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    print("PEAK_ANON_KB", peak_anon, file=sys.stderr)
    if torch.cuda.is_available():
        print("PEAK_GPU_B", torch.cuda.max_memory_allocated(), file=sys.stderr)
"""


def esm_parameter(text: str) -> tuple[str, object]:
    """--esm KEY=VALUE: one of ESM's recipe parameters, its value read as YAML (as in a recipe)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an ESM recipe parameter), got {text!r}")
    return key, yaml.safe_load(value)


def layer_tensors(config: LlamaConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    p = f"model.layers.{layer}."
    return {
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


# Drawn on the GPU when there is one: at the 8B shape, CPU sampling alone would take minutes.
# (The weights then differ between CPU and GPU machines; both are random of the same law.)
GENERATOR_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tensor(name: str, shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator(GENERATOR_DEVICE).manual_seed(zlib.crc32(f"{name}/{seed}".encode()))
    if len(shape) == 1:
        return torch.ones(shape) if seed == 0 else torch.zeros(shape)
    return torch.randn(shape, generator=g, device=GENERATOR_DEVICE) * scale


def write_model(path: Path, config: LlamaConfig, expert: int) -> None:
    """Base (expert 0) or base + perturbation, one safetensors shard per layer, bf16."""
    path.mkdir(parents=True)
    shards = {"embed": {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)},
              "head": {"model.norm.weight": (config.hidden_size,),
                       "lm_head.weight": (config.vocab_size, config.hidden_size)}}
    shards.update({f"layer{i:03d}": layer_tensors(config, i) for i in range(config.num_hidden_layers)})
    index = {}
    for shard, tensors in shards.items():
        state = {}
        for name, shape in tensors.items():
            w = _tensor(name, shape, 0, 0.02)
            if expert:
                w += _tensor(name, shape, expert, 0.002)
            state[name] = w.to(torch.bfloat16).cpu()
        file = f"{shard}.safetensors"
        save_file(state, path / file, metadata={"format": "pt"})
        index.update({name: file for name in state})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def read_all_once(models: list[Path]) -> float:
    start = time.perf_counter()
    for model in models:
        for shard in sorted(model.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name)
    return time.perf_counter() - start


def write_checkpoints(root: Path, shape: dict, layers: int, experts: int) -> tuple[LlamaConfig, list[Path]]:
    """`shape` cut to `layers` decoder layers, written under root: [base, expert1, …]."""
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    models = [root / ("base" if i == 0 else f"expert{i}") for i in range(experts + 1)]
    for i, path in enumerate(models):
        write_model(path, config, i)
    return config, models


def write_recipe(path: Path, method: str, base: Path, experts: list[Path], parameters: dict | None = None) -> Path:
    """A mergekit-yaml recipe: `ties` at weight 1 and density 0.5 per expert; any other method
    takes `parameters` as its global parameters."""
    per_model = "    parameters: {weight: 1.0, density: 0.5}\n" if method == "ties" else ""
    settings = f"parameters: {json.dumps(parameters)}\n" if parameters else ""
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\ndtype: bfloat16\n{settings}models:\n"
        + "".join(f"  - model: {e}\n{per_model}" for e in experts)
    )
    return path


def reported_peaks(stderr: str) -> dict:
    """The peaks MEASURE printed last on stderr, in MiB (the GPU's only where one was used)."""
    def reported(key: str) -> int:
        return int(stderr.rsplit(key, 1)[1].split()[0])

    peaks = {"peak_rss_mib": round(reported("PEAK_RSS_KB") / 1024), "peak_anon_mib": round(reported("PEAK_ANON_KB") / 1024)}
    if "PEAK_GPU_B" in stderr:
        peaks["peak_gpu_mib"] = round(reported("PEAK_GPU_B") / 2**20)
    return peaks


def run_merge(method: str, base: Path, experts: list[Path], root: Path, flags: list[str], esm_parameters: dict,
              log: Path | None = None) -> dict:
    recipe = write_recipe(root / f"{method}.yml", method, base, experts, esm_parameters if method == "esm" else None)
    out, cache = root / f"out_{method}", root / f"cache_{method}"
    env = {**os.environ, "MERGEKIT_ESM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    # stderr (mergekit's log, the progress bars' per-layer times) goes to a file as it comes,
    # so a run stopped by a time limit still leaves it
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", MEASURE, str(recipe), str(out), *flags],
                                stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{stderr[-3000:]}")
    row = {"method": method, "wall_s": round(wall, 1), **reported_peaks(stderr)}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return row


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({cpu})"
    return f"CPU only ({cpu})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="test")
    parser.add_argument("--layers", help="comma-separated depths (default: the shape's L and 2L for test, L otherwise)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", default="ties,esm")
    parser.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml")
    parser.add_argument("--precision", choices=["auto", "float64", "float32"], default="auto", help="ESM's `precision`")
    parser.add_argument("--proxy-samples", type=int, default=None, help="ESM's `proxy_samples` (512-token windows per expert; default: the plugin's, from the rank)")
    parser.add_argument("--esm", type=esm_parameter, action="append", default=[], metavar="KEY=VALUE",
                        help="another ESM recipe parameter, e.g. subspace_solver=randomized (repeatable)")
    parser.add_argument("--out-shard-size", default="500M",
                        help="mergekit's --out-shard-size for both methods: a shard is buffered in RAM until written")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/bench_scale.md"))
    parser.add_argument("--logs", type=Path, default=None, help="keep each merge's stderr here as METHOD_LAYERS.log")
    args = parser.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    shape = SHAPES[args.shape]
    depth = shape["num_hidden_layers"]
    depths = [int(x) for x in args.layers.split(",")] if args.layers else ([depth, 2 * depth] if args.shape == "test" else [depth])
    flags = ["--out-shard-size", args.out_shard_size, *(["--cuda"] if args.cuda else [])]
    rows = []
    for layers in depths:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            config, models = write_checkpoints(root, shape, layers, args.experts)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the merges run in subprocesses: leave them the GPU
            params = sum(torch.Size(s).numel() for i in range(layers) for s in layer_tensors(config, i).values())
            params += 2 * config.vocab_size * config.hidden_size
            print(f"{layers} layers, {params / 1e9:.2f}B parameters: wrote {len(models)} models in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            cold = drop_page_cache()
            rows.append({"layers": layers, "params_b": round(params / 1e9, 2), "method": "read inputs once",
                         "wall_s": round(read_all_once(models), 1)})
            print(json.dumps(rows[-1]), flush=True)
            for method in args.methods.split(","):
                drop_page_cache()
                rows.append({"layers": layers, "params_b": round(params / 1e9, 2),
                             **run_merge(method, models[0], models[1:], root, flags,
                                         {"precision": args.precision, **({"proxy_samples": args.proxy_samples} if args.proxy_samples else {}),
                                          **dict(args.esm)},
                                         args.logs / f"{method}_{layers}.log" if args.logs else None)})
                print(json.dumps(rows[-1]), flush=True)

    header = (f"Shape `{args.shape}` ({', '.join(f'{k}={v}' for k, v in shape.items() if k != 'num_hidden_layers')}), "
              f"{args.experts} experts, bf16; flags {' '.join(flags)}; ESM precision {args.precision}, "
              f"{args.proxy_samples or 'the default number of'} × 512 proxy tokens"
              f"{''.join(f', {k}: {v}' for k, v in args.esm)}; page cache "
              f"{'dropped before each run' if cold else 'not dropped (not root)'}; {machine()}.\n\n")
    table = (
        "| layers | params | run | wall s | peak RSS MiB | peak anonymous RSS MiB | peak GPU MiB |\n"
        "|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {r['layers']} | {r['params_b']}B | {r['method']} | {r['wall_s']} | {r.get('peak_rss_mib', '')} | "
            f"{r.get('peak_anon_mib', '')} | {r.get('peak_gpu_mib', '')} |\n"
            for r in rows
        )
    )
    ratios = []
    for layers in depths:
        by = {r["method"]: r for r in rows if r["layers"] == layers}
        if {"esm", "ties"} <= by.keys():
            ratios.append(f"ESM/ties time at {layers} layers: {by['esm']['wall_s'] / by['ties']['wall_s']:.2f}×")
    esm = [r for r in rows if r["method"] == "esm"]
    if len(esm) > 1:
        ratios.append(f"ESM peak RSS at {esm[-1]['layers']} vs {esm[0]['layers']} layers: "
                      f"{esm[-1]['peak_rss_mib'] / esm[0]['peak_rss_mib']:.2f}× (anonymous: "
                      f"{esm[-1]['peak_anon_mib'] / esm[0]['peak_anon_mib']:.2f}×)")
    report = header + table + "\n" + "\n".join(ratios) + "\n"
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n<!-- rows: " + json.dumps(rows) + " -->\n")


if __name__ == "__main__":
    main()
