"""Benchmark: ESM vs mergekit `ties` on the same random LLaMA-shaped checkpoints, one run.

Prints wall time and peak RSS of each merge (each in a fresh subprocess running the real
`mergekit-yaml`; ESM with an empty cache, so calibration is included), at depth L and 2L.

    python eval/bench_merge.py --hidden 512 --intermediate 1536 --layers 8 --experts 3
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tiny_models import byte_tokenizer  # noqa: E402

MEASURE = """
import resource, sys
from mergekit.scripts.run_yaml import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def write_zoo(root: Path, args, layers: int) -> tuple[Path, list[Path]]:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(args.experts + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + (0.02 * torch.randn_like(p) if i else 0))
        path = root / ("base" if i == 0 else f"expert{i}")
        model.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1:]


def run(method: str, base: Path, experts: list[Path], root: Path) -> dict:
    params = "    parameters: {weight: 1.0, density: 0.5}\n" if method == "ties" else ""
    recipe = root / f"{method}.yml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
        + "".join(f"  - model: {e}\n{params}" for e in experts)
    )
    out = root / f"out_{method}"
    env = {"MERGEKIT_ESM_CACHE": str(root / f"cache_{method}"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recipe), str(out)], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    rss = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
    return {"method": method, "wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    for layers in (args.layers, 2 * args.layers):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            base, experts = write_zoo(root, args, layers)
            for method in ("ties", "esm"):
                rows.append({"layers": layers, **run(method, base, experts, root)})
                print(json.dumps(rows[-1]), flush=True)
    by = {(r["layers"], r["method"]): r for r in rows}
    L = args.layers
    print(f"\nshape: hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, {args.experts} experts, bf16")
    print("| layers | method | wall s | peak RSS MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['method']} | {r['wall_s']} | {r['peak_rss_mib']} |")
    for layers in (L, 2 * L):
        print(f"ESM/ties time at {layers} layers: {by[(layers, 'esm')]['wall_s'] / by[(layers, 'ties')]['wall_s']:.2f}x")
    print(f"ESM peak RSS 2L/L: {by[(2 * L, 'esm')]['peak_rss_mib'] / by[(L, 'esm')]['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
