#!/usr/bin/env bash
# The C tokenizer (tokenizer.h, through ./run -z TOK.bin --encode|--decode)
# against SentencePiece's own spm_encode / spm_decode.
#
# Small models are trained with spm_train on one text (KJV verses plus some
# non-ASCII lines): unigram and BPE, each with and without byte_fallback, with
# the nmt_nfkc and the identity normalizer, plus user-defined symbols, other
# whitespace settings, nfkc_cf, unused pieces. Each is exported with
# dev/export_tokenizer.py and must encode a different text (fortunes, other
# verses, and lines with accents, CJK, emoji, full-width characters, odd
# whitespace, empty lines, unknown characters, malformed UTF-8, spelled
# sentinels) to the same ids as spm_encode, line for line, and decode spm's ids,
# and random ids, to the same text as spm_decode; so must exports with
# --extra-ids (SPEC §10's sentinels) against spm with the model OpenMoE's seqio
# builds from the same sentinels. Deliberately changed models show that the
# comparisons can fail. Malformed tokenizer files and bad --decode input must
# give a clear error.
#
# TOK_RUN=path runs that program instead of ./run (which is built by make run).
set -u
source test/lib.sh
BUILD=${BUILD:-build/test}
PY=${PYTHON:-/usr/bin/python3}
T=$BUILD/tokenizer
rm -rf "$T"
mkdir -p "$T"

# --- what the test needs ----------------------------------------------------------
need=()
for pkg in sentencepiece python3-sentencepiece bible-kjv fortunes; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
            >"$T/apt.log" 2>&1
    fi
    for pkg in "${need[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || { echo "SKIP tokenizer: Debian package $pkg is missing"; exit 0; }
    done
fi

if [ -n "${TOK_RUN:-}" ]; then
    RUN=$TOK_RUN
else
    RUN=./run
    if ! make -s run >"$T/make.log" 2>&1; then
        fail "tokenizer: make run failed: $(tail -3 "$T/make.log" | tr '\n' ' ')"
        exit 0
    fi
fi

# tokenizer.h needs utils.h only: it compiles with openmoe.h's include guard
# already defined (so that nothing of openmoe.h is seen), as C and as C++
# (nvcc compiles run.c and train.c as C++)
printf '#include "tokenizer.h"\nint main(void){Tokenizer t; (void)t; return 0;}\n' > "$T/alone.c"
expect_ok "tokenizer.h compiles without openmoe.h" gcc -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter \
    -Wno-unused-function -DOPENMOE_H -I. -fsyntax-only "$T/alone.c"
if command -v g++ >/dev/null; then
    expect_ok "tokenizer.h compiles as C++" g++ -std=c++17 -Wall -Wextra -Werror -Wno-unused-parameter \
        -Wno-unused-function -DOPENMOE_H -I. -fsyntax-only -x c++ "$T/alone.c"
fi

