#!/usr/bin/env bash
# CPU benchmark, run by `make bench`: the C backend against PyTorch (Debian's
# torch on OpenBLAS, eager float32, the fast implementation in
# dev/bench_torch.py) on the same configs, batches, weights and threads,
# measured in one run and printed as ratios. Each pair is timed C first, then
# torch, back to back, and again (steps and generation STEP_ROUNDS times,
# each matmul MATMUL_ROUNDS times, alternating between two serving
# processes), the best of each side kept.
# Run it alone on a quiet machine.
#
# Fairness: OpenBLAS picks its kernels by CPU; an old OpenBLAS on a newer CPU
# (or an OPENBLAS_CORETYPE set in the environment) can leave torch on slow
# kernels. The bench tries the cores that can run here, keeps those whose
# products agree with float64, and gives torch the fastest. The two training
# steps start from the same weights and batch, and their first losses must
# agree (before and after one update), or the bench stops.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
# OpenMP's wait policy: torch runs PASSIVE (its OpenMP threads must not spin
# while OpenBLAS's own threads compute: spinning halves its matmuls on 2
# cores); C keeps the environment's, libgomp's default unless set, which is
# what ./train runs with
c_wait=${OMP_WAIT_POLICY:-default}
PY=${PYTHON:-/usr/bin/python3}
py() { OMP_WAIT_POLICY=PASSIVE $PY dev/bench_torch.py "$@"; }
c() { build/bench_cpu "$@"; }
field() { sed -n "s/.*$1 \([0-9.e+-]*\).*/\1/p"; }
mkdir -p build/bench

flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -1)
has() { [[ " $flags " == *" $1 "* ]]; }
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $threads threads, $(has avx512f && echo AVX-512 || (has avx2 && echo AVX2 || echo 'no AVX2')); $(gcc --version | head -1); torch $($PY -c 'import torch; print(torch.__version__)')"
echo "OpenMP wait policy: C $c_wait, torch PASSIVE"

