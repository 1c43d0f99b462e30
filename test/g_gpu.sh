# GPU tests (make test_gpu): the CUDA backend against the PyTorch reference,
# against the CPU backend, and against itself. Without a usable GPU it prints
# one SKIP line and passes.
#
# Tolerances. fp32 (default): SPEC §7's, as test_cpu. bf16 (--bf16, mixed
# precision): test_gpu --tol-scale $BF16_TOL, 200x SPEC §7's. SPEC §7 guessed
# 30x; bf16 matmul operands cannot meet that on the gradients. Measured on the
# reference cases (fp32-tolerance units, worst element / worst tensor):
#   PyTorch bf16 autocast (CPU, vs float64):  logits 25-34x, gradients 80-300x
#   this backend's bf16 (dev/cuda_emu, CPU):  logits 25-36x, gradients 40-85x
# (dev/bf16_tolerance.py reproduces the PyTorch row). The losses and the
# dropped fraction stay within 30x. 200x keeps about 2x headroom over our worst
# and is still tighter than PyTorch's own bf16 error.
source test/lib.sh
skip_all() { echo "SKIP gpu tests: $*"; exit 0; }
cases=$BUILD/cases
BF16_TOL=${BF16_TOL:-200}
G=$BUILD/gpu
mkdir -p $G

# 0. is there a GPU? (CI has nvcc and no GPU: one SKIP line, exit 0)
[ -x ./test_gpu ] || { fail "test_gpu was not built (make gpu needs nvcc)"; exit 1; }
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    skip_all "no CUDA device (nvidia-smi finds none)"
fi
$PYTHON test/reference.py $cases > $BUILD/reference.log || { fail "reference.py could not write the cases"; exit 1; }
probe=$(./test_gpu --gradcheck 2>&1)
if echo "$probe" | grep -q "no CUDA device"; then skip_all "no CUDA device ($(echo "$probe" | grep -m1 'no CUDA device'))"; fi
echo "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"

# 1. every reference case: fp32 at SPEC §7's tolerances, bf16 at BF16_TOL x
#    (with the flash attention kernels where the head width allows, and with
#    the cuBLAS path), the experts' exact row layout (one matmul per expert)
#    besides the default padded one (one batched matmul), the optimizers
#    (fp32 master weights in both modes), and determinism: the same run twice
#    gives the same bits
while read -r name opts; do
    M=$cases/$name.model.bin S=$cases/$name.state.bin
    expect_ok "test_gpu $name" ./test_gpu $M $S -o $G/$name.gpu.bin
    grep -E "^ok +(logits|grads)" $BUILD/last.log | sed 's/^ok  */    /'
    expect_ok "test_gpu --bf16 $name (${BF16_TOL}x)" ./test_gpu $M $S --bf16 --tol-scale $BF16_TOL -o $G/$name.bf16.bin
    grep -E "^ok +(logits|grads)" $BUILD/last.log | sed 's/^ok  */    /'
    expect_ok "test_gpu --bf16 $name, OPENMOE_ATTENTION=cublas" env OPENMOE_ATTENTION=cublas ./test_gpu $M $S --bf16 --tol-scale $BF16_TOL
    expect_ok "test_gpu $name, OPENMOE_MOE_LAYOUT=exact" env OPENMOE_MOE_LAYOUT=exact ./test_gpu $M $S
    for opt in $opts; do
        expect_ok "test_gpu $opt steps $name" ./test_gpu $M $S --update $opt $cases/$name.$opt.bin
        expect_ok "test_gpu --bf16 $opt steps $name" ./test_gpu $M $S --update $opt $cases/$name.$opt.bin --bf16
    done
    ./test_gpu $M $S -o $G/$name.gpu2.bin > /dev/null 2>&1
    ./test_gpu $M $S --bf16 --tol-scale $BF16_TOL -o $G/$name.bf16_2.bin > /dev/null 2>&1
    if cmp -s $G/$name.gpu.bin $G/$name.gpu2.bin && cmp -s $G/$name.bf16.bin $G/$name.bf16_2.bin; then
        pass "test_gpu $name: fp32 and bf16 bit for bit the same twice"
    else
        fail "test_gpu $name: two runs differ (determinism)"
    fi
