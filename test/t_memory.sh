#!/usr/bin/env bash
# Memory follows what a model uses (openmoe.h's activation tables): a width
# no layer has allocates nothing. Two micro models whose files are a few
# hundred KB, one with every layer MoE and no extra FFN (its dense width F
# unused), one without a MoE layer (its expert width Fe unused), each with
# the unused width at 65536, train for two steps in batches of 16 x 64
# under a 1 GB limit of virtual memory. Sized by the unused width, the
# backward's FFN scratch alone would take 2 GB.
set -u
source test/lib.sh
PY=${PYTHON:-/usr/bin/python3}
in_scratch memory train

# model files (SPEC §6) of 2 layers, D 32, their parameters small noise, and a token file
$PY - <<'PY'
import numpy as np
def model(path, F, every, Fe, extra, V=256, ctx=64, L=2, D=32, H=2, Hd=16, E=4, K=2):
    n_moe = L // every
    attn, dense = 2 * D + 4 * H * Hd * D, 4 * F * D
    moe = E * D + 4 * E * Fe * D + (D + dense if extra else 0)
    n = 2 * V * D + D + (L - n_moe) * (attn + dense) + n_moe * (attn + moe)
    h = np.zeros(256, np.int32)
    h[:14] = [240201739, 1, V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra]
    w = np.random.default_rng(5).normal(0, 0.02, n).astype(np.float32)
    open(path, "wb").write(h.tobytes() + w.tobytes())
model("unused_f.bin", F=65536, every=1, Fe=48, extra=0)   # every layer MoE, no extra FFN
model("unused_fe.bin", F=48, every=3, Fe=65536, extra=1)  # no MoE layer
ids = (3 + np.arange(5000) * 7 % 253).astype(np.uint16)
h = np.zeros(256, np.int32)
h[:5] = [240201741, 1, 2, 256, len(ids)]
open("tokens.bin", "wb").write(h.tobytes() + ids.tobytes())
PY

for name in unused_f unused_fe; do
    if (ulimit -v 1000000 && OMP_NUM_THREADS=2 "$ROOT/train" -c $name.bin -i tokens.bin -j tokens.bin -b 16 -t 64 \
        -n 2 -e 0 -v 0 -V 1 -o $name > $name.out 2>&1); then
        pass "memory: $name.bin ($(wc -c < $name.bin) bytes) trains in batches of 16 x 64 within 1 GB"
    else
        fail "memory: $name.bin does not train within 1 GB: $(grep -m1 -i 'error\|memory' $name.out)"
    fi
done

# run holds one copy of a model, the file's pages, mapped: no copy while
# loading, none for decoding. A 403 MB model file (V 65536, D 768, zero
# weights, a sparse file) generates within 1 GB of virtual memory; before
# (issue 29) run read the file into memory, copied it into the model and made
# decode's transposed copy, three copies.
$PY - <<'PY'
import numpy as np
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [65536, 64, 2, 768, 2, 32, 64, 4, 2, 2, 64, 1]
n = 2 * V * D + D + 2 * (2 * D + 4 * H * Hd * D) + 4 * F * D + E * D + 4 * E * Fe * D + D + 4 * F * D
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
with open("wide_vocab.bin", "wb") as f:
    f.write(h.tobytes())
    f.truncate(1024 + 4 * n)
PY
spm_train --input="$ROOT/tokenizer.bin-spec" --model_prefix=tok --vocab_size=200 --model_type=unigram \
    --character_coverage=0.995 --minloglevel=2 > spm.log 2>&1 &&
    $PY "$ROOT/dev/export_tokenizer.py" tok.model tok.bin > /dev/null 2>&1 || fail "memory: a tokenizer: $(tail -2 spm.log)"
if (ulimit -v 1000000 && OMP_NUM_THREADS=2 "$ROOT/run" wide_vocab.bin -z tok.bin -i "abc" -t 0 -n 8 > vocab.out 2>&1); then
    pass "memory: run generates from a $(($(stat -c %s wide_vocab.bin) >> 20)) MB model file within 1 GB"
else
    fail "memory: run on a $(($(stat -c %s wide_vocab.bin) >> 20)) MB model file needs more than 1 GB: $(grep -m1 error vocab.out)"
fi

# run's KV cache and RoPE tables hold the prompt and the tokens asked for, not
# the context (issue 27, finding 5): a model of 77 KB whose context is 2^20
# generates 4 tokens within 300 MB (sized by the context: 1 GB of KV cache)
$PY - <<'PY'
import numpy as np
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [256, 1 << 20, 2, 16, 4, 16, 16, 2, 1, 2, 16, 0]
n = 2 * V * D + D + 2 * (2 * D + 4 * H * Hd * D) + 4 * F * D + E * D + 4 * E * Fe * D
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
w = np.random.default_rng(2).normal(0, 0.1, n).astype(np.float32)
open("long_context.bin", "wb").write(h.tobytes() + w.tobytes())
PY
if (ulimit -v 300000 && OMP_NUM_THREADS=2 timeout 20 "$ROOT/run" long_context.bin -z tok.bin -i "abc" -t 0 -n 4 --verify \
    > context.out 2>&1) && grep -q "^verify: 4/4" context.out; then
    pass "memory: run on a $(($(stat -c %s long_context.bin) >> 10)) KB model with a context of 2^20 generates within 300 MB"
else
    fail "memory: run on a model with a context of 2^20: $(grep -m1 'error\|verify' context.out)"
fi
