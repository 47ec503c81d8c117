#!/usr/bin/env bash
# Every GPU measurement of issues #15 and #16 in one call on a lent GPU machine (device tool `run`);
# every file lands under $OUT. Prepare the wheels here first (docs/BENCHMARKS.md, "GPU session"):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl nvmath-python==0.5.0 "cuda-core>=0.3,<0.4" transformers==5.24.0
#   (nvmath-python also needs cuda-bindings; the image's CuPy may bring it: `pip show cuda-bindings` there
#   first, and carry a wheel matching the image's CUDA major version if it is missing)
# and run, with carry [".whl"] and a timeout that leaves room for one rerun:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-results/gpu-session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    python3 -c "import nvmath; print('nvmath', nvmath.__version__)" 2>&1 | tail -1
    python3 -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
} | tee "$OUT/versions.txt"
# 1. the eigensolver routes side by side, ms per image at batch 8 / 64 / 256, agreement vs float64 (#15)
timeout 150 python3 benchmarks/bench_information_score.py --batches 8,64,256 --json "$OUT/eigh.json" 2>&1 | tee "$OUT/eigh.md"
# 2. every selection method's cost at 4096 width vs the prefill it shortens (#16)
timeout 90 python3 benchmarks/bench_selection.py --batches 8,64 --write "$OUT/selection.md" 2>&1 | tail -20
# 3. the end-to-end 7B benchmark with the library's default solver, its JSON and a profile (#15)
timeout 300 python3 benchmarks/bench_gpu.py --json "$OUT/gpu.json" --write "$OUT/BENCHMARKS-gpu.md" --profile "$OUT/profile" 2>&1 | tee "$OUT/bench_gpu.md"