done < $cases/cases.txt

# 2. finite differences through the GPU backend, and a broken backward they must catch
expect_ok "test_gpu --gradcheck" ./test_gpu --gradcheck
if ./test_gpu --gradcheck --break > $G/gradcheck_break.log 2>&1; then
    fail "test_gpu gradcheck missed gradients scaled by 1.1"
else
    pass "test_gpu gradcheck catches gradients scaled by 1.1"
fi

# 3. more cases (test/gpu_cases.py): preset shapes, flash attention over
#    several tiles at head widths 32/64/128, sharp attention. Each against the
#    reference (fp32; bf16 with the flash kernels and with the cuBLAS path),
#    and against the CPU: test_cpu -o writes the CPU's numbers, test_gpu is
#    judged against them
$PYTHON test/gpu_cases.py $G/more > $G/more.log || { fail "test/gpu_cases.py could not write its cases"; exit 1; }
while read -r name opts; do
    M=$G/more/$name.model.bin S=$G/more/$name.state.bin
    expect_ok "test_gpu $name" ./test_gpu $M $S
    expect_ok "test_gpu --bf16 $name (flash attention where Hd allows)" ./test_gpu $M $S --bf16 --tol-scale $BF16_TOL
    grep -E "^ok +(logits|grads)" $BUILD/last.log | sed 's/^ok  */    /'
    expect_ok "test_gpu --bf16 $name (OPENMOE_ATTENTION=cublas)" env OPENMOE_ATTENTION=cublas ./test_gpu $M $S --bf16 --tol-scale $BF16_TOL
    ./test_cpu $M $S -o $G/$name.cpu.bin > $G/$name.cpu.log 2>&1
    [ -f $G/$name.cpu.bin ] || { fail "test_cpu -o $name wrote nothing"; continue; }
    expect_ok "test_gpu $name against test_cpu -o" ./test_gpu $M $G/$name.cpu.bin
    grep -E "^ok +(logits|grads)" $BUILD/last.log | sed 's/^ok  */    /'
    expect_ok "test_gpu --bf16 $name against test_cpu -o" ./test_gpu $M $G/$name.cpu.bin --bf16 --tol-scale $BF16_TOL
done < $G/more/cases.txt

# 4. training: train_gpu against train for a few AdamW steps on the same
#    data and seed (fp32: the same losses to 1e-4; bf16: close), and train_gpu
#    twice gives the same losses bit for bit
if [ -f data/kjv/train.bin ] && [ -f data/kjv/val.bin ]; then
    tr=data/kjv/train.bin va=data/kjv/val.bin
else  # random tokens in the token-file format (tokenizer.bin-spec)
    $PYTHON - $G <<'EOF'
import sys, numpy as np
for name, n in (("train", 200000), ("val", 20000)):
    h = np.zeros(256, dtype="<i4"); h[:5] = [240201741, 1, 2, 4096, n]
    with open(f"{sys.argv[1]}/{name}.bin", "wb") as f:
        f.write(h.tobytes()); f.write(np.random.default_rng(1).integers(0, 4096, n).astype("<u2").tobytes())
EOF
    tr=$G/train.bin va=$G/val.bin
