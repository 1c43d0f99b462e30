"""fuzz.py WORK BIN N SEED [READERS]: the seeded mutation test of every file
reader (READERS: a comma-separated subset of model, debug_state, checkpoint,
tokens, tokenizer, trace).

For each reader: N mutants of one good file (WORK holds the inputs that
test/t_sanitize.sh made), each read by its real program in BIN (one process
per mutant; the sanitizer build in make test), the trace reader
(dev/analyze_routing.py read_trace) in this process. Each mutant is 1-3
changes to one file: a header word set to a nearby or extreme value or next
to another word's value (half the changes), bytes of the payload set or
flipped, or the file cut or extended.

The oracle: an independent check, written from the formats' specifications
(SPEC §6, §7, tokenizer.bin-spec, train.c's checkpoint and trace layouts),
says what a correct reader must do with each mutant:
  accept   the file is still well formed: only payload a reader cannot judge
           changed (parameters, optimizer state, scores, logits, gradients, the
           RNG state and schedule words of a checkpoint, names), or header
           words changed to other valid values (e.g. BPE for unigram);
  refuse   the file breaks its format or does not fit the other inputs;
  either   bytes whose validity no reader can decide without using them (the
           interior of a charsmap's double-array trie).
Outcomes: accepted (exit 0, or for test_cpu exit 0/1 with no "error:" line:
its comparison, not its reader, failed), refused (exit 1 and stderr
"error: PATH:" naming the mutant file; "either" mutants may name the
tokenizer instead), or bad (any other exit, a signal, a sanitizer report, a
timeout, a refusal that does not name the file). A reader passes when no
outcome is bad and every accept/refuse matches the oracle. Prints one
PASS/FAIL line per reader and the counts."""
import os
import random
import shutil
import struct
import subprocess
import sys

import numpy as np

WORK, BIN, N, SEED = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
READERS = sys.argv[5].split(",") if len(sys.argv) > 5 else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "dev"))
INT32_MAX, MAX_SEQ_LEN = 2**31 - 1, 1 << 20
MAX_V, MAX_L, MAX_WIDTH, MAX_E, MAX_K = 1 << 22, 512, 1 << 16, 4096, 32  # openmoe.h's bounds of the header fields
B, T = 2, 16  # the batch test/t_sanitize.sh trains with
TIMEOUT = 60


def words(data, n=256):
    return list(struct.unpack_from(f"<{n}i", data, 0)) if len(data) >= 4 * n else None


# -----------------------------------------------------------------------------
# mutations


def mutate(rng, data, header_words, regions):
    """1-3 changes to data (bytes); header_words: the words a header uses;
    regions: [(start, end)] of payload to pick bytes from."""
    b = bytearray(data)
    if rng.random() < 0.06:  # cut or extend
        return bytes(b[:rng.randrange(len(b))]) if rng.random() < 0.6 else bytes(b + bytes(rng.randrange(1, 64)))
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if rng.random() < 0.5:
            i = rng.choice(header_words) if rng.random() < 0.8 else rng.randrange(256)
            v = struct.unpack_from("<i", b, 4 * i)[0]
            other = struct.unpack_from("<i", b, 4 * rng.choice(header_words))[0]  # near another word's value
            v = rng.choice([0, 1, -1, v + 1, v - 1, v ^ (1 << rng.randrange(31)), 2 * v, INT32_MAX, -2**31,
                            134217732, 16777216, rng.randrange(-2**31, 2**31), other + rng.randint(-1, 1)])
            v = (v + 2**31) % 2**32 - 2**31
            struct.pack_into("<i", b, 4 * i, v)
        else:
            lo, hi = rng.choice(regions)
            if hi <= lo:
                continue
            j = rng.randrange(lo, hi)
            b[j] = rng.randrange(256) if rng.random() < 0.5 else b[j] ^ (1 << rng.randrange(8))
    return bytes(b)


# -----------------------------------------------------------------------------
# oracles: "accept", "refuse" or "either" for a mutant, from the format alone


def config_ok(c):
    V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c
    return (min(c[:11]) > 0 and V <= MAX_V and ctx <= MAX_SEQ_LEN and L <= MAX_L and every <= MAX_L + 1
            and max(D, H, Hd, F, Fe, H * Hd) <= MAX_WIDTH and E <= MAX_E and K <= min(E, MAX_K)
            and Hd % 2 == 0 and extra in (0, 1))


def n_params(c):
    V, ctx, L, D, H, Hd, F, E, K, every, Fe, extra = c
    attn, dense = 2 * D + 4 * H * Hd * D, 4 * F * D
    moe = E * D + 4 * E * Fe * D + (D + dense if extra else 0)
    nm = L // every
    return 2 * V * D + D + (L - nm) * (attn + dense) + nm * (attn + moe)


