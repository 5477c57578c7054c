#!/usr/bin/env bash
# The whole GPU benchmark in one command, each step under 10 minutes (a lent GPU machine's
# per-command limit): main run, ablation, overhead. Run from the repository root:
#
#   bash benchmarks/gpu-session.sh            # all three steps
#   bash benchmarks/gpu-session.sh main       # or one: main | ablation | overhead
#
# On a box without diffusers (or torchao for the fp8 variant) it installs the wheels carried
# in wheels/ first (see benchmarks/README.md). Results land in benchmarks/results/ and, when
# $OUT is set (the lent machine's output folder), are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
STEP_LIMIT_S=${STEP_LIMIT_S:-570}
DATA=${BENCH_DATA_DIR:-/tmp/zimage-bench}  # shared: the compile cache is warm after step 1
DAY=$(date -u +%F)

if ! python -c "import diffusers" 2>/dev/null && ls wheels/*.whl >/dev/null 2>&1; then
    pip install --no-deps wheels/*.whl
fi
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
GPU=$(python -c "from zimage_server.bench.environment import slug, device_name; print(slug(device_name('cuda:0')))")

run() {  # run NAME ARGS...: one bench step under the time limit
    local name=$1; shift
    echo "== $name: $*"
    timeout "$STEP_LIMIT_S" python benchmarks/run.py --data-dir "$DATA/$name" "$@"
    echo "== $name exit $?"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(main ablation overhead)
for step in "${steps[@]}"; do
    case $step in
        main) run main --model random:full --sizes 1024,512,2048 --iterations 5 ;;
        ablation) run ablation --model random:full --sizes 1024 --iterations 5 --skip-stock \
            --no-lossy --ablation --concurrency 1 \
            --output "benchmarks/results/$DAY-$GPU-ablation.json" ;;
        overhead) run overhead --overhead --device cpu --overhead-requests 500 --warmup 20 \
            --output "benchmarks/results/$DAY-$GPU-host-overhead.json" ;;
        *) echo "unknown step $step (main | ablation | overhead)"; exit 2 ;;
    esac
done
if [[ -n "${OUT:-}" ]]; then
    cp benchmarks/results/"$DAY"-*.json "$OUT"/ 2>/dev/null
    for log in "$DATA"/*/server-*.log; do
        [[ -f $log ]] && cp "$log" "$OUT/$(basename "$(dirname "$log")")-$(basename "$log")"
    done
fi