# --- texts --------------------------------------------------------------------------
bible -f gen1:1-rev22:21 </dev/null | sed -E 's/^[^ ]+ //' > "$T/kjv.txt"
head -n 4000 "$T/kjv.txt" > "$T/train.txt"
cat >> "$T/train.txt" <<'EOF'
Café au lait, naïve résumé, Ångström, São Paulo, Zürich, déjà vu.
Straße und Mädchen über Köln, Øresund, Łódź, Dvořák, Ελληνικά κείμενα.
日本語のテキストと中文文本，한국어 텍스트.
Русский текст и ещё немного кириллицы.
ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３ and ｶﾀｶﾅ half-width.
EOF
"$PY" - "$T/edge.txt" <<'EOF'
import sys
lines = [
    "", " ", "   ", "\t", "  leading spaces", "trailing spaces   ", "  both  ",
    "multiple    spaces   inside", "tab\tseparated\tvalues", "Café naïve résumé Ångström déjà vu",
    "e\u0301 combining acute, A\u030a ring", "日本語のテキスト、中文文本。한국어",
    "emoji 😀👍🏽 🇩🇪 and ❤️", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３", "ｶﾀｶﾅ half-width katakana",
    "ligatures ﬁ ﬂ ﬀ and ﷺ", "superscripts x² ½ ㎏ ™ Ⅻ",
    "\u00a0non-breaking\u00a0space and\u3000ideographic space", "soft\u00adhyphen zero\u200bwidth",
    "literal \u2581 lower block and \ufffd replacement", "\u2581leading block", "trailing block\u2581",
    "unknown: \U0001d11e \u2603 \u0e01\u0e02 \u05d0\u05d1 \u0915\u093f ꙮ",
    "Ελληνικά, Русский, עברית, العربية", "  \u3000  ", "\u00ad", "a\u00ad", "x " * 300,
    "<unk> <s> </s> <sep> literal control strings", "<0x41> looks like a byte piece",
    "digits 0123456789 3.14159", "CR at end\r", "mixed\u2028line separator",
    "\x01\x02 control chars \x7f", "the man <sep> Lord and the Lord",
    "<extra_id_0> sentinels <extra_id_3>  spelled <extra_id_9>, inside<extra_id_1>words <extra_id_1>x",
    "<extra_id_10> <extra_id_99> <extra_id_> <extra_id_0 \u2581<extra_id_2> <EXTRA_ID_0>",
]
with open(sys.argv[1], "wb") as f:
    for l in lines:
        f.write(l.encode("utf-8") + b"\n")
    f.write(b"invalid utf8 \xff\xfe and \xc3( and truncated \xe2\x82\n")
    f.write(b"overlong \xc0\xaf surrogate \xed\xa0\x80 end \xf4\x90\x80\x80\n")
    f.write(b"a NUL \x00 byte\n")
    f.write(b"no newline at the end")
EOF
fdir=/usr/share/games/fortunes
{ tail -n 2000 "$T/kjv.txt"; cat $fdir/computers $fdir/linux $fdir/science $fdir/wisdom; cat "$T/edge.txt"; } > "$T/test.txt"

# random id lines for decode: every kind of piece in any order (vocab size $2)
random_ids() {
    "$PY" - "$1" "$2" <<'EOF'
import random, sys
rng = random.Random(1234)
V = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for i in range(400):
        n = rng.choice([0, 1, 2, 3, 5, 8, 20])
        ids = [rng.randrange(V) if rng.random() < 0.6 else rng.randrange(min(V, 270)) for _ in range(n)]
        f.write(" ".join(map(str, ids)) + "\n")
    f.write("  1   3 4  \n")   # extra spaces between ids, as spm_decode allows
EOF
}

# a copy of a SentencePiece model with pieces changed: mutate IN OUT MODE
cat > "$T/mutate.py" <<'EOF'
import struct, sys
sys.path.insert(0, "dev")
from export_tokenizer import fields
def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | 0x80 if v else b)
        if not v:
            return bytes(out)
def field(num, wt, val):
    key = varint(num << 3 | wt)
    if wt == 0: return key + varint(val)
    if wt == 1: return key + struct.pack("<Q", val)
    if wt == 2: return key + varint(len(val)) + val
    return key + struct.pack("<I", val)
