#!/usr/bin/python3
"""Checks a dump of UL2 rows (train --objective ul2 --dump-examples N FILE)
against every rule of SPEC §10, written from the spec and T5's code, not from
train.c:

    check_ul2.py DUMP T TOKENIZER.bin TOKENIZER.model TRAIN.bin [--self-test]
    check_ul2.py --lengths I

TOKENIZER.bin gives V and the sentinel count S (header words 2 and 16),
TOKENIZER.model (SentencePiece, without the sentinels) EOS and the mode
prefixes' ids, TRAIN.bin the token stream the chunks come from. Prints one
line per rule, "holds RULE: ..." or "broken RULE: first problem", and exits 1
when any rule is broken. --self-test checks instead copies of the dump each
damaged in one rule's way, and prints "caught RULE: ..." when that rule then
breaks, else "missed RULE"; --lengths I prints the span denoisers' lengths at
I as train prints them.

The rules:
  layout       rows of T tokens, cols in order; in a row, segments 0, 1, ...
               contiguous from col 0, then padding (segment -1, token 0,
               target -1, position 0) to the end
  positions    positions 0, 1, ... in every segment
  whole        every segment is one whole example: it starts with the start
               token 0 and its last target is EOS (no example split across rows)
  greedy       the first example of a row did not fit the row before (at
               I = T/2 every example is longer than T/2, so a row holds one)
  shift        the model reads the example shifted by one: where a target is
               given, the next token read is that target
  loss_mask    targets (>= 0) are a suffix of each segment: no loss on inputs;
               inputs at most I = T/2 tokens, targets at most T - I
  eos          the inputs' last token and the targets' last token are EOS
  prefix       the inputs start with the mode prefix "[NLU] ", "[NLG] " or
               "[S2S] " as the tokenizer encodes it
  sentinels    span corruption: targets <0> span <1> span ... <s-1> span EOS,
               sentinel k = V-1-k in order, spans and runs not empty; the
               inputs' sentinels <0> <1> ... in order after non-empty runs; the
               prefix LM has no sentinels
  lengths      per denoiser, §10's m and s (T5's random_spans_helper with its
               r = 0.5 adjustment, ported here) and inputs of
               min(prefix + n - m + s + 1, I) tokens; prefix LM: a chunk of
               I - 1 tokens cut at p in [1, I - 2], inputs min(prefix + p + 1, I)
  chunk        the runs and spans (prefix LM: both parts) interleaved are the
               training stream at one offset
  rates        the six denoisers' counts within 3 sigma of 0.1 x 5 and 0.5 (those
               whose examples look alike at a small I counted together)
  composition  spans and runs are uniformly random compositions: first span's
               mean, and how often the first span, the last span and the first
               run have length 1 (where that is expected 10 times or more, so
               that the count is about normal), each within 3 sigma
"""
import math
import struct
import sys

import numpy as np
import sentencepiece as spm

# (kind, mean span, noise density, rate, mode prefix): ul2_objective's defaults
DENOISERS = [("R", 3.0, 0.15, 0.1, "[NLU] "), ("R", 8.0, 0.15, 0.1, "[NLU] "), ("X", 3.0, 0.5, 0.1, "[NLG] "),
             ("X", 8.0, 0.5, 0.1, "[NLG] "), ("X", 64.0, 0.5, 0.1, "[NLG] "), ("S", None, None, 0.5, "[S2S] ")]
RULES = ["layout", "positions", "whole", "greedy", "shift", "loss_mask", "eos", "prefix", "sentinels", "lengths",
         "chunk", "rates", "composition"]
SIGMAS = 3.0


def mask_lengths(n, density, mean_span):
    """random_spans_noise_mask's noise tokens (kept in [1, n - 1]) and spans (at least 1)."""
    m = min(max(round(n * density), 1), n - 1)
    return m, max(1, round(m / mean_span))


