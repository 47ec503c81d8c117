#!/usr/bin/env bash
# Every GPU measurement of issues #38, #15, #16, #23 and #24 in one call on a lent GPU machine (device tool `run`);
# every file lands under $OUT. Prepare the wheels here first (docs/BENCHMARKS.md, "GPU session"):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl nvmath-python==0.5.0 "cuda-core>=0.3,<0.4" transformers==5.25.0
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
# 0. (#38, first) the engine's default path at scale, as a job's actor runs it: LLaVA-1.5-7B size, bf16,
#    every engine default (static path compiled with CUDA graphs, 64 slots in 0.9 of the free memory,
#    8 x 64 rows per call), 1,024 rows of mixed prompt (6-55 words) and caption (natural) lengths, keep 64:
#    warm-up seconds, shapes compiled vs the allowance, eager fallbacks, pool bytes vs budget, peak memory,
#    captions/s, and whether every row generated exactly its length. Then the stock model likewise, if time
#    allows. On a CPU: python3 benchmarks/bench_engine_scale.py --scale tiny --rows 48
timeout 300 python3 benchmarks/bench_engine_scale.py --scale "${SCALE:-7b}" --rows "${SCALE_ROWS:-1024}" --keep 64 \
    --json "$OUT/engine-scale.json" --out "$OUT/engine-scale.md" > "$OUT/engine-scale.log" 2>&1
if [ "$SECONDS" -lt 240 ]; then
    timeout $((330 - SECONDS)) python3 benchmarks/bench_engine_scale.py --scale "${SCALE:-7b}" --rows "${SCALE_ROWS:-1024}" \
        --keep stock --json "$OUT/engine-scale-stock.json" --out "$OUT/engine-scale-stock.md" > "$OUT/engine-scale-stock.log" 2>&1
fi
# 1. (#23) LLaVA-1.5-7B size, bf16, natural output lengths:
#    {generate, static, static-refill} x {stock, keep 128, keep 64} x {volume, tokencarve}, the best batch of
#    each among the batches below (one each by default: every budget x batch compiles its own CUDA-graph step,
#    ~1 min at 7B, so a second batch per budget does not fit in 8 minutes; H200: stock 128, carved 256 fit with
#    the static pool and a full prefill cache side by side). 4 batches' worth of rows per setting. bench_gpu.py
#    rewrites gpu.json / gpu.md after every setting, so a timeout still leaves what was measured.
#    On a CPU, end to end in ~2 minutes (the 4096-wide eigh / selection steps stop at their timeouts there):
#    OUT=/tmp/gs SCALE=tiny STOCK_BATCHES=2 BATCHES=2 BLOCKS=2 PREFILL_BATCHES=1,8 bash benchmarks/gpu_session.sh
timeout $((520 - SECONDS)) python3 benchmarks/bench_gpu.py --scale "${SCALE:-7b}" --lengths natural \
    --decode generate,static,static-refill --budgets stock,128,64 --method volume,tokencarve \
    --stock-batches "${STOCK_BATCHES:-128}" --batches "${BATCHES:-256}" --blocks "${BLOCKS:-4}" \
    --prefill-batches "${PREFILL_BATCHES:-1,8,64}" --repeats 2 --json "$OUT/gpu.json" --out "$OUT/gpu.md" 2>&1 | tail -60 > "$OUT/bench_gpu.log"
# what follows only runs while the session is under ~8 minutes ($SECONDS: since this script started)
# 2. the eigensolver routes side by side, ms per image at batch 8 / 64, agreement vs float64 (#15)
if [ "$SECONDS" -lt 525 ]; then
    timeout 45 python3 benchmarks/bench_information_score.py --batches 8,64 --repeats 2 --json "$OUT/eigh.json" \
        --out "$OUT/eigh.md" > "$OUT/eigh.log" 2>&1
fi
# 3. every selection method's cost at 4096 width vs the prefill it shortens (#16)
if [ "$SECONDS" -lt 565 ]; then
    timeout 20 python3 benchmarks/bench_selection.py --batches 8,64 --repeats 2 --out "$OUT/selection.md" \
        --json "$OUT/selection.json" > "$OUT/selection.log" 2>&1
fi
# 4. (#24) Qwen2.5-VL-7B size: one 1008 px image (1,296 tokens) per prompt, stock vs keep 128, volume,
#    generate vs static refill, one batch each; only while the session is under ~8 minutes. A GPU session
#    that has more time for it (or one that is for it alone): raise the timeout and add 64 to --budgets.
if [ "$SECONDS" -lt 420 ]; then
    timeout 150 python3 benchmarks/bench_gpu.py --arch qwen2.5-vl --scale "${SCALE:-7b}" --lengths natural \
        --decode generate,static-refill --budgets stock,128 --method volume --stock-batches "${QWEN_BATCHES:-32}" \
        --batches "${QWEN_BATCHES:-32}" --blocks 2 --prefill-batches "${QWEN_PREFILL_BATCHES:-1,8}" --repeats 2 \
        --json "$OUT/gpu_qwen.json" --out "$OUT/gpu_qwen.md" 2>&1 | tail -40 > "$OUT/bench_gpu_qwen.log"
fi
echo "session: $SECONDS s" | tee -a "$OUT/versions.txt"
# the device tool brings back at most 8 files: the JSON figures and versions.txt as they are, the
# Markdown tables and logs in one archive
(cd "$OUT" && tar -czf tables-and-logs.tgz ./*.md ./*.log 2>/dev/null && rm -f ./*.md ./*.log)