src, dst, mode = sys.argv[1:4]
out, normal, last_piece = bytearray(), 0, False
for num, wt, val in fields(open(src, "rb").read()):
    if mode == "extra" and last_piece and num != 1:
        # seqio's SentencePieceVocabulary(extra_ids=10): <extra_id_9> .. <extra_id_0>, user defined, score 0
        for k in reversed(range(10)):
            sub = field(1, 2, ("\u2581<extra_id_%d>" % k).encode()) + field(2, 5, 0) + field(3, 0, 4)
            out += field(1, 2, sub)
    last_piece = num == 1
    if num == 1 and wt == 2:
        p = {1: None, 2: None, 3: None}
        for n2, w2, v2 in fields(val):
            p[n2] = v2
        t = p[3] if p[3] is not None else 1
        if mode == "score" and p[1] == "▁the".encode():
            p[2] = struct.unpack("<I", struct.pack("<f", -40.0))[0]
        if mode == "piece" and p[1] == "▁the".encode():
            p[1] = "▁t#e".encode()
        if mode == "unused" and t == 1:
            normal += 1
            if normal % 7 == 3:
                p[3] = 5
        sub = field(1, 2, p[1])
        if p[2] is not None: sub += field(2, 5, p[2])
        if p[3] is not None: sub += field(3, 0, p[3])
        out += field(1, 2, sub)
    else:
        out += field(num, wt, val)
open(dst, "wb").write(out)
EOF

# --- models --------------------------------------------------------------------------
# train NAME spm_train-options...: $T/NAME.model and $T/NAME.bin
train() {
    local name=$1; shift
    spm_train --input="$T/train.txt" --model_prefix="$T/$name" --vocab_size=800 \
        --character_coverage=0.995 --num_threads=2 --minloglevel=2 "$@" >"$T/$name.log" 2>&1 &&
    "$PY" dev/export_tokenizer.py "$T/$name.model" "$T/$name.bin" >>"$T/$name.log" 2>&1
}

# same A B: the two files are equal, else says how many lines differ and shows the first
same() {
    if cmp -s "$1" "$2"; then return 0; fi
    local n
    n=$(diff "$1" "$2" | grep -c '^<')
    echo "  $n lines differ; first: $(diff "$1" "$2" | head -4 | cut -c1-160 | tr '\n' '|')"
    return 1
}

# compare NAME [MODEL]: ./run with $T/NAME.bin against spm with MODEL (default $T/NAME.model)
compare() {
    local name=$1 model=${2:-$T/$1.model} V
    spm_encode --model="$model" --output_format=id <"$T/test.txt" >"$T/$name.spm.ids"
    "$RUN" -z "$T/$name.bin" --encode <"$T/test.txt" >"$T/$name.c.ids" 2>"$T/$name.err" ||
        { echo "  ./run --encode failed: $(head -2 "$T/$name.err")"; return 1; }
    same "$T/$name.spm.ids" "$T/$name.c.ids" || return 1
    spm_decode --model="$model" --input_format=id <"$T/$name.spm.ids" >"$T/$name.spm.txt"
    "$RUN" -z "$T/$name.bin" --decode <"$T/$name.spm.ids" >"$T/$name.c.txt" 2>"$T/$name.err" ||
        { echo "  ./run --decode failed: $(head -2 "$T/$name.err")"; return 1; }
    same "$T/$name.spm.txt" "$T/$name.c.txt" || return 1
    V=$(grep -c '' "${model%.model}.vocab" 2>/dev/null || echo 800)
    random_ids "$T/$name.rand.ids" "$V"
    spm_decode --model="$model" --input_format=id <"$T/$name.rand.ids" >"$T/$name.spm.rand.txt"
    "$RUN" -z "$T/$name.bin" --decode <"$T/$name.rand.ids" >"$T/$name.c.rand.txt" 2>"$T/$name.err" ||
        { echo "  ./run --decode failed: $(head -2 "$T/$name.err")"; return 1; }
    same "$T/$name.spm.rand.txt" "$T/$name.c.rand.txt"
}

check() {  # check NAME spm_train-options...
    local name=$1
    if ! train "$@"; then fail "tokenizer $name: training or export failed: $(tail -2 "$T/$name.log")"; return; fi
    if compare "$name"; then pass "tokenizer $name: --encode/--decode equal spm_encode/spm_decode"
    else fail "tokenizer $name: --encode/--decode differ from spm_encode/spm_decode"; fi
}

for mt in unigram bpe; do
    for bf in false true; do
        for nr in nmt_nfkc identity; do
            check "${mt}_${nr}_bf$bf" --model_type=$mt --byte_fallback=$bf --normalization_rule_name=$nr
        done
    done