def model_oracle(d, model_cfg):
    h = words(d)
    if h is None or h[0] != 240201739 or h[1] != 1 or any(h[14:]):
        return "refuse"
    c = h[2:14]
    if not config_ok(c) or len(d) != 1024 + 4 * n_params(c) or c[0] != model_cfg[0]:
        return "refuse"  # c[0]: run needs the tokenizer's vocabulary
    return "accept"


def debug_state_oracle(d, c):
    h = words(d)
    if (h is None or h[0] != 240201740 or h[1] != 1 or h[10] not in (0, 1, 2) or h[11] not in (0, 1)
            or h[12] not in (0, 1) or any(h[13:])):
        return "refuse"  # [10] capacity rule, [11] drop policy (SPEC §7, §8), [12] segments and positions (§10)
    Bs, Ts, cf, mincap, lb, rz, lz, group = h[2:10]
    if Bs <= 0 or Ts <= 0 or Ts > c[1] or cf <= 0 or mincap < 0 or group < 0 or min(lb, rz, lz) < 0:
        return "refuse"
    BT, V, ints = Bs * Ts, c[0], 4 if h[12] else 2
    if len(d) != 1024 + 4 * (ints * BT + BT * V + 8 + n_params(c)):
        return "refuse"
    x, y, seg, pos = (np.frombuffer(d, "<i4", BT, 1024 + 4 * BT * i) for i in (0, 1, 2, 3))
    if h[12] and (seg.min() < -1 or pos.min() < 0 or pos.max() >= c[1]):
        return "refuse"  # a segment below -1 (padding), a position outside the context
    return "accept" if x.min() >= 0 and x.max() < V and y.min() >= -1 and y.max() < V else "refuse"


def checkpoint_oracle(d, good):
    h, g = words(d), words(good)
    rate = lambda w: struct.unpack("<f", struct.pack("<i", w[20]))[0]  # the router bias rate, float32 bits
    # [22..25] the objective, --ul2-steps and the UL2 generator's state: 0 in the good (causal) run's, as the
    # resuming causal run must find them; [26..] reserved
    if (h is None or h[0:6] != g[0:6] or h[8:11] != g[8:11] or h[17:20] != g[17:20] or rate(h) != rate(g)
            or h[21] != g[21] or any(h[22:]) or len(d) != len(good)):
        return "refuse"
    # [6..7] the data RNG, [11..16] the saved schedule (a note); payload: optimizer state and router bias
    return "accept"


def tokens_oracle(d, V):
    h = words(d)
    if h is None or h[0] != 240201741 or h[1] != 1 or any(h[5:]):
        return "refuse"
    nbytes, v, n = h[2:5]
    if nbytes not in (2, 4) or v <= 0 or n <= 0 or (nbytes == 2 and v > 65536) or len(d) != 1024 + n * nbytes:
        return "refuse"
    t = np.frombuffer(d, "<u2" if nbytes == 2 else "<i4", n, 1024)
    if t.min() < 0 or t.max() >= v or v != V or n < B * T + 1:  # train: the model's vocabulary, one batch
        return "refuse"
    return "accept"


def tokenizer_oracle(d, good):
    h = words(d)
    if h is None or h[0] != 240201738 or h[1] != 1:
        return "refuse"
    V, mtype, unk, bos, eos, pad, flags, n_name, n_unk, n_pieces, n_map, dflags, n_demap, maxlen = h[2:16]
    # h[16], the sentinels, is 0 in the good file, whose last pieces are no "\u2581<extra_id_k>": any other refused
    if (V <= 0 or mtype not in (1, 2) or flags & ~31 or dflags & ~7 or min(h[9:16]) < 0 or (n_demap == 0 and dflags)
            or any(h[16:]) or len(d) != 1024 + n_name + n_unk + n_pieces + n_map + n_demap or V * 8 > n_pieces):
        return "refuse"
    if V > words(good)[2]:
        return "refuse"  # run: no more pieces than the model's vocabulary
    p, end = 1024 + n_name + n_unk, 1024 + n_name + n_unk + n_pieces
    pieces, types = [], []
    for _ in range(V):
        if end - p < 7:
            return "refuse"
        typ, n = d[p + 4], d[p + 5] | d[p + 6] << 8
        p += 7
        if n == 0 or end - p < n or typ < 1 or typ > 6 or 0 in d[p:p + n]:
            return "refuse"
        pieces.append(d[p:p + n])
        types.append(typ)
        p += n
    nbytes = sum(t == 6 for t in types)
    if (p != end or max(map(len, pieces)) != maxlen or len(set(pieces)) != V or types.count(2) != 1
            or not (0 <= unk < V and types[unk] == 2)
            or any(not (i == -1 or (0 <= i < V and types[i] == 3)) for i in (bos, eos, pad))
            or nbytes != (256 if flags & 8 else 0)):
        return "refuse"
    hexd = b"0123456789ABCDEF"
    for s, t in zip(pieces, types):
        if t == 6 and not (len(s) == 6 and s[:3] == b"<0x" and s[5:] == b">" and s[3] in hexd and s[4] in hexd):
            return "refuse"
    for at, n in ((end, n_map), (end + n_map, n_demap)):  # charsmap framing: trie size, strings end with NUL
        if n == 0:
            continue
        tb = struct.unpack_from("<I", d, at)[0] if n > 4 else 0
        if n <= 4 or tb == 0 or tb % 4 or tb > n - 4 or (n - 4 - tb > 0 and d[at + n - 1] != 0):
            return "refuse"
    g = words(good)
    if d[end:] != good[1024 + sum(g[9:12]):]:
        return "either"  # the trie's units and strings: used, not checkable
    return "accept"