fi
targs="-c tiny -i $tr -j $va -b 4 -t 128 -n 6 -e 6 -v 0 -s 5"
./train $targs -o $G/train_cpu > $G/train_cpu.log 2>&1 || fail "train (CPU) did not run"
./train_gpu $targs -o $G/train_gpu > $G/train_gpu.log 2>&1 || fail "train_gpu did not run"
./train_gpu $targs -o $G/train_gpu2 > $G/train_gpu2.log 2>&1 || fail "train_gpu (second run) did not run"
./train_gpu $targs --bf16 -o $G/train_bf16 > $G/train_bf16.log 2>&1 || fail "train_gpu --bf16 did not run"
compare_logs() {  # compare_logs NAME A B TOL: the losses (column 2) of each step within TOL (1 + |a|)
    if $PYTHON - "$2" "$3" "$4" <<'EOF'
import sys
rows = lambda p: [l.split("\t") for l in open(p).read().split("\n")[1:] if l]
a, b, tol = rows(sys.argv[1]), rows(sys.argv[2]), float(sys.argv[3])
assert len(a) == len(b) > 0, f"{len(a)} and {len(b)} steps"
for x, y in zip(a, b):
    la, lb = float(x[1]), float(y[1])
    ok = abs(la - lb) <= tol * (1 + abs(la))
    print(f"    step {x[0]}: {la:.6f} {lb:.6f}{'' if ok else '  <- differs'}")
    assert ok
EOF
    then pass "$1"; else fail "$1"; fi
}
compare_logs "train_gpu losses match train (fp32, 6 steps)" $G/train_cpu/log.tsv $G/train_gpu/log.tsv 1e-4
compare_logs "train_gpu twice: the same losses bit for bit" $G/train_gpu/log.tsv $G/train_gpu2/log.tsv 0
compare_logs "train_gpu --bf16 losses near train's (2%)" $G/train_cpu/log.tsv $G/train_bf16/log.tsv 2e-2
for variant in "--capacity none --router-bias 0.01 --freeze-router 3" "--capacity colossalai --drop-policy probs"; do
    tag=$(echo "$variant" | tr -dc 'a-z0-9')
    # shellcheck disable=SC2086  # variant is a list of words
    ./train $targs $variant -o $G/v_cpu_$tag > $G/v_cpu_$tag.log 2>&1 || fail "train $variant did not run"
    # shellcheck disable=SC2086
    ./train_gpu $targs $variant -o $G/v_gpu_$tag > $G/v_gpu_$tag.log 2>&1 || fail "train_gpu $variant did not run"
    compare_logs "train_gpu $variant: losses match train (fp32, 6 steps)" $G/v_cpu_$tag/log.tsv $G/v_gpu_$tag/log.tsv 1e-4
done
if cmp -s $G/train_gpu/model_00000006.bin $G/train_gpu2/model_00000006.bin; then
    pass "train_gpu twice: the same weights bit for bit"
else
    fail "train_gpu twice: the weights differ"
fi

# 5. generation with the KV cache against a full forward (needs the tokenizer)
if [ -f data/kjv/tokenizer.bin ] && [ -f $G/train_gpu/model_00000006.bin ] && [ "$tr" = data/kjv/train.bin ]; then
    expect_ok "run_gpu --verify: KV-cache decode matches the forward" \
        ./run_gpu $G/train_gpu/model_00000006.bin -t 0 -n 64 --verify
    # versions 2 and 3 (SPEC §11): uploaded as the bf16 copy with no fp32 copy on the
    # device, computed in bf16 mode; their prefill and decode against a full forward
    for d in "bf16" "int8 --group 64"; do
        # shellcheck disable=SC2086  # d is a list of words
        $PYTHON dev/convert_model.py $G/train_gpu/model_00000006.bin $G/v.${d%% *}.bin --dtype $d > /dev/null
        expect_ok "run_gpu --verify on a ${d%% *} model file (bf16 mode)" ./run_gpu $G/v.${d%% *}.bin -t 0 -n 64 --verify
    done
else
    echo "SKIP run_gpu --verify: needs data/kjv (make data)"
fi

# 6. compute-sanitizer, where the toolkit has it: out-of-bounds accesses
#    (memcheck), shared-memory races (racecheck: what the CPU emulation in
#    dev/cuda_emu cannot see, as it runs a block's threads one after another
#    between barriers) and barrier misuse (synccheck), on small cases
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$san" ] || [ "${SANITIZE:-1}" = 0 ]; then
    echo "SKIP compute-sanitizer checks: $([ -n "$san" ] && echo "SANITIZE=0" || echo "compute-sanitizer not found")"
else
    for tool in memcheck racecheck synccheck; do
        for run in "$cases/moe_drop fp32" "$cases/moe_drop bf16" "$G/more/tiny_groups bf16" "$G/more/flash64 bf16" \
                   "$G/more/sharp32 bf16"; do
            set -- $run
            flags=""; [ "$2" = bf16 ] && flags="--bf16 --tol-scale $BF16_TOL"
            expect_ok "compute-sanitizer $tool $(basename $1) $2" timeout 900 $san --tool $tool --error-exitcode 1 \
                ./test_gpu $1.model.bin $1.state.bin $flags
        done
    done
fi
