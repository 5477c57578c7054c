#!/usr/bin/env bash
# The whole GPU benchmark in one command, each step under 10 minutes (a lent GPU machine's
# per-command limit): stock vs ours at three sizes, the lossy opt-ins, the ablation in two
# halves, the server's overhead. About 25 minutes in all on an H100; main and lossy first.
# Run from the repository root:
#
#   bash benchmarks/gpu-session.sh            # every step
#   bash benchmarks/gpu-session.sh main lossy # or some of: main lossy ablation1 ablation2 overhead
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
    mkdir -p "$DATA/$name" "$DATA/compile-cache"
    ln -sfn "$DATA/compile-cache" "$DATA/$name/compile-cache"  # compiled once, reused by all
    echo "== $name: $*"
    timeout "$STEP_LIMIT_S" python benchmarks/run.py --data-dir "$DATA/$name" "$@"
    echo "== $name exit $?"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(main lossy ablation1 ablation2 overhead)
for step in "${steps[@]}"; do
    case $step in
        main) run main --model random:full --sizes 1024,512,2048 --iterations 5 --no-lossy ;;
        lossy) run lossy --model random:full --sizes 1024 --iterations 5 --skip-stock --lossy \
            --output "benchmarks/results/$DAY-$GPU-lossy.json" ;;
        ablation1|ablation2)  # two halves: each fits the limit
            if [[ $step == ablation1 ]]; then
                names=eager,compile_static,vae_eager,complex_rope,cudagraphs,pad512
            else
                names=attn_cudnn,attn_flash,vae_nchw,prompt_cache,no_prefetch
            fi
            run "$step" --model random:full --sizes 1024 --iterations 5 --skip-stock --no-lossy \
                --ablation "$names" --concurrency 4 \
                --output "benchmarks/results/$DAY-$GPU-$step.json" ;;
        overhead) run overhead --overhead --device cpu --overhead-requests 500 --warmup 20 \
            --output "benchmarks/results/$DAY-$GPU-host-overhead.json" ;;
        *) echo "unknown step $step (main | lossy | ablation1 | ablation2 | overhead)"; exit 2 ;;
    esac
done
if [[ -n "${OUT:-}" ]]; then
    cp benchmarks/results/"$DAY"-*.json "$OUT"/ 2>/dev/null
    for log in "$DATA"/*/server-*.log; do
        [[ -f $log ]] && cp "$log" "$OUT/$(basename "$(dirname "$log")")-$(basename "$log")"
    done
fi
