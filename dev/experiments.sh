#!/usr/bin/env bash
# make experiments: the routing variants of SPEC §8 side by side, then UL2
# against causal LM on a long run. Trains the tiny preset on the KJV data once
# per variant, with the same steps, seed and data order, with routing traces
# (train -a) at each quarter and the end. Then twice for LONG_STEPS steps with
# the same seed, data and batch (equal tokens), validating every 2% of the
# steps and tracing the routing every 10%: causal LM throughout ("long", whose
# traces judge Early Routing Learning on a run long enough for it), and SPEC
# §10's UL2 for the first half, causal LM after ("ul2", as OpenMoE-8B
# switched). dev/analyze_routing.py on each run, and dev/experiments_summary.py
# writes out/experiments/summary.md and its plots (experiments.png, ul2.png).
#
#   bash dev/experiments.sh [STEPS]     (default 800; `make experiments STEPS=N`)
#   LONG_STEPS=N                        (default 5000; `make experiments LONG_STEPS=N`)
#
# Each variant is its own run directory out/experiments/NAME; a run already
# finished there is kept (delete the directory to retrain it). TRAIN=./train_gpu
# trains on a GPU.
set -eu
cd "$(dirname "$0")/.."
STEPS=${1:-800}
LONG=${LONG_STEPS:-5000}
TRAIN=${TRAIN:-./train}
PYTHON=${PYTHON:-/usr/bin/python3}
OUT=out/experiments
FREEZE=$((STEPS / 10 > 0 ? STEPS / 10 : 1))
EVERY=$((STEPS / 4 > 0 ? STEPS / 4 : 1))
[ -f data/kjv/train.bin ] || { echo "error: data/kjv/train.bin missing: run make data first" >&2; exit 1; }
mkdir -p $OUT
# name | flags (one line each; the summary reads the same list from variants.tsv)
cat > $OUT/variants.tsv <<EOF
default	
dropless	--capacity none
colossalai	--capacity colossalai
probs	--drop-policy probs
freeze	--freeze-router $FREEZE
bias	--router-bias 0.001
EOF
# the objectives over LONG steps: name | flags
cat > $OUT/objectives.tsv <<EOF
long	
ul2	--objective ul2 --ul2-steps $((LONG / 2))
EOF
# train NAME N FLAGS...: tiny for N steps into $OUT/NAME, unless done; then its routing analysis
train() {
    local name=$1 n=$2 dir=$OUT/$1
    shift 2
    if [ -f $dir/model_$(printf %08d $n).bin ]; then
        echo "== $name: already trained in $dir (delete it to retrain)"
    else
        echo "== $name: $TRAIN -c tiny -n $n $*"
        rm -rf $dir
        $TRAIN -c tiny -o $dir -n $n -a 32 -s 1337 "$@" > $OUT/$name.log
        tail -n 1 $dir/log.tsv | cut -f1-3
    fi
    $PYTHON dev/analyze_routing.py $dir > $OUT/$name.analysis.log
}
while IFS=$'\t' read -r name flags; do
    # shellcheck disable=SC2086  # flags is a list of words
    train $name $STEPS -e $EVERY -v $EVERY $flags
done < $OUT/variants.tsv
while IFS=$'\t' read -r name flags; do
    # shellcheck disable=SC2086
    train $name $LONG -e $((LONG / 10 > 0 ? LONG / 10 : 1)) -v $((LONG / 50 > 0 ? LONG / 50 : 1)) $flags
done < $OUT/objectives.tsv
$PYTHON dev/experiments_summary.py $OUT