# --- the OpenBLAS core for torch ---------------------------------------------
# blas_probe LABEL ENV...: the core OpenBLAS reports under ENV, the worst
# relative error of float32 products against float64, GFLOP/s at 1024^3
blas_probe() {
    local label=$1; shift
    local out core
    out=$(env "$@" OMP_WAIT_POLICY=PASSIVE OPENBLAS_VERBOSE=2 $PY dev/bench_torch.py blas 2>&1) || { echo "$label - failed - -"; return; }
    core=$(echo "$out" | sed -n 's/^Core: //p' | tail -1)
    echo "$label ${core:-unknown} $(echo "$out" | field blas_rel_err) $(echo "$out" | field blas_gflops)"
}
candidates=("environment:")   # as the environment has it
candidates+=("autodetect:-u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")
has avx512f && candidates+=("SkylakeX:-u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=SkylakeX")
has avx512_bf16 && candidates+=("Cooperlake:-u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Cooperlake")
has avx2 && candidates+=("Haswell:-u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell" "Zen:-u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Zen")
echo "OpenBLAS cores tried for torch (OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-unset} in the environment):"
best_env="" best_gf=0 best_label="" best_core=""
for cand in "${candidates[@]}"; do
    label=${cand%%:*}; envs=${cand#*:}
    read -r _ core err gf <<< "$(blas_probe "$label" $envs)"
    ok=no
    [ "$err" != "-" ] && awk -v e="$err" 'BEGIN { exit !(e < 1e-5) }' && ok=yes
    printf "    %-12s core %-12s max rel err %-9s %7s GFLOP/s  %s\n" "$label" "$core" "$err" "$gf" \
        "$([ $ok = yes ] && echo correct || echo 'WRONG or failed: not used')"
    if [ $ok = yes ] && awk -v g="$gf" -v b="$best_gf" 'BEGIN { exit !(g > b) }'; then
        best_env=$envs best_gf=$gf best_label=$label best_core=$core
    fi
done
[ -n "$best_label" ] || { echo "no OpenBLAS core computes right here; no torch comparison"; exit 1; }
if [ "$best_label" = environment ]; then
    echo "torch runs on OpenBLAS core $best_core, as the environment sets it (bench changed nothing)"
else
    echo "torch runs on OpenBLAS core $best_core: bench set it ($best_env), the fastest correct core"
fi
py() { env $best_env OMP_WAIT_POLICY=PASSIVE $PY dev/bench_torch.py "$@"; }

# --- results -------------------------------------------------------------------
printf "%-44s %12s %12s %8s\n" "what" "C" "PyTorch" "C/torch"
row() {  # row NAME C_VALUE TORCH_VALUE HIGHER_IS_BETTER
    awk -v n="$1" -v c="$2" -v t="$3" -v hi="$4" \
        'BEGIN { printf "%-44s %12s %12s %7.2fx\n", n, c, t, hi == 1 ? c / t : t / c }'
}

# training steps from the same weights and batch, C then torch STEP_ROUNDS
# times over (each run the median of its steps), the best run of each side
# kept: a slow spell of a shared machine (one C tiny step read 227 ms in a
# bench, 168-174 ms alone) then does not decide the ratio. The losses of the
# first two steps (before and after one AdamW update) must agree to 1e-5.
for cfg in tiny:8:256:5 small:2:1024:3; do
    IFS=: read -r name B T steps <<< "$cfg"
    cms=1e30 tms=1e30
    for _ in $(seq "${STEP_ROUNDS:-2}"); do
        cl=$(c step $name $B $T $steps build/bench/$name.bin)
        tl=$(py step $name $B $T $steps build/bench/$name.bin)
        for k in loss0 loss1; do
            cv=$(echo "$cl" | field $k) tv=$(echo "$tl" | field $k)
            awk -v c="$cv" -v t="$tv" 'BEGIN { d = c - t; if (d < 0) d = -d; exit !(d <= 1e-5 * (c < 0 ? -c : c)) }' || {
                echo "$name: $k C $cv, torch $tv differ by more than 1e-5 relative: not the same math; stopping"; exit 1; }
        done
        cms=$(awk -v a="$cms" -v b="$(echo "$cl" | field step_ms)" 'BEGIN { print (b < a ? b : a) }')
        tms=$(awk -v a="$tms" -v b="$(echo "$tl" | field step_ms)" 'BEGIN { print (b < a ? b : a) }')
    done
    row "train step $name B=$B T=$T (ms)" "$cms" "$tms" 0
    echo "    same weights and batch; losses of the first two steps: C $(echo "$cl" | field loss0), $(echo "$cl" | field loss1); torch $(echo "$tl" | field loss0), $(echo "$tl" | field loss1)"
done

peak_line=$(c peak)
peak=$(echo "$peak_line" | field peak_gflops)
echo "fp32 FMA peak of this machine, measured at $(echo "$peak_line" | field width)-float vectors ($(echo "$peak_line" | sed -n 's/.*isa \([^ ]*\).*/\1/p')): $peak GFLOP/s"

# every matmul of the tiny and small steps at 2048 tokens, (tokens, in, out):
# q/k/v/o, gate (2F), up, down, lm_head, router; experts at their capacity of 320 rows
tiny_shapes="2048:128:128 2048:128:768 2048:128:384 2048:384:128 2048:128:4096 2048:128:8 320:128:768 320:128:384 320:384:128"
small_shapes="2048:512:512 2048:512:3072 2048:512:1536 2048:1536:512 2048:512:32000 2048:512:8 320:512:3072 320:512:1536 320:1536:512"
# Each side serves the products from a process of its own (matmul -: a
# shape a line), and the bench asks the two in turn, C then torch, each
# shape MATMUL_ROUNDS times over, each answer the best of five products: the
# sides alternate every fraction of a second, so that a slow spell of a
# shared machine (they last seconds to minutes here) costs both. After
# each answer the bench waits, so that neither side's idle threads
# (libgomp's spinning, OpenBLAS's thread timeout) still run while the other
# computes.
settle=0.2  # seconds
fifos=$(mktemp -d)
trap 'rm -rf "$fifos"' EXIT
mkfifo "$fifos/c_in" "$fifos/c_out" "$fifos/t_in" "$fifos/t_out"
c matmul - < "$fifos/c_in" > "$fifos/c_out" &
py matmul - < "$fifos/t_in" > "$fifos/t_out" &
exec 3> "$fifos/c_in" 4< "$fifos/c_out" 5> "$fifos/t_in" 6< "$fifos/t_out"
ask() {  # ask IN_FD OUT_FD SHAPE: the server's answer line
    local line
    echo "$3" >&"$1"
    read -r line <&"$2" || { echo "a matmul server stopped at $3" >&2; exit 1; }
    echo "$line"
    sleep $settle
}
min_ratio=1e9
for shape in $tiny_shapes $small_shapes; do
    IFS=: read -r n i o <<< "$shape"
    cl="" tl=""
    for _ in $(seq "${MATMUL_ROUNDS:-5}"); do
        cl="$cl"$'\n'$(ask 3 4 $shape)
        tl="$tl"$'\n'$(ask 5 6 $shape)
    done
    for dir in fwd bwd; do
        cg=$(echo "$cl" | field ${dir}_gflops | sort -g | tail -1)
        tg=$(echo "$tl" | field ${dir}_gflops | sort -g | tail -1)
        row "matmul ${n}x${i} @ ${i}x${o} $dir (GFLOP/s)" "$cg" "$tg" 1
        min_ratio=$(awk -v m="$min_ratio" -v c="$cg" -v t="$tg" 'BEGIN { r = c / t; print (r < m ? r : m) }')
        awk -v g="$cg" -v p="$peak" 'BEGIN { printf "%-44s %11.0f%%\n", "    C at share of peak", 100 * g / p }'
    done
done
exec 3>&- 4<&- 5>&- 6<&-  # the servers see the end of their input and stop
wait
echo "slowest matmul against torch: $(awk -v m="$min_ratio" 'BEGIN { printf "%.2fx", m }')"

cv=0 tv=0
for _ in $(seq "${STEP_ROUNDS:-2}"); do  # as the steps: in turn, the best of each side
    cv=$(awk -v a="$cv" -v b="$(c decode tiny 200 | field decode_tok_s)" 'BEGIN { print (b > a ? b : a) }')
    tv=$(awk -v a="$tv" -v b="$(py decode tiny 200 | field decode_tok_s)" 'BEGIN { print (b > a ? b : a) }')
done
row "generate tiny, KV cache (tokens/s)" "$cv" "$tv" 1
