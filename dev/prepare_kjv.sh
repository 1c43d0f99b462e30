#!/usr/bin/env bash
# make data: the King James Bible as token data for openmoe.c.
#
#   data/kjv/kjv.txt          the corpus: 31102 verses, one a line, without the
#                             "Ge1:1" reference, runs of spaces made one space
#   data/kjv/train.txt        the verses of the training split
#   data/kjv/val.txt          the verses of the validation split
#   data/kjv/tokenizer.model  SentencePiece unigram model trained on train.txt
#   data/kjv/tokenizer.bin    the same model for tokenizer.h with $EXTRA_IDS sentinels
#                             appended (dev/export_tokenizer.py --extra-ids)
#   data/kjv/train.bin        token data files (format in tokenizer.bin-spec):
#   data/kjv/val.bin            each verse's ids followed by the EOS id
#   data/kjv/ood.bin          out-of-domain text for routing analysis: every
#                             Debian fortune (/usr/share/games/fortunes/*, .dat
#                             and .u8 files left out, files in name order), its
#                             lines joined by one space, encoded with the KJV
#                             tokenizer, each followed by the EOS id
#   data/kjv/stats.txt        token counts of the three files
#
# Split: the Bible's 1189 chapters are numbered 0..1188 in book order (Genesis 1
# is 0, Revelation 22 is 1188); chapter c is validation when c % 20 == 19
# (59 chapters: Genesis 20, Genesis 40, Exodus 10, ..., about 5% of the verses),
# everything else is training. The tokenizer sees only the training split.
#
# Tokenizer: spm_train, unigram, vocab $VOCAB - $EXTRA_IDS (default 4096 - 100),
# byte_fallback (so that every character encodes, the fortunes' included),
# character_coverage 1, the default nmt_nfkc normalizer; one thread and a fixed
# seed so that the model is the same on every run (spm's unigram trainer gives
# different models for different thread counts). tokenizer.bin appends
# $EXTRA_IDS sentinels <extra_id_k> (SPEC §10: the UL2 denoisers' span markers,
# k at id VOCAB - 1 - k), so that the tokenizer, the data files and the model
# all have VOCAB ids. The text never spells a sentinel, so the data's ids are
# those of tokenizer.model.
#
# Encoding: Python sentencepiece (python3-sentencepiece) encodes the .bin files;
# test/t_tokenizer.sh checks that tokenizer.h (./run -z ... --encode) gives the
# same ids as sentencepiece, line for line.
#
# Idempotent: when every output exists and data/kjv/.stamp records the same
# settings and the same scripts, nothing is done (FORCE=1 redoes everything).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=/usr/bin/python3
VOCAB=${VOCAB:-4096}
EXTRA_IDS=${EXTRA_IDS:-100}
[ "$EXTRA_IDS" -ge 0 ] && [ "$VOCAB" -gt "$EXTRA_IDS" ] ||
    { echo "error: VOCAB=$VOCAB must exceed EXTRA_IDS=$EXTRA_IDS >= 0" >&2; exit 1; }
OUT=data/kjv
mkdir -p "$OUT"

