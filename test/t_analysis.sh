# dev/analyze_routing.py on synthetic traces whose answers are known: routing
# that is a pure function of token id scores 100% (random routing near
# chance), a map equal to the final one from step 100 agrees 100% from there,
# and drops only in the second half of positions leave the first half at 0.
source test/lib.sh
dir=$BUILD/analysis
rm -rf $dir
mkdir -p $dir/pure/trace $dir/random/trace
$PYTHON - $dir <<'PY'
import sys
import numpy as np
sys.path.insert(0, "dev")
from analyze_routing import write_trace
d = sys.argv[1]
E, K, T, n_seq, n_moe = 8, 2, 64, 32, 2
N = T * n_seq
rng = np.random.default_rng(1)
tokens = rng.integers(0, 50, N)                       # 50 ids, about 40 of each
pos = np.arange(N) % T
def layers(top0):
    expert = np.stack([np.stack([top0, (top0 + 1) % E], 1)] * n_moe)   # [n_moe, N, K]
    prob = np.full(expert.shape, 0.3, np.float32)
    kept = np.ones(expert.shape, bool)
    kept[:, pos >= T // 2, 1] = False                  # rank 1 dropped in the second half only
    return expert, prob, kept
for step, top0 in [(0, rng.integers(0, E, N)), (100, tokens % E), (200, tokens % E)]:
    for domain in (0, 1):
        for cf in (1250, 2000):
            write_trace(f"{d}/pure/trace/s{step:08d}_d{domain}_cf{cf}.bin", step, tokens, *layers(top0), T, E, cf, domain)
for cf in (1250, 2000):
    write_trace(f"{d}/random/trace/s00000000_d0_cf{cf}.bin", 0, tokens, *layers(rng.integers(0, E, N)), T, E, cf, 0)
PY
expect_ok "analyze a pure id-routing run" $PYTHON dev/analyze_routing.py $dir/pure --tokenizer none
expect_ok "analyze a random-routing run" $PYTHON dev/analyze_routing.py $dir/random --tokenizer none
check() {  # check NAME RUN PYTHON-EXPRESSION-ON-m (metrics.json)
    if $PYTHON -c "import json, sys; m = json.load(open('$2/analysis/metrics.json')); sys.exit(0 if ($3) else 1)"; then
        pass "$1"
    else
        fail "$1: $($PYTHON -c "import json; m = json.load(open('$2/analysis/metrics.json')); print($4)")"
    fi
}
check "routing by token id alone scores 100%" $dir/pure "all(s['predictability'] == 1.0 for s in m['specialization'])" "[s['predictability'] for s in m['specialization']]"
check "the shuffled baseline scores far lower" $dir/pure "all(s['shuffled'] < 0.3 for s in m['specialization'])" "[s['shuffled'] for s in m['specialization']]"
check "random routing scores near chance" $dir/random "all(0.12 < s['predictability'] < 0.35 for s in m['specialization'])" "[s['predictability'] for s in m['specialization']]"
check "the map agrees 100% from the step it is fixed" $dir/pure "all(c[1][1] == 1.0 and c[2][1] == 1.0 and c[0][1] < 0.5 for c in m['early_routing'])" "m['early_routing']"
check "no drops in the first half of positions" $dir/pure "all(v == 0 for v in m['drop_by_position']['domain0_cf2000'][:8])" "m['drop_by_position']['domain0_cf2000']"
check "half the assignments dropped in the second half" $dir/pure "all(v == 0.5 for v in m['drop_by_position']['domain0_cf2000'][8:])" "m['drop_by_position']['domain0_cf2000']"
check "verdicts follow the numbers" $dir/pure "m['verdicts']['specialization']['holds'] and m['verdicts']['early_routing']['holds'] and m['verdicts']['drop_towards_end']['holds']" "m['verdicts']"
check "verdict of a random run" $dir/random "not m['verdicts']['specialization']['holds']" "m['verdicts']"
for f in specialization.png early_routing.png drop_position.png summary.md; do
    if [ -s $dir/pure/analysis/$f ]; then pass "writes $f"; else fail "no $f"; fi
done
head -c 3000 $dir/pure/trace/s00000200_d0_cf2000.bin > $dir/pure/trace/s00000300_d0_cf2000.bin
expect_error "a truncated trace is rejected" "s00000300_d0_cf2000.bin: size 3000 bytes" $PYTHON dev/analyze_routing.py $dir/pure --tokenizer none
expect_error "a run without traces gets a clear message" "holds no trace files" $PYTHON dev/analyze_routing.py $dir/none