def random_spans_helper(inputs_length, noise_density, mean_noise_span_length):
    """T5's random_spans_helper (extra tokens per span 1 and 1), with the mask's limits on m and s."""
    def lengths(tokens_length):
        m, s = mask_lengths(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - m + s + 1, m + s + 1
    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length_, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length_:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def spans_at(I):
    """{denoiser index: (n, m, s)} of the span denoisers at inputs length I."""
    out = {}
    for d, (kind, mu, r, _, _) in enumerate(DENOISERS):
        if kind != "S":
            n, _ = random_spans_helper(I, r, mu)
            out[d] = (n,) + mask_lengths(n, r, mu)
    return out


def self_check():
    """§10's numbers at I = 1024, which the port must give."""
    for I, (mu, r), want in ((1024, (3.0, 0.15), (1137, 229)), (1024, (64.0, 0.5), (2014, 1024))):
        got = random_spans_helper(I, r, mu)
        if got != want:
            raise SystemExit("check_ul2.py: random_spans_helper(%d, %g, %g) = %s, SPEC §10 says %s" % (I, r, mu, got,
                                                                                                      want))


# -----------------------------------------------------------------------------
# reading


def read_dump(path, T):
    """rows: a list of dicts of int arrays token, target, segment, position (T each), in row order."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["row", "col", "token", "target", "segment", "position", "piece"]:
            raise SystemExit("check_ul2.py: %s: header %r" % (path, header))
        a = np.loadtxt(f, dtype=np.int64, delimiter="\t", usecols=range(6), comments=None, ndmin=2)
    if len(a) % T:
        raise SystemExit("check_ul2.py: %s: %d token lines, not rows of %d" % (path, len(a), T))
    rows = []
    for r in range(len(a) // T):
        b = a[r * T:(r + 1) * T]
        rows.append({"row": b[:, 0].copy(), "col": b[:, 1].copy(), "token": b[:, 2].copy(), "target": b[:, 3].copy(),
                     "segment": b[:, 4].copy(), "position": b[:, 5].copy()})
    return rows


def tokenizer_words(path):
    h = struct.unpack_from("<256i", open(path, "rb").read(1024))
    return h[2], h[16]


def segments_of(row):
    """[(start, end)] of the row's runs of equal segment id >= 0, in order."""
    seg, out, t = row["segment"], [], 0
    while t < len(seg):
        e = t
        while e < len(seg) and seg[e] == seg[t]:
            e += 1
        if seg[t] >= 0:
            out.append((t, e))
        t = e
    return out


# -----------------------------------------------------------------------------
# the checks


class Checker:
    def __init__(self, rows, T, V, S, eos, modes, stream):
        self.rows, self.T, self.I, self.V, self.S, self.eos = rows, T, T // 2, V, S, eos
        self.modes = modes  # {prefix text: ids}
        self.stream = stream
        self.stream_bytes = stream.astype("<i4").tobytes()
        self.spans = spans_at(self.I)
        self.problems = {r: [] for r in RULES}
        self.notes = {r: "" for r in RULES}

    def bad(self, rule, where, what):
        self.problems[rule].append("%s: %s" % (where, what))

    def sentinel_k(self, tok):
        k = self.V - 1 - tok
        return k if 0 <= k < self.S else None

    def find(self, seq, start=0):
        """offsets where seq (ints) occurs in the stream."""
        pat = np.asarray(seq, "<i4").tobytes()
        i = self.stream_bytes.find(pat, 4 * start)
        while i >= 0:
            if i % 4 == 0:
                yield i // 4
            i = self.stream_bytes.find(pat, i + 1)

    def run(self):
        T, I = self.T, self.I
        examples = []  # (row, start, end, seq, n_inputs)
        prev_pad = None
        for r, row in enumerate(self.rows):
            where = "row %d" % r
            if not np.array_equal(row["col"], np.arange(T)) or np.any(row["row"] != row["row"][0]):
                self.bad("layout", where, "cols not 0..T-1 of one row")
            segs = segments_of(row)
            ids = [row["segment"][s] for s, _ in segs]
            end = segs[-1][1] if segs else 0
            if ids != list(range(len(ids))) or (segs and segs[0][0] != 0) or \
                    any(a[1] != b[0] for a, b in zip(segs, segs[1:])):
                self.bad("layout", where, "segments %s at %s, not 0, 1, ... contiguous from col 0"
                         % (ids, [s for s, _ in segs]))
            pad = slice(end, T)
            if np.any(row["segment"][pad] != -1) or np.any(row["target"][pad] != -1) or \
                    np.any(row["token"][pad] != 0) or np.any(row["position"][pad] != 0):
                self.bad("layout", where, "padding after col %d is not segment -1, token 0, target -1, position 0"
                         % end)
            first = segs[0][1] - segs[0][0] if segs else T + 1  # a row after an empty one is not greedy either
            if prev_pad is not None and first <= prev_pad:
                self.bad("greedy", where, "its first example (%d tokens) fit the %d padding tokens of the row before"
                         % (first, prev_pad))
            prev_pad = T - end
            for s, e in segs:
                examples.append(self.example(r, s, e))
        examples = [x for x in examples if x is not None]
        self.rates_check(examples)
        self.composition_check(examples)
        return examples

    def example(self, r, s, e):
        """checks one segment; returns (denoiser, details) or None when it cannot be read as an example."""
        row, T, I = self.rows[r], self.T, self.I
        where = "row %d col %d" % (r, s)
        tok, tgt, pos = row["token"][s:e], row["target"][s:e], row["position"][s:e]
        L = e - s
        if not np.array_equal(pos, np.arange(L)):
            self.bad("positions", where, "positions %s..., not 0, 1, ..." % list(pos[:5]))
        if tok[0] != 0:
            self.bad("whole", where, "starts with token %d, not the start token 0: not a whole example" % tok[0])
        if tgt[-1] != self.eos:
            self.bad("whole", where, "its last target is %d, not EOS %d: not a whole example" % (tgt[-1], self.eos))
        for t in range(L - 1):
            if tgt[t] >= 0 and tok[t + 1] != tgt[t]:
                self.bad("shift", where, "target %d at position %d, but the next token read is %d"
                         % (tgt[t], t, tok[t + 1]))
                break
        given = tgt >= 0
        n_in = int(np.argmax(given)) if given.any() else L
        if n_in == 0 or n_in == L or not given[n_in:].all():
            self.bad("loss_mask", where, "targets are not a non-empty suffix after non-empty inputs (first target "
                     "at %d of %d, %d targets)" % (n_in, L, int(given.sum())))
            return None
        if n_in > I or L - n_in > T - I:
            self.bad("loss_mask", where, "inputs %d (at most %d) and targets %d (at most %d)"
                     % (n_in, I, L - n_in, T - I))
        # the example itself: inputs seq[:n_in] read one position later, targets as given
        seq = list(tok[1:n_in + 1]) + list(tgt[n_in:])
        inputs, targets = seq[:n_in], seq[n_in:]
        if inputs[-1] != self.eos or targets[-1] != self.eos:
            self.bad("eos", where, "inputs end with %d, targets with %d, not EOS %d"
                     % (inputs[-1], targets[-1], self.eos))
        mode = next((m for m, ids in self.modes.items() if inputs[:len(ids)] == ids), None)
        if mode is None:
            self.bad("prefix", where, "inputs start %s, no mode prefix" % inputs[:8])
            return None
        body, tbody = inputs[len(self.modes[mode]):-1], targets[:-1]
        trimmed = len(inputs) == I
        if mode == "[S2S] ":
            return self.prefix_lm(where, body, tbody, len(self.modes[mode]), trimmed, len(inputs))
        return self.span_corruption(where, mode, body, tbody, len(self.modes[mode]), trimmed, len(inputs))

    def prefix_lm(self, where, body, tbody, n_mode, trimmed, n_inputs):
        I = self.I
        if any(self.sentinel_k(t) is not None for t in body + tbody):
            self.bad("sentinels", where, "a sentinel in a prefix LM example")
        p = I - 1 - len(tbody)
        if not 1 <= p <= I - 2 or n_inputs != min(n_mode + p + 1, I) or len(body) != min(p, I - 1 - n_mode):
            self.bad("lengths", where, "prefix LM: targets %d, inputs %d: no cut p in [1, %d] of a %d-token chunk "
                     "gives them" % (len(tbody) + 1, n_inputs, I - 2, I - 1))
            return None
        # the chunk is stream[o:o + I - 1]: body at o, tbody at o + p; the longer one is searched
        if len(body) >= len(tbody):
            found = any(list(self.stream[o + p:o + I - 1]) == tbody for o in self.find(body))
        else:
            found = any(q >= p and list(self.stream[q - p:q - p + len(body)]) == body for q in self.find(tbody))
        if not found:
            self.bad("chunk", where, "prefix LM: inputs and targets are not one chunk of the stream")
        return (5, {"p": p})

    def span_corruption(self, where, mode, body, tbody, n_mode, trimmed, n_inputs):
        # targets: <0> span_0 <1> span_1 ... <s-1> span_{s-1}
        spans, ks = [], []
        for t in tbody:
            k = self.sentinel_k(t)
            if k is not None:
                ks.append(k)
                spans.append([])
            elif spans:
                spans[-1].append(t)
            else:
                self.bad("sentinels", where, "targets do not start with a sentinel")
                return None
        s, m = len(ks), sum(map(len, spans))
        if ks != list(range(s)) or any(not x for x in spans):
            self.bad("sentinels", where, "targets' sentinels %s (not 0, 1, ... each before a non-empty span)"
                     % ks[:8])
            return None
        # inputs: run_0 <0> run_1 <1> ... run_{s-1} <s-1>, cut when trimmed
        runs, iks = [[]], []
        for t in body:
            k = self.sentinel_k(t)
            if k is None:
                runs[-1].append(t)
            else:
                iks.append(k)
                runs.append([])
        complete, tail = runs[:-1], runs[-1]
        if iks != list(range(len(iks))) or len(iks) > s or any(not x for x in complete) or \
                (not trimmed and (len(iks) != s or tail)):
            self.bad("sentinels", where, "inputs' sentinels %s of %d, runs %s: not run <0> run <1> ... <%d>"
                     % (iks[:8], s, [len(x) for x in runs][:8], s - 1))
            return None
        cands = [d for d, (n, dm, ds) in self.spans.items() if DENOISERS[d][4] == mode and (dm, ds) == (m, s)]
        if not cands:
            self.bad("lengths", where, "%s with m %d s %d: no such denoiser at I %d (%s)" % (mode.strip(), m, s, self.I,
                     {DENOISERS[d][:3]: v for d, v in self.spans.items()}))
            return None
        d = cands[0]
        n = self.spans[d][0]
        if n_inputs != min(n_mode + n - m + s + 1, self.I):
            self.bad("lengths", where, "inputs %d, but n %d m %d s %d with a %d-token prefix give %d"
                     % (n_inputs, n, m, s, n_mode, min(n_mode + n - m + s + 1, self.I)))
        chunk = []
        for j, run in enumerate(complete):
            chunk += run + spans[j]
        chunk += tail
        if not trimmed and len(chunk) != n:
            self.bad("lengths", where, "the chunk has %d tokens, not n %d" % (len(chunk), n))
        if next(self.find(chunk), None) is None:
            self.bad("chunk", where, "runs and spans interleaved are not a chunk of the stream")
        return (d, {"spans": [len(x) for x in spans], "run0": len(runs[0]) if iks else None})

    def rates_check(self, examples):
        """denoisers whose examples look the same (at a small I) are counted together."""
        N = len(examples)
        groups = {}  # (mode prefix, lengths) -> denoisers
        for d in range(len(DENOISERS)):
            groups.setdefault((DENOISERS[d][4], self.spans.get(d)), []).append(d)
        notes = []
        for ds in groups.values():
            count = sum(1 for d, _ in examples if d in ds)
            rate = sum(DENOISERS[d][3] for d in ds)
            sd = math.sqrt(N * rate * (1 - rate))
            name = " + ".join(DENOISERS[d][0] + ("(%g, %g)" % DENOISERS[d][1:3] if DENOISERS[d][1] else "")
                              for d in ds)
            notes.append("%s %d" % (name, count))
            if abs(count - N * rate) > SIGMAS * sd:
                self.bad("rates", name, "%d of %d examples, expected %.0f +- %.0f (3 sigma)"
                         % (count, N, N * rate, SIGMAS * sd))
        self.notes["rates"] = "%d examples: %s" % (N, ", ".join(notes))

    def composition_check(self, examples):
        """a part of a uniform composition of m into s parts is 1 + a Bose-Einstein share of m - s over s bins:
        mean m/s, variance (m-s)(s-1)m / (s^2 (s+1)); P(part = 1) = (s-1)/(m-1)."""
        tested = 0
        for d, (n, m, s) in self.spans.items():
            if s < 2:
                continue
            got = [x for dd, x in examples if dd == d]
            N = len(got)
            if N < 30:  # too few to test
                continue
            first = np.array([x["spans"][0] for x in got])
            last = np.array([x["spans"][-1] for x in got])
            run0 = np.array([x["run0"] for x in got if x["run0"] is not None])
            var = (m - s) * (s - 1) * m / (s * s * (s + 1))
            checks = [("first span mean", first.mean(), m / s, math.sqrt(var / N))]
            for name, a, total in (("first span = 1", first, m), ("last span = 1", last, m),
                                   ("first run = 1", run0, n - m)):
                p = (s - 1) / (total - 1)
                if min(p, 1 - p) * len(a) >= 10:  # where the normal approximation of the count holds
                    checks.append(("P(%s)" % name, (a == 1).mean(), p, math.sqrt(p * (1 - p) / len(a))))
            for name, val, want, se in checks:
                tested += 1
                if abs(val - want) > SIGMAS * se:
                    self.bad("composition", "%s(%g, %g)" % DENOISERS[d][:3], "%s %.4f, expected %.4f +- %.4f (3 sigma, "
                             "%d examples)" % (name, val, want, SIGMAS * se, N))
        self.notes["composition"] = "%d statistics" % tested


# -----------------------------------------------------------------------------
# corruptions: each damages the parsed rows in one rule's way


def corrupt(rows, rule, ck):
    """damages rows (in place) in rule's way."""
    T, I, eos, V = ck.T, ck.I, ck.eos, ck.V
    segs = [segments_of(r) for r in rows]

    def first(pred):
        for r, row in enumerate(rows):
            for s, e in segs[r]:
                if pred(row, s, e):
                    return row, s, e
        raise SystemExit("check_ul2.py: --corrupt %s: no example to damage" % rule)

    def n_inputs(row, s, e):
        return s + int(np.argmax(row["target"][s:e] >= 0))

    def mode_of(row, s, name):
        ids = ck.modes[name]
        return list(row["token"][s + 1:s + 1 + len(ids)]) == ids

    if rule == "layout":  # a padding token before a row's example
        r = next(r for r, sg in enumerate(segs) if sg[-1][1] < T)
        for k in ("token", "target", "segment", "position"):
            rows[r][k][1:] = rows[r][k][:-1].copy()
        rows[r]["token"][0], rows[r]["target"][0], rows[r]["segment"][0], rows[r]["position"][0] = 0, -1, -1, 0
    elif rule == "positions":  # positions that run on from example to example
        at = 0
        for r, row in enumerate(rows):
            for s, e in segs[r]:
                row["position"][s:e] = at + np.arange(e - s)
                at += e - s
    elif rule == "greedy":  # a row left empty
        for k in ("token", "target", "segment", "position"):
            rows[1][k][:] = {"token": 0, "target": -1, "segment": -1, "position": 0}[k]
    elif rule == "whole":  # the next row's example begun in this row's padding
        for r in range(len(rows) - 1):
            pad = T - segs[r][-1][1]
            s1, e1 = segs[r + 1][0]
            if rule == "whole" and 0 < pad < e1 - s1 and len(segs[r + 1]) == 1:
                head = e1 - pad
                for k in ("token", "target", "position"):
                    x = rows[r + 1][k][:e1].copy()
                    rows[r][k][T - pad:] = x[:pad]
                    rows[r + 1][k][:e1] = 0 if k != "target" else -1
                    rows[r + 1][k][:head] = x[pad:]
                rows[r]["segment"][T - pad:] = len(segs[r])
                rows[r + 1]["segment"][:e1] = -1
                rows[r + 1]["segment"][:head] = 0
                rows[r + 1]["position"][:head] = np.arange(head)
                rows[r]["position"][T - pad:] = np.arange(pad)
                return
        raise SystemExit("check_ul2.py: --corrupt %s: no pair of rows to damage" % rule)
    elif rule == "shift":  # a target that is not the next token read
        row, s, e = first(lambda row, s, e: True)
        t = n_inputs(row, s, e)
        row["target"][t] = (row["target"][t] + 1) % V
    elif rule == "loss_mask":  # a loss on an input token
        row, s, e = first(lambda row, s, e: True)
        t = s + 3
        row["target"][t] = row["token"][t + 1]
    elif rule == "eos":  # the inputs' EOS replaced by the token before it
        row, s, e = first(lambda row, s, e: True)
        t = n_inputs(row, s, e)
        row["token"][t] = row["token"][t - 1]
    elif rule == "prefix":  # an S2S example with "[NLU] "'s last prefix token
        row, s, e = first(lambda row, s, e: mode_of(row, s, "[S2S] "))
        ids = ck.modes["[S2S] "]
        row["token"][s + len(ids)] = next(t for t in ck.modes["[NLU] "] if t not in ids)
    elif rule == "sentinels":  # sentinels 0 and 1 swapped throughout one example
        row, s, e = first(lambda row, s, e: mode_of(row, s, "[NLG] "))
        for k in ("token", "target"):
            x = row[k][s:e]
            a, b = x == V - 1, x == V - 2
            x[a], x[b] = V - 2, V - 1
    elif rule == "lengths":  # the last span's last token dropped, the row padded one more
        row, s, e = first(lambda row, s, e: mode_of(row, s, "[NLU] ") and max(row["target"][e - 3:e - 1]) < V - ck.S)
        row["target"][e - 2] = row["target"][e - 1]
        row["token"][e - 1], row["target"][e - 1], row["segment"][e - 1], row["position"][e - 1] = 0, -1, -1, 0
    elif rule == "chunk":  # a text token of the inputs replaced
        row, s, e = first(lambda row, s, e: mode_of(row, s, "[NLG] "))
        t = s + len(ck.modes["[NLG] "]) + 1
        row["token"][t] = eos if row["token"][t] != eos else eos + 1
    elif rule == "rates":  # every third prefix LM example dropped (its row's rest padded)
        k = 0
        for r, row in enumerate(rows):
            for s, e in segs[r]:
                if mode_of(row, s, "[S2S] "):
                    k += 1
                    if k % 3 == 0:
                        for key in ("token", "target", "segment", "position"):
                            row[key][s:] = {"token": 0, "target": -1, "segment": -1, "position": 0}[key]
                        break
    elif rule == "composition":  # each span example's spans reordered, longest first
        for r, row in enumerate(rows):
            for s, e in segs[r]:
                if mode_of(row, s, "[S2S] "):
                    continue
                t0 = n_inputs(row, s, e)
                tg = list(row["target"][t0:e - 1])
                parts, cur = [], None
                for t in tg:
                    if V - ck.S <= t:
                        cur = [t]
                        parts.append(cur)
                    else:
                        cur.append(t)
                bodies = sorted((p[1:] for p in parts), key=len, reverse=True)
                new = []
                for p, b in zip(parts, bodies):
                    new += [p[0]] + b
                row["target"][t0:e - 1] = new
                row["token"][t0 + 1:e] = new
    else:
        raise SystemExit("check_ul2.py: --corrupt %s: no such rule (%s)" % (rule, " ".join(RULES)))


def report(ck):
    """the verdict lines; returns how many rules are broken."""
    broken = 0
    for r in RULES:
        if ck.problems[r]:
            broken += 1
            print("broken %s: %s (%d problems)" % (r, ck.problems[r][0], len(ck.problems[r])))
        else:
            print("holds %s%s" % (r, ": " + ck.notes[r] if ck.notes[r] else ""))
    return broken


def main():
    args = sys.argv[1:]
    self_check()
    if args[:1] == ["--lengths"]:
        I = int(args[1])
        print(", ".join("%s(%g, %g) n %d m %d s %d" % (DENOISERS[d][:3] + v) for d, v in spans_at(I).items()))
        return
    self_test = args[5:] == ["--self-test"]
    if self_test:
        args = args[:5]
    if len(args) != 5:
        raise SystemExit(__doc__)
    dump, T, tok_bin, tok_model, train_bin = args
    T = int(T)
    V, S = tokenizer_words(tok_bin)
    sp = spm.SentencePieceProcessor(model_file=tok_model)
    if sp.get_piece_size() + S != V:
        raise SystemExit("check_ul2.py: %s has %d pieces + %d sentinels, %s has %d" % (tok_model, sp.get_piece_size(),
                                                                                    S, tok_bin, V))
    modes = {m: sp.encode(m) for _, _, _, _, m in DENOISERS}
    h = struct.unpack_from("<256i", open(train_bin, "rb").read(1024))
    stream = np.fromfile(train_bin, "<u2" if h[2] == 2 else "<i4", h[4], offset=1024).astype(np.int64)
    rows = read_dump(dump, T)
    if self_test:
        missed = 0
        for rule in RULES:
            # the statistics need every row, a broken example a few hundred
            some = rows if rule in ("rates", "composition") else rows[:300]
            damaged = [{k: v.copy() for k, v in row.items()} for row in some]
            ck = Checker(damaged, T, V, S, sp.eos_id(), modes, stream)
            corrupt(damaged, rule, ck)
            ck.run()
            if ck.problems[rule]:
                print("caught %s: %s" % (rule, ck.problems[rule][0]))
            else:
                missed += 1
                print("missed %s" % rule)
        sys.exit(1 if missed else 0)
    ck = Checker(rows, T, V, S, sp.eos_id(), modes, stream)
    examples = ck.run()
    broken = report(ck)
    print("%d rows, %d examples, %d of %d rules broken" % (len(rows), len(examples), broken, len(RULES)))
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
