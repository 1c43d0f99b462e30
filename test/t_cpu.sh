# The CPU reference against the PyTorch float64 reference (test/reference.py),
# the finite-difference gradient check, and the rejection of bad files.
source test/lib.sh
cases=$BUILD/cases
# two threads, as on the CI machine, whatever this one has: the matmul cuts
# its tasks by the thread count, and the cases were made to reach its paths
# (deeper than a slice, several passes, several ranges) on two
export OMP_NUM_THREADS=2
$PYTHON test/reference.py $cases > $BUILD/reference.log || { fail "reference.py could not write the cases"; exit 1; }

# 1. every case: logits, losses, dropped fraction and every gradient at SPEC §7
#    tolerances; -o writes this build's numbers, which must then pass against itself
while read -r name opts; do
    expect_ok "test_cpu $name" ./test_cpu $cases/$name.model.bin $cases/$name.state.bin -o $BUILD/$name.cpu.bin
    grep -E "^ok +(logits|grads)" $BUILD/last.log | sed 's/^ok  */    /'
    expect_ok "test_cpu $name -o round trip" ./test_cpu $cases/$name.model.bin $BUILD/$name.cpu.bin
    for opt in $opts; do  # three optimizer steps against the reference's
        expect_ok "$opt steps $name" ./test_cpu $cases/$name.model.bin $cases/$name.state.bin --update $opt $cases/$name.$opt.bin
    done
done < $cases/cases.txt

# 2. the comparisons must be able to fail: a state off by a little beyond the
#    tolerance is rejected, element by element
corrupt() {  # corrupt STATE OUT WHAT V: WHAT is grad, logit or dropped; V the model's vocabulary
    $PYTHON - "$@" <<'EOF'
import sys, numpy as np
src, dst, what, V = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
buf = np.fromfile(src, dtype=np.uint8).copy()
h = buf[:1024].view(np.int32)
BT = int(h[2]) * int(h[3])
f = buf[1024:].view(np.float32)           # x, y, logits, losses, grads as 4-byte words
logits, losses, grads = 2 * BT, 2 * BT + BT * V, 2 * BT + BT * V + 8
if what == "grad":       # the largest gradient of the first tensors, off by 1e-3 of itself
    i = grads + int(np.argmax(np.abs(f[grads:grads + 1000])))
    f[i] *= 1.001
elif what == "logit":
    f[logits + 7] += 1e-3 * (1 + abs(f[logits + 7]))
elif what == "dropped":
    f[losses + 5] += 1e-6
buf.tofile(dst)
EOF
}
V=$(od -An -t d4 -j 8 -N 4 $cases/moe_drop.model.bin | tr -d ' ')
for what in grad logit dropped; do
    corrupt $cases/moe_drop.state.bin $BUILD/bad_$what.state.bin $what $V
    if ./test_cpu $cases/moe_drop.model.bin $BUILD/bad_$what.state.bin > $BUILD/bad_$what.log; then
        fail "a state with a corrupted $what passed"
    else
        pass "a state with a corrupted $what is rejected"
    fi
done
if ./test_cpu $cases/moe_drop.model.bin $cases/moe_drop.state.bin --update adamw $cases/moe_drop.adafactor.bin > /dev/null; then
    fail "adamw steps matched adafactor's parameters"
else
    pass "the optimizer check tells adamw from adafactor"
fi

# 3. finite differences, and a deliberately wrong backward that they must catch
expect_ok "gradcheck (finite differences, micro config)" ./test_cpu --gradcheck
if ./test_cpu --gradcheck --break > $BUILD/gradcheck_break.log; then
    fail "gradcheck missed gradients scaled by 1.1"
else
    pass "gradcheck catches gradients scaled by 1.1"
fi

