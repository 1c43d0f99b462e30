# Model file versions 2 (bf16) and 3 (int8 in groups), SPEC §11, as
# dev/import_openmoe.py and dev/convert_model.py write them: checked by
# test/check_model_files.py against test/reference.py's layout, torch's bf16
# rounding and the int8 rule computed in float64; the importer in small
# pieces and the converter give the same bytes; round trips decode exactly;
# every bad input is refused naming the file or flag, leaving nothing.
source test/lib.sh
M=$BUILD/model_files
rm -rf $M && mkdir -p $M
mk() { $PYTHON test/make_hf_checkpoint.py "$@" > /dev/null 2>&1; }
imp() { $PYTHON dev/import_openmoe.py "$@" > /dev/null 2> $M/last.err || { cat $M/last.err; fail "import $*"; }; }
conv() { $PYTHON dev/convert_model.py "$@" > /dev/null 2> $M/last.err || { cat $M/last.err; fail "convert $*"; }; }
# in pieces of 7 rows of 48 elements: pieces end inside an expert and a tensor
pieces() { $PYTHON test/check_model_files.py pieces 336 "$@" > /dev/null 2> $M/last.err || cat $M/last.err; }
same() {  # NAME A B
    if cmp -s "$2" "$3"; then pass "$1"; else fail "$1: $(cmp "$2" "$3" 2>&1)"; fi
}

# 1. micro checkpoints: bf16 safetensors shards, an fp32 .bin, and bf16
#    shards written as --preset 8b writes them (--stream); each imported in
#    every version
mk $M/st --format st-sharded --dtype bf16 --seed 1
mk $M/bin --format bin --dtype f32 --seed 2 --spelling 8b
mk $M/sm --format st-sharded --dtype bf16 --seed 3 --stream
for ck in st bin sm; do
    imp $M/$ck $M/$ck.fp32.bin
    imp $M/$ck $M/$ck.bf16.bin --dtype bf16
    imp $M/$ck $M/$ck.int8.bin --dtype int8 --group 8
done
imp $M/st $M/st.int8g4.bin --dtype int8 --group 4

# 2. the importer in pieces writes what it writes in one piece
for d in fp32 bf16 int8; do
    pieces import_openmoe.py $M/st $M/st.$d.p.bin --dtype $d $([ $d = int8 ] && echo --group 8)
    same "import in pieces of 336 elements = in one piece ($d)" $M/st.$d.p.bin $M/st.$d.bin
done

# 3. the converter: from the fp32 import, the importer's bytes; bf16 ->
#    int8 as from the bf16 checkpoint; round trips to fp32 and back
conv $M/st.fp32.bin $M/c.st.int8.bin --dtype int8 --group 8
same "convert fp32 -> int8 = import as int8 (bf16 checkpoint)" $M/c.st.int8.bin $M/st.int8.bin
conv $M/bin.fp32.bin $M/c.bin.int8.bin --dtype int8 --group 8
same "convert fp32 -> int8 = import as int8 (fp32 checkpoint)" $M/c.bin.int8.bin $M/bin.int8.bin
conv $M/bin.fp32.bin $M/c.bin.bf16.bin --dtype bf16
same "convert fp32 -> bf16 = import as bf16 (fp32 checkpoint)" $M/c.bin.bf16.bin $M/bin.bf16.bin
conv $M/st.bf16.bin $M/c.st.bf16-int8.bin --dtype int8 --group 8
same "convert bf16 -> int8 = import as int8 (bf16 checkpoint)" $M/c.st.bf16-int8.bin $M/st.int8.bin
conv $M/bin.bf16.bin $M/rt.bf16.fp32.bin --dtype fp32
conv $M/rt.bf16.fp32.bin $M/rt.bf16.bin --dtype bf16
same "convert bf16 -> fp32 -> bf16 gives the bf16 file back" $M/rt.bf16.bin $M/bin.bf16.bin
conv $M/bin.int8.bin $M/rt.int8.fp32.bin --dtype fp32
conv $M/bin.int8.bin $M/rt.int8.bin --dtype int8 --group 8
same "convert int8 -> int8 of the same group gives the file back" $M/rt.int8.bin $M/bin.int8.bin
conv $M/bin.int8.bin $M/rt.int8g4.bin --dtype int8 --group 4
pieces convert_model.py $M/bin.int8.bin $M/rt.int8.fp32.p.bin --dtype fp32
same "convert int8 -> fp32 in pieces of 336 elements = in one piece" $M/rt.int8.fp32.p.bin $M/rt.int8.fp32.bin
pieces convert_model.py $M/bin.fp32.bin $M/c.bin.int8.p.bin --dtype int8 --group 8
same "convert fp32 -> int8 in pieces of 336 elements = in one piece" $M/c.bin.int8.p.bin $M/bin.int8.bin

