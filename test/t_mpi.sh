#!/usr/bin/env bash
# Data-parallel training (train.c's data parallelism, build/train_mpi) with
# mpirun on the CPU backend, one thread per rank, on a micro model:
#
#   - 2 ranks with batch -b 4 (2 windows each) give the losses of one rank
#     (./train, no MPI) with -b 4, step for step within SPEC §7's tolerance
#     |a-b| <= 1e-4 (1+|b|) (routing groups -q 64 = one rank's 2 x 32 tokens);
#   - two 2-rank runs give identical logs (but the timing) and identical
#     model and state files;
#   - stop (-y) and resume (-r) on 2 ranks continue bit for bit; a 2-rank
#     checkpoint resumes on 1 rank (ZeRO-1 shards gathered into the usual
#     files and split again) within the tolerance; the same for Adafactor,
#     resumed by ./train (no MPI); the router bias and freeze (SPEC §8) on
#     2 ranks follow 1 rank;
#   - bad input: a batch the ranks do not divide, ranks with different flags
#     or data files, a checkpoint of another batch, a rank that fails alone:
#     a clear message and a non-zero exit, never a hang;
#   - the README's `make -B train MPI=1` builds with MPI (also with CFLAGS given),
#     and a ./train built without MPI refuses to run as one of several ranks.
set -u
source test/lib.sh
BUILD=${BUILD:-build/test}
PY=${PYTHON:-/usr/bin/python3}
ROOT=$(pwd)
if ! command -v mpirun > /dev/null || ! command -v mpicc > /dev/null; then
    echo "SKIP mpi: mpirun or mpicc missing (apt-get install openmpi-bin libopenmpi-dev)"
    exit 0
fi
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
S=$BUILD/mpi
rm -rf "$S"
mkdir -p "$S"
if ! make -s train build/train_mpi > "$S/make.log" 2>&1; then
    fail "mpi: make train build/train_mpi failed: $(tail -3 "$S/make.log" | tr '\n' ' ')"
    exit 0
fi
TRAIN=$ROOT/train
TMPI=$ROOT/build/train_mpi
# as root, in containers (no cross-memory attach between ranks), one thread per rank
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
MPIRUN=(timeout 120 mpirun --oversubscribe -x OMP_NUM_THREADS -x OMP_WAIT_POLICY)
cd "$S"

# token files of a noisy repeating pattern (vocabulary 256) and a micro model (SPEC §6)
$PY - <<'EOF'
import numpy as np
r = np.random.default_rng(1)
def tokens(path, n):
    ids = np.array([3 + (7 * i + 3 * j + int(r.integers(0, 2))) % 253 for i in range(n) for j in range(12)])
    h = np.zeros(256, np.int32); h[:5] = [240201741, 1, 2, 256, len(ids)]
    open(path, "wb").write(h.tobytes() + ids.astype(np.uint16).tobytes())
tokens("train.bin", 1500); tokens("val.bin", 200); tokens("train2.bin", 1400)
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = 256, 64, 2, 32, 2, 16, 64, 4, 2, 2, 48, 0
mat = lambda *s: r.normal(0, (0.1 / s[-1]) ** 0.5, s)
t = [r.normal(0, 1, (V, D))]
for l in range(L):
    t += [np.ones(D), mat(H * Hd, D) / Hd ** 0.5, mat(H * Hd, D), mat(H * Hd, D), mat(D, H * Hd), np.ones(D)]
    t += [mat(2 * F, D), mat(F, D), mat(D, F)] if (l + 1) % every else \
         [r.normal(0, 0.02, (E, D)), mat(E, 2 * Fe, D), mat(E, Fe, D), mat(E, D, Fe)]
t += [np.ones(D), mat(V, D)]
h = np.zeros(256, np.int32); h[:14] = [240201739, 1, V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra]
open("micro.bin", "wb").write(h.tobytes() + np.concatenate([x.ravel() for x in t]).astype(np.float32).tobytes())
EOF
COMMON=(-c micro.bin -i train.bin -j val.bin -b 4 -t 32 -n 8 -l 0.02 -e 4 -v 4 -V 2 -q 64 -s 7)

# same_losses A B: the loss columns (loss ce lb rz lz dropped, val_ce val_loss) of two
# log.tsv files agree step for step within 1e-4 (1 + |b|)
same_losses() {
    $PY - "$1" "$2" <<'EOF'
import sys, numpy as np
a, b = (np.genfromtxt(p, names=True, delimiter="\t") for p in sys.argv[1:3])
if len(a) != len(b): sys.exit(f"{len(a)} rows against {len(b)}")
worst = 0.0
for col in ("loss", "ce", "lb", "rz", "lz", "dropped", "val_ce", "val_loss"):
    x, y = a[col], b[col]
    ok = np.isnan(x) == np.isnan(y)
    d = np.where(np.isnan(y), 0.0, np.abs(x - y) / (1 + np.abs(y)))
    if not ok.all() or (d > 1e-4).any(): sys.exit(f"{col}: {x} against {y}")
    worst = max(worst, np.nanmax(d))
print(f"worst relative loss difference {worst:.2e}")
EOF
}
# no_timing LOG: log.tsv without the ms and tok_s columns
no_timing() { cut -f 1-9,12- "$1"; }

# --- 2 ranks against 1 -------------------------------------------------------------------
expect_ok "mpi: 1 rank (./train, no MPI), batch 4" "$TRAIN" "${COMMON[@]}" -o one
expect_ok "mpi: 2 ranks, batch 4 (2 per rank)" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o two
expect_ok "mpi: 2 ranks give 1 rank's losses step for step (tolerance 1e-4 (1+|b|))" \
    same_losses two/log.tsv one/log.tsv