# --- Debian packages -----------------------------------------------------------
need=()
for pkg in sentencepiece python3-sentencepiece python3-numpy bible-kjv fortunes; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# --- up to date? ----------------------------------------------------------------
stamp="vocab=$VOCAB extra_ids=$EXTRA_IDS split=chapter%20==19 spm=$(dpkg-query -W -f='${Version}' sentencepiece) \
bible=$(dpkg-query -W -f='${Version}' bible-kjv-text 2>/dev/null || true) \
fortunes=$(dpkg-query -W -f='${Version}' fortunes) \
scripts=$(cat dev/prepare_kjv.sh dev/export_tokenizer.py | md5sum | cut -c1-32)"
outputs=(kjv.txt train.txt val.txt tokenizer.model tokenizer.bin train.bin val.bin ood.bin stats.txt)
uptodate=1
for f in "${outputs[@]}"; do [ -s "$OUT/$f" ] || uptodate=0; done
if [ "$uptodate" = 1 ] && [ "${FORCE:-0}" != 1 ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$OUT is up to date ($(tr '\n' ' ' < "$OUT/stats.txt"))"
    exit 0
fi
rm -f "$OUT/.stamp"

# --- the corpus -------------------------------------------------------------------
# bible -f: one verse a line, "Ge1:1 In the beginning ..." (no line breaks unless -l)
bible -f gen1:1-rev22:21 < /dev/null > "$OUT/raw.txt"
$PY - "$OUT" <<'EOF'
import re, sys
out = sys.argv[1]
ref = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
verses, chapter, last = [], -1, None
for line in open(out + "/raw.txt", encoding="utf-8"):
    m = ref.match(line.rstrip("\n"))
    if not m:
        raise SystemExit("error: unexpected line from bible: %r" % line[:80])
    book, ch, text = m.group(1), int(m.group(2)), m.group(4)
    if (book, ch) != last:
        chapter, last = chapter + 1, (book, ch)
    verses.append((chapter, " ".join(text.split())))
if len(verses) != 31102 or chapter != 1188:
    raise SystemExit("error: bible printed %d verses in %d chapters, expected 31102 in 1189"
                     % (len(verses), chapter + 1))
with open(out + "/kjv.txt", "w") as a, open(out + "/train.txt", "w") as tr, \
     open(out + "/val.txt", "w") as va:
    for c, text in verses:
        a.write(text + "\n")
        (va if c % 20 == 19 else tr).write(text + "\n")
EOF
rm -f "$OUT/raw.txt"

# --- the tokenizer ----------------------------------------------------------------
spm_train --input="$OUT/train.txt" --model_prefix="$OUT/tokenizer" --vocab_size="$((VOCAB - EXTRA_IDS))" \
    --model_type=unigram --byte_fallback=true --character_coverage=1.0 \
    --input_sentence_size=0 --shuffle_input_sentence=false --num_threads=1 --random_seed=1 \
    --minloglevel=2 > "$OUT/spm_train.log" 2>&1 || { cat "$OUT/spm_train.log"; exit 1; }
$PY dev/export_tokenizer.py "$OUT/tokenizer.model" "$OUT/tokenizer.bin" --extra-ids "$EXTRA_IDS"

# --- token data files -------------------------------------------------------------
$PY - "$OUT" "$EXTRA_IDS" <<'EOF'
import glob, os, sys
import numpy as np
import sentencepiece as spm
out = sys.argv[1]
sp = spm.SentencePieceProcessor(model_file=out + "/tokenizer.model")
V, eos = sp.get_piece_size() + int(sys.argv[2]), sp.eos_id()  # the sentinels' ids too
assert eos >= 0, "the tokenizer has no EOS"
MAGIC, VERSION = 240201741, 1

def write(path, seqs):
    ids = sp.encode(seqs)
    n = sum(len(x) + 1 for x in ids)
    dtype = np.uint16 if V <= 65536 else np.int32
    toks = np.empty(n, dtype=dtype)
    k = 0
    for x in ids:
        toks[k:k + len(x)] = x
        toks[k + len(x)] = eos
        k += len(x) + 1
    header = np.zeros(256, dtype="<i4")
    header[:5] = [MAGIC, VERSION, toks.itemsize, V, n]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype(toks.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)
    return len(seqs), n

def lines(path):
    with open(path, encoding="utf-8") as f:
        return [l.rstrip("\n") for l in f]

fortunes = []
for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
    if path.endswith((".dat", ".u8")) or not os.path.isfile(path) or os.path.islink(path):
        continue
    entry = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in list(f) + ["%\n"]:       # a line "%" ends a fortune
            if line.rstrip("\n") == "%":
                text = " ".join(" ".join(entry).split())
                if text:
                    fortunes.append(text)
                entry = []
            else:
                entry.append(line)

stats = []
for name, seqs in (("train", lines(out + "/train.txt")), ("val", lines(out + "/val.txt")),
                   ("ood", fortunes)):
    nseq, ntok = write("%s/%s.bin" % (out, name), seqs)
    stats.append("%s.bin: %d tokens (%d sequences)" % (name, ntok, nseq))
with open(out + "/stats.txt", "w") as f:
    f.write("\n".join(stats) + "\n")
print("\n".join(stats))
EOF
echo "$stamp" > "$OUT/.stamp"
echo "wrote $OUT: tokenizer.model tokenizer.bin train.bin val.bin ood.bin (vocab $VOCAB, $EXTRA_IDS sentinels)"
