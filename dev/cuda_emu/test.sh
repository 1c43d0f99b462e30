#!/usr/bin/env bash
# The CUDA backend's kernels on the CPU (dev/cuda_emu/cuda_emu.h): every
# reference case in fp32 (SPEC §7 tolerances) and bf16 (test/g_gpu.sh's
# tolerance), the optimizer steps, the gradient check, decode against forward,
# and train_emu against train. Checks logic and indexing without a GPU; the
# GPU's own numbers are test/g_gpu.sh's. Verdict lines as test/run_tests.sh counts.
# Usage: bash dev/cuda_emu/test.sh   (after make; about a few minutes)
set -u
cd "$(dirname "$0")/../.."
export BUILD=${BUILD:-build/test}
PYTHON=${PYTHON:-/usr/bin/python3}
source test/lib.sh
mkdir -p "$BUILD"
bash dev/cuda_emu/build.sh > "$BUILD/emu_build.log" 2>&1 || { tail -20 "$BUILD/emu_build.log"; fail "cuda_emu build"; exit 1; }
cases=$BUILD/cases
[ -f $cases/cases.txt ] || $PYTHON test/reference.py $cases > "$BUILD/reference.log" || { fail "reference.py"; exit 1; }
BF16_TOL=${BF16_TOL:-200}  # see test/g_gpu.sh
E=build/emu
while read -r name opts; do
    expect_ok "emu fp32 $name" $E/test_emu $cases/$name.model.bin $cases/$name.state.bin
    expect_ok "emu bf16 $name (tolerance ${BF16_TOL}x)" $E/test_emu $cases/$name.model.bin $cases/$name.state.bin --bf16 --tol-scale $BF16_TOL
    expect_ok "emu fp32 $name, OPENMOE_MOE_LAYOUT=exact" env OPENMOE_MOE_LAYOUT=exact $E/test_emu $cases/$name.model.bin $cases/$name.state.bin
    for opt in $opts; do
        expect_ok "emu $opt steps $name" $E/test_emu $cases/$name.model.bin $cases/$name.state.bin --update $opt $cases/$name.$opt.bin
    done
done < $cases/cases.txt
# the CUDA backend's own cases (test/gpu_cases.py --quick): flash attention over several tiles, sharp attention
$PYTHON test/gpu_cases.py $BUILD/emu_more --quick > $BUILD/emu_more.log || { fail "test/gpu_cases.py"; exit 1; }
while read -r name opts; do
    M=$BUILD/emu_more/$name.model.bin S=$BUILD/emu_more/$name.state.bin
    expect_ok "emu fp32 $name" $E/test_emu $M $S
    expect_ok "emu bf16 $name (flash attention where Hd allows)" $E/test_emu $M $S --bf16 --tol-scale $BF16_TOL
    expect_ok "emu bf16 $name (OPENMOE_ATTENTION=cublas)" env OPENMOE_ATTENTION=cublas $E/test_emu $M $S --bf16 --tol-scale $BF16_TOL
done < $BUILD/emu_more/cases.txt
expect_ok "emu gradcheck" $E/test_emu --gradcheck
if $E/test_emu --gradcheck --break > /dev/null 2>&1; then fail "emu gradcheck missed a broken backward"; else pass "emu gradcheck catches a broken backward"; fi
# decode (KV cache, one token at a time) against one forward with group_size 1
if [ -f data/kjv/tokenizer.bin ]; then
    ./train -c tiny -o $BUILD/emu_tiny -b 2 -t 32 -n 2 -e 0 -v 0 > $BUILD/emu_train_cpu.log 2>&1 &&
        expect_ok "emu decode matches forward (run --verify)" $E/run_emu $BUILD/emu_tiny/model_00000002.bin -t 0 -n 24 --verify
    # training steps: the emulated CUDA backend against the CPU backend, plain, in the routing variants (SPEC §8),
    # and on UL2's packed rows (SPEC §10: segments and positions copied to the device; -t 64 for the denoisers)
    for variant in "" "--capacity none --router-bias 0.01 --freeze-router 1" "--capacity colossalai --drop-policy probs" \
        "--objective ul2 --ul2-steps 2 -t 64"; do
        # shellcheck disable=SC2086  # variant is a list of words
        ./train -c tiny -o $BUILD/emu_cpu -b 2 -t 32 -n 3 -e 0 -v 0 -s 7 $variant > $BUILD/emu_cpu.log 2>&1
        # shellcheck disable=SC2086
        $E/train_emu -c tiny -o $BUILD/emu_gpu -b 2 -t 32 -n 3 -e 0 -v 0 -s 7 $variant > $BUILD/emu_gpu.log 2>&1
        if $PYTHON - $BUILD/emu_cpu/log.tsv $BUILD/emu_gpu/log.tsv <<'PY'
import sys
a = [l.split("\t") for l in open(sys.argv[1]).read().split("\n")[1:] if l]
b = [l.split("\t") for l in open(sys.argv[2]).read().split("\n")[1:] if l]
assert len(a) == len(b) == 3, (len(a), len(b))
for x, y in zip(a, b):
    la, lb = float(x[1]), float(y[1])
    print(f"step {x[0]}: cpu {la:.6f} emu {lb:.6f}")
    assert abs(la - lb) <= 1e-4 * (1 + abs(la)), "losses differ"
    assert x[6] == y[6], "dropped shares differ"
PY
        then pass "emu train_emu losses match train (3 steps) ${variant:-default routing}"
        else fail "emu train_emu losses match train (3 steps) ${variant:-default routing}"; fi
        rm -rf $BUILD/emu_cpu $BUILD/emu_gpu
    done
else
    echo "SKIP emu decode and training checks: no data/kjv/tokenizer.bin (make data)"
fi
