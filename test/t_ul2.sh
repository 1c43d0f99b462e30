#!/usr/bin/env bash
# UL2's example generator (SPEC §10, train.c's UL2 section), through
# train --objective ul2 --dump-examples N FILE, without a model:
#
#   - a SentencePiece tokenizer of KJV verses with 300 sentinels
#     (dev/export_tokenizer.py --extra-ids 300, as OpenMoE's vocabulary) and
#     token data of other verses;
#   - the lengths train prints for -t 30 .. 2048 equal those of
#     test/check_ul2.py's port of T5's random_spans_helper, and at -t 2048
#     SPEC §10's numbers (n 1137 with targets 229 for R(3, 0.15), n 2014 with
#     targets 1024 for X(64, 0.5));
#   - 3000 rows at -t 256 hold every rule of §10 (test/check_ul2.py: layout,
#     positions, whole examples, greedy packing, the shift, no loss on inputs,
#     EOS, mode prefixes, sentinel order, lengths, chunks of the stream, the
#     rates and the span compositions within 3 sigma), and the checker catches
#     each rule broken in a copy of the dump;
#   - the rows are the same whatever -b (between batches the generator goes
#     through the state a checkpoint keeps), the same on every run, other with
#     another -s; --ul2-steps S gives causal windows after step S;
#   - a causal run's checkpoint keeps words 22..25 at 0 (as files written
#     before §10), and one whose words say UL2 is refused by a causal run;
#   - training: --objective ul2 --ul2-steps 6 trains steps 1..6 on the packed
#     rows (fewer targets than tokens), then causal LM; validation reports
#     the causal CE and the UL2 CE; stopped in the UL2 steps or at the switch
#     and resumed, it continues bit for bit; on 2 MPI ranks (build/train_mpi)
#     it gives 1 rank's losses, each rank's CE over the whole batch's targets;
#   - bad input: unknown --objective, --ul2-steps negative, beyond -n or
#     without ul2, no tokenizer, a tokenizer without sentinels or with too
#     few, -t too short, a bad --dump-examples.
set -u
source test/lib.sh
PY=${PYTHON:-/usr/bin/python3}
in_scratch ul2 train
TRAIN=$ROOT/train
CHECK=("$PY" "$ROOT/test/check_ul2.py")
for pkg in sentencepiece python3-sentencepiece bible-kjv; do
    dpkg -s "$pkg" > /dev/null 2>&1 || { echo "SKIP ul2: Debian package $pkg is missing"; exit 0; }
done

# --- a tokenizer and data ----------------------------------------------------------------
bible -f gen1:1-rev22:21 < /dev/null | sed -E 's/^[^ ]+ //' > kjv.txt
head -n 5000 kjv.txt > spm.txt
sed -n 5001,15000p kjv.txt > train.txt
sed -n 15001,15500p kjv.txt > val.txt
if ! spm_train --input=spm.txt --model_prefix=tok --vocab_size=700 --model_type=unigram --byte_fallback=true \
        --character_coverage=1 --num_threads=1 --minloglevel=2 > spm.log 2>&1; then
    fail "ul2: spm_train failed: $(tail -2 spm.log)"
    exit 0
fi
for n in 300 10 0; do  # tokN.bin: N sentinels
    $PY "$ROOT/dev/export_tokenizer.py" tok.model tok$n.bin --extra-ids $n > /dev/null
done
# trainN.bin, valN.bin: the verses, each followed by EOS, in the vocabulary of tokN.bin
$PY - <<'EOF'
import numpy as np, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file="tok.model")
for name in ("train", "val"):
    ids = []
    for x in sp.encode([l.rstrip("\n") for l in open(name + ".txt")]):
        ids += x + [sp.eos_id()]
    for S in (300, 10, 0):
        h = np.zeros(256, np.int32)
        h[:5] = [240201741, 1, 2, sp.get_piece_size() + S, len(ids)]
        open("%s%d.bin" % (name, S), "wb").write(h.tobytes() + np.array(ids, np.uint16).tobytes())
EOF
D=(-i train300.bin -j val300.bin -z tok300.bin)
CK=("${CHECK[@]}" rows.tsv 256 tok300.bin tok.model train300.bin)

# --- lengths ------------------------------------------------------------------------------
bad=""
for T in 30 48 64 120 200 256 512 2048; do
    line=$("$TRAIN" -c base "${D[@]}" -b 1 -t $T --objective ul2 --dump-examples 1 d$T.tsv 2>&1 | grep '^ul2:')
    got=$(echo "$line" | sed -E 's/^ul2: I [0-9]+; //; s/, S n .*//')
    want=$("${CHECK[@]}" --lengths $((T / 2)))
    [ "$got" = "$want" ] && echo "$line" | grep -q ", S n $((T / 2 - 1));" || bad="$bad -t $T (train: $got; check_ul2.py: $want)"