def trace_oracle(d, name):
    h = words(d)
    if h is None or h[0] != 240201742 or h[1] != 1:
        return "refuse"
    step, nm, E, K, Nt, Tt, cf, group, domain, L = h[2:12]
    if not (0 < nm <= min(L, 240) and 0 < K <= E and Nt > 0 and Tt > 0 and Nt % Tt == 0 and cf > 0 and group >= 0
            and domain in (0, 1) and step >= 0) or len(d) != 1024 + 4 * Nt + nm * Nt * K * 9:
        return "refuse"
    layers = h[16:16 + nm]
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= L or any(h[12:16]) \
            or any(h[16 + nm:]):
        return "refuse"
    if name != f"s{step:08d}_d{domain}_cf{cf}.bin":
        return "refuse"
    tokens = np.frombuffer(d, "<i4", Nt, 1024)
    at = 1024 + 4 * Nt
    for _ in range(nm):
        ex = np.frombuffer(d, "<i4", Nt * K, at)
        if ex.min() < 0 or ex.max() >= E:
            return "refuse"
        at += 9 * Nt * K
    return "accept" if tokens.min() >= 0 else "refuse"


# -----------------------------------------------------------------------------
# running a mutant


def run(cmd, path, stdin=None, quiet_compare=False):
    """-> "accepted", "refused" or "bad: why" (path: the mutant file)."""
    try:
        r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT, cwd=WORK)
    except subprocess.TimeoutExpired:
        return "bad: timeout"
    err = r.stderr.decode(errors="replace")
    if "Sanitizer" in err or "runtime error" in err:
        return "bad: sanitizer: " + err[:300]
    if r.returncode == 0 or (quiet_compare and r.returncode == 1 and "error:" not in err):
        return "accepted"
    if r.returncode == 1 and "error:" in err and path in err:
        return "refused"
    if r.returncode == 1 and "error:" in err:
        return "refused elsewhere: " + err.strip().splitlines()[-1][:200]
    return f"bad: exit {r.returncode}: " + err[-300:]


def campaign(name, good_path, header_words, regions, oracle, execute):
    if READERS and name not in READERS:
        return None
    rng = random.Random(f"{SEED}-{name}")
    good = open(good_path, "rb").read()
    counts, problems = {}, []
    for k in range(N):
        d = mutate(rng, good, header_words, regions)
        want = oracle(d)
        got = execute(d)
        key = f"{want}->{got.split(':')[0]}"
        counts[key] = counts.get(key, 0) + 1
        ok = not got.startswith("bad") and (want == "either" or (want == "accept") == (got == "accepted"))
        if want == "refuse" and got.startswith("refused elsewhere"):
            ok = False
        if want == "either" and got.startswith("refused elsewhere") and "tokenizer" not in got:
            ok = False
        if not ok:
            problems.append(f"mutant {k}: oracle {want}, got {got}")
            open(f"{WORK}/fail_{name}_{k}.bin", "wb").write(d)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    verdict = "PASS" if not problems else "FAIL"
    print(f"{verdict} mutation {name}: {N} mutants: {summary}")
    for p in problems[:5]:
        print("    " + p)
    sys.stdout.flush()