# 4. groups at the int8 rule's edges (halves, zeros, subnormals, the largest
#    floats, clamping), and defective version-3 files for section 6
$PYTHON test/check_model_files.py inputs $M/bin.fp32.bin $M/bin.int8.bin $M
conv $M/edges.bin $M/edges.int8.bin --dtype int8 --group 8

# 5. each file against the independent reading of SPEC §11
$PYTHON test/check_model_files.py checks <<EOF
bf16 = torch's bf16 of the fp32 import (fp32 checkpoint)|bf16 $M/bin.fp32.bin $M/bin.bf16.bin
bf16 = the bf16 checkpoint's bits (safetensors shards)|bf16-copy $M/st.fp32.bin $M/st.bf16.bin
bf16 = the bf16 checkpoint's bits (streamed shards)|bf16-copy $M/sm.fp32.bin $M/sm.bf16.bin
int8 G=8 by the rule (fp32 checkpoint)|int8 $M/bin.fp32.bin $M/bin.int8.bin
int8 G=8 by the rule (bf16 checkpoint)|int8 $M/st.fp32.bin $M/st.int8.bin
int8 G=4 by the rule (bf16 checkpoint)|int8 $M/st.fp32.bin $M/st.int8g4.bin
int8 G=8 by the rule (streamed shards)|int8 $M/sm.fp32.bin $M/sm.int8.bin
int8 G=8 by the rule at its edges|int8 $M/edges.bin $M/edges.int8.bin
int8 G=8 -> G=4 quantizes the decoded values|int8 $M/rt.int8.fp32.bin $M/rt.int8g4.bin
bf16 -> fp32 writes the widened values|decoded $M/bin.bf16.bin $M/rt.bf16.fp32.bin
int8 -> fp32 writes s·q|decoded $M/bin.int8.bin $M/rt.int8.fp32.bin
EOF

# 6. refusals: one "error: FILE-or-FLAG: ..." line, exit 1, no output left
refuses() {  # NAME PATTERN PROGRAM ARGS... (writing $M/out/x.bin)
    local name=$1 pattern=$2 prog=$3; shift 3
    rm -rf $M/out && mkdir $M/out
    $PYTHON dev/$prog "$@" > /dev/null 2> $M/x.err
    local rc=$?
    if [ $rc = 1 ] && [ "$(wc -l < $M/x.err)" = 1 ] && grep -q -- "^error: $pattern" $M/x.err &&
        [ -z "$(ls -A $M/out)" ]; then
        pass "refused: $name"
    else
        fail "refused: $name (exit $rc, left [$(ls -A $M/out | tr '\n' ' ')], stderr: $(head -3 $M/x.err | tr '\n' ' '))"
    fi
}
refuses "import --group not dividing F" "--group 16 does not divide F = 40$" \
    import_openmoe.py $M/st $M/out/x.bin --dtype int8 --group 16
refuses "import --group not a multiple of 4" "--group 6 is not a positive multiple of 4$" \
    import_openmoe.py $M/st $M/out/x.bin --dtype int8 --group 6
refuses "import --group without int8" "--group 8: only --dtype int8 has groups$" \
    import_openmoe.py $M/st $M/out/x.bin --dtype bf16 --group 8
refuses "convert --group not dividing F" "--group 16 does not divide F = 40$" \
    convert_model.py $M/bin.fp32.bin $M/out/x.bin --dtype int8 --group 16
refuses "convert --group 0" "--group 0 is not a positive multiple of 4$" \
    convert_model.py $M/bin.fp32.bin $M/out/x.bin --dtype int8 --group 0
refuses "convert to int8: a weight whose decoding overflows" \
    "$M/max.bin: tensor l0.wq has 1 groups whose s·127 overflows: weights too near the largest float for int8$" \
    convert_model.py $M/max.bin $M/out/x.bin --dtype int8 --group 8
refuses "convert to bf16: a weight rounding to infinity" \
    "$M/edges.bin: tensor l0.wq has 2 values that round to infinity in bfloat16$" \
    convert_model.py $M/edges.bin $M/out/x.bin --dtype bf16
while IFS='|' read -r kind pattern; do
    refuses "convert a version-3 file: $kind" "$M/$kind.bin: $pattern" \
        convert_model.py $M/$kind.bin $M/out/x.bin --dtype fp32
