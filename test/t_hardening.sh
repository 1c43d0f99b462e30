#!/usr/bin/env bash
# Hardening: what a careless user or an attacker can hand the programs.
#
#   1. one test per finding of issue 16 (huge header sizes, resume with other
#      settings, capacity factors that round to 0, header sizes that wrap,
#      -o '', run's and train's numeric flags, reserved header words of the
#      tokenizer and trace files, the messages, .tmp files of a failed write);
#   2. ASan + UBSan builds (build/asan/) of train, run and test_cpu: a short
#      real train / resume / run / encode / test_cpu pass through them;
#   3. the seeded mutation test of every file reader through them (test/fuzz.py,
#      FUZZ_N mutants per reader, 200 in make test; make mutate N=... for more;
#      make fuzz runs the coverage-guided fuzzers of test/t_fuzz.sh);
#   4. the bad-flag table: every numeric and path flag of train and run with
#      values that are not numbers, not finite or out of range.
#
# BIN (default: the repository root) holds the train and run that section 1
# tests, so that it can be pointed at an older build; FINDINGS_ONLY=1 runs
# section 1 alone; DEV (default dev/) holds the analyze_routing.py it tests.
set -u
source test/lib.sh
BUILD=${BUILD:-build/test}
PY=${PYTHON:-/usr/bin/python3}
ROOT=$(pwd)
BIN=$(cd "${BIN:-.}" && pwd)
DEV=${DEV:-$ROOT/dev}
FUZZ_N=${FUZZ_N:-200}
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
S=$BUILD/hardening
rm -rf "$S"
mkdir -p "$S"
if [ "$BIN" = "$ROOT" ] && ! make -s train run test_cpu > "$S/make.log" 2>&1; then
    fail "hardening: make failed: $(tail -3 "$S/make.log" | tr '\n' ' ')"
    exit 0
fi
if ! command -v spm_train > /dev/null; then
    echo "SKIP hardening: needs spm_train (sentencepiece) for its tokenizer"
    exit 0
fi
cd "$S"

# --- inputs: a tokenizer, token files, a micro model (V 256, ctx 64, L 2, D 32, E 4) ---------
cat "$ROOT/openmoe.h" "$ROOT/tokenizer.bin-spec" | grep -v '^ *$' > text.txt
n=$(wc -l < text.txt)
head -n $((n * 4 / 5)) text.txt > train.txt
tail -n +$((n * 4 / 5 + 1)) text.txt > val.txt
spm_train --input=train.txt --model_prefix=tok --vocab_size=256 --model_type=unigram --character_coverage=1 \
    --num_threads=1 > spm.log 2>&1 && $PY "$ROOT/dev/export_tokenizer.py" tok.model tok.bin > export.log 2>&1 ||
    { fail "hardening: could not make the tokenizer (see $S/spm.log)"; exit 0; }
$PY - "$ROOT" <<'EOF'
import subprocess, sys, numpy as np
for name in ("train", "val"):
    ids = [int(t) for t in subprocess.run([sys.argv[1] + "/run", "-z", "tok.bin", "--encode"],
           input=open(name + ".txt", "rb").read(), capture_output=True, check=True).stdout.split()]
    h = np.zeros(256, np.int32)
    h[:5] = [240201741, 1, 2, 256, len(ids)]
    open(name + ".bin", "wb").write(h.tobytes() + np.array(ids, np.uint16).tobytes())