done
[ -z "$bad" ] && pass "ul2 lengths: train's at -t 30 .. 2048 equal check_ul2.py's port of random_spans_helper" ||
    fail "ul2 lengths differ:$bad"
if echo "$line" | grep -q 'R(3, 0.15) n 1137 m 171 s 57,' && echo "$line" | grep -q 'X(64, 0.5) n 2014 m 1007 s 16,'; then
    pass "ul2 lengths at -t 2048: SPEC §10's n 1137 (targets 171 + 57 + 1 = 229) and n 2014 (1007 + 16 + 1 = 1024)"
else
    fail "ul2 lengths at -t 2048 are not SPEC §10's: $line"
fi

# --- every rule of §10 on 3000 rows ------------------------------------------------------
"$TRAIN" -c tiny "${D[@]}" -b 8 -t 256 --objective ul2 --dump-examples 3000 rows.tsv > dump.log 2>&1
if "${CK[@]}" > check.log 2>&1; then
    pass "ul2 rows: every rule of SPEC §10 holds ($(tail -1 check.log); $(grep 'holds rates' check.log | cut -d: -f2-))"
else
    cat check.log
    fail "ul2 rows: test/check_ul2.py finds broken rules: $(grep -o '^broken [a-z_]*' check.log | cut -c8- | tr '\n' ' ')"
fi
"${CK[@]}" --self-test > self.log 2>&1
while read -r verdict rule rest; do
    [ "$verdict" = caught ] && pass "ul2 check_ul2.py catches a broken ${rule%:} (${rest:0:100})" ||
        fail "ul2 check_ul2.py misses a broken $rule"
done < <(grep -E '^(caught|missed) ' self.log)
[ "$(grep -cE '^(caught|missed) ' self.log)" = 13 ] || fail "ul2 check_ul2.py --self-test: $(tail -1 self.log)"

# --- the same rows whatever the batch, on every run --------------------------------------
dump() {  # dump FILE FLAGS...: 64 rows at -t 256
    local f=$1; shift
    "$TRAIN" -c tiny "${D[@]}" -t 256 --objective ul2 --dump-examples 64 "$f" "$@" > /dev/null 2>&1
}
dump b64.tsv -b 64 && dump b1.tsv -b 1 && dump b8.tsv -b 8 && dump again.tsv -b 8 && dump seed.tsv -b 8 -s 5
if cmp -s b64.tsv b1.tsv && cmp -s b64.tsv b8.tsv && head -n $((1 + 8 * 256)) rows.tsv | cmp -s - <(head -n $((1 + 8 * 256)) b8.tsv); then
    pass "ul2 rows do not depend on -b (1, 8, 64: the generator resumed from its checkpoint state between batches)"
else
    fail "ul2 rows depend on -b"
fi
cmp -s b8.tsv again.tsv && ! cmp -s b8.tsv seed.tsv && pass "ul2 rows: the same on every run, others with another -s" ||
    fail "ul2 rows: not the same on every run, or the same with another -s"
dump switch.tsv -b 4 -n 10 --ul2-steps 2
if $PY - <<'EOF'
import numpy as np
h = np.fromfile("train300.bin", np.int32, 256)
stream = np.fromfile("train300.bin", np.uint16, h[4], offset=1024).astype(np.int64)
a = np.loadtxt("switch.tsv", np.int64, delimiter="\t", skiprows=1, usecols=range(6), comments=None).reshape(64, 256, 6)
b = np.loadtxt("b8.tsv", np.int64, delimiter="\t", skiprows=1, usecols=range(6), comments=None).reshape(64, 256, 6)
assert (a[:8] == b[:8]).all(), "steps 1..2 are not UL2's rows"
for r in range(8, 64):
    tok, tgt, seg, pos = a[r, :, 2], a[r, :, 3], a[r, :, 4], a[r, :, 5]
    assert (seg == 0).all() and (pos == np.arange(256)).all(), "row %d: not one segment" % r
    assert (tgt[:-1] == tok[1:]).all(), "row %d: targets are not the next tokens" % r
    o = [i for i in np.flatnonzero(stream[:-256] == tok[0]) if (stream[i:i + 257] == np.append(tok, tgt[-1])).all()]
    assert o, "row %d: not a window of the stream" % r
EOF
then pass "ul2 --ul2-steps 2: UL2's rows in steps 1..2, then windows of the stream (causal LM)"
else fail "ul2 --ul2-steps 2: the rows after the switch are not causal windows"
fi

