#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (a lent GPU comes for minutes): the GPU tests (the bundled job
# on the GPU against the CPU run, a stage's tensors on its device, VEO through two stages on the GPU), then
# bench/gpu.py at LLaVA-13B's layer shape (128 x 2048 tokens, float16), then learned and best at 100 steps, then
# GPTQ's column loop on that layer (bench/gptq_columns.py: the launch time bench/projection.py's GPTQ figures rest
# on). Each part has its own time limit, so a slow one still leaves the others' figures; everything printed is also
# written under OUTDIR.
#   usage: bash bench/gpu_checks.sh OUTDIR [PYTHON]        (PYTHON: .venv/bin/python by default)
#   on a lent GPU machine with no registry: bench/device_wheels.sh prepares what it lacks and says how to run it.
#   TEST_SECONDS (180), BENCH_SECONDS (240) and DEFAULTS_SECONDS (120) set the limits: 540 s in all, which leaves
#   the wheels' install room inside the device tool's 600 s a command (the first GPU run, install included and
#   without the third part, took about 5 minutes). The fourth part (GPTQ_SECONDS, 60) runs in what is left, last so
#   that the others' figures come back whole; if the command's limit cuts it, run it alone.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
py=${2:-.venv/bin/python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)" 2>&1 | tee -a "$out/gpu.txt"
timeout "${TEST_SECONDS:-180}" "$py" -m pytest tests/test_stage.py tests/test_veo.py -k "gpu or cuda" -p no:cacheprovider -ra \
  2>&1 | tee "$out/tests.log"
echo "[gpu_checks] tests exit ${PIPESTATUS[0]}"
timeout "${BENCH_SECONDS:-240}" "$py" bench/gpu.py --json "$out/gpu.json" 2>&1 | tee "$out/bench.log"
echo "[gpu_checks] bench exit ${PIPESTATUS[0]}"
# learned and best at the job's own default of 100 steps (bench/gpu.py's 200 are the issue's figure): what
# bench/projection.py's end-to-end totals for a default job rest on
timeout "${DEFAULTS_SECONDS:-120}" "$py" bench/gpu.py --iters 100 --methods learned best --json "$out/gpu-100.json" \
  2>&1 | tee "$out/bench-100.log"
echo "[gpu_checks] bench at 100 steps exit ${PIPESTATUS[0]}"
timeout "${GPTQ_SECONDS:-60}" "$py" bench/gptq_columns.py --repeats 1 --json "$out/gptq-columns.json" 2>&1 \
  | tee "$out/gptq-columns.log"
echo "[gpu_checks] gptq columns exit ${PIPESTATUS[0]}"
