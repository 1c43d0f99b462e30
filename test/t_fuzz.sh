#!/usr/bin/env bash
# Coverage-guided fuzzing of every C reader of untrusted input: the libFuzzer
# harnesses of test/fuzz_targets.c (clang, ASan + UBSan; make fuzz_harnesses),
# each run for FUZZ_SECONDS (3 in make test, so that they cannot rot; make
# fuzz: 60), one at a time, from seed corpora made here from real small files:
#
#   build/fuzz/files/       what the harnesses hold fixed: a nano model, token
#                           data, a checkpoint of it (./train), tokenizers (spm_train)
#   build/fuzz/seeds/H/     harness H's seeds, remade on every run
#   build/fuzz/corpus/H/    what libFuzzer added for new coverage, kept between runs
#   build/fuzz/H-crash-...  an input that crashed H (also -leak-, -timeout-,
#                           -oom-), with H.log beside it; FUZZ_FILES=build/fuzz/files
#                           build/fuzz/fuzz_H FILE replays it
#
# First each past finding is replayed alone (PASS/FAIL per finding); then
# libFuzzer's summary of each harness, and PASS when it ran without a finding
# or FAIL naming the input it kept; SKIP without clang's fuzzer runtime
# (Debian: clang, libclang-rt-14-dev), and for the tokenizer harnesses without
# spm_train. Memory: libFuzzer stops at -rss_limit_mb, -malloc_limit_mb, and
# test/fuzz_targets.c skips models whose header asks for more than it builds.
set -u
source test/lib.sh
ROOT=$(pwd)
PY=${PYTHON:-/usr/bin/python3}
SECS=${FUZZ_SECONDS:-3}
F=$ROOT/build/fuzz
FILES=$F/files
mkdir -p "$F"

# --- the fuzzer runtime and the harnesses ------------------------------------------------------
echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' > "$F/probe.c"
if ! ${FUZZ_CC:-clang} -fsanitize=fuzzer,address,undefined "$F/probe.c" -o "$F/probe" > "$F/probe.log" 2>&1; then
    echo "SKIP fuzz: clang's libFuzzer runtime is missing (Debian: apt-get install clang libclang-rt-14-dev):" \
        "$(head -2 "$F/probe.log" | tr '\n' ' ')"
    exit 0
fi
if ! make -s train test_cpu fuzz_harnesses > "$F/make.log" 2>&1; then
    fail "fuzz: make fuzz_harnesses failed: $(tail -3 "$F/make.log" | tr '\n' ' ')"
    exit 0
fi

# --- fixed inputs and seeds ------------------------------------------------------------------------
rm -rf "$FILES" "$F/seeds"
mkdir -p "$FILES"
for h in model tokenizer text tokens checkpoint debug_state; do mkdir -p "$F/seeds/$h" "$F/corpus/$h"; done
cd "$FILES"
# models: nano (an MoE layer every 2, extra FFN) and two other shapes; token data
# of its vocabulary, as uint16 and int32; a debug state (SPEC §7) of nano, zero
"$PY" - <<'EOF'
import numpy as np
def n_params(c):
    V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c
    attn, dense = 2 * D + 4 * H * Hd * D, 4 * F * D
    nm = L // every
    return 2 * V * D + D + (L - nm) * (attn + dense) + nm * (attn + E * D + 4 * E * Fe * D + (D + dense) * extra)
def model(path, c, seed):
    h = np.zeros(256, np.int32)
    h[:14] = [240201739, 1] + c
    p = np.random.default_rng(seed).normal(0, 0.3, n_params(c)).astype(np.float32)
    open(path, "wb").write(h.tobytes() + p.tobytes())
nano = [32, 8, 2, 8, 2, 4, 16, 4, 2, 2, 8, 1]  # V ctx L D H Hd F E K moe_every Fe extra_ffn
model("nano.bin", nano, 1)
model("dense.bin", [16, 4, 1, 4, 1, 2, 4, 1, 1, 2, 2, 0], 2)
model("moe.bin", [8, 2, 2, 4, 2, 2, 4, 4, 4, 1, 4, 0], 3)
rng = np.random.default_rng(4)
for path, bytes_, dtype in (("tokens.bin", 2, np.uint16), ("tokens4.bin", 4, np.int32)):
    ids = rng.integers(0, 32, 200)
    h = np.zeros(256, np.int32)
    h[:5] = [240201741, 1, bytes_, 32, len(ids)]
    open(path, "wb").write(h.tobytes() + ids.astype(dtype).tobytes())