done
check unigram_user --model_type=unigram --byte_fallback=true --user_defined_symbols='<sep>,Lord,ἀ,the man' \
    --control_symbols='<ctl>'
check bpe_user --model_type=bpe --user_defined_symbols='<sep>,Lord,ἀ'
check unigram_keepspace --model_type=unigram --remove_extra_whitespaces=false --add_dummy_prefix=false
check bpe_keepspace --model_type=bpe --byte_fallback=true --remove_extra_whitespaces=false
check unigram_suffix --model_type=unigram --treat_whitespace_as_suffix=true
check unigram_nfkc_cf --model_type=unigram --normalization_rule_name=nfkc_cf --byte_fallback=true
check unigram_pad --model_type=unigram --pad_id=3 --bos_id=-1 --unk_surface='??'
# a denormalizer (applied after decoding): a -> A, two spaces -> _, U+2581 -> ~
printf '61\t41\n20 20\t5F\n2581\t7E\n' > "$T/denorm.tsv"
check unigram_denorm --model_type=unigram --byte_fallback=true --denormalization_rule_tsv="$T/denorm.tsv"

# unused pieces (never matched by unigram, split again by BPE)
for m in unigram_nmt_nfkc_bftrue bpe_nmt_nfkc_bffalse; do
    "$PY" "$T/mutate.py" "$T/$m.model" "$T/${m}_unused.model" unused &&
        "$PY" dev/export_tokenizer.py "$T/${m}_unused.model" "$T/${m}_unused.bin" >/dev/null
    if compare "${m}_unused"; then pass "tokenizer ${m}_unused: unused pieces as spm"
    else fail "tokenizer ${m}_unused: unused pieces differ from spm"; fi
done

# sentinels (SPEC §10): an export with --extra-ids 10 against spm with the model
# OpenMoE's seqio builds (the same ten pieces appended to the .model), on text
# that spells sentinels, and on random ids that include them
for m in unigram_nmt_nfkc_bftrue bpe_identity_bffalse; do
    "$PY" "$T/mutate.py" "$T/$m.model" "$T/${m}_extra.model" extra &&
        "$PY" dev/export_tokenizer.py "$T/$m.model" "$T/${m}_extra.bin" --extra-ids 10 >/dev/null
    { cat "$T/$m.vocab"; for k in 9 8 7 6 5 4 3 2 1 0; do printf '\xe2\x96\x81<extra_id_%d>\t0\n' $k; done; } \
        > "$T/${m}_extra.vocab"
    if compare "${m}_extra"; then pass "tokenizer ${m}_extra: --extra-ids 10 as spm with seqio's sentinels"
    else fail "tokenizer ${m}_extra: --extra-ids 10 differs from spm with seqio's sentinels"; fi
done
m=unigram_nmt_nfkc_bftrue
ids=$(echo "<extra_id_0> and <extra_id_9>" | "$RUN" -z "$T/${m}_extra.bin" --encode)
if [ "${ids%% *}" = 809 ] && [ "${ids##* }" = 800 ]; then
    pass "tokenizer ${m}_extra: <extra_id_0> and <extra_id_9> are ids 809 and 800 ($ids)"
else
    fail "tokenizer ${m}_extra: '<extra_id_0> and <extra_id_9>' encodes to $ids, not 809 ... 800"
fi

