#!/usr/bin/env bash
# make experiments: the routing variants of SPEC §8 side by side. Trains the
# tiny preset on the KJV data once per variant, with the same steps, seed and
# data order, with routing traces (train -a) at each quarter and the end; then
# dev/analyze_routing.py on each run, and dev/experiments_summary.py writes
# out/experiments/summary.md and its plots.
#
#   bash dev/experiments.sh [STEPS]     (default 800; `make experiments STEPS=N`)
#
# Each variant is its own run directory out/experiments/NAME; a run already
# finished there is kept (delete the directory to retrain it). TRAIN=./train_gpu
# trains on a GPU.
set -eu
cd "$(dirname "$0")/.."
STEPS=${1:-800}
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
while IFS=$'\t' read -r name flags; do
    dir=$OUT/$name
    if [ -f $dir/model_$(printf %08d $STEPS).bin ]; then
        echo "== $name: already trained in $dir (delete it to retrain)"
    else
        echo "== $name: $TRAIN -c tiny -n $STEPS $flags"
        rm -rf $dir
        # shellcheck disable=SC2086  # flags is a list of words
        $TRAIN -c tiny -o $dir -n $STEPS -e $EVERY -v $EVERY -a 32 -s 1337 $flags > $OUT/$name.log
        tail -n 1 $dir/log.tsv | cut -f1-3
    fi
    $PYTHON dev/analyze_routing.py $dir > $OUT/$name.analysis.log
done < $OUT/variants.tsv
$PYTHON dev/experiments_summary.py $OUT
