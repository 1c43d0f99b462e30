# dev/analyze_routing.py on synthetic traces whose answers are known
# (test/make_synthetic_trace.py): routing that is a pure function of token id
# scores 100% and its shuffle far lower; random routing scores what its
# shuffle does; a map equal to the final one from step 100 agrees 100% from
# there; drops of rank 1 in the second half of positions only leave the first
# half at 0 and the top-1 curve at 0. A "perturbed" run changes one routing
# decision for each of these, and its numbers must move. Malformed traces get
# a clear error naming the file.
set -u
source test/lib.sh
BUILD=${BUILD:-build/test}
PYTHON=${PYTHON:-/usr/bin/python3}
dir=$BUILD/analysis
rm -rf "$dir"
mkdir -p "$dir"
for case in pure random perturbed; do
    expect_ok "synthetic $case traces" $PYTHON test/make_synthetic_trace.py $dir/$case $case
    expect_ok "analyze the $case run" $PYTHON dev/analyze_routing.py $dir/$case --tokenizer none
done

# check NAME CASE EXPR: EXPR, a python expression on m = the case's metrics.json, must be true
check() {
    local out
    if out=$($PYTHON - "$dir/$2/analysis/metrics.json" "$3" 2>&1 <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
sp, er, v = m["specialization"], m["early_routing"], m["verdicts"]
drop, drop1 = m["drop_by_position"]["domain0_cf2000"], m["drop_by_position_top1"]["domain0_cf2000"]
ok = eval(sys.argv[2])
print(json.dumps(dict(specialization=[{k: s[k] for k in ("predictability", "shuffled", "predictability_all",
      "entropy_by_id")} for s in sp], early_routing=er, drop=drop, drop_top1=drop1,
      verdicts={k: x["holds"] for k, x in v.items()})))
sys.exit(0 if ok else 1)
PY
    ); then pass "$1"; else fail "$1: $out"; fi
}
# (a) routing a pure function of token id
check "routing by token id alone scores 100%" pure "all(s['predictability'] == 1.0 for s in sp)"
check "its shuffled baseline scores far lower" pure "all(s['shuffled'] < 0.3 for s in sp)"
check "its entropy given token id is 0" pure "all(s['entropy_by_id'] == 0 for s in sp)"
check "one changed decision scores under 100%" perturbed "all(abs(s['predictability'] - (1 - 1 / 2048)) < 1e-9 for s in sp)"
# (b) routing independent of token id
check "random routing scores its shuffle (chance)" random "all(abs(s['predictability'] - s['shuffled']) < 0.05 and s['predictability'] < 0.4 for s in sp)"
check "ids seen once count only among all ids" random "all(s['predictability_all'] > s['predictability'] + 0.02 for s in sp)"
# (c) the map is the final one from step 100 on
check "the map agrees 100% from the step it is fixed" pure "all([a for _, a, _ in c] [1:] == [1.0, 1.0] and c[0][1] < 0.5 for c in er)"
check "one id mapped elsewhere agrees under 100%" perturbed "all(0.9 < c[1][1] < 1 and c[2][1] == 1.0 for c in er)"
# (d) drops only in the second half of positions, of rank 1 only
check "no drops in the first half of positions" pure "drop[:8] == [0.0] * 8"
check "half the assignments dropped in the second half" pure "drop[8:] == [0.5] * 8"
check "no top-1 drops" pure "drop1 == [0.0] * 16"
check "one top-1 drop at position 0 shows in the first bin" perturbed "drop[0] > 0 and drop1[0] > 0 and drop1[1:] == [0.0] * 15"
# verdicts
check "verdicts of the pure run: all three hold" pure "v['specialization']['holds'] and v['early_routing']['holds'] and v['drop_towards_end']['holds']"
check "verdicts of the random run: no specialisation, no early verdict" random "v['specialization']['holds'] is False and v['early_routing']['holds'] is None"
for f in specialization.png early_routing.png drop_position.png summary.md; do
    if [ -s $dir/pure/analysis/$f ]; then pass "writes $f"; else fail "no $f"; fi
done
n=$(grep -c '^\*\*Verdict: ' $dir/pure/analysis/summary.md)
if [ "$n" = 3 ]; then pass "summary states three verdicts"; else fail "summary states $n verdicts"; fi

# malformed traces
t=$dir/pure/trace
head -c 3000 $t/s00000200_d0_cf2000.bin > $t/s00000300_d0_cf2000.bin
expect_error "a truncated trace is rejected" "s00000300_d0_cf2000.bin: size 3000 bytes" $PYTHON dev/analyze_routing.py $dir/pure --tokenizer none
printf 'XXXX' | dd of=$t/s00000300_d0_cf2000.bin conv=notrunc status=none
expect_error "a trace with a bad magic is rejected" "s00000300_d0_cf2000.bin: bad magic" $PYTHON dev/analyze_routing.py $dir/pure --tokenizer none
cp $t/s00000200_d0_cf2000.bin $t/s00000300_d0_cf2000.bin
expect_error "a trace whose header contradicts its name is rejected" "s00000300_d0_cf2000.bin: its header says step 200" $PYTHON dev/analyze_routing.py $dir/pure --tokenizer none
expect_error "a run without traces gets a clear message" "holds no trace files" $PYTHON dev/analyze_routing.py $dir/none
