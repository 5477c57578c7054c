#!/usr/bin/env bash
# The whole GPU benchmark in one command, each step under 10 minutes (a lent GPU machine's
# per-command limit): stock vs ours at three sizes, the lossy opt-ins, the ablation in two
# halves, the server's overhead, what step previews cost. About 27 minutes in all on an H100; main and lossy first.
# Run from the repository root:
#
#   bash benchmarks/gpu-session.sh            # every step
#   bash benchmarks/gpu-session.sh main lossy # or some of: main lossy ablation1 ablation2 overhead preview
#
# On a box without diffusers, FastAPI, ... it first installs the wheels that
# scripts/gpu-wheels downloaded into .whl/ (see benchmarks/README.md). Results land in benchmarks/results/ and, when
# $OUT is set (the lent machine's output folder), are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
STEP_LIMIT_S=${STEP_LIMIT_S:-570}
DATA=${BENCH_DATA_DIR:-/tmp/zimage-bench}  # shared: the compile cache is warm after step 1
DAY=$(date -u +%F)
PY=${PYTHON:-python3}  # the GPU image's python3 is the one with torch
# Overridable only to dry-run this script on a CPU (BENCH_MODEL=tiny BENCH_DEVICE=cpu ...).
MODEL=${BENCH_MODEL:-random:full}
DEVICE=${BENCH_DEVICE:-cuda}
SIZES=${BENCH_SIZES:-1024,512,2048}
SIZE=${SIZES%%,*}

if [[ -d .whl ]] && ! $PY -c "import diffusers, fastapi" 2>/dev/null; then
    # Wheels from scripts/gpu-wheels, carried here: installed beside, not over, the image's.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/zimage-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/zimage-site:$PYTHONPATH
fi
GPU=$($PY -c "
from zimage_server.bench.environment import device_name, resolve_device, slug
print(slug(device_name(resolve_device('$DEVICE'))))") || exit 1
echo "device: $GPU"

run() {  # run NAME ARGS...: one bench step under the time limit
    local name=$1; shift
    mkdir -p "$DATA/$name" "$DATA/compile-cache"
    ln -sfn "$DATA/compile-cache" "$DATA/$name/compile-cache"  # compiled once, reused by all
    echo "== $name: $*"
    timeout "$STEP_LIMIT_S" $PY benchmarks/run.py --data-dir "$DATA/$name" --device "$DEVICE" "$@"
    echo "== $name exit $?"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(main lossy ablation1 ablation2 overhead preview)
for step in "${steps[@]}"; do
    case $step in
        main) run main --model "$MODEL" --sizes "$SIZES" --iterations 5 --no-lossy ;;
        lossy) run lossy --model "$MODEL" --sizes "$SIZE" --iterations 5 --skip-stock --lossy \
            --output "benchmarks/results/$DAY-$GPU-lossy.json" ;;
        ablation1|ablation2)  # two halves: each fits the limit
            if [[ $step == ablation1 ]]; then
                names=eager,compile_static,vae_eager,complex_rope,cudagraphs,pad512
            else
                names=attn_cudnn,attn_flash,vae_nchw,prompt_cache,no_prefetch
            fi
            run "$step" --model "$MODEL" --sizes "$SIZE" --iterations 5 --skip-stock --no-lossy \
                --ablation "$names" --concurrency 4 \
                --output "benchmarks/results/$DAY-$GPU-$step.json" ;;
        overhead) DEVICE=cpu run overhead --overhead --overhead-requests 500 --warmup 20 \
            --output "benchmarks/results/$DAY-$GPU-host-overhead.json" ;;
        preview) run preview --model "$MODEL" --sizes "$SIZE" --iterations 10 --preview-overhead \
            --output "benchmarks/results/$DAY-$GPU-preview.json" ;;
        *) echo "unknown step $step (main | lossy | ablation1 | ablation2 | overhead | preview)"; exit 2 ;;
    esac
done
if [[ -n "${OUT:-}" ]]; then
    cp benchmarks/results/"$DAY"-*.json "$OUT"/ 2>/dev/null
    for log in "$DATA"/*/server-*.log; do
        [[ -f $log ]] && cp "$log" "$OUT/$(basename "$(dirname "$log")")-$(basename "$log")"
    done
fi
