#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine whose time is short (one start, one script):
#   1. the GPU benchmark (benchmarks/bench_gpu.py through run_gpu.sh: sdpa vs flex attention, bf16, MFU);
#   2. the ablation sweep on the shapes world (benchmarks/ablations.py), many runs side by side on the one GPU;
#   3. with PRESETS_STEPS set, every CPU-sized preset on the glyphs image folder (benchmarks/bench_presets_draw.py),
#      one process per preset side by side;
#   4. sampling: seconds per 256x256 image at 0.16B (benchmarks/bench_sampling.py --preset paper), ours with and
#      without the prefix KV cache against the peer (transfusion-pytorch, from the carried wheels), bf16 autocast.
#
#   bash benchmarks/run_device_checks.sh            # SWEEP_SECONDS (default 540) caps the sweep's wall time
#   STAGES=presets PRESETS_STEPS=10000 bash benchmarks/run_device_checks.sh      # only the presets check
#   STAGES=sweep SWEEP_ROWS=u_narrow SWEEP_STEPS=2500 SWEEP_SEEDS="0 1 2 3" bash benchmarks/run_device_checks.sh
#                                                   # the demo's recipe over 4 seeds
#   STAGES="bench sampling" BENCH_ARGS="--compile flex_attention --steps 10 --warmup 3" BENCH_SECONDS=330 \
#       bash benchmarks/run_device_checks.sh        # issue 30: sdpa / flex / compiled flex MFU, then GPU sampling
# STAGES: which of "bench sweep presets sampling" run (default "sweep bench", and "presets" too when PRESETS_STEPS is
# set).
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
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # our package from the working tree, nothing to install
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"

STAGES=${STAGES:-sweep bench${PRESETS_STEPS:+ presets}}
wants() { [[ " $STAGES " == *" $1 "* ]]; }

if wants sweep; then
    # SWEEP_ROWS: a space-separated subset of the rows (default: every row); SWEEP_SEEDS: the seeds of each row.
    timeout "${SWEEP_SECONDS:-540}" python3 benchmarks/ablations.py ${SWEEP_ROWS:+--rows $SWEEP_ROWS} --seeds ${SWEEP_SEEDS:-0 1} \
        --jobs "${SWEEP_JOBS:-26}" --threads_per_job 1 --max_train_steps "${SWEEP_STEPS:-2000}" \
        --max_train_time_minutes "${SWEEP_RUN_MINUTES:-6.5}" --work_dir /tmp/ablations \
        --output "$RESULTS/ablations.json" --montage "$RESULTS/ablations.png" 2>&1 | tee "$RESULTS/ablations.log"
    # A sweep stopped by the time limit still leaves its finished runs in the json; the montage then needs a rerun.
    [[ -f "$RESULTS/ablations.png" ]] || python3 -c "
import sys, json; sys.path.insert(0, 'benchmarks'); import ablations
args = ablations.parse_args(['--work_dir', '/tmp/ablations'])
ablations.write_montage(args, args.rows, '$RESULTS/ablations.png')
print(ablations.markdown_table(json.load(open('$RESULTS/ablations.json'))['rows']))"
fi

if wants bench; then
    # BENCH_ARGS: arguments for bench_gpu.py (e.g. "--steps 10 --warmup 3" when time is short).
    timeout "${BENCH_SECONDS:-100}" bash benchmarks/run_gpu.sh ${BENCH_ARGS:-} || echo "bench_gpu stopped with status $?"
fi

if wants presets; then
    # PRESETS: the presets (default: every CPU-sized one); PRESETS_ARGS: more bench_presets_draw.py flags (the same
    # for every preset, e.g. "--num_samples 64" for a smoke run); PRESETS_SECONDS caps each preset's wall time.
    PRESETS_DIR=${PRESETS_WORK_DIR:-/tmp/presets_draw}
    # The image folder and the glyph judge are made once, before the presets start side by side.
    python3 benchmarks/bench_presets_draw.py --prepare_only --work_dir "$PRESETS_DIR" ${PRESETS_ARGS:-} || exit 1
    for preset in ${PRESETS:-small tiny}; do
        timeout "${PRESETS_SECONDS:-540}" python3 benchmarks/bench_presets_draw.py --presets "$preset" \
            --work_dir "$PRESETS_DIR" --max_train_steps "${PRESETS_STEPS:-10000}" --max_train_time_minutes 60 \
            --output "$PRESETS_DIR/$preset.json" ${PRESETS_ARGS:-} > "$PRESETS_DIR/$preset.log" 2>&1 &
    done
    wait
    python3 benchmarks/bench_presets_draw.py --merge "$PRESETS_DIR" --output "$RESULTS/presets_draw.json" \
        --montage "$RESULTS/presets_draw.png"
fi

if wants sampling; then
    # SAMPLING_ARGS: more bench_sampling.py flags (e.g. "--no_peer" when the peer's wheels did not travel).
    timeout "${SAMPLING_SECONDS:-150}" python3 benchmarks/bench_sampling.py --preset paper --device cuda \
        --dtype bfloat16 --threads 8 --output "$RESULTS/sampling_gpu.json" ${SAMPLING_ARGS:-} 2>&1 \
        | tee "$RESULTS/sampling_gpu.log"
fi
