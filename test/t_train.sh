# train and run end to end on a micro model and synthetic data (no `make data`
# needed): resume bit-exactness, greedy generation against a full forward,
# interrupted checkpoints, and every bad input getting a clear message.
source test/lib.sh
dir=$BUILD/train
rm -rf $dir
mkdir -p $dir
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# a small tokenizer, token files made with it, and a micro model file
bible -f gen1:1-deu34:12 < /dev/null | sed -n "s/^[A-Za-z0-9]*:[0-9]* //p" | head -6000 > $dir/text.txt
spm_train --input=$dir/text.txt --model_prefix=$dir/tok --vocab_size=300 --model_type=unigram \
    --character_coverage=1.0 --num_threads=1 --minloglevel=2 > /dev/null 2>&1 \
    && $PYTHON dev/export_tokenizer.py $dir/tok.model $dir/tok.bin > /dev/null \
    || { fail "could not make the test tokenizer"; exit 1; }
./run -z $dir/tok.bin --encode < $dir/text.txt > $dir/ids.txt
$PYTHON - $dir <<'EOF'
import sys, numpy as np
sys.path.insert(0, "test")
import reference as ref
d = sys.argv[1]
ids = [np.array(l.split(), dtype=np.int64) for l in open(f"{d}/ids.txt")]
eos = 2
seqs = [np.append(x, eos) for x in ids]
def write(path, toks, V=300, word4=None):
    h = np.zeros(256, dtype=np.int32)
    h[:5] = [240201741, 1, 2, V, len(toks)]
    if word4 is not None:
        h[4] = word4
    with open(path, "wb") as f:
        f.write(h.tobytes()); f.write(np.asarray(toks, dtype=np.uint16).tobytes())
train = np.concatenate(seqs[:5000]); val = np.concatenate(seqs[5000:])
write(f"{d}/train.bin", train)
write(f"{d}/val.bin", val)
bad = train.copy(); bad[100] = 299
write(f"{d}/bad_range.bin", bad, V=299)          # a token id >= V
write(f"{d}/bad_trunc.bin", train, word4=len(train) + 10)  # says more tokens than it holds
write(f"{d}/tiny_data.bin", train[:50])          # fewer than one batch
write(f"{d}/other_vocab.bin", train, V=400)      # another tokenizer's data
#                  V  ctx L  D  H Hd  F  E  K every Fe extra
cfg = ref.Config(300, 64, 4, 32, 2, 16, 64, 4, 2, 2, 48, 1)
ref.write_model(f"{d}/micro.bin", cfg, ref.flatten(cfg, ref.init_params(cfg, 5, router_var=0.02, norm_std=0.0)))
EOF
[ -f $dir/micro.bin ] || { fail "could not make the micro model"; exit 1; }
common="-c $dir/micro.bin -i $dir/train.bin -j $dir/val.bin -z $dir/tok.bin -b 4 -t 32 -v 10 -V 2 -e 10"

# 1. a run of 20 steps, and a run of 10 steps resumed to 20, log the same
#    losses and end with the same files, byte for byte
expect_ok "train 20 steps" ./train $common -n 20 -o $dir/a
expect_ok "train 10 of 20 steps" ./train $common -n 20 -y 10 -o $dir/b
touch $dir/b/state_00000015.bin.tmp $dir/b/model_00000015.bin.tmp   # an interrupted write, left behind
expect_ok "resume to 20" ./train $common -n 20 -r -o $dir/b
if grep -q "resumed from $dir/b/model_00000010.bin" $BUILD/last.log; then
    pass "resume skips half-written checkpoints"
else
    fail "resume did not pick step 10: $(grep resumed $BUILD/last.log)"
fi
if cmp -s <(cut -f1-7,12,13 $dir/a/log.tsv) <(cut -f1-7,12,13 $dir/b/log.tsv) \
   && cmp -s $dir/a/model_00000020.bin $dir/b/model_00000020.bin \
   && cmp -s $dir/a/state_00000020.bin $dir/b/state_00000020.bin; then
    pass "resume is bit-exact: losses, model and optimizer state"
else
    fail "resume is not bit-exact"
fi
if [ "$(wc -l < $dir/a/log.tsv)" -eq 21 ] && head -1 $dir/a/log.tsv | grep -q "^step	loss	ce	lb	rz	lz	dropped"; then
    pass "log.tsv has a header and one row per step"