B, T = 2, 4  # cf 1.25, min capacity 4, coefficients, group 4: two routing groups
h = np.zeros(256, np.int32)
h[:10] = [240201740, 1, B, T, 1250, 4, 10000, 100, 100, 4]
x = rng.integers(0, 32, B * T).astype(np.int32)
y = rng.integers(-1, 32, B * T).astype(np.int32)
open("zero_state.bin", "wb").write(h.tobytes() + x.tobytes() + y.tobytes()
                                   + np.zeros(B * T * 32 + 8 + n_params(nano), np.float32).tobytes())
EOF
[ -s nano.bin ] || { fail "fuzz: could not write the seed models"; exit 0; }
# nano in bf16 and in int8 groups of 4 (SPEC §11), which run reads as well
"$PY" "$ROOT/dev/convert_model.py" nano.bin nano_bf16.bin --dtype bf16 > /dev/null &&
    "$PY" "$ROOT/dev/convert_model.py" nano.bin nano_int8.bin --dtype int8 --group 4 > /dev/null ||
    fail "fuzz: could not convert the seed model to versions 2 and 3"
cp nano.bin dense.bin moe.bin nano_bf16.bin nano_int8.bin "$F/seeds/model/"
cp tokens.bin tokens4.bin "$F/seeds/tokens/"
# a checkpoint of nano after 2 steps with the router bias (its state is the seed;
# test/fuzz_targets.c's checkpoint harness sets up the same run)
"$ROOT/train" -c nano.bin -i tokens.bin -j tokens.bin -b 2 -t 4 -n 2 -V 1 -v 0 -e 2 --router-bias 0.001 \
    -o checkpoint > train.log 2>&1 && cp checkpoint/state_00000002.bin "$F/seeds/checkpoint/" ||
    fail "fuzz: ./train did not make the seed checkpoint: $(tail -2 train.log | tr '\n' ' ')"
# debug states: what test_cpu computes for the zero state's batch, and with the
# other capacity rules and the drop policy probs (header words 10, 11), and as packed
# rows (word 12: segments and positions, SPEC §10)
"$ROOT/test_cpu" nano.bin zero_state.bin -o debug_state.bin > test_cpu.log 2>&1
if [ -s debug_state.bin ]; then
    "$PY" - "$F/seeds/debug_state" <<'EOF'
import sys, numpy as np
b = bytearray(open("debug_state.bin", "rb").read())
for name, rule, policy in (("t5x", 0, 0), ("colossalai_probs", 1, 1), ("none", 2, 0)):
    b[40:48] = np.array([rule, policy], np.int32).tobytes()
    open(f"{sys.argv[1]}/{name}.bin", "wb").write(b)
# packed rows (SPEC §10): word [12] = 1, segments (padding -1) and positions after y (B*T = 8)
b[40:52] = np.array([0, 0, 1], np.int32).tobytes()
seg_pos = np.array([0, 0, 1, -1, 0, 0, 0, 0, 0, 1, 0, 0, 2, 3, 4, 5], np.int32).tobytes()
open(f"{sys.argv[1]}/packed.bin", "wb").write(b[:1024 + 64] + seg_pos + b[1024 + 64:])
EOF
else
    fail "fuzz: test_cpu -o did not write the seed debug state: $(tail -2 test_cpu.log | tr '\n' ' ')"