done <<'EOF'
nan-scale|tensor l0.wq: scale 3 is nan; a scale is >= 0 with s·127 finite$
inf-scale|tensor l0.wq: scale 3 is inf; a scale is >= 0 with s·127 finite$
huge-scale|tensor l0.wq: scale 3 is 3.4028[0-9]*e+36; a scale is >= 0 with s·127 finite$
negative-scale|tensor l0.wq: scale 3 is -[0-9.e-]*; a scale is >= 0 with s·127 finite$
int8-min|tensor l0.wq: int8 value 5 is -128, outside ±127$
version-2|size 365632 bytes, but its header describes 240912 parameters in version 2 (482848 bytes)$
version-4|unknown version 4 (versions 1, 2 and 3 are read)$
group-half|size 365632 bytes, but its header describes 240912 parameters in version 3 (485440 bytes)$
group-not-dividing|header word 14: G = 16 does not divide F = 40$
word-15|header word 15 is 1, must be 0$
truncated|size 365631 bytes, but its header describes 240912 parameters in version 3 (365632 bytes)$
EOF
cp $M/bin.bf16.bin $M/v2-as-v1.bin
printf '\001' | dd of=$M/v2-as-v1.bin bs=1 seek=4 conv=notrunc status=none
refuses "convert a version-2 file labelled version 1" \
    "$M/v2-as-v1.bin: size 482848 bytes, but its header describes 240912 parameters in version 1 (964672 bytes)$" \
    convert_model.py $M/v2-as-v1.bin $M/out/x.bin --dtype int8 --group 8
cp $M/bin.fp32.bin $M/nan.bin
printf '\000\000\300\177' | dd of=$M/nan.bin bs=1 seek=$((1024 + 4 * 100)) conv=notrunc status=none
refuses "convert an fp32 file with a NaN" "$M/nan.bin: tensor wte has 1 values that are not finite (NaN or inf)$" \
    convert_model.py $M/nan.bin $M/out/x.bin --dtype bf16

# 7. ./run reads every version in place, and a version-2 or -3 file computes
#    exactly as the version-1 file of its decoded weights (SPEC §11): the same
#    ids and the same logits (--verify's hash of every position's, which it
#    has checked against one full forward bit for bit), in the gemm.c build
#    and the plain one (make PLAIN=1), with the prompt as one routing group
#    (the default for a model with OpenMoE's tokenizer) and token by token.
#    Besides the micro files, a wider model for every path of gemm.c's
#    decode: whole blocks of rows and the rows past them, bf16 words, int8
#    groups of 64 (words of 4 values) and of 32 (decoded first)
if ! make -s build/plain/run build/fast/run > $M/make.log 2>&1; then
    fail "run: make build/plain/run build/fast/run failed: $(tail -3 $M/make.log | tr '\n' ' ')"
    exit 0
fi
spm_train --input=tokenizer.bin-spec --model_prefix=$M/tok --vocab_size=320 --model_type=unigram --pad_id=0 \
    --eos_id=1 --unk_id=2 --bos_id=-1 --character_coverage=0.995 --minloglevel=2 > $M/spm.log 2>&1 &&
    $PYTHON dev/export_tokenizer.py $M/tok.model $M/tok.bin > /dev/null || fail "run: the tokenizer: $(tail -2 $M/spm.log)"
$PYTHON - $M/wide.bin <<'PY'
import sys, numpy as np
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [392, 64, 2, 128, 2, 64, 192, 4, 2, 2, 128, 1]
HHd, n_moe = H * Hd, L // every
n = 2 * V * D + D + (L - n_moe) * (2 * D + 4 * HHd * D + 4 * F * D) \
    + n_moe * (2 * D + 4 * HHd * D + E * D + 4 * E * Fe * D + D + 4 * F * D)
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
w = np.random.default_rng(11).normal(0, 0.08, n).astype(np.float32)
open(sys.argv[1], "wb").write(h.tobytes() + w.tobytes())
PY
conv $M/wide.bin $M/wide.bf16.bin --dtype bf16
conv $M/wide.bin $M/wide.int8.bin --dtype int8 --group 64
conv $M/wide.bin $M/wide.int8g32.bin --dtype int8 --group 32
for f in wide.bf16 wide.int8 wide.int8g32; do conv $M/$f.bin $M/$f.fp32.bin --dtype fp32; done
# runs FILE: every build and prompt routing, the ids and --verify's line of each
runs() {
    for build in fast plain; do
        for routing in group token; do
            echo "$build $routing: $(build/$build/run "$1" -z $M/tok.bin -i "Experts in C route every token" -t 0 \
                -n 20 --ids --verify --prompt-routing $routing 2> /dev/null | tr '\n' ' ')"
        done
    done
}
while read -r compact decoded what; do
    runs $M/$compact.bin > $M/$compact.runs
    runs $M/$decoded.bin > $M/$decoded.runs
    if [ "$(grep -c 'verify: 20/20 positions match; logits bit-identical at 20/20' $M/$compact.runs)" = 4 ] &&
        cmp -s $M/$compact.runs $M/$decoded.runs && [ "$(cut -d: -f2- $M/$compact.runs | sort -u | wc -l)" -le 2 ]; then
        pass "run: $what = its fp32 decoding, ids and logits byte for byte (gemm.c and plain builds, prompt one group and token by token)"
    else
        fail "run: $what differs from its fp32 decoding: $(diff $M/$compact.runs $M/$decoded.runs | head -3 | tr '\n' ' ')"
    fi
