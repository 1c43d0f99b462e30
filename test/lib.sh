# shared helpers for test/t_*.sh: verdict lines that test/run_tests.sh counts
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; }
# expect_ok NAME CMD...: passes when CMD exits 0; its output goes to
# $BUILD/last.log and is shown when it fails
expect_ok() {
    local name=$1; shift
    if "$@" > "$BUILD/last.log" 2>&1; then pass "$name"; else tail -20 "$BUILD/last.log"; fail "$name"; fi
}
# expect_error NAME PATTERN CMD...: passes when CMD exits non-zero and its
# stderr matches PATTERN (a clear message, not a crash)
expect_error() {
    local name=$1 pattern=$2; shift 2
    local err rc
    err=$("$@" 2>&1 >/dev/null); rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && echo "$err" | grep -q -- "$pattern"; then
        pass "$name"
    else
        fail "$name (exit $rc, stderr: $(echo "$err" | head -3))"
    fi
}
# in_scratch NAME TARGET...: makes the TARGETs, then works in a fresh $BUILD/NAME
# (S; ROOT: the repository; BUILD made absolute, as expect_ok writes there),
# where no default path (data/kjv/...) points at a real corpus; a failed make
# is a FAIL line and the end of the test
in_scratch() {
    local name=$1; shift
    ROOT=$(pwd)
    mkdir -p "${BUILD:-build/test}" && BUILD=$(cd "${BUILD:-build/test}" && pwd) || { fail "$name: no $BUILD"; exit 0; }
    S=$BUILD/$name
    rm -rf "$S" && mkdir -p "$S" || { fail "$name: cannot make $S"; exit 0; }
    if ! make -s "$@" > "$S/make.log" 2>&1; then
        fail "$name: make $* failed: $(tail -3 "$S/make.log" | tr '\n' ' ')"
        exit 0
    fi
    cd "$S" || exit 0
}
