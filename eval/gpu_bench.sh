#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one call of the device tool (a lent machine has
# 15 minutes, start included, and cannot reach a package index).
#
#   eval/gpu_bench.sh            # on the GPU machine: 8B shape at 4 and 10 layers, then the stage split
#   SHAPE=test LAYERS=1,2 STAGE_LAYERS=1 CUDA= eval/gpu_bench.sh    # a dry run on a CPU machine
#
# Needs the wheels the image lacks in .whl/ (mergekit and its pydantic/immutables deps, fetched
# here with `pip download --python-version 3.12 --only-binary=:all:`); this checkout is put on
# the image's python path and the plugin's .pth hook installed beside it, as `pip install .`
# would (the image has no hatchling to build the plugin's own wheel).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
SHAPE=${SHAPE:-8b} LAYERS=${LAYERS:-4,10} STAGE_LAYERS=${STAGE_LAYERS:-2} CUDA=${CUDA---cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
    site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PWD" >"$site/00_mergekit_esm_checkout.pth"  # read before mergekit_esm.pth (alphabetical)
    cp mergekit_esm.pth "$site/"
fi
"$PYTHON" -c "import torch, mergekit, mergekit_esm._import_hook; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null

timeout 500 "$PYTHON" -m eval.bench_scale --shape "$SHAPE" --layers "$LAYERS" $CUDA --workdir /tmp \
    --logs "$OUT/logs" --out "$OUT/bench_scale.md" 2>&1 | tee "$OUT/bench_scale.log"
timeout 85 "$PYTHON" -m eval.bench_stages --shape "$SHAPE" --layers "$STAGE_LAYERS" $CUDA --workdir /tmp \
    2>&1 | grep -v "it/s\]$" | tee "$OUT/stages.md"