# 4. malformed model and state files get a clear message naming the file
m=$cases/moe_basic.model.bin s=$cases/moe_basic.state.bin
patch_word() {  # patch_word IN OUT WORD VALUE: set int32 header word WORD
    cp "$1" "$2"
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $(( $4 & 255 )) $(( ($4 >> 8) & 255 )) $(( ($4 >> 16) & 255 )) $(( ($4 >> 24) & 255 )))" |
        dd of="$2" bs=4 seek="$3" conv=notrunc status=none
}
patch_word $m $BUILD/m_magic.bin 0 1234;     expect_error "model: wrong magic" "m_magic.bin: bad magic" ./test_cpu $BUILD/m_magic.bin $s
patch_word $m $BUILD/m_version.bin 1 4;      expect_error "model: unknown version" "unknown version 4" ./test_cpu $BUILD/m_version.bin $s
head -c 5000 $m > $BUILD/m_trunc.bin;        expect_error "model: truncated" "m_trunc.bin: size 5000 bytes" ./test_cpu $BUILD/m_trunc.bin $s
head -c 100 $m > $BUILD/m_short.bin;         expect_error "model: shorter than its header" "shorter than the 1024-byte header" ./test_cpu $BUILD/m_short.bin $s
patch_word $m $BUILD/m_k.bin 10 99;          expect_error "model: K > E" "K = 99 > E" ./test_cpu $BUILD/m_k.bin $s
patch_word $m $BUILD/m_hd.bin 7 7;           expect_error "model: odd Hd" "Hd = 7 is odd" ./test_cpu $BUILD/m_hd.bin $s
patch_word $m $BUILD/m_d.bin 5 0;            expect_error "model: a size of 0" "D = 0, must be > 0" ./test_cpu $BUILD/m_d.bin $s
patch_word $m $BUILD/m_extra.bin 13 2;       expect_error "model: extra_ffn not 0/1" "extra_ffn = 2" ./test_cpu $BUILD/m_extra.bin $s
patch_word $m $BUILD/m_word.bin 100 1;       expect_error "model: reserved word not 0" "header word 100 is 1" ./test_cpu $BUILD/m_word.bin $s
patch_word $m $BUILD/m_l.bin 4 5;            expect_error "model: header disagrees with size" "its header describes" ./test_cpu $BUILD/m_l.bin $s
expect_error "model: missing file" "cannot open" ./test_cpu $BUILD/no_such_model.bin $s
patch_word $s $BUILD/s_magic.bin 0 1234;     expect_error "state: wrong magic" "s_magic.bin: bad magic" ./test_cpu $m $BUILD/s_magic.bin
head -c 3000 $s > $BUILD/s_trunc.bin;        expect_error "state: truncated" "s_trunc.bin: size 3000 bytes" ./test_cpu $m $BUILD/s_trunc.bin
patch_word $s $BUILD/s_t.bin 3 100000;       expect_error "state: T longer than the context" "longer than the model's context" ./test_cpu $m $BUILD/s_t.bin
patch_word $s $BUILD/s_cap.bin 10 3;        expect_error "state: unknown capacity rule" "s_cap.bin: header word 10 (capacity rule) is 3" ./test_cpu $m $BUILD/s_cap.bin
patch_word $s $BUILD/s_drop.bin 11 -1;      expect_error "state: unknown drop policy" "s_drop.bin: header word 11 (drop policy) is -1" ./test_cpu $m $BUILD/s_drop.bin
patch_word $s $BUILD/s_x.bin 256 100000;     expect_error "state: token out of range" "token x\[0\] = 100000 is out of range" ./test_cpu $m $BUILD/s_x.bin
# SPEC §10's word [12] and the segments and positions after y (the packed case: B*T = 48, segment at word
# 256 + 96, position at 256 + 144; its context is 24)
pm=$cases/packed.model.bin ps=$cases/packed.state.bin
patch_word $s $BUILD/s_w12.bin 12 2;         expect_error "state: word 12 not 0/1" "s_w12.bin: header word 12 (segments and positions) is 2" ./test_cpu $m $BUILD/s_w12.bin
patch_word $s $BUILD/s_w12s.bin 12 1;        expect_error "state: word 12 without the arrays" "s_w12s.bin: size .* with segments and positions" ./test_cpu $m $BUILD/s_w12s.bin
patch_word $ps $BUILD/s_seg.bin 352 -2;      expect_error "state: segment below -1" "s_seg.bin: segment\[0\] = -2, must be >= -1" ./test_cpu $pm $BUILD/s_seg.bin
patch_word $ps $BUILD/s_pos.bin 401 24;      expect_error "state: position outside the context" "s_pos.bin: position\[1\] = 24 is out of the context \[0, 24)" ./test_cpu $pm $BUILD/s_pos.bin

