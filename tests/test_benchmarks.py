"""The diagnostic benchmarks run, and what they measure holds on the test shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_float32_merge_of_low_rank_layer_inputs_takes_no_svd_route(tmp_path):
    """Layer 0 of bench_scale's random models sees only the byte tokenizer's 258 tokens, so
    the inputs span fewer directions than k: the case that sent an 8B merge to 30 s SVDs on a
    GPU. Through the real mergekit-yaml, every polar factor must take the Newton route (the
    code before the null-direction fix took the SVD route twice here)."""
    # 32 windows, the budget this case was found with: at 8 the random model's layer-0 inputs
    # (258 distinct byte tokens) leave one factor singular to float32 (docs/performance.md)
    stdout = _run("eval.bench_stages", "--shape", "test", "--layers", "1", "--experts", "2",
                  "--precision", "float32", "--proxy-samples", "32", "--workdir", str(tmp_path))
    table = _table(stdout)
    assert table["calibration: forward and statistics"][1] == "2"  # one layer of each expert
    assert table["· load an expert's layer"][1] == "2"
    assert table["· the layer's forward over all windows, statistics included"][1] == "2"
    # four input groups (q/k/v's, o_proj's, gate/up's, down_proj's) per window, 32 windows per expert
    assert int(table["· · statistics of one input and window"][1]) == 2 * 32 * 4
    assert float(table["· the layer's forward over all windows, statistics included"][0]) <= float(
        table["calibration: forward and statistics"][0])
    assert table["· polar factors"][1] == "14"  # P_cat and A_cat of 7 weights
    assert "· · Newton route (a wide factor counts twice)" in table
    assert "· · SVD route (fallback)" not in table
    assert int(table["mergekit-yaml, all"][2]) >= int(table["· polar factors"][2]) > 0  # peak anonymous MiB
    assert int(table["mergekit-yaml, all"][3]) >= int(table["mergekit-yaml, all"][2])  # RSS ⊇ anonymous
    assert int(table["outside the pre-pass (checks, mergekit's phase)"][3]) > 0
    layer_peaks = stdout.split("Peak anonymous MiB of each layer (its calibration and merge): ")[1].splitlines()[0]
    assert len(json.loads(layer_peaks)) == 1
    assert list(tmp_path.iterdir()) == []  # checkpoints and cache removed


def test_layer_benchmark_times_every_weight():
    table = _table(_run("eval.bench_layer", "--shape", "test", "--tokens", "600", "--experts", "2", "--rows", "3"))
    weights = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(float(table[w][1]) >= 0 for w in weights)
    assert abs(float(table["layer"][1]) - sum(float(table[w][1]) for w in weights)) <= 0.05
