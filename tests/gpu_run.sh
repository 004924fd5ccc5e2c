#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md ("GPU"), in one run of at most about nine minutes on a
# lent GPU machine: its Python 3.12 has torch, torchvision, transformers, aiohttp, numpy,
# pillow, prometheus-client, nvidia-ml-py, onnx and onnxruntime (the ONNX export and the
# memory step need those two), and nothing can be fetched there. What it lacks
# (wheels, and a redis-server) is put in .gpu/ here first by `make gpu-kit`, and carried:
#   device run: command "bash tests/gpu_run.sh", carry [".gpu"], timeout_s 590
# Every step has its own time limit; the figures come back under $OUT (JSON, and one log).
# A dry run here, on the CPU and the venv, checks the script itself:
#   OUT=/tmp/gpu-out PY=.venv/bin/python INSTALL=0 DEVICE=cpu FRAMES=16 BATCHES=8 bash tests/gpu_run.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
FRAMES=${FRAMES:-300}
BATCHES=${BATCHES:-1,8,32}
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PATH="$PWD/.gpu:$PATH" PYTHONPATH="/tmp/site:$PWD"
if [ "${INSTALL:-1}" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/*.whl >> "$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
fi

step() {  # name, seconds, command...: its output into the log, its last lines shown
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), at most ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "   exit $?" | tee -a "$LOG"
}

{ nvidia-smi -L; "$PY" -c "import importlib
for name in ('torch', 'torchvision', 'transformers', 'onnxruntime'):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, 'missing')"; } >> "$LOG" 2>&1
ORT_GPU=$("$PY" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" \
  2>/dev/null || echo missing)

step models 90 "$PY" -m tests.gpu_bench_models /tmp/bench
step yolo-torch 100 "$PY" -m sightstream bench --config /tmp/bench/bench.toml --model bench/yolo-torch \
  --device "$DEVICE" --frames "$FRAMES" --batch-sizes "$BATCHES" --json "$OUT/yolo-torch.json"
step rtdetr 100 "$PY" -m sightstream bench --config /tmp/bench/bench.toml --model bench/rtdetr \
  --device "$DEVICE" --frames "$FRAMES" --batch-sizes "$BATCHES" --json "$OUT/rtdetr.json"
if [ "$ORT_GPU" = 1 ]; then
  step yolo-onnx 80 "$PY" -m sightstream bench --config /tmp/bench/bench.toml --model bench/yolo \
    --device "$DEVICE" --frames "$FRAMES" --batch-sizes "$BATCHES" --json "$OUT/yolo-onnx.json"
elif [ "$ORT_GPU" = missing ]; then
  echo "== yolo-onnx: skipped, no onnxruntime here (nor onnx? the models step says)" | tee -a "$LOG"
else
  echo "== yolo-onnx: skipped, this onnxruntime has no CUDA provider (onnxruntime-gpu is too big to carry)" \
    | tee -a "$LOG"
fi
step decode 45 "$PY" -m tests.gpu_decode --device "$DEVICE" --json "$OUT/decode.json"
step unload 70 "$PY" -m tests.unload_memory --mb 200 --device "$DEVICE"
step null 60 "$PY" -m sightstream bench --null --json "$OUT/null.json"
tail -c 6000 "$LOG"
