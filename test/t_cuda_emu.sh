#!/usr/bin/env bash
# The CUDA backend's NaN handling, on the CPU through dev/cuda_emu (build/emu/test_emu;
# the whole emulated suite is dev/cuda_emu/test.sh, outside make test): a model with NaNs,
# one forward and backward through test_cpu and test_emu, each writing what it computed
# (-o), must agree:
#   - NaN router probabilities (a NaN router weight) under the drop policy probs, with
#     capacity 2 of 16: the same assignments kept, seen as the same logit rows NaN (a
#     dropped token keeps its residual). The GPU ranks the assignments by the CPU's keys
#     (probs_key); its float compares gave every NaN assignment place 0, all kept;
#   - NaN logits (a NaN row of lm_head, no target on it): a NaN cross-entropy on both
#     (the GPU's logsumexp skipped NaNs and reported a finite loss).
# And, in bf16 mode, a batch whose B*H passes the flash kernels' grid limit (65535 in y,
# which the emulator enforces as the GPU does) takes the cuBLAS attention instead of
# failing to launch. And SPEC §10's packed rows (segments, padding, positions): the
# reference cases packed (Hd 8: the cuBLAS attention in both modes) and packed_long (Hd 16,
# examples that start in a later 64-token tile: the flash kernels in bf16 mode) against
# test/reference.py, fp32 at SPEC §7's tolerances, bf16 at test/g_gpu.sh's. And run_emu on
# model files of versions 2 and 3 (SPEC §11), which the CUDA backend uploads as its bf16
# copy with no fp32 copy of the weights: its prefill and decode against one full forward
# (--verify, the argmax), the prompt one routing group.
set -u
source test/lib.sh
BUILD=${BUILD:-build/test}
PY=${PYTHON:-/usr/bin/python3}
mkdir -p "$BUILD"
S=$BUILD/cuda_emu
rm -rf "$S"
mkdir -p "$S"
if ! command -v "${CXX:-g++}" > /dev/null; then
    echo "SKIP cuda_emu: no ${CXX:-g++}"
    exit 0
fi
if ! make -s test_cpu > "$S/make.log" 2>&1 || ! bash dev/cuda_emu/build.sh test_emu run_emu > "$S/emu_build.log" 2>&1; then
    fail "cuda_emu: build failed: $(tail -n 3 "$S/make.log" "$S/emu_build.log" | tr '\n' ' ')"
    exit 0
fi

# micro models (SPEC §6: V 32, ctx 16, L 2 with layer 1 MoE, D 16, E 4, K 2) and a batch of 2 x 8 (SPEC §7)
$PY - "$S" <<'PY'
import sys, numpy as np
d = sys.argv[1]
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [32, 16, 2, 16, 2, 8, 32, 4, 2, 2, 16, 0]
HD = H * Hd
dense, attn = 4 * F * D, 2 * D + 4 * HD * D
n = 2 * V * D + D + attn + dense + attn + E * D + 4 * E * Fe * D
router = V * D + attn + dense + D + 4 * HD * D + D  # layer 1's router [E, D], after its attention and mlp_norm
rng = np.random.default_rng(7)
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
for name, at in (("nan_router", router), ("nan_logits", n - V * D + 5 * D)):  # lm_head row 5
    w = rng.normal(0, 0.2, n).astype(np.float32)
    w[at:at + (1 if name == "nan_router" else D)] = np.nan
    open(f"{d}/{name}.model.bin", "wb").write(h.tobytes() + w.tobytes())
# wide: H = 4096 heads of 16 (flash kernels exist for Hd 16), batches of 16 x 1: B*H = 65536
cw = [32, 16, 1, 16, 4096, 16, 32, 4, 2, 2, 16, 0]
nw = 2 * 32 * 16 + 16 + 2 * 16 + 4 * 4096 * 16 * 16 + 4 * 32 * 16
h[:14] = [240201739, 1] + cw
open(f"{d}/wide.model.bin", "wb").write(h.tobytes() + rng.normal(0, 0.2, nw).astype(np.float32).tobytes())
s = np.zeros(256, np.int32)
s[:12] = [240201740, 1, 16, 1, 1250, 4, 10000, 100, 100, 4096, 0, 0]
open(f"{d}/wide.state.bin", "wb").write(s.tobytes() + rng.integers(0, 32, 32).astype(np.int32).tobytes()
                                        + np.zeros(16 * 32 + 8 + nw, np.float32).tobytes())
B, T = 2, 8
x = rng.integers(0, V, B * T).astype(np.int32)
y = (rng.integers(6, V, B * T)).astype(np.int32)  # no target on the NaN row 5
for name, cf, policy in (("probs", 500, 1), ("plain", 1250, 0)):
    s = np.zeros(256, np.int32)  # B, T, cf1000, min_capacity, coefs e6, group, capacity rule, drop policy
    s[:12] = [240201740, 1, B, T, cf, 1, 10000, 100, 100, 16, 0, policy]
    open(f"{d}/{name}.state.bin", "wb").write(s.tobytes() + x.tobytes() + y.tobytes()
                                            + np.zeros(B * T * V + 8 + n, np.float32).tobytes())