# 5. the config parser (the benchmarks' -c) and the model header's words, which
#    must be in SPEC §6's order: V, max_seq_len (2048 when parsed), L, D, H, Hd,
#    F, E, K, moe_every, Fe, extra_ffn (distinct values, so that a swap shows)
check_config() {  # check_config NAME SPEC WORDS: test_cpu --config SPEC must print WORDS
    local got
    got=$(./test_cpu --config "$2" 2>&1)
    if [ "$got" = "$3" ]; then pass "config $1"; else fail "config $1: '$2' gave '$got', want '$3'"; fi
}
check_config "numbers" 5000,6,64,4,16,96,8,2,3,48,1 "5000 2048 6 64 4 16 96 8 2 3 48 1"
check_config "numbers, leading blanks" " 5000, 6,64,4,16,96,8,2,3,48,0" "5000 2048 6 64 4 16 96 8 2 3 48 0"
check_config "preset tiny" tiny "4096 256 4 128 4 32 384 8 2 2 384 1"
expect_error "config: a field missing" "not a preset name nor V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn" \
    ./test_cpu --config 5000,6,64,4,16,96,8,2,3,48
expect_error "config: a blank before a comma" "not a preset name nor" ./test_cpu --config "5000 ,6,64,4,16,96,8,2,3,48,1"
expect_error "config: checked" "K = 9 > E = 8" ./test_cpu --config 5000,6,64,4,16,96,8,9,3,48,1
# every field has an upper bound (openmoe.h MAX_*), used by the model or not (issue 27, finding 4): every
# preset and a config at all the bounds pass; each field one past its bound is refused, naming the field
for p in tiny small base 8b 34b; do expect_ok "config: preset $p within the bounds" ./test_cpu --config $p; done
at_bounds=(4194304 512 65536 1 65536 65536 4096 32 513 65536 1)
expect_ok "config: every field at its bound" ./test_cpu --config "$(IFS=,; echo "${at_bounds[*]}")"
names=(V L D H Hd F E K moe_every Fe extra_ffn)
for i in "${!at_bounds[@]}"; do
    past=("${at_bounds[@]}")
    past[$i]=$((past[i] + 1 + (i == 4)))  # Hd stays even
    [ $i = 3 ] && past[3]=65537 && past[4]=2  # H past its bound, with Hd 2
    expect_error "config: ${names[$i]} past its bound is refused" "${names[$i]} = ${past[$i]}, must be in \[" \
        ./test_cpu --config "$(IFS=,; echo "${past[*]}")"
done
expect_error "config: H*Hd past the width bound is refused" "H\*Hd = 131072, must be <= 65536" \
    ./test_cpu --config 5000,6,64,2,65536,96,8,2,3,48,1

# 6. the router's top-K (openmoe.h router_row, O(E*K) a token) against its definition, K scans (issue 27, finding 3)
expect_ok "router: top-K equals its definition (K scans, ties to the lower index) on random rows" ./test_cpu --router

# 6b. decode's product (gemm.c matvec_forward) against its definition bit for
#     bit on every path, and a planted rounding (int8 as (x·s)·q) it catches
expect_ok "matvec: decode's product equals its definition (fp32, bf16, int8 groups 4..128)" ./test_cpu --matvec
if ./test_cpu --matvec --break > $BUILD/matvec_break.log; then
    fail "matvec: int8 computed as (x·s)·q passed the check"
else
    pass "matvec: int8 computed as (x·s)·q is caught"
fi

# 7. make bench's C side runs (its speed is make bench's, not a test's): a
#    training step, and decoding past the first position, which needs a KV
#    cache that holds the tokens (it held one when issue 29 sized the cache by T)
if make -s build/bench_cpu > $BUILD/bench_build.log 2>&1; then
    expect_ok "bench_cpu step tiny: make bench's training rows run" build/bench_cpu step tiny 2 32 1
    expect_ok "bench_cpu decode tiny: make bench's generation row runs" build/bench_cpu decode tiny 8
else
    cat $BUILD/bench_build.log; fail "build/bench_cpu does not build"
fi