# --- checkpoint words 22..25 -------------------------------------------------------------
"$TRAIN" -c tiny "${D[@]}" -b 2 -t 32 -n 2 -e 0 -v 0 -V 1 -o ck > ck.log 2>&1 || fail "ul2: a causal run failed: $(tail -2 ck.log)"
if $PY -c "
import numpy as np, sys
h = np.fromfile('ck/state_00000002.bin', np.int32, 256)
sys.exit(0 if h[1] == 1 and (h[22:26] == 0).all() else 1)"; then
    pass "ul2: a causal run's checkpoint has words 22..25 at 0, as files written before SPEC §10"
else
    fail "ul2: a causal run's checkpoint words 22..25 are not 0"
fi
patch() {  # patch DIR WORD VALUE: ck copied to DIR, its state's header word changed
    rm -rf "$1" && cp -r ck "$1"
    $PY -c "
import numpy as np, sys
p = sys.argv[1] + '/state_00000002.bin'
b = bytearray(open(p, 'rb').read())
b[4 * int(sys.argv[2]):4 * int(sys.argv[2]) + 4] = np.int32(int(sys.argv[3])).tobytes()
open(p, 'wb').write(b)" "$1" "$2" "$3"
}
R=(-c tiny "${D[@]}" -b 2 -t 32 -n 3 -e 0 -v 0 -V 1 -r)
patch ck_ul2 22 1
expect_error "ul2: a checkpoint of a UL2 run is refused by a causal run" \
    "saved with --objective ul2 --ul2-steps 0, this run has --objective causal --ul2-steps 0" "$TRAIN" "${R[@]}" -o ck_ul2
patch ck_switch 23 1
expect_error "ul2: a checkpoint of another --ul2-steps is refused" "saved with --objective causal --ul2-steps 1" \
    "$TRAIN" "${R[@]}" -o ck_switch
patch ck_rng 24 12345
expect_error "ul2: a causal checkpoint with a UL2 generator state is damaged" "words 24..25 hold a UL2 generator state (damaged)" \
    "$TRAIN" "${R[@]}" -o ck_rng

# --- bad input ----------------------------------------------------------------------------
B=(-c tiny "${D[@]}" -b 2 -t 256)
expect_error "ul2: unknown --objective" "^error: --objective mlm: the objective is causal or ul2" \
    "$TRAIN" "${B[@]}" --objective mlm
expect_error "ul2: negative --ul2-steps" "^error: --ul2-steps -1: needs a whole number" \
    "$TRAIN" "${B[@]}" --objective ul2 --ul2-steps -1 --dump-examples 1 x.tsv
expect_error "ul2: --ul2-steps beyond -n" "^error: --ul2-steps 11 is beyond the run's -n 10 steps" \
    "$TRAIN" "${B[@]}" -n 10 --objective ul2 --ul2-steps 11 --dump-examples 1 x.tsv
expect_error "ul2: --ul2-steps without --objective ul2" "^error: --ul2-steps 5: .*needs --objective ul2" \
    "$TRAIN" "${B[@]}" --ul2-steps 5
expect_error "ul2: no tokenizer" "^error: --objective ul2 needs the data's tokenizer.*data/kjv/tokenizer.bin is missing" \
    "$TRAIN" -c tiny -i train300.bin -j val300.bin -t 256 --objective ul2 --dump-examples 1 x.tsv
expect_error "ul2: a tokenizer without sentinels" "^error: tok0.bin: the tokenizer has no sentinels" \
    "$TRAIN" -c tiny -i train0.bin -j val0.bin -z tok0.bin -t 256 --objective ul2 --dump-examples 1 x.tsv
expect_error "ul2: a tokenizer with fewer sentinels than -t needs" \
    "^error: tok10.bin: the tokenizer has 10 sentinels, but UL2 at -t 256 masks up to 32 spans" \
    "$TRAIN" -c tiny -i train10.bin -j val10.bin -z tok10.bin -t 256 --objective ul2 --dump-examples 1 x.tsv
# the mode prefixes are 6 ids with this tokenizer: inputs of 8 hold one, a token of text and EOS
expect_error "ul2: -t too short for the denoisers" "^error: -t 14 is too short for UL2: .* -t 16 at least" \
    "$TRAIN" "${B[@]}" -t 14 --objective ul2 --dump-examples 1 x.tsv
"$TRAIN" "${B[@]}" -t 16 --objective ul2 --dump-examples 200 t16.tsv > /dev/null 2>&1 &&
    "${CHECK[@]}" t16.tsv 16 tok300.bin tok.model train300.bin > t16.log 2>&1 &&
    pass "ul2: -t 16, the shortest, gives rows that keep every rule" || fail "ul2: -t 16: $(grep broken t16.log | head -2)"
expect_error "ul2: --dump-examples without its file" "^error: --dump-examples: needs N and FILE" \
    "$TRAIN" "${B[@]}" --dump-examples 5
