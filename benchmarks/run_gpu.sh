#!/usr/bin/env bash
# Run every benchmark on one CUDA GPU with bf16 autocast and torch.compile. Each runs under its own time limit, and
# the limits add up to under 8 minutes.
#
#     bash benchmarks/run_gpu.sh            # reports go to $OUT, or to ./benchmark-results when OUT is unset
#     PIPELINE_DIR=cfg-mnist bash benchmarks/run_gpu.sh
#
# The project's dependencies (diffusers, accelerate, datasets, mlxtend, scikit-learn) must be importable; the project
# itself is installed without them when it is missing. Sampling times and scores the pipeline in $PIPELINE_DIR, or a
# randomly initialised UNet when that folder is missing. A command that fails or runs out of time is reported, the
# others still run, and the exit status is 1.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-benchmark-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The evaluation classifier is cached outside $OUT, so that only the reports come back from a device run.
export DIFFUSERS_CFG_CACHE="${DIFFUSERS_CFG_CACHE:-${TMPDIR:-/tmp}/diffusers-cfg-cache}"

python3 -c "import torch; assert torch.cuda.is_available(), 'torch finds no CUDA GPU'" || exit 1
if ! python3 -c "import diffusers_cfg" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi

status=0
run() {  # run NAME SECONDS COMMAND...: print the command's output and copy it to $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds} s): $*"
    if ! timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"; then
        echo "== $name failed or ran out of time"
        status=1
    fi
}

run training_speed 100 python3 benchmarks/training_speed.py --device cuda --mixed_precision bf16 --compile --channels_last --matmul_size 8192
run sampling_speed 100 python3 benchmarks/sampling_speed.py --device cuda --mixed_precision bf16 --compile --channels_last --pipeline_dir "${PIPELINE_DIR:-cfg-mnist}" --batch_size 250 --samples_per_class 50
run memory 60 python3 benchmarks/memory.py --device cuda --mixed_precision bf16 --sampling_mixed_precision bf16 --pipeline_dir "${PIPELINE_DIR:-cfg-mnist}"
# Training picks bf16 on the GPU by itself (--mixed_precision auto) and has no torch.compile flag.
run time_to_quality 200 python3 benchmarks/time_to_quality.py --eval_every_steps 50
exit $status