# --- the comparisons can fail ----------------------------------------------------------
# one piece score changed in the model spm uses, but not in the .bin: encode must differ;
# then the .bin exported from the changed model must agree again
for m in unigram_nmt_nfkc_bftrue bpe_identity_bffalse; do
    "$PY" "$T/mutate.py" "$T/$m.model" "$T/${m}_score.model" score
    cp "$T/$m.bin" "$T/${m}_orig.bin"
    out=$(compare "${m}_orig" "$T/${m}_score.model")
    if [ $? -ne 0 ] && echo "$out" | grep -q 'lines differ'; then
        pass "tokenizer $m: a changed piece score is detected ($(echo "$out" | grep -o '[0-9]* lines differ' | head -1))"
    else
        fail "tokenizer $m: a changed piece score went unnoticed"
    fi
    "$PY" dev/export_tokenizer.py "$T/${m}_score.model" "$T/${m}_score.bin" >/dev/null
    if compare "${m}_score"; then pass "tokenizer $m: the changed model, exported, agrees again"
    else fail "tokenizer $m: the changed model, exported, differs"; fi
done
# one piece's text changed: decoding spm's ids must differ
m=unigram_nmt_nfkc_bffalse
"$PY" "$T/mutate.py" "$T/$m.model" "$T/${m}_piece.model" piece
if spm_decode --model="$T/${m}_piece.model" --input_format=id <"$T/$m.spm.ids" >"$T/${m}_piece.spm.txt" \
        2>"$T/${m}_piece.err" && ! cmp -s "$T/${m}_piece.spm.txt" "$T/$m.c.txt"; then
    pass "tokenizer $m: a changed piece text is detected by decode ($(diff "$T/${m}_piece.spm.txt" "$T/$m.c.txt" | grep -c '^<') lines differ)"
else
    fail "tokenizer $m: a changed piece text went unnoticed by decode (or spm_decode failed: $(head -1 "$T/${m}_piece.err"))"
fi

# --- errors ----------------------------------------------------------------------------
good=$T/unigram_nmt_nfkc_bftrue.bin
size=$(stat -c %s "$good")
"$PY" - "$good" "$T" <<'EOF'
import struct, sys
src, d = sys.argv[1], sys.argv[2]
b = bytearray(open(src, "rb").read())
def put(name, data):
    open(d + "/" + name, "wb").write(data)
