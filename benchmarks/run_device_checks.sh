#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine whose time is short (one start, one script):
#   1. the GPU benchmark (benchmarks/bench_gpu.py through run_gpu.sh: sdpa vs flex attention, bf16, MFU);
#   2. the ablation sweep on the shapes world (benchmarks/ablations.py), many runs side by side on the one GPU.
#
#   bash benchmarks/run_device_checks.sh            # SWEEP_SECONDS (default 540) caps the sweep's wall time
#
# Packages missing there travel as wheels in ./.whl (see benchmarks/README.md) and go to /tmp/site. Results go to
# $OUT when set (the device runner's folder), else benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"

# SWEEP_ROWS: a space-separated subset of the rows (default: every row).
timeout "${SWEEP_SECONDS:-540}" python3 benchmarks/ablations.py ${SWEEP_ROWS:+--rows $SWEEP_ROWS} --jobs "${SWEEP_JOBS:-26}" --threads_per_job 1 --max_train_steps "${SWEEP_STEPS:-2000}" \
    --max_train_time_minutes "${SWEEP_RUN_MINUTES:-6.5}" --work_dir /tmp/ablations \
    --output "$RESULTS/ablations.json" --montage "$RESULTS/ablations.png" 2>&1 | tee "$RESULTS/ablations.log"
# A sweep stopped by the time limit still leaves its finished runs in the json; the montage then needs a rerun.
[[ -f "$RESULTS/ablations.png" ]] || python3 -c "
import sys, json; sys.path.insert(0, 'benchmarks'); import ablations
args = ablations.parse_args(['--work_dir', '/tmp/ablations'])
ablations.write_montage(args, args.rows, '$RESULTS/ablations.png')
print(ablations.markdown_table(json.load(open('$RESULTS/ablations.json'))['rows']))"

# BENCH_ARGS: arguments for bench_gpu.py (e.g. "--steps 10 --warmup 3" when time is short).
timeout "${BENCH_SECONDS:-100}" bash benchmarks/run_gpu.sh ${BENCH_ARGS:-} || echo "bench_gpu stopped with status $?"