c = [256, 64, 2, 32, 2, 16, 64, 4, 2, 2, 48, 1]
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c
n = 2 * V * D + D + (L - L // every) * (2 * D + 4 * H * Hd * D + 4 * F * D) \
    + L // every * (2 * D + 4 * H * Hd * D + E * D + 4 * E * Fe * D + D + 4 * F * D)
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
p = np.random.default_rng(3).normal(0, 0.05, n).astype(np.float32)
open("micro.bin", "wb").write(h.tobytes() + p.tobytes())
EOF
TR=(-c micro.bin -i train.bin -j val.bin -z tok.bin -b 2 -t 16 -V 1)
# model M FIELD=VALUE...: micro.bin with header words changed (index=value)
patch_words() {
    local src=$1 dst=$2; shift 2
    $PY - "$src" "$dst" "$@" <<'EOF'
import sys, numpy as np
b = bytearray(open(sys.argv[1], "rb").read())
h = np.frombuffer(b, np.int32, 256).copy()
for a in sys.argv[3:]:
    i, v = a.split("=")
    h[int(i)] = np.int64(int(v)).astype(np.int32) if int(v) < 2**31 else np.int32(int(v) - 2**32)
b[:1024] = h.tobytes()
open(sys.argv[2], "wb").write(b)
EOF
}
# no_change NAME DIR SNAPSHOT: the files of DIR are those of SNAPSHOT (an md5sum list)
snapshot() { (cd "$1" && md5sum * 2> /dev/null | sort); }

# --- 1. the findings ---------------------------------------------------------------------------
T0=$(date +%s)
# finding 1: a huge L is refused from the file size (or, since issue 27, its bound), before any table is built
patch_words micro.bin hugeL.bin 4=16777216
err=$( (ulimit -v 1500000; timeout 20 "$BIN/run" hugeL.bin -z tok.bin -n 1 2>&1 >/dev/null); echo "rc=$?")
if echo "$err" | grep -q "rc=1" && echo "$err" | grep -q "^error: hugeL.bin: \(size .* header describes\|inconsistent header: L = 16777216\)"; then
    pass "finding 1: a header with L = 16777216 is refused by size or bound, in little memory and time"
else
    fail "finding 1: huge L: $(echo "$err" | head -2 | tr '\n' ' ')"
fi

# finding 2: resume with settings the checkpoints were not saved with refuses, and changes nothing
"$BIN/train" "${TR[@]}" -n 2 -v 0 -o r2 > r2a.out 2>&1
before=$(snapshot r2)
expect_error "finding 2: resume with another optimizer refuses, naming the checkpoint and -x" \
    "cannot resume from checkpoint 2 in r2: r2/state_00000002.bin: saved with optimizer 0 (adamw), this run has -x adafactor" \
    "$BIN/train" "${TR[@]}" -n 2 -v 0 -o r2 -x adafactor -r
expect_error "finding 2: resume with another model refuses, naming the model file and the setting" \
    "r2/model_00000002.bin: the model has max_seq_len 64, this run.s (-c) has 256" "$BIN/train" -c tiny "${TR[@]:2}" -n 2 -v 0 -o r2 -r
head -c 3000 r2/state_00000002.bin > cut && cp r2 -r r2cut && cp cut r2cut/state_00000002.bin
expect_error "finding 2: resume from a damaged only checkpoint refuses" "r2cut/state_00000002.bin: .*damaged" \
    "$BIN/train" "${TR[@]}" -n 2 -v 0 -o r2cut -r
[ "$(snapshot r2)" = "$before" ] && pass "finding 2: the refused resumes left the checkpoints and log.tsv as they were" ||
    fail "finding 2: the refused resumes changed $S/r2"

# finding 3: capacity factors whose cf1000 rounds to 0 or overflows are refused before training
for bad in "-g 1e-9" "-f 0.0004" "-g 3e6" "-f 1e30"; do
    expect_error "finding 3: train $bad is refused up front" "^error: ${bad% *} " "$BIN/train" "${TR[@]}" -n 3 -e 0 $bad -o cf
done
[ ! -e cf/log.tsv ] && pass "finding 3: nothing was trained or written" || fail "finding 3: cf/log.tsv exists"

# finding 4: H*Hd that wraps around 2^32 to the file's 32 is refused, not accepted
patch_words micro.bin wrapH.bin 6=268435458
expect_error "finding 4: H = 268435458 (H*Hd wraps to 32) is refused" "^error: wrapH.bin: inconsistent header: H" \
    "$BIN/run" wrapH.bin -z tok.bin -n 1
patch_words micro.bin wrapF.bin 8=1073741856
expect_error "finding 4: F = 2^30 + 32 (2F wraps) is refused" "^error: wrapF.bin: inconsistent header" \
    "$BIN/run" wrapF.bin -z tok.bin -n 1

# finding 5: -o '' is refused by name (the data is missing, so an old build stops before writing)
expect_error "finding 5: train -o '' is refused" "^error: -o '': needs a path" "$BIN/train" "${TR[@]}" -i nope.bin -o ''

# finding 6: run's and train's numeric flags
M=r2/model_00000002.bin
"$BIN/run" $M -z tok.bin -n 2147483647 -t 0 > n6.out 2> n6.err
if [ $? = 0 ] && grep -q "generating 63 tokens" n6.err && [ -s n6.out ]; then
    pass "finding 6: run -n 2147483647 is clamped to the context, not wrapped to nothing"
else
    fail "finding 6: run -n 2147483647: $(tail -2 n6.err | tr '\n' ' ')"
fi
for bad in "-n 1e10" "-s 1e30" "-s nan" "-t nan" "-p nan" "-t inf" "-g nan"; do
    expect_error "finding 6: run $bad is refused" "^error: ${bad% *} " "$BIN/run" $M -z tok.bin $bad
done
for bad in "-l inf" "-l nan" "-l 1e30"; do
    expect_error "finding 6: train $bad is refused" "^error: ${bad% *} " "$BIN/train" "${TR[@]}" -n 1 $bad -o l6
done

# finding 7: reserved words of the tokenizer and the trace, the denormalizer flags, a trace
# without frequent ids
patch_words tok.bin tok_res.bin 200=5
expect_error "finding 7: a tokenizer with reserved word 200 set is refused" "^error: tok_res.bin: reserved header\[200\]" \
    "$BIN/run" -z tok_res.bin --encode < /dev/null
patch_words tok.bin tok_dn.bin 13=1
expect_error "finding 7: denormalizer flags without a denormalizer are refused" "^error: tok_dn.bin: denormalizer flags" \
    "$BIN/run" -z tok_dn.bin --encode < /dev/null
$PY "$ROOT/test/make_synthetic_trace.py" tr pure > /dev/null
t=tr/trace/s00000200_d0_cf2000.bin
cp $t good_trace.bin
patch_words good_trace.bin $t 100=1
expect_error "finding 7: a trace with reserved word 100 set is refused" "s00000200_d0_cf2000.bin: reserved header word 100" \
    $PY "$DEV/analyze_routing.py" tr --tokenizer none
patch_words good_trace.bin $t 16=7
expect_error "finding 7: a trace with a MoE layer id >= L is refused" "s00000200_d0_cf2000.bin: MoE layer ids" \
    $PY "$DEV/analyze_routing.py" tr --tokenizer none
cp good_trace.bin $t
expect_ok "finding 7: analyze_routing.py with no id reaching --min-count" \
    $PY "$DEV/analyze_routing.py" tr --tokenizer none --min-count 100000

# finding 8: messages
cp -r r2 r8 && patch_words r2/state_00000002.bin r8/state_00000002.bin 8=64
expect_error "finding 8: a min_dim mismatch names min_dim" "saved with Adafactor min_dim 64, this run has 128" \
    "$BIN/train" "${TR[@]}" -n 2 -v 0 -o r8 -r
patch_words r2/state_00000002.bin r8/state_00000002.bin 3=7
expect_error "finding 8: an unknown optimizer kind is not called adafactor" "saved with optimizer 7 (unknown)" \
    "$BIN/train" "${TR[@]}" -n 2 -v 0 -o r8 -r
mkdir -p adir
expect_error "finding 8: -z DIR says it is a directory" "^error: adir: is a directory" "$BIN/train" "${TR[@]}" -n 1 -z adir -o z8
expect_error "finding 8: -i DIR says it is a directory" "^error: adir: is a directory" "$BIN/train" "${TR[@]}" -n 1 -i adir -o z8

# finding 9: a write that fails (here: past the file size limit, as a full disk) leaves no .tmp
err=$( (trap '' XFSZ; ulimit -f 64; "$BIN/train" "${TR[@]}" -n 1 -v 0 -o w9 2>&1 >/dev/null); echo "rc=$?")
if echo "$err" | grep -q "rc=1" && echo "$err" | grep -q "model_00000001.bin.tmp: write failed" &&
    [ -z "$(ls w9 | grep '\.tmp$')" ]; then
    pass "finding 9: a failed checkpoint write exits naming the file and removes its .tmp"
else
    fail "finding 9: failed write: $(echo "$err" | tail -2 | tr '\n' ' '); w9 holds: $(ls w9 | tr '\n' ' ')"
fi

# --- issue 27 ---------------------------------------------------------------------------------------
# model PATH V ctx L D H Hd F E K moe_every Fe extra_ffn: a model file of that header and size, random weights
model() {
    $PY - "$@" <<'EOF2'
import sys, numpy as np
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [int(a) for a in sys.argv[2:]]
nm = L // every
n = 2 * V * D + D + (L - nm) * (2 * D + 4 * H * Hd * D + 4 * F * D) \
    + nm * (2 * D + 4 * H * Hd * D + E * D + 4 * E * Fe * D + (D + 4 * F * D if extra else 0))
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
open(sys.argv[1], "wb").write(h.tobytes() + np.random.default_rng(4).normal(0, 0.1, n).astype(np.float32).tobytes())
EOF2
}
# finding 3: E = K = 20000 (800 KB) or E = K = 4096: top-K was O(K^2 E) a token, hours for run's first token
model ek20000.bin 256 64 1 2 1 2 2 20000 20000 1 1 0
model ek4096.bin 256 64 1 2 1 2 2 4096 4096 1 1 0
for m in ek20000.bin:E ek4096.bin:K; do
    f=${m#*:} m=${m%:*}
    expect_error "issue 27 finding 3: run on $m is refused at once, naming $f" "^error: $m: inconsistent header: $f = .*must be in" \
        timeout 20 "$BIN/run" $m -z tok.bin -i "the" -n 1
    expect_error "issue 27 finding 3: train -c $m is refused at once, naming $f" "^error: $m: inconsistent header: $f = .*must be in" \
        timeout 20 "$BIN/train" "${TR[@]}" -c $m -n 1 -o ek
done
# finding 4: every header field has a bound, used or not: a 30 KB model whose F no parameter uses
# (every layer MoE, no extra FFN), or whose Fe none uses (no MoE layer), sized activations of GBs
model unusedF.bin 256 64 2 8 2 4 536870912 4 2 1 8 0
model unusedFe.bin 256 64 2 8 2 4 16 4 2 3 536870912 1
for m in unusedF.bin:F unusedFe.bin:Fe; do
    f=${m#*:} m=${m%:*}
    err=$( (ulimit -v 4000000; timeout 60 "$BIN/run" $m -z tok.bin -i "the" -n 1 2>&1 >/dev/null); echo "rc=$?")
    if echo "$err" | grep -q "rc=1" && echo "$err" | grep -q "^error: $m: inconsistent header: $f = 536870912, must be in \[1, "; then
        pass "issue 27 finding 4: a $(($(stat -c %s $m) / 1024)) KB model with an unused $f = 2^29 is refused, naming $f"
    else
        fail "issue 27 finding 4: unused $f = 2^29: $(echo "$err" | tail -2 | tr '\n' ' ')"
    fi
done
# ... and each field one past its bound (openmoe.h MAX_*) in micro.bin's header
wrong=""
for w in 2=4194305:V 3=1048577:max_seq_len 4=513:L 5=65537:D 6=65537,7=2:H 7=65538:Hd 8=65537:F 9=4097:E \
    9=4096,10=33:K 11=514:moe_every 12=65537:Fe 13=2:extra_ffn; do
    f=${w#*:} words=${w%:*}
    patch_words micro.bin bound.bin ${words//,/ }
    err=$("$BIN/run" bound.bin -z tok.bin -n 1 2>&1 >/dev/null)
    echo "$err" | grep -q "^error: bound.bin: inconsistent header: $f = [0-9]*, must be in \[" || wrong="$wrong [$f: $err]"
done
[ -z "$wrong" ] && pass "issue 27 finding 4: each of the 12 header fields one past its bound is refused, naming it" ||
    fail "issue 27 finding 4: bounds:$(echo "$wrong" | cut -c1-600)"
# finding 7: a link planted under a writer's temporary name (OUT.tmp) was followed: its target overwritten,
# OUT renamed into a link to it; the same for the probe of -o (DIR/.write_test, truncated)
mkdir -p l7/trace
echo "precious" > victim.txt
for f in log.tsv model_00000001.bin state_00000001.bin; do ln -s ../victim.txt "l7/$f.tmp"; done
ln -s ../victim.txt l7/.write_test
ln -s ../../victim.txt l7/trace/s00000000_d0_cf1250.bin.tmp
"$BIN/train" "${TR[@]}" -n 1 -v 0 -a 2 -o l7 > l7.out 2>&1; rc=$?
links=$(find l7 -type l | tr '\n' ' ')
if [ $rc = 0 ] && [ "$(cat victim.txt)" = precious ] && [ "$links" = "l7/.write_test " ] && [ -f l7/model_00000001.bin ] &&
    [ -f l7/trace/s00000000_d0_cf1250.bin ]; then
    pass "issue 27 finding 7: links planted as the .tmp of the log, model, state and trace are replaced, not followed"
else
    fail "issue 27 finding 7: planted links (exit $rc): victim.txt holds '$(head -c 40 victim.txt | tr -cd '[:alnum:] ')'; links: $links"
fi
echo "(findings: $(($(date +%s) - T0)) s)"
[ "${FINDINGS_ONLY:-0}" = 1 ] && exit 0

# --- 2. sanitizer builds and a short real pass through them ----------------------------------------
T0=$(date +%s)
A=$ROOT/build/asan
if ! make -C "$ROOT" -s asan > asan_make.log 2>&1; then
    fail "sanitizers: make asan failed: $(tail -3 asan_make.log | tr '\n' ' ')"
    exit 0
fi
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1
expect_ok "sanitizers: train 4 steps with checkpoints, validation, samples and traces" \
    "$A/train" "${TR[@]}" -n 4 -e 2 -v 2 -a 2 -o ck
expect_ok "sanitizers: train 2 steps, stop" "$A/train" "${TR[@]}" -n 4 -e 2 -v 2 -a 2 -y 2 -o ckr
expect_ok "sanitizers: resume to 4" "$A/train" "${TR[@]}" -n 4 -e 2 -v 2 -a 2 -r -o ckr
cmp -s ck/state_00000004.bin ckr/state_00000004.bin && cmp -s ck/model_00000004.bin ckr/model_00000004.bin &&
    pass "sanitizers: the resumed run ends bit-identical" || fail "sanitizers: resumed run differs"
expect_ok "sanitizers: adafactor 2 steps" "$A/train" "${TR[@]}" -n 2 -x adafactor -v 0 -o ckaf
# UL2 (SPEC §10): packed rows (segments, padding, positions) through the model, and their validation;
# the tokenizer with 40 sentinels, the token files relabelled to its 296 ids, tiny at that vocabulary
$PY "$ROOT/dev/export_tokenizer.py" tok.model tok_ul2.bin --extra-ids 40 > export_ul2.log 2>&1
$PY -c "
import numpy as np
for name in ('train', 'val'):
    b = bytearray(open(name + '.bin', 'rb').read())
    b[12:16] = np.int32(296).tobytes()
    open(name + '_ul2.bin', 'wb').write(b)
"
expect_ok "sanitizers: UL2 train 3 steps, causal LM after step 2 (--objective ul2 --ul2-steps 2)" "$A/train" -c tiny \
    -i train_ul2.bin -j val_ul2.bin -z tok_ul2.bin -b 2 -t 64 -n 3 -e 0 -v 3 -V 1 --objective ul2 --ul2-steps 2 -o ckul2
expect_ok "sanitizers: run --verify" "$A/run" ck/model_00000004.bin -z tok.bin -i "static inline" -n 12 -t 0 --verify
expect_ok "sanitizers: run sampling" "$A/run" ck/model_00000004.bin -z tok.bin -i "the" -n 12 -t 0.8 -p 0.9
if "$A/run" -z tok.bin --encode < val.txt > val.ids 2> enc.err && "$A/run" -z tok.bin --decode < val.ids > val.dec 2>> enc.err &&
    [ "$(wc -l < val.dec)" = "$(wc -l < val.txt)" ]; then
    pass "sanitizers: encode and decode the validation text"
else
    fail "sanitizers: encode/decode: $(head -3 enc.err | tr '\n' ' ')"
fi
# a debug state: test_cpu writes what it computes for a batch, then reads it back; a batch
# of packed rows (SPEC §10: word [12], segments with padding, positions), which the mutation
# test below then mutates
$PY -c "
import numpy as np
h = np.zeros(256, np.int32); h[:13] = [240201740, 1, 2, 8, 1250, 4, 10000, 100, 100, 4096, 0, 0, 1]
n = (open('micro.bin', 'rb').seek(0, 2) - 1024) // 4
xy = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
seg = np.array([0, 0, 0, 1, 1, 1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1], np.int32)
pos = np.array([0, 1, 2, 0, 1, 2, 0, 0, 3, 4, 5, 6, 7, 0, 1, 2], np.int32)
open('zero_state.bin', 'wb').write(h.tobytes() + xy.tobytes() + seg.tobytes() + pos.tobytes()
                                   + np.zeros(16 * 256 + 8 + n, np.float32).tobytes())
"
"$A/test_cpu" micro.bin zero_state.bin -o debug_state.bin > tc1.out 2>&1
expect_ok "sanitizers: test_cpu reads back the state it wrote" "$A/test_cpu" micro.bin debug_state.bin
grep -q "Sanitizer\|runtime error" tc1.out && fail "sanitizers: test_cpu -o reported: $(grep -m1 'runtime error\|Sanitizer' tc1.out)"
echo "(sanitizer pass: $(($(date +%s) - T0)) s)"

# --- 3. the mutation test of every reader ---------------------------------------------------------
T0=$(date +%s)
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1  # a refusal exits with its buffers allocated
$PY "$ROOT/test/fuzz.py" "$S" "$A" "$FUZZ_N" 1
echo "(mutation: $(($(date +%s) - T0)) s)"

# --- 4. the bad-flag table -----------------------------------------------------------------------
T0=$(date +%s)
tried=0 wrong=""
# flag_table PROGRAM PREFIX-ARGS... -- FLAGS... -- VALUES...: each flag with each value must exit 1 naming the flag
flag_table() {
    local prog=$1; shift
    local pre=() flags=() values=()
    while [ "$1" != -- ]; do pre+=("$1"); shift; done; shift
    while [ "$1" != -- ]; do flags+=("$1"); shift; done; shift
    values=("$@")
    for f in "${flags[@]}"; do
        for v in "${values[@]}"; do
            tried=$((tried + 1))
            err=$("$prog" "${pre[@]}" "$f" "$v" 2>&1 >/dev/null); rc=$?
            if [ $rc != 1 ] || ! echo "$err" | grep -q -- "^error: $f "; then
                wrong="$wrong [$(basename "$prog") $f '$v': exit $rc $(echo "$err" | head -1)]"
            fi
        done
    done
}
NOTNUM=("" x 1x 0x10 nan inf -inf 1e999 -1 99999999999999999999)
flag_table "$A/train" "${TR[@]}" -o flags -- -b -t -n -y -w -q -s -e -v -V -a -- "${NOTNUM[@]}" 1.5 1e3
flag_table "$A/train" "${TR[@]}" -o flags -- -l -f -g -- "${NOTNUM[@]}" 0 1e9
flag_table "$A/train" "${TR[@]}" -o flags -- -b -- 0 4097
flag_table "$A/train" "${TR[@]}" -o flags -- -n -- 0 100000000
flag_table "$A/train" "${TR[@]}" -o flags -- -t -V -- 0
flag_table "$A/train" "${TR[@]}" -o flags -- -s -q -- 2147483648
flag_table "$A/train" "${TR[@]}" -o flags -- -l -- 10.5
flag_table "$A/train" "${TR[@]}" -o flags -- -f -g -- 0.0009 1000.5
flag_table "$A/train" "${TR[@]}" -- -c -i -j -k -z -o -- ""
flag_table "$A/train" "${TR[@]}" -o flags -- --freeze-router -- "${NOTNUM[@]}" 1.5 1e3
flag_table "$A/train" "${TR[@]}" -o flags -- --router-bias -- "${NOTNUM[@]}" 1.5
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -n -s -- "${NOTNUM[@]}" 1.5 1e3
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -t -p -g -- "${NOTNUM[@]}"
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -b -- "" x 1x 0x10 nan inf 1.5 -2 99999999999999999999
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -p -- 0 1.01
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -t -- 100.5
flag_table "$A/run" ck/model_00000004.bin -z tok.bin -- -g -- 0 0.0009 1000.5
flag_table "$A/run" ck/model_00000004.bin -- -z -- ""
[ ! -e flags ] || wrong="$wrong [a refused flag left the directory 'flags']"
if [ -z "$wrong" ]; then
    pass "bad-flag table: $tried bad values of train's and run's flags, each refused naming its flag"
else
    fail "bad-flag table: $tried tried:$(echo "$wrong" | cut -c1-600)"
fi
echo "(flags: $(($(date +%s) - T0)) s)"