def main():
    w = lambda p: os.path.join(WORK, p)
    model_good = w("ck/model_00000002.bin")
    cfg = words(open(model_good, "rb").read())[2:14]
    size = lambda p: os.path.getsize(p)

    # model file: ./run MODEL -z TOK -n 2 -t 0
    def exe_model(d):
        open(w("mut_model.bin"), "wb").write(d)
        return run([f"{BIN}/run", "mut_model.bin", "-z", "tok.bin", "-n", "2", "-t", "0"], "mut_model.bin")
    campaign("model", model_good, list(range(14)), [(1024, size(model_good))],
                               lambda d: model_oracle(d, cfg), exe_model)

    # debug state: ./test_cpu MODEL STATE (its comparisons may fail: the reader accepted)
    def exe_state(d):
        open(w("mut_state.bin"), "wb").write(d)
        return run([f"{BIN}/test_cpu", "micro.bin", "mut_state.bin"], "mut_state.bin", quiet_compare=True)
    micro_cfg = words(open(w("micro.bin"), "rb").read())[2:14]
    dbg = w("debug_state.bin")
    hd = words(open(dbg, "rb").read())
    ints = 4 * hd[2] * hd[3] * (4 if hd[12] else 2)  # bytes of x, y (and segment, position)
    campaign("debug_state", dbg, list(range(13)),
                                     [(1024, 1024 + ints), (1024 + ints, size(dbg))],
                                     lambda d: debug_state_oracle(d, micro_cfg), exe_state)

    # checkpoint: train -r from a directory holding model_2 and a mutated state_2
    state_good = w("ck/state_00000002.bin")
    good_state = open(state_good, "rb").read()
    def exe_ckpt(d):
        shutil.rmtree(w("mut_ck"), ignore_errors=True)
        os.makedirs(w("mut_ck"))
        shutil.copy(model_good, w("mut_ck/model_00000002.bin"))
        open(w("mut_ck/state_00000002.bin"), "wb").write(d)
        return run([f"{BIN}/train", "-c", "micro.bin", "-i", "train.bin", "-j", "val.bin", "-z", "tok.bin", "-b", str(B),
                    "-t", str(T), "-n", "3", "-e", "0", "-v", "0", "-V", "1", "-o", "mut_ck", "-r"],
                   "mut_ck/state_00000002.bin")
    campaign("checkpoint", state_good, list(range(26)), [(1024, size(state_good))],
                                    lambda d: checkpoint_oracle(d, good_state), exe_ckpt)

    # token data: train -j MUTANT
    def exe_tokens(d):
        open(w("mut_tokens.bin"), "wb").write(d)
        return run([f"{BIN}/train", "-c", "micro.bin", "-i", "train.bin", "-j", "mut_tokens.bin", "-z", "tok.bin",
                    "-b", str(B), "-t", str(T), "-n", "1", "-e", "0", "-v", "0", "-V", "1", "-o", "mut_tok_out"],
                   "mut_tokens.bin")
    campaign("tokens", w("val.bin"), list(range(5)), [(1024, size(w("val.bin")))],
                                    lambda d: tokens_oracle(d, cfg[0]), exe_tokens)

    # tokenizer: run -z MUTANT --encode, then the model with it
    tok_good = open(w("tok.bin"), "rb").read()
    g = words(tok_good)
    sec = np.cumsum([1024] + g[9:13] + [g[14]]).tolist()
    regions = [(sec[i], sec[i + 1]) for i in range(5)]
    def exe_tok(d):
        open(w("mut_tok.bin"), "wb").write(d)
        r = run([f"{BIN}/run", "-z", "mut_tok.bin", "--encode"], "mut_tok.bin",
                stdin="In the beginning, caf\u00e9 \uff21\uff22 \u2460!\n  two  spaces\n".encode())
        if r != "accepted":
            return r
        return run([f"{BIN}/run", "ck/model_00000002.bin", "-z", "mut_tok.bin", "-i", "the", "-n", "3"], "mut_tok.bin")
    campaign("tokenizer", w("tok.bin"), list(range(17)), regions,
                                   lambda d: tokenizer_oracle(d, tok_good), exe_tok)

    # routing trace: dev/analyze_routing.py read_trace, in this process
    import analyze_routing
    tname = sorted(os.listdir(w("ck/trace")))[-1]
    tgood = w(f"ck/trace/{tname}")
    def exe_trace(d):
        p = w(f"mut_trace/{tname}")
        os.makedirs(w("mut_trace"), exist_ok=True)
        open(p, "wb").write(d)
        try:
            analyze_routing.read_trace(p)
            return "accepted"
        except SystemExit as e:
            return "refused" if p in str(e) else f"bad: message without the file: {e}"
        except Exception as e:  # noqa: BLE001 - anything else is a bug
            return f"bad: {type(e).__name__}: {e}"
    campaign("trace", tgood, list(range(12)) + [16], [(1024, size(tgood))],
                               lambda d: trace_oracle(d, tname), exe_trace)


if __name__ == "__main__":
    main()