done <<'LIST'
bin.bf16 rt.bf16.fp32 bf16 (micro)
bin.int8 rt.int8.fp32 int8 G=8 (micro)
wide.bf16 wide.bf16.fp32 bf16 (wide)
wide.int8 wide.int8.fp32 int8 G=64 (wide)
wide.int8g32 wide.int8g32.fp32 int8 G=32 (wide)
LIST
# the plain and gemm.c builds agree; int8 differs from bf16 (the comparisons above can tell files apart)
if [ "$(grep '^fast group' $M/wide.int8.runs | cut -d: -f2-)" = "$(grep '^plain group' $M/wide.int8.runs | cut -d: -f2-)" ] &&
    ! cmp -s $M/wide.int8.runs $M/wide.bf16.runs; then
    pass "run: the plain build gives the gemm.c build's bits; int8 and bf16 files give other logits"
else
    fail "run: the builds disagree, or int8 and bf16 give the same logits"
fi

# 8. ./run refuses a bad model file naming it: every defect of section 6 that
#    its reader can see (it reads the int8 values only as it uses them), a G
#    not a multiple of 4, version words in other versions' places
patch_word() {  # FILE WORD VALUE: header word WORD of FILE set to VALUE
    $PYTHON -c "import sys, numpy as np; f = open(sys.argv[1], 'r+b'); f.seek(4 * int(sys.argv[2])); f.write(np.int32(int(sys.argv[3])).tobytes())" "$@"
}
cp $M/bin.int8.bin $M/group-6.bin && patch_word $M/group-6.bin 14 6
cp $M/bin.bf16.bin $M/v2-word14.bin && patch_word $M/v2-word14.bin 14 8
cp $M/bin.bf16.bin $M/v2-as-v3.bin && patch_word $M/v2-as-v3.bin 1 3
while IFS='|' read -r kind pattern; do
    expect_error "run refuses $kind, naming the file" "^error: $M/$kind.bin: $pattern" \
        ./run $M/$kind.bin -z $M/tok.bin -n 1
done <<'EOF2'
nan-scale|tensor l0.wq: scale 3 is nan; a scale is >= 0 with s\*127 finite$
inf-scale|tensor l0.wq: scale 3 is inf; a scale is >= 0
huge-scale|tensor l0.wq: scale 3 is 3.40282e+36; a scale is >= 0
negative-scale|tensor l0.wq: scale 3 is -[0-9.e-]*; a scale is >= 0
version-2|size 365632 bytes, but its header describes 240912 parameters in version 2 (482848 bytes)$
version-4|unknown version 4 (versions 1, 2 and 3 are read)$
group-half|size 365632 bytes, but its header describes 240912 parameters in version 3 (485440 bytes)$
group-not-dividing|header word 14: G = 16 does not divide F = 40$
group-6|header word 14: G = 6 is not a positive multiple of 4$
word-15|header word 15 is 1, must be 0$
truncated|size 365631 bytes, but its header describes 240912 parameters in version 3 (365632 bytes)$
v2-as-v1|size 482848 bytes, but its header describes 240912 parameters in version 1 (964672 bytes)$
v2-word14|header word 14 is 8, must be 0$
v2-as-v3|header word 14: G = 0 is not a positive multiple of 4$
EOF2
# token data of its own, so that train reaches the model file (the KJV data may not exist)
$PYTHON - $M/tokens.bin <<'EOF2'
import sys, numpy as np
ids = np.arange(4096, dtype=np.uint16) % 256
h = np.zeros(256, dtype="<i4"); h[:5] = [240201741, 1, 2, 256, len(ids)]
with open(sys.argv[1], "wb") as f: f.write(h.tobytes()); f.write(ids.astype("<u2").tobytes())
EOF2
expect_error "train refuses a version-2 file, naming it and the converter" \
    "^error: $M/bin.bf16.bin: version 2 (bf16 weights): train and test_cpu read version 1 (fp32) only; dev/convert_model.py" \
    ./train -c $M/bin.bf16.bin -i $M/tokens.bin -j $M/tokens.bin -k $M/tokens.bin -z $M/none -n 1
