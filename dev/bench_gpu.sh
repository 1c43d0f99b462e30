#!/usr/bin/env bash
# GPU benchmark: a bf16 training step of the CUDA backend (dev/bench_gpu.c,
# the code train_gpu --bf16 runs) against PyTorch on the same GPU, same
# config, batch, data and optimizer (dev/bench_gpu.py: bf16 autocast, fused
# AdamW, flash attention; eager and torch.compile), for `small` and `base`.
# Prints tokens/s, model FLOPs utilisation (active-parameter FLOPs, see
# bench_gpu.py) and the ratios, from one run. Each program runs alone on the GPU.
#
#   bash dev/bench_gpu.sh                 (PYTHON: a python with torch 2.x + CUDA)
#   SMALL_B=8 BASE_B=4 STEPS=10 PEAK_TFLOPS=989 bash dev/bench_gpu.sh
#   CONFIGS="base:4:2048" bash dev/bench_gpu.sh      (CONFIG:B:T, space-separated)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
STEPS=${STEPS:-10}
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "SKIP bench_gpu: no CUDA device"
    exit 0
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# dense bf16 peak (no sparsity): H100 SXM and H200 989.4 TFLOP/s, H100 NVL 835, H100 PCIe 756
case "$gpu" in
    *H100*PCIe*) peak=756 ;;
    *H100*NVL*) peak=835 ;;
    *H100* | *H200* | *GH200*) peak=989.4 ;;
    *) peak=0 ;;
esac
peak=${PEAK_TFLOPS:-$peak}
mkdir -p build
$NVCC -O3 -std=c++17 -arch=sm_90 -I. -diag-suppress 177 -x cu dev/bench_gpu.c -x cu openmoe.cu -o build/bench_gpu \
    -lcublas -lcublasLt -lm || { echo "bench_gpu: build failed"; exit 1; }
echo "machine: $gpu ($(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)), peak ${peak} TFLOP/s bf16;" \
     "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null || echo missing); $($NVCC --version | tail -1)"
field() { sed -n "s/.*\b$1 \([0-9.]*\).*/\1/p"; }
mfu() { awk -v t="$1" -v f="$2" -v p="$peak" 'BEGIN { if (t == "" || p == 0) print "-"; else printf "%.1f%%", 100 * t * f / (p * 1e12) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
printf "%-6s %3s %5s | %-22s | %-22s | %-22s | %8s %8s\n" config B T "openmoe.cu tok/s (MFU)" "torch eager tok/s (MFU)" \
    "torch.compile tok/s (MFU)" "/eager" "/compile"
for spec in ${CONFIGS:-small:${SMALL_B:-8}:1024 base:${BASE_B:-4}:2048}; do
    IFS=: read -r cfg B T <<< "$spec"
    fpt=$($PY dev/bench_gpu.py flops $cfg $T | field flops_per_token)
    ours=$(build/bench_gpu $cfg $B $T $STEPS 2>&1)
    eager=$($PY dev/bench_gpu.py step $cfg $B $T $STEPS eager 2>&1 | tail -1)
    comp=$($PY dev/bench_gpu.py step $cfg $B $T $STEPS compile 2>&1 | tail -1)
    to=$(echo "$ours" | field tok_s) te=$(echo "$eager" | field tok_s) tc=$(echo "$comp" | field tok_s)
    printf "%-6s %3s %5s | %10s %-11s | %10s %-11s | %10s %-11s | %8s %8s\n" $cfg $B $T "${to:-failed}" "($(mfu "$to" "$fpt"))" \
        "${te:-failed}" "($(mfu "$te" "$fpt"))" "${tc:-failed}" "($(mfu "$tc" "$fpt"))" "$(ratio "$to" "$te")" "$(ratio "$to" "$tc")"
    echo "    openmoe.cu: $(echo "$ours" | tail -1)"
    echo "    eager:      $eager"
    echo "    compile:    $comp"
done
echo "targets (base): >= 1.5x eager, >= 1.0x torch.compile, >= 40% MFU"
