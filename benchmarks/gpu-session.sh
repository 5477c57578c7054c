#!/usr/bin/env bash
# The whole GPU benchmark as one command that fits a lent GPU machine: at most 10 minutes
# (BENCH_BUDGET_S, default 540 s: later steps are skipped, and said so, once it is spent),
# at most 8 files back from $OUT (the step JSONs, the servers' logs in one archive, this
# output), and every key figure printed, so the printed output alone holds the results.
# Steps run most valuable first. Run from the repository root:
#
#   bash benchmarks/gpu-session.sh             # main overhead lossy preview lora ablation1 ablation2
#   bash benchmarks/gpu-session.sh lora ablation1 ablation2  # or some (a second command)
#   BENCH_SKIP="lossy preview" bash benchmarks/gpu-session.sh
#   bash benchmarks/gpu-session.sh dispatch           # on request only: host CPU, ~3 minutes
#
# On a box without diffusers, FastAPI, ... it first installs the wheels that
# scripts/gpu-wheels downloaded into .whl/ (see benchmarks/README.md). Results land in
# benchmarks/results/ and, when $OUT is set (the lent machine's output folder), there too.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
MAX_FILES=8                                  # what a lent machine returns from $OUT
BUDGET_S=${BENCH_BUDGET_S:-540}              # the whole script, wheel install included
STEP_LIMIT_S=${STEP_LIMIT_S:-540}            # one step at most
MIN_STEP_S=${BENCH_MIN_STEP_S:-45}           # a step with less time left is skipped
DATA=${BENCH_DATA_DIR:-/tmp/zimage-bench}    # shared: the compile cache is warm after step 1
DAY=$(date -u +%F)
PY=${PYTHON:-python3}  # the GPU image's python3 is the one with torch
# Overridable to dry-run this script on a CPU (BENCH_MODEL=tiny BENCH_DEVICE=cpu ...).
MODEL=${BENCH_MODEL:-random:full}
DEVICE=${BENCH_DEVICE:-cuda}
SIZES=${BENCH_SIZES:-1024,512}  # 2048 too (BENCH_SIZES=1024,2048,512) costs ~150 s of stock
SIZE=${SIZES%%,*}
ITERATIONS=${BENCH_ITERATIONS:-5}
DENOISE_STEPS=${BENCH_DENOISE_STEPS:-8}
CONCURRENCY=${BENCH_CONCURRENCY:-1,4,8}
OVERHEAD_REQUESTS=${BENCH_OVERHEAD_REQUESTS:-500}
LORAS=${BENCH_LORAS:-3}                      # adapters the lora step switches among
LORA_RANK=${BENCH_LORA_RANK:-32}
LORA_CONCURRENCY=${BENCH_LORA_CONCURRENCY:-1,4}
SKIP=" ${BENCH_SKIP:-} "
RESULTS=${BENCH_RESULTS_DIR:-benchmarks/results}  # a dry run keeps the committed ones
SESSION=$(mktemp -d)                         # this run's JSONs, nothing older
[[ -n "${OUT:-}" ]] && exec > >(tee "$OUT/session.log") 2>&1

if [[ -d .whl ]] && ! $PY -c "import diffusers, fastapi" 2>/dev/null; then
    # Wheels from scripts/gpu-wheels, carried here: installed beside, not over, the image's.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/zimage-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/zimage-site:$PYTHONPATH
