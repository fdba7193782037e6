#!/usr/bin/env bash
# One command for a lent GPU machine (H100 / H200): make the imports work, then run benchmarks/bench_gpu.py.
#
#   bash benchmarks/run_gpu.sh                    # sdpa + flex_attention, bf16, 0.16B model, 4096 tokens
#   bash benchmarks/run_gpu.sh --compile          # any bench_gpu.py arguments are passed on
#
# Packages missing from the machine's Python are installed offline from ./wheels (if that folder exists:
# `pip install --no-index --find-links wheels ...`); see benchmarks/README.md for how to fill it. Our own package is
# used from src/ through PYTHONPATH, so nothing is installed for it. If $OUT is set (the device runner's output
# folder), the json and the log are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# import name -> pip name
declare -A PIP_NAME=(
    [torch]=torch [transformers]=transformers [diffusers]=diffusers [tokenizers]=tokenizers
    [safetensors]=safetensors [huggingface_hub]=huggingface-hub [PIL]=pillow [numpy]=numpy
)
missing=()
for module in "${!PIP_NAME[@]}"; do
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
        missing+=("${PIP_NAME[$module]}")
    fi
done
if ((${#missing[@]})); then
    echo "missing: ${missing[*]}"
    if [[ -d "$WHEELS" ]]; then
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
    else
        echo "no $WHEELS/ folder to install them from (see benchmarks/README.md)" >&2
        exit 1
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not found"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

# A CPU dry run logs beside its own json (results/gpu_dry_run.*, git-ignored), not over the GPU run's log.
LOG=benchmarks/results/gpu.log
[[ " $* " == *" --dry_run "* ]] && LOG=benchmarks/results/gpu_dry_run.log
mkdir -p benchmarks/results
set +e
"$PYTHON" benchmarks/bench_gpu.py "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e

if [[ -n "${OUT:-}" && -d "${OUT}" ]]; then
    cp "$LOG" "$OUT/" || true
    cp benchmarks/results/gpu*.json "$OUT/" 2>/dev/null || true
fi
exit "$status"