x = bytearray(b); x[0:4] = b"\x00\x01\x02\x03"; put("bad_magic.bin", x)
put("trunc_header.bin", b[:100])
put("trunc.bin", b[:len(b) // 2])
x = bytearray(b); struct.pack_into("<i", x, 8, struct.unpack_from("<i", b, 8)[0] + 1); put("vocab_plus.bin", x)
x = bytearray(b); struct.pack_into("<i", x, 8, struct.unpack_from("<i", b, 8)[0] - 1); put("vocab_minus.bin", x)
x = bytearray(b); struct.pack_into("<i", x, 44, struct.unpack_from("<i", b, 44)[0] + 7); put("pieces_size.bin", x)
x = bytearray(b); struct.pack_into("<i", x, 4, 99); put("version.bin", x)
x = bytearray(b); x += b"junk"; put("trailing.bin", x)
x = bytearray(struct.pack("<256i", 240201741, 1, 2, 800, 0, *([0] * 251))); put("tokens.bin", x)
x = bytearray(b); struct.pack_into("<i", x, 64, 3); put("sentinels_not.bin", x)
x = bytearray(b); struct.pack_into("<i", x, 64, struct.unpack_from("<i", b, 8)[0] + 1); put("sentinels_many.bin", x)
EOF
# a file whose last two sentinels are swapped (piece 809 is <extra_id_1>, 808 <extra_id_0>)
"$PY" - "$T/unigram_nmt_nfkc_bftrue_extra.bin" "$T/sentinels_swapped.bin" <<'EOF'
import sys
b = open(sys.argv[1], "rb").read()
a, z, tmp = (("\u2581<extra_id_%s>" % k).encode() for k in "01X")
open(sys.argv[2], "wb").write(b.replace(a, tmp).replace(z, a).replace(tmp, z))
EOF
echo "hello" > "$T/hello.txt"
expect_error "tokenizer: missing file" "cannot open" "$RUN" -z "$T/nonexistent.bin" --encode
expect_error "tokenizer: bad magic" "bad magic" "$RUN" -z "$T/bad_magic.bin" --encode
expect_error "tokenizer: truncated header" "truncated" "$RUN" -z "$T/trunc_header.bin" --encode
expect_error "tokenizer: truncated file" "truncated" "$RUN" -z "$T/trunc.bin" --encode
expect_error "tokenizer: vocab size too large" "inconsistent sizes" "$RUN" -z "$T/vocab_plus.bin" --encode
expect_error "tokenizer: vocab size too small" "inconsistent sizes" "$RUN" -z "$T/vocab_minus.bin" --encode
expect_error "tokenizer: piece table size" "inconsistent sizes" "$RUN" -z "$T/pieces_size.bin" --encode
expect_error "tokenizer: trailing bytes" "inconsistent sizes" "$RUN" -z "$T/trailing.bin" --encode
expect_error "tokenizer: wrong version" "version 99" "$RUN" -z "$T/version.bin" --encode
expect_error "tokenizer: token data file given" "token data file" "$RUN" -z "$T/tokens.bin" --encode
expect_error "tokenizer: sentinels in header word 16 that the pieces are not" \
    "piece 799 must be sentinel 0 of 3, the user-defined piece" "$RUN" -z "$T/sentinels_not.bin" --encode
expect_error "tokenizer: more sentinels than pieces" "801 sentinels, must be in \[0, 800\]" \
    "$RUN" -z "$T/sentinels_many.bin" --encode
expect_error "tokenizer: sentinels out of order" "piece 809 must be sentinel 0 of 10" \
    "$RUN" -z "$T/sentinels_swapped.bin" --encode
for input in "5 800 7" "5 -1" "99999999999999999999"; do
    echo "$input" > "$T/bad_ids.txt"
    expect_error "tokenizer: --decode rejects id in '$input'" "line 1: id .* is out of range \[0, 800)" \
        sh -c "\"\$0\" -z \"\$1\" --decode < \"\$2\"" "$RUN" "$good" "$T/bad_ids.txt"
done
printf '1 2 3\n4 abc 5\n' > "$T/bad_ids.txt"
expect_error "tokenizer: --decode rejects a non-numeric id" 'line 2: "abc" is not an id' \
    sh -c "\"\$0\" -z \"\$1\" --decode < \"\$2\"" "$RUN" "$good" "$T/bad_ids.txt"
printf '12x\n' > "$T/bad_ids.txt"
expect_error "tokenizer: --decode rejects '12x'" 'line 1: "12x" is not an id' \
    sh -c "\"\$0\" -z \"\$1\" --decode < \"\$2\"" "$RUN" "$good" "$T/bad_ids.txt"
expect_error "export_tokenizer: not a model" "not a SentencePiece model\|no pieces" \
    "$PY" dev/export_tokenizer.py "$T/hello.txt" "$T/hello.bin"
# what people save as spiece.model / tokenizer.model by mistake (issue 27,
# finding 12): each named for what it is, in one error line
printf 'version https://git-lfs.github.com/spec/v1\noid sha256:%064d\nsize 4309802\n' 0 > "$T/lfs.model"
printf 'IQ== 0\nIg== 1\nIw== 2\nJA== 3\n' > "$T/tiktoken.model"
printf '{"version": "1.0", "model": {"type": "BPE"}}\n' > "$T/json.model"
while read -r what pattern; do
    expect_error "export_tokenizer: $what" "^error: $T/$what.model: $pattern" \
        "$PY" dev/export_tokenizer.py "$T/$what.model" "$T/$what.bin"
    if [ -e "$T/$what.bin" ]; then fail "export_tokenizer: $what left $T/$what.bin behind"; fi
done <<'EOF2'
lfs is a Git LFS pointer, not the model: fetch it with git lfs pull$
tiktoken is a tiktoken BPE file (Llama 3 style), not a SentencePiece model$
json is JSON (a Hugging Face tokenizer.json[?]), not a SentencePiece model$
EOF2