fi
GPU=$($PY -c "
from zimage_server.bench.environment import device_name, resolve_device, slug
print(slug(device_name(resolve_device('$DEVICE'))))") || exit 1
echo "device: $GPU, budget ${BUDGET_S}s, ${SECONDS}s spent before the first step"

BROKEN=""  # set once main failed (not cut short): the other model steps would fail alike

run() {  # run NAME ARGS...: one bench step, its JSON in $SESSION, its key figures printed
    local name=$1 left=$((BUDGET_S - SECONDS)); shift
    if [[ $SKIP == *" $name "* ]]; then echo "== $name skipped (BENCH_SKIP)"; return; fi
    if [[ -n $BROKEN && $name != overhead && $name != dispatch ]]; then
        echo "== $name skipped: $BROKEN"; return
    fi
    if ((left < MIN_STEP_S)); then echo "== $name skipped: ${left}s of BENCH_BUDGET_S left"; return; fi
    local limit=$((left < STEP_LIMIT_S ? left : STEP_LIMIT_S))
    local out="$SESSION/$DAY-$GPU-$name.json"
    [[ $name == main ]] && out="$SESSION/$DAY-$GPU.json"
    mkdir -p "$DATA/$name" "$DATA/compile-cache"
    ln -sfn "$DATA/compile-cache" "$DATA/$name/compile-cache"  # compiled once, reused by all
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" $PY benchmarks/run.py --data-dir "$DATA/$name" --device "$DEVICE" \
        --output "$out" "$@"
    local code=$?
    echo "== $name exit $code after $((BUDGET_S - left))..${SECONDS}s"
    [[ -f $out ]] && $PY -m zimage_server.bench.keyfigures "$out"
    if [[ $name == main && $code != 0 && $code != 124 ]]; then  # 124: its time ran out
        BROKEN="main failed (its error is above): fix that, then rerun"
        echo "== $BROKEN; the other model steps are skipped, saving the device's time"
    fi
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(main overhead lossy preview lora ablation1 ablation2)
common=(--model "$MODEL" --steps "$DENOISE_STEPS" --iterations "$ITERATIONS")
for step in "${steps[@]}"; do
    case $step in
        main) run main "${common[@]}" --sizes "$SIZES" --concurrency "$CONCURRENCY" --no-lossy ;;
        overhead) DEVICE=cpu run overhead --overhead --overhead-requests "$OVERHEAD_REQUESTS" \
            --warmup 20 ;;
        lossy) run lossy "${common[@]}" --sizes "$SIZE" --skip-stock --lossy --concurrency 1 ;;
        preview) run preview "${common[@]}" --sizes "$SIZE" --preview-overhead ;;
        lora) run lora "${common[@]}" --sizes "$SIZE" --lora-switch --loras "$LORAS" \
            --lora-rank "$LORA_RANK" --concurrency "$LORA_CONCURRENCY" ;;
        dispatch) DEVICE=cpu run dispatch --dispatch ;;
        ablation1|ablation2)  # two halves, so each fits a command on its own
            if [[ $step == ablation1 ]]; then
                names=eager,compile_static,vae_eager,complex_rope,cudagraphs,pad512
            else
                names=attn_cudnn,attn_flash,vae_nchw,prompt_cache,no_prefetch
            fi
            run "$step" "${common[@]}" --sizes "$SIZE" --skip-stock --no-lossy \
                --ablation "$names" --concurrency 4 ;;
        *) echo "unknown step $step (main | overhead | lossy | preview | lora | ablation1 | ablation2 | dispatch)"
           exit 2 ;;
    esac
done

shopt -s nullglob
results=("$SESSION"/*.json)
echo "== key figures, most valuable first (${SECONDS}s in all)"
for step in "${steps[@]}"; do  # in the steps' order, not the files'
    for file in "${results[@]}"; do
        [[ $file == *"-$step.json" || ($step == main && $file == "$SESSION/$DAY-$GPU.json") ]] &&
            $PY -m zimage_server.bench.keyfigures "$file"
    done
done
((${#results[@]})) && mkdir -p "$RESULTS" && cp "${results[@]}" "$RESULTS"/
if [[ -n "${OUT:-}" ]]; then
    logs=("$DATA"/*/server-*.log "$DATA"/*/*/server-*.log)
    ((${#logs[@]})) && tar -czf "$OUT/server-logs.tar.gz" -C "$DATA" "${logs[@]#"$DATA"/}"
    if ((${#results[@]} + 2 <= MAX_FILES)); then  # + the logs archive and session.log
        cp "${results[@]}" "$OUT"/
    else
        tar -czf "$OUT/results.tar.gz" -C "$SESSION" .
    fi
    echo "== \$OUT holds $(find "$OUT" -type f | wc -l) files (at most $MAX_FILES come back)"
fi
rm -rf "$SESSION"