PY
# agree CPU EMU: the debug states written by -o (x, y, logits, losses; SPEC §7) agree: NaN at the
# same logits (the tokens an expert kept with a NaN weight; a dropped token keeps its residual), the
# others within 1e-4 (1 + |cpu|); a NaN cross-entropy on both; the same dropped share
agree() {
    $PY - "$@" <<'PY'
import sys, numpy as np
BT, V = 16, 32
(la, a), (lb, b) = ((np.fromfile(p, np.float32, BT * V, offset=1024 + 8 * BT),
                     np.fromfile(p, np.float32, 8, offset=1024 + 8 * BT + 4 * BT * V)) for p in sys.argv[1:])
nan_rows = lambda l: "".join("N" if np.isnan(r).any() else "." for r in l.reshape(BT, V))
print(f"cpu: ce {a[1]} dropped {a[5]}, NaN logit rows {nan_rows(la)}")
print(f"emu: ce {b[1]} dropped {b[5]}, NaN logit rows {nan_rows(lb)}")
same_nan = (np.isnan(la) == np.isnan(lb)).all()
close = np.allclose(lb[~np.isnan(la)], la[~np.isnan(la)], rtol=1e-4, atol=1e-4)
sys.exit(0 if same_nan and close and np.isnan([a[1], b[1]]).all() and a[5] == b[5] else 1)
PY
}
for run in nan_router:probs nan_logits:plain; do
    m=$S/${run%:*}.model.bin st=$S/${run#*:}.state.bin
    ./test_cpu $m $st -o $S/${run%:*}.cpu.bin > $S/${run%:*}.cpu.log 2>&1
    build/emu/test_emu $m $st -o $S/${run%:*}.emu.bin > $S/${run%:*}.emu.log 2>&1
done
for check in "nan_router:NaN router probabilities, drop policy probs: the CPU's assignments kept, NaN loss" \
    "nan_logits:NaN logits: a NaN cross-entropy on the CPU and the emulated GPU"; do
    name=${check%%:*}
    agree $S/$name.cpu.bin $S/$name.emu.bin > $S/$name.agree 2>&1 && pass "cuda_emu: ${check#*:}" || fail "cuda_emu: ${check#*:}"
    cat $S/$name.agree
done
build/emu/test_emu $S/wide.model.bin $S/wide.state.bin --bf16 > $S/wide.log 2>&1; rc=$?
if [ $rc -lt 128 ] && grep -q "^losses: total [0-9]" $S/wide.log; then
    pass "cuda_emu: bf16, B*H = 65536 heads of 16: the cuBLAS attention, not a flash grid of 65536 in y"
else
    fail "cuda_emu: bf16, B*H = 65536 (exit $rc): $(grep -m1 'cuda_emu\|error' $S/wide.log)"
fi

cases=$BUILD/cases
[ -f $cases/packed_long.state.bin ] || $PY test/reference.py $cases > $S/reference.log 2>&1
for name in packed packed_long; do
    M=$cases/$name.model.bin ST=$cases/$name.state.bin
    expect_ok "cuda_emu: fp32 $name (segments, padding, positions) against the reference" build/emu/test_emu $M $ST
    expect_ok "cuda_emu: bf16 $name against the reference (200x)" build/emu/test_emu $M $ST --bf16 --tol-scale 200
done

# run_emu on versions 1, 2 and 3 of a micro model (V 256, L 2, D 32, E 4; G 16)
spm_train --input=tokenizer.bin-spec --model_prefix=$S/tok --vocab_size=200 --model_type=unigram \
    --character_coverage=0.995 --minloglevel=2 > $S/spm.log 2>&1 && $PY dev/export_tokenizer.py $S/tok.model $S/tok.bin \
    > /dev/null || fail "cuda_emu: a tokenizer: $(tail -2 $S/spm.log)"
$PY - "$S" <<'PY'
import sys, numpy as np
V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c = [256, 32, 2, 32, 2, 16, 48, 4, 2, 2, 32, 1]
n = 2 * V * D + D + (2 * D + 4 * H * Hd * D + 4 * F * D) + (2 * D + 4 * H * Hd * D + E * D + 4 * E * Fe * D + D + 4 * F * D)
h = np.zeros(256, np.int32)
h[:14] = [240201739, 1] + c
open(sys.argv[1] + "/micro.bin", "wb").write(h.tobytes() + np.random.default_rng(3).normal(0, 0.3, n).astype(np.float32).tobytes())
PY
$PY dev/convert_model.py $S/micro.bin $S/micro_bf16.bin --dtype bf16 > /dev/null &&
    $PY dev/convert_model.py $S/micro.bin $S/micro_int8.bin --dtype int8 --group 16 > /dev/null || fail "cuda_emu: convert"
for v in micro micro_bf16 micro_int8; do
    expect_ok "cuda_emu: run_emu --verify on $v.bin, the prompt one routing group" \
        build/emu/run_emu $S/$v.bin -z $S/tok.bin -i "the model file" -t 0 -n 12 --verify --prompt-routing group
done
