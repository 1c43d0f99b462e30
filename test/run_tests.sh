#!/usr/bin/env bash
# Runs every test script test/t_*.sh (or, with "gpu", test/g_*.sh) and counts
# its verdict lines: "PASS name", "FAIL name", "SKIP name". Ends with one line
# "N passed, M failed" and exits non-zero when anything failed.
set -u
cd "$(dirname "$0")/.."
pattern="test/t_*.sh"
[ "${1:-}" = gpu ] && pattern="test/g_*.sh"
export PYTHON=${PYTHON:-/usr/bin/python3}
export BUILD=${BUILD:-build/test}
mkdir -p "$BUILD"
pass=0 fail=0 skip=0
for t in $pattern; do
    echo "== $t"
    log="$BUILD/$(basename "$t" .sh).log"
    bash "$t" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    p=$(grep -c '^PASS ' "$log"); f=$(grep -c '^FAIL ' "$log"); s=$(grep -c '^SKIP ' "$log")
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $t exited with status $status"
        f=1
    fi
    pass=$((pass + p)); fail=$((fail + f)); skip=$((skip + s))
done
if [ "$skip" -gt 0 ]; then
    echo "$pass passed, $fail failed, $skip skipped"
else
    echo "$pass passed, $fail failed"
fi
[ "$fail" -eq 0 ]