fi
# tokenizers: unigram with small normalization and denormalization rules (a
# charsmap each), BPE with byte fallback and user-defined pieces, both the
# tokenizer harness's seeds; and unigram with nmt_nfkc, which the text harness
# also encodes with
have_spm=1
if command -v spm_train > /dev/null; then
    cat "$ROOT/openmoe.h" "$ROOT/tokenizer.bin-spec" | grep -v '^ *$' > text.txt
    printf 'Café naïve Ångström ﬁne Ⅻ ＡＢＣ １２３\n日本語のテキスト 中文 한국어 🙂 Ελληνικά\n' >> text.txt
    printf '41\t61\nFB01\t66 69\n2160\t49\n' > norm.tsv    # A -> a, ligature fi -> f i, Roman one -> I
    printf '61\t41\n' > denorm.tsv
    spm() {
        local name=$1; shift
        spm_train --input=text.txt --model_prefix="$name" --character_coverage=1 --num_threads=1 \
            --minloglevel=2 "$@" >> spm.log 2>&1 && "$PY" "$ROOT/dev/export_tokenizer.py" "$name.model" "$name.bin" >> spm.log 2>&1
    }
    spm tok_unigram --model_type=unigram --vocab_size=256 --normalization_rule_tsv=norm.tsv \
        --denormalization_rule_tsv=denorm.tsv &&
    spm tok_bpe --model_type=bpe --vocab_size=400 --byte_fallback=true --normalization_rule_name=identity \
        --user_defined_symbols='<sep>,God' &&
    spm tok_nfkc --model_type=unigram --vocab_size=256 ||
        { fail "fuzz: spm_train or dev/export_tokenizer.py failed: $(tail -2 spm.log | tr '\n' ' ')"; have_spm=0; }
    cp tok_unigram.bin tok_bpe.bin "$F/seeds/tokenizer/" 2> /dev/null
    head -c 600 text.txt > "$F/seeds/text/source.txt"
    tail -n 2 text.txt > "$F/seeds/text/unicode.txt"
    printf '  spaces  \tand tabs \xff\xfe bytes\n\n12 0 7 255\n' > "$F/seeds/text/mixed.txt"
    printf '5 17 3 9 0\n1 2\n' > "$F/seeds/text/ids.txt"
    printf '\n' > "$F/seeds/text/empty_line.txt"   # finding 1 below
else
    have_spm=0
    echo "SKIP fuzz tokenizer: needs spm_train (Debian: sentencepiece) for its seeds"
    echo "SKIP fuzz text: needs spm_train (Debian: sentencepiece) for its tokenizers"
fi
cd "$ROOT"

# wait_harness PID: its exit status; removes the directory of its input, which a
# harness that crashed leaves (test/fuzz_targets.c removes it at exit)
wait_harness() {
    wait "$1"
    local rc=$?
    rm -rf "/dev/shm/openmoe_fuzz.$1" "${TMPDIR:-/tmp}/openmoe_fuzz.$1"
    return $rc
}

# --- past findings: each input that once crashed a harness, replayed alone ------------------------
# replay HARNESS NAME INPUT: the harness runs INPUT once and must come back clean
replay() {
    local h=$1 name=$2 input=$3
    FUZZ_FILES=$FILES UBSAN_OPTIONS=print_stacktrace=1 "$F/fuzz_$h" "$input" > "$F/replay.log" 2>&1 &
    if wait_harness $!; then
        pass "fuzz $h: finding $name"
    else
        grep -E -A4 'ERROR|runtime error' "$F/replay.log" | head -8
        fail "fuzz $h: finding $name"
    fi
}
if [ $have_spm = 1 ]; then
    replay text "1: --decode of an empty line with a denormalizer copied 0 bytes from NULL (tokenizer.h tok_buf_put)" \
        "$F/seeds/text/empty_line.txt"
fi

# --- the runs ---------------------------------------------------------------------------------------
# fuzz HARNESS: FUZZ_SECONDS of libFuzzer; inputs up to twice the largest seed
fuzz() {
    local h=$1 log=$F/$1.log largest
    largest=$(ls -S "$F/seeds/$h" | head -1)
    if [ -z "$largest" ]; then fail "fuzz $h: no seeds"; return; fi
    largest=$(stat -c %s "$F/seeds/$h/$largest")
    FUZZ_FILES=$FILES UBSAN_OPTIONS=print_stacktrace=1 "$F/fuzz_$h" -max_total_time="$SECS" \
        -max_len=$((2 * largest > 4096 ? 2 * largest : 4096)) -timeout=30 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1 -close_fd_mask=3 -artifact_prefix="$F/$h-" "$F/corpus/$h" "$F/seeds/$h" > "$log" 2>&1 &
    wait_harness $!
    local rc=$? runs
    echo "--- $h"
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done [0-9]+ runs|^stat::' "$log"
    runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log")
    if [ $rc = 0 ] && [ -n "$runs" ]; then
        pass "fuzz $h: $runs, $(grep -oE 'cov: [0-9]+' "$log" | tail -1), nothing found"
    else
        local kept
        kept=$(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$log" | tail -1)
        grep -E 'ERROR|SUMMARY|runtime error' "$log" | head -5
        fail "fuzz $h: exit $rc${kept:+, the input is $kept}; see $log"
    fi
}
fuzz model
fuzz tokens
fuzz checkpoint
fuzz debug_state
if [ $have_spm = 1 ]; then
    fuzz tokenizer
    fuzz text
fi
