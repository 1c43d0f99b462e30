#!/usr/bin/env bash
# One call on a lent GPU (minutes of device time are scarce): build, then the
# stages named in STAGES, each under a time limit cut to the budget left, each
# with its whole output in LOGS/STAGE.log and its last lines on the screen.
#
#   bash dev/gpu_session.sh                          (all stages, BUDGET=580 s)
#   STAGES="sanitize profile" BUDGET=150 bash dev/gpu_session.sh
#
#   build     make all (CPU and GPU targets), -j over the cores
#   test      make test_gpu without compute-sanitizer (test/g_gpu.sh)
#   bench     dev/bench_gpu.sh: small and base against PyTorch eager and compile
#   dropless  base, bf16: capacity rule t5x against none (dropless), same tokens
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck on two small cases
#   profile   dev/profile_gpu.py base 4 2048: GPU time per kernel
set -u
cd "$(dirname "$0")/.." || exit 1
LOGS=${LOGS:-${OUT:-build/gpu_session}}
BUDGET=${BUDGET:-580}
STAGES=${STAGES:-build test bench dropless sanitize profile}
export PYTHON=${PYTHON:-$(command -v python3)}
mkdir -p "$LOGS" build
start=$SECONDS

stage() {  # stage NAME MAX_SECONDS COMMAND...
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - start)))
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, ${left} s of the budget left"; return; fi
    local t0=$SECONDS
    timeout "$limit" bash -c '"$@"' stage "$@" > "$LOGS/$name.log" 2>&1  # bash -c: COMMAND may be a function
    local rc=$?
    echo "== $name: rc $rc after $((SECONDS - t0)) s (limit $limit s)"
    tail -n "${TAIL:-4}" "$LOGS/$name.log"
}

dropless() {  # the capacity rules at equal tokens, our bf16 step only
    [ -x build/bench_gpu ] || { echo "build/bench_gpu is missing: the bench stage builds it"; return 1; }
    for rule in t5x none; do
        echo "base 4 2048 --capacity $rule: $(build/bench_gpu base 4 2048 10 --capacity $rule 2>&1 | tail -1)"
    done
}

sanitize() {  # the cases make test_gpu wrote (build/test): a plain fp32 one, and the flash kernels over tiles
    local san cases=build/test/cases more=build/test/gpu/more
    san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck synccheck; do
        for run in "$cases/moe_drop" "$more/flash64 --bf16 --tol-scale 200"; do
            # shellcheck disable=SC2086  # a case and its flags, split into words
            set -- $run
            timeout 40 "$san" --tool $tool --error-exitcode 1 ./test_gpu "$1.model.bin" "$1.state.bin" "${@:2}" \
                > build/sanitize.last 2>&1
            local rc=$?  # (each tool's summary line: ERROR SUMMARY, or RACECHECK SUMMARY)
            echo "$tool $(basename "$1") ${2:-fp32}: rc $rc, $(grep -m1 'SUMMARY' build/sanitize.last)"
        done
    done
}

export -f dropless sanitize
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores; $(nvcc --version | tail -1)"
stage build 150 make -j"$(nproc)" all
stage test 170 env SANITIZE=0 make test_gpu
stage bench 240 bash dev/bench_gpu.sh
stage dropless 60 dropless
stage sanitize 60 sanitize
stage profile 100 "$PYTHON" dev/profile_gpu.py base 4 2048
echo "total $((SECONDS - start)) s"
