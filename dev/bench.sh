#!/usr/bin/env bash
# CPU benchmark, run by `make bench`: the C backend against PyTorch (the test
# reference in float32, eager, Debian's torch on OpenBLAS) on the same
# configs, batches and threads, measured in one run and printed as ratios.
# Each pair is timed C first, then torch, back to back.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=$threads
py() { OPENBLAS_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE ${PYTHON:-/usr/bin/python3} dev/bench_torch.py "$@"; }
c() { build/bench_cpu "$@"; }
field() { sed -n "s/.*$1 \([0-9.]*\).*/\1/p"; }

tiny=tiny                          # SPEC §1: V 4096, L 4, D 128, E 8
wide=8192,4,256,4,64,768,8,2,2,768,1   # wider: D 256, F 768, V 8192
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $threads threads; $(gcc --version | head -1); torch $(${PYTHON:-/usr/bin/python3} -c 'import torch; print(torch.__version__)')"
printf "%-38s %12s %12s %8s\n" "what" "C" "PyTorch" "C/torch"
row() {  # row NAME C_VALUE TORCH_VALUE HIGHER_IS_BETTER
    awk -v n="$1" -v c="$2" -v t="$3" -v hi="$4" \
        'BEGIN { printf "%-38s %12s %12s %7.2fx\n", n, c, t, hi == 1 ? c / t : t / c }'
}
for cfg in tiny:$tiny:8:256 wide:$wide:4:256; do
    IFS=: read -r name conf B T <<< "$cfg"
    cv=$(c step $conf $B $T 5 | field step_ms)
    tv=$(py step $conf $B $T 5 | field step_ms)
    row "train step $name B=$B T=$T (ms)" "$cv" "$tv" 0
done
peak=$(c peak | field peak_gflops)
echo "fp32 FMA peak of this machine, measured: $peak GFLOP/s"
# the matmuls of a tiny step: (tokens, in, out)
for shape in 2048:128:128 2048:128:768 2048:384:128 2048:128:4096; do
    IFS=: read -r n i o <<< "$shape"
    cl=$(c matmul $n $i $o); tl=$(py matmul $n $i $o)
    for dir in fwd bwd; do
        cg=$(echo "$cl" | field ${dir}_gflops)
        row "matmul ${n}x${i} @ ${i}x${o} $dir (GFLOP/s)" "$cg" "$(echo "$tl" | field ${dir}_gflops)" 1
        awk -v g="$cg" -v p="$peak" 'BEGIN { printf "%-38s %11.0f%%\n", "    C at share of peak", 100 * g / p }'
    done
done
cv=$(c decode $tiny 200 | field decode_tok_s)
tv=$(py decode $tiny 200 | field decode_tok_s)
row "generate tiny, KV cache (tokens/s)" "$cv" "$tv" 1
