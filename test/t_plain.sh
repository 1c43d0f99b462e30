#!/usr/bin/env bash
# The plain build (make PLAIN=1: openmoe.c's plain matrix products in place of
# gemm.c) against the normal one. Both compute every output element as one
# chain of multiply-adds in k order (gemm.h), so 30 steps of tiny from the
# same seed and data must write the same model file, byte for byte, the same
# losses and the same sample (model_decode), whatever the thread counts (the
# plain build runs on one, the other on two). The batch is small: the plain
# loops are slow.
set -u
source test/lib.sh
PY=${PYTHON:-/usr/bin/python3}
in_scratch plain build/plain/train build/fast/train

# a token data file (tokenizer.bin-spec §2) of tiny's vocabulary: a pattern with noise
$PY - <<'EOF'
import numpy as np
r = np.random.default_rng(3)
ids = (3 + (np.arange(20000) * 37 + r.integers(0, 5, 20000)) % 4093).astype(np.uint16)
h = np.zeros(256, np.int32)
h[:5] = [240201741, 1, 2, 4096, len(ids)]
open("tokens.bin", "wb").write(h.tobytes() + ids.tobytes())
EOF

for kind in plain fast; do
    threads=1
    [ $kind = fast ] && threads=2
    OMP_NUM_THREADS=$threads "$ROOT/build/$kind/train" -c tiny -i tokens.bin -j tokens.bin -b 2 -t 32 -n 30 -l 0.02 \
        -e 30 -v 30 -V 1 -s 7 -o $kind > $kind.out 2>&1 || { tail -3 $kind.out; fail "plain: the $kind build's training failed"; exit 0; }
    cut -f 1-9,12- $kind/log.tsv > $kind.losses  # all but the timings (ms, tok_s)
    grep '^sample: ' $kind.out > $kind.sample
done
if cmp -s plain/model_00000030.bin fast/model_00000030.bin; then
    pass "plain: 30 steps of tiny write the same model file in the plain and the gemm.c build"
else
    fail "plain: the plain and the gemm.c build's model files differ after 30 steps of tiny"
fi
if cmp -s plain.losses fast.losses && [ -s plain.sample ] && cmp -s plain.sample fast.sample; then
    pass "plain: the same losses at every step and the same sample"
else
    fail "plain: the losses or the sample differ: $(diff plain.losses fast.losses | head -2 | tr '\n' ' ')"
fi
