#!/usr/bin/env bash
# Builds build/emu/{test_emu,run_emu,train_emu}: test/test_model.c, run.c and
# train.c linked with openmoe.cu's kernels run on the CPU by
# dev/cuda_emu/cuda_emu.h (no GPU, no nvcc needed). It checks the CUDA
# backend's logic and indexing, not the GPU's speed or exact bits:
#   bash dev/cuda_emu/build.sh && build/emu/test_emu MODEL STATE [--bf16]
#   bash dev/cuda_emu/build.sh test_emu     (only the programs named)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build/emu
${PYTHON:-/usr/bin/python3} dev/cuda_emu/translate.py openmoe.cu build/emu/openmoe_emu.cpp
CXX=${CXX:-g++}
flags="-O2 -g -std=c++17 -w -U_FORTIFY_SOURCE -I. -Idev/cuda_emu"
$CXX $flags -c -x c++ build/emu/openmoe_emu.cpp -o build/emu/openmoe_emu.o
pids=""
wanted=${*:-test_emu run_emu train_emu}
for prog in test/test_model.c:test_emu run.c:run_emu train.c:train_emu; do
    [[ " $wanted " == *" ${prog##*:} "* ]] || continue
    $CXX $flags -x c++ "${prog%%:*}" -x none build/emu/openmoe_emu.o -o "build/emu/${prog##*:}" -lm &
    pids="$pids $!"
done
for p in $pids; do wait $p; done
echo "built build/emu/: $wanted"