else
    fail "log.tsv layout"
fi
# the same seed gives the same run; another seed another
./train $common -n 3 -s 7 -o $dir/s1 > /dev/null; ./train $common -n 3 -s 7 -o $dir/s2 > /dev/null
./train $common -n 3 -s 8 -o $dir/s3 > /dev/null
if cmp -s <(cut -f2 $dir/s1/log.tsv) <(cut -f2 $dir/s2/log.tsv) && ! cmp -s <(cut -f2 $dir/s1/log.tsv) <(cut -f2 $dir/s3/log.tsv); then
    pass "a seed fixes the run"
else
    fail "seeds: same seed differs or other seed matches"
fi

# 2. greedy generation equals the argmax of one full forward pass
model=$dir/a/model_00000020.bin
expect_ok "greedy generation matches a full forward (--verify)" ./run $model -z $dir/tok.bin -i "And God said" -n 40 -t 0 --verify
grep "^verify" $BUILD/last.log
expect_ok "sampling with temperature and top-p" ./run $model -z $dir/tok.bin -i "In the beginning" -n 20 -t 0.8 -p 0.9 -s 1

# 3. bad input: a clear message naming the file or flag, a non-zero exit
expect_error "train: missing data file" "no_such.bin: cannot open" ./train $common -i $dir/no_such.bin -o $dir/x
head -c 500 $dir/train.bin > $dir/short.bin
expect_error "train: data file shorter than its header" "short.bin: not a token data file" ./train $common -i $dir/short.bin -o $dir/x
cp $dir/train.bin $dir/magic.bin; printf 'XXXX' | dd of=$dir/magic.bin conv=notrunc status=none
expect_error "train: data file with a bad magic" "magic.bin: bad magic" ./train $common -i $dir/magic.bin -o $dir/x
expect_error "train: truncated data file" "bad_trunc.bin: size" ./train $common -i $dir/bad_trunc.bin -o $dir/x
expect_error "train: token out of range" "bad_range.bin: token 100 is 299, out of range" ./train $common -i $dir/bad_range.bin -j $dir/bad_range.bin -o $dir/x
expect_error "train: too little data for a batch" "fewer than one batch" ./train $common -i $dir/tiny_data.bin -o $dir/x
expect_error "train: model and data vocabularies differ" "the model's vocabulary is 300, the data's" ./train $common -i $dir/other_vocab.bin -j $dir/other_vocab.bin -o $dir/x
expect_error "train: sequence longer than the context" "-t 100 is longer than the model's context 64" ./train $common -t 100 -o $dir/x
expect_error "train: unwritable output directory" "cannot write there" ./train $common -o /proc/openmoe_test
expect_error "train: bad flag value" "-b x: needs a whole number" ./train $common -b x -o $dir/x
cp $model $dir/bad_model.bin; printf 'XXXX' | dd of=$dir/bad_model.bin conv=notrunc status=none
expect_error "run: model with a bad magic" "bad_model.bin: bad magic" ./run $dir/bad_model.bin -z $dir/tok.bin
head -c 9000 $model > $dir/trunc_model.bin
expect_error "run: truncated model" "trunc_model.bin: size 9000 bytes" ./run $dir/trunc_model.bin -z $dir/tok.bin
expect_error "train: truncated model" "trunc_model.bin: size 9000 bytes" ./train $common -c $dir/trunc_model.bin -o $dir/x
expect_error "run: missing model" "cannot open" ./run $dir/no_model.bin -z $dir/tok.bin
expect_error "run: missing tokenizer" "none.bin: cannot open" ./run $model -z $dir/none.bin
spm_train --input=$dir/text.txt --model_prefix=$dir/tok2 --vocab_size=280 --model_type=unigram --num_threads=1 --minloglevel=2 > /dev/null 2>&1
$PYTHON dev/export_tokenizer.py $dir/tok2.model $dir/tok2.bin > /dev/null
expect_error "run: tokenizer vocabulary differs from the model's" "the tokenizer has 280 pieces, but" ./run $model -z $dir/tok2.bin
long=$(head -c 3000 $dir/text.txt | tr '\n' ' ')
expect_error "run: prompt longer than the context" "longer than the model's context 64" ./run $model -z $dir/tok.bin -i "$long"
expect_error "run: --verify needs greedy" "needs greedy" ./run $model -z $dir/tok.bin -t 0.5 --verify