cat "$BUILD/last.log"
expect_ok "mpi: 2 ranks again" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o two_b
if cmp -s <(no_timing two/log.tsv) <(no_timing two_b/log.tsv) && cmp -s two/model_00000008.bin two_b/model_00000008.bin &&
    cmp -s two/state_00000008.bin two_b/state_00000008.bin; then
    pass "mpi: two 2-rank runs are bit-identical (log, model, state)"
else
    fail "mpi: two 2-rank runs differ"
fi

# --- stop and resume ------------------------------------------------------------------
expect_ok "mpi: 2 ranks stop after step 4 (-y 4)" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o res -y 4
expect_ok "mpi: 2 ranks resume (-r) to step 8" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o res -r
if cmp -s <(no_timing two/log.tsv) <(no_timing res/log.tsv) && cmp -s two/model_00000008.bin res/model_00000008.bin &&
    cmp -s two/state_00000008.bin res/state_00000008.bin; then
    pass "mpi: stop and resume on 2 ranks continue bit for bit"
else
    fail "mpi: stop and resume on 2 ranks differ from the straight run"
fi
mkdir -p one_res
cp res/model_00000004.bin res/state_00000004.bin one_res/
head -n 5 res/log.tsv > one_res/log.tsv
expect_ok "mpi: a 2-rank checkpoint resumes on 1 rank" "${MPIRUN[@]}" -np 1 "$TMPI" "${COMMON[@]}" -o one_res -r
expect_ok "mpi: ... and continues with the 2-rank run's losses" same_losses one_res/log.tsv two/log.tsv

# Adafactor: its state is per tensor, so the shards are whole tensors
expect_ok "mpi: Adafactor, 1 rank" "$TRAIN" "${COMMON[@]}" -x adafactor -l 0.01 -o one_af
expect_ok "mpi: Adafactor, 2 ranks stop after step 4" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -x adafactor -l 0.01 \
    -o two_af -y 4
expect_ok "mpi: Adafactor, 2-rank checkpoint resumed on 1 rank" "$TRAIN" "${COMMON[@]}" -x adafactor -l 0.01 -o two_af -r
expect_ok "mpi: Adafactor, 2 ranks then 1 give 1 rank's losses" same_losses two_af/log.tsv one_af/log.tsv

# routing variants (SPEC §8): the loss-free balancing bias moves by all ranks' loads, the router freezes
VAR=(--router-bias 0.01 --freeze-router 4)
expect_ok "mpi: router bias and freeze, 1 rank" "$TRAIN" "${COMMON[@]}" "${VAR[@]}" -o one_var
expect_ok "mpi: router bias and freeze, 2 ranks" "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" "${VAR[@]}" -o two_var
expect_ok "mpi: router bias and freeze, 2 ranks give 1 rank's losses" same_losses two_var/log.tsv one_var/log.tsv

# --- bad input ------------------------------------------------------------------------
expect_error "mpi: -b 3 on 2 ranks is refused" "does not split over 2 ranks" \
    "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o bad -b 3
expect_error "mpi: ranks with different flags are refused" "ranks differ in their flags" \
    "${MPIRUN[@]}" -np 1 "$TMPI" "${COMMON[@]}" -o bad : -np 1 "$TMPI" "${COMMON[@]}" -o bad -s 8
mkdir -p a b
cp micro.bin val.bin a/ && cp micro.bin val.bin b/ && cp train.bin a/ && cp train2.bin b/train.bin
expect_error "mpi: ranks with different data files (same flags) are refused" "ranks differ in their flags or the sizes" \
    "${MPIRUN[@]}" -np 1 -wdir a "$TMPI" "${COMMON[@]}" -o bad : -np 1 -wdir b "$TMPI" "${COMMON[@]}" -o bad
expect_error "mpi: a checkpoint of another batch is refused on 2 ranks" "saved with -b 4, this run has -b 8" \
    "${MPIRUN[@]}" -np 2 "$TMPI" "${COMMON[@]}" -o res -r -b 8
expect_error "mpi: a rank that fails alone brings the job down" "missing.bin" \
    "${MPIRUN[@]}" -np 1 "$TMPI" "${COMMON[@]}" -o bad : -np 1 "$TMPI" "${COMMON[@]/train.bin/missing.bin}" -o bad

# --- builds with and without MPI (issue 27, finding 2) ---------------------------------------
mpi_build_ok=1
for flags in "" "CFLAGS=-O2"; do
    # shellcheck disable=SC2086  # flags is one word or none
    make -C "$ROOT" -n -B train MPI=1 $flags 2> /dev/null | grep -q "^mpicc .* -DUSE_MPI .*-o train " || mpi_build_ok=0
done
[ $mpi_build_ok = 1 ] && pass "mpi: make -B train MPI=1 (and with CFLAGS=...) compiles ./train with mpicc -DUSE_MPI" ||
    fail "mpi: make -B train MPI=1 builds ./train without -DUSE_MPI: $(make -C "$ROOT" -n -B train MPI=1 2>&1 | grep -- '-o train ')"
expect_error "mpi: ./train built without MPI refuses to run as one of 2 ranks" \
    "built without MPI, but OMPI_COMM_WORLD_SIZE=2" "${MPIRUN[@]}" -np 2 "$TRAIN" "${COMMON[@]}" -o nompi
[ ! -e nompi/log.tsv ] && pass "mpi: ... and writes nothing" || fail "mpi: the refused ./train wrote nompi/log.tsv"
expect_ok "mpi: ./train built without MPI runs as 1 rank under mpirun" "${MPIRUN[@]}" -np 1 "$TRAIN" "${COMMON[@]}" \
    -n 1 -o nompi1