expect_error "ul2: --dump-examples 0" "^error: --dump-examples 0: needs a whole number in \[1," \
    "$TRAIN" "${B[@]}" --dump-examples 0 x.tsv
expect_error "ul2: --dump-examples to a directory that does not exist" "no_such_dir/x.tsv" \
    "$TRAIN" "${B[@]}" --dump-examples 2 no_such_dir/x.tsv

# --- training ---------------------------------------------------------------------------
# tiny at the tokenizer's 1000 ids, batches of 4 x 64: UL2 in steps 1..6, then causal LM
TR=(-c tiny "${D[@]}" -b 4 -t 64 -n 10 -e 3 -v 5 -V 2 -q 128 -s 7 --objective ul2 --ul2-steps 6)
if "$TRAIN" "${TR[@]}" -o full > full.log 2>&1 && $PY - > full.check 2>&1 <<'EOF'
import numpy as np
log = np.genfromtxt("full/log.tsv", names=True, delimiter="\t")
ul2, targets = log["ul2"], log["targets"]
assert (ul2 == (log["step"] <= 6)).all(), f"ul2 column {ul2}"
assert (targets[:6] > 0).all() and (targets[:6] < 4 * 64 / 2).all() and (targets[6:] == 4 * 64).all(), targets
for col in ("val_ce", "val_ul2_ce", "loss"):
    due = np.isin(log["step"], (5, 10)) if col != "loss" else np.ones(len(log), bool)
    assert np.isfinite(log[col][due]).all() and np.isnan(log[col][~due]).all(), f"{col}: {log[col]}"
print(f"targets {targets[:6].astype(int)}; val_ul2_ce {log['val_ul2_ce'][4]:.3f} {log['val_ul2_ce'][9]:.3f}")
EOF
then
    pass "ul2 training: steps 1..6 on packed rows ($(cat full.check)), causal LM after; validation gives val_ce and val_ul2_ce"
else
    fail "ul2 training: $(tail -n 2 full.log full.check | tr "\n" " ")"
fi
no_timing() { cut -f 1-9,12- "$1"; }
for stop in 4 6; do  # in the UL2 steps, at the switch
    rm -rf "r$stop"
    "$TRAIN" "${TR[@]}" -o "r$stop" -y $stop > "r$stop.log" 2>&1 && "$TRAIN" "${TR[@]}" -o "r$stop" -r >> "r$stop.log" 2>&1
    if cmp -s full/model_00000010.bin "r$stop/model_00000010.bin" && cmp -s full/state_00000010.bin "r$stop/state_00000010.bin" &&
        cmp -s <(no_timing full/log.tsv) <(no_timing "r$stop/log.tsv"); then
        pass "ul2 training: stopped after step $stop and resumed, the same model, state and log bit for bit"
    else
        fail "ul2 training: stopped after step $stop and resumed, it differs from the straight run"
    fi
done

# 2 ranks of 2 rows against 1 rank of 4 (routing groups -q 128: one rank's rows); the ranks'
# rows hold other numbers of targets, and each rank's CE is over all of them
if command -v mpirun > /dev/null && command -v mpicc > /dev/null && (cd "$ROOT" && make -s build/train_mpi) > mpi_make.log 2>&1; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
    if OMP_NUM_THREADS=1 timeout 120 mpirun --oversubscribe -x OMP_NUM_THREADS -np 2 "$ROOT/build/train_mpi" "${TR[@]}" \
            -o two > two.log 2>&1 && $PY - > two.check 2>&1 <<'EOF'
import numpy as np, sys
a, b = (np.genfromtxt(p, names=True, delimiter="\t") for p in ("two/log.tsv", "full/log.tsv"))
worst = 0.0
for col in ("loss", "ce", "lb", "rz", "lz", "dropped", "val_ce", "val_loss", "val_ul2_ce", "targets"):
    x, y = a[col], b[col]
    d = np.where(np.isnan(y), 0.0, np.abs(x - y) / (1 + np.abs(y)))
    if not (np.isnan(x) == np.isnan(y)).all() or (d > 1e-4).any(): sys.exit(f"{col}: {x} against {y}")
    worst = max(worst, np.nanmax(d))
print(f"worst relative difference {worst:.2e}")
EOF
    then
        pass "ul2 training: 2 MPI ranks give 1 rank's losses step for step, UL2 and causal ($(cat two.check))"
    else
        fail "ul2 training: 2 MPI ranks differ from 1 rank: $(tail -n 2 two.log two.check | tr "\n" " ")"
    fi
else
    echo "SKIP ul2 training on 2 MPI ranks: mpirun, mpicc or build/train_mpi missing"
fi
