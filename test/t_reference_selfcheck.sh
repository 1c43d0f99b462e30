#!/usr/bin/env bash
# The PyTorch reference checks itself (test/reference.py --selfcheck):
#   - fp32 against fp64 on every test case, under SPEC §7's tolerances, with
#     at least 100x headroom (the worst tolerance/error ratio is printed);
#   - the vectorised router against a plain loop, and fp32 routing == fp64;
#   - the comparison catches a perturbed gradient (one element off by
#     1e-3*max), a perturbed expert slice, logit, loss and dropped fraction;
#   - file round trips, determinism of the cases, AdamW against
#     torch.optim.AdamW, Adafactor's factored path against its per-element one.
# The reference prints its own PASS/FAIL lines; this script adds a FAIL when
# it crashes or prints no verdict.
cd "$(dirname "$0")/.." || exit 1
source test/lib.sh
PYTHON=${PYTHON:-/usr/bin/python3}

if ! "$PYTHON" -c 'import torch, numpy' 2>/dev/null; then
    echo "SKIP reference selfcheck ($PYTHON has no torch/numpy)"
    exit 0
fi
out=$("$PYTHON" test/reference.py --selfcheck 2>&1)
rc=$?
echo "$out"
if [ $rc -ne 0 ] && ! echo "$out" | grep -q '^FAIL '; then
    fail "reference selfcheck exited with status $rc: $(echo "$out" | tail -3)"
fi
if ! echo "$out" | grep -q '^PASS reference fp32-vs-fp64'; then
    fail "reference selfcheck printed no fp32-vs-fp64 PASS"
fi

# The GPU bench's PyTorch model (dev/bench_gpu.py) computes the reference's
# math its own way; its check runs on the CPU in float64, so that a change of
# the reference cannot break it unseen (one did: reference.capacity's arguments)
expect_ok "dev/bench_gpu.py check: its MoE layer and loss equal the reference's" "$PYTHON" dev/bench_gpu.py check
exit 0
