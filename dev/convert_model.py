#!/usr/bin/python3
"""Converts a model file (SPEC §6, §11) to another version: fp32, bf16 or
int8 weights in groups.

    /usr/bin/python3 dev/convert_model.py IN.bin OUT.bin --dtype fp32|bf16|int8 [--group G]

The versions, all with SPEC §6's header and tensor order:
  1  fp32: every parameter a float32; 1024 + 4·n bytes for n parameters.
  2  bf16: every parameter a bfloat16; 1024 + 2·n bytes.
  3  int8: header word [14] = G. Each matrix but the router (wte, wq, wk, wv,
     wo, the FFNs', the experts', lm_head) is its float32 scales [n/G] then
     its int8 values [n], in groups of G consecutive elements along its last
     dimension (per expert for an expert stack); the norms and the routers
     stay float32, in place. With n_f the parameters of the norms and
     routers, D·(2L + 1) + (L / moe_every)·(E·D + extra_ffn·D), and
     n_q = n − n_f: 1024 + 4·n_f + n_q + 4·n_q/G bytes.
G must be a multiple of 4 (so that every tensor starts 4-byte aligned:
the scales can be read in place from a mapped file) that divides D, H·Hd,
F and Fe (so that a group never spans two rows).

The arithmetic, exactly (IEEE float32, round to nearest even except where
said), so that C reproduces each bit:
  bf16 of a float32 x: the upper 16 bits of x rounded to nearest even, on
    x's bits u: (u + 0x7FFF + ((u >> 16) & 1)) >> 16. A bf16 value widens
    to the float32 of its bits << 16.
  int8 of a group of float32 weights w[0..G-1]:
    s    = m / 127.0f, m = max |w[i]|       (one float32 division)
    q[i] = 0 where s == 0, else clamp(roundf(w[i] / s), -127, 127)
           (w[i] / s one float32 division; roundf rounds halves away from 0)
  decoding: w[i] = s * (float)q[i]          (one float32 multiplication)

A file of version 2 or 3 computes as the version-1 file of its decoded
values (bf16 widened, s·q), which is what converting it to fp32 writes.

Writing refuses a weight that is not finite, one that rounds to infinity
in bf16, and one so near the largest float that its group's s·127
overflows (decoding would give infinity). Reading, any version: the header
is checked as SPEC §6 says (magic, a version 1 to 3, a config the C code
can run, the words past the config 0, in version 3 G as above) and the size
against the version's; every scale must be >= 0 with s·127 finite (which
rules out NaN and infinity), and every int8 value within ±127. Converting
writes the encoding of the decoded values (which gives an int8 file of the
same G back unchanged). One piece of PIECE elements is in memory at a time,
and the output goes to a fresh temporary file beside OUT.bin, renamed when
complete; a refusal is one line, "error: FILE: what is wrong", with exit
status 1.

The reader and writer here serve dev/import_openmoe.py as well.
"""
import argparse
import collections
import os
import sys

import numpy as np

from export_tokenizer import Refused, atomic_output, open_regular

MODEL_MAGIC = 240201739
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
HEADER_ORDER = ["V", "max_seq_len", "L", "D", "H", "Hd", "F", "E", "K", "moe_every", "Fe", "extra_ffn"]  # words 2..13
GROUP_WORD = 14  # version 3's G
DTYPES = {"fp32": 1, "bf16": 2, "int8": 3}  # --dtype -> version
DEFAULT_GROUP = 64
GROUP_ALIGN = 4  # G a multiple of this: a version-3 tensor's int8 block keeps the next one 4-byte aligned
INT8_MAX = 127
PIECE = 1 << 22  # elements converted at once (16 MB of fp32): malloc reuses blocks this size, larger ones fault afresh
INT32_MAX = 2**31 - 1
MAX_SEQ_LEN = 1 << 20  # openmoe.h


# ----------------------------------------------------------------------------
# the layout: the tensors in the file's order, and the file's size from the
# config alone

# rows: an expert stack [E, r, cols] counts E·r rows; quantized: int8 in version 3
Tensor = collections.namedtuple("Tensor", "name rows cols quantized offset")


def tensors(c, version, G=0):
    """every tensor of the model file in its order (SPEC §6), named as C's
    parameter table names them, with its byte offset in version VERSION"""
    D, HHd, E = c["D"], c["H"] * c["Hd"], c["E"]
    ffn = [("gate", 2 * c["F"], D), ("up", c["F"], D), ("down", D, c["F"])]

    def layer(l):
        p = "l%d." % l
        yield p + "attn_norm", 1, D, False
        for w in ("wq", "wk", "wv"):
            yield p + w, HHd, D, True
        yield p + "wo", D, HHd, True
        yield p + "mlp_norm", 1, D, False
        if (l + 1) % c["moe_every"]:
            for w, rows, cols in ffn:
                yield p + "w_" + w, rows, cols, True
            return
        yield p + "router", E, D, False
        yield p + "w_gate", E * 2 * c["Fe"], D, True
        yield p + "w_up", E * c["Fe"], D, True
        yield p + "w_down", E * D, c["Fe"], True
        if c["extra_ffn"]:
            yield p + "extra_norm", 1, D, False
            for w, rows, cols in ffn:
                yield p + "x_" + w, rows, cols, True

    def all_tensors():
        yield "wte", c["V"], D, True
        for l in range(c["L"]):
            yield from layer(l)
        yield "final_norm", 1, D, False
        yield "lm_head", c["V"], D, True

    offset = HEADER_BYTES
    for name, rows, cols, quantized in all_tensors():
        yield Tensor(name, rows, cols, quantized, offset)
        offset += stored_bytes(rows * cols, quantized, version, G)


def stored_bytes(n, quantized, version, G):
    """the bytes of a tensor of N parameters in version VERSION"""
    if version == 2:
        return 2 * n
    if version == 3 and quantized:
        return 4 * (n // G) + n
    return 4 * n


def n_params(c):
    """SPEC §6's parameter count (openmoe.h config_n_params)"""
    D, HHd = c["D"], c["H"] * c["Hd"]
    dense_ffn = 4 * c["F"] * D
    attn = 2 * D + 4 * HHd * D
    moe = c["E"] * D + 4 * c["E"] * c["Fe"] * D + c["extra_ffn"] * (D + dense_ffn)
    n_moe = c["L"] // c["moe_every"]
    return 2 * c["V"] * D + D + (c["L"] - n_moe) * (attn + dense_ffn) + n_moe * (attn + moe)


def n_float(c):
    """the parameters that stay float32 in version 3: the norms and routers"""
    D = c["D"]
    return D * (2 * c["L"] + 1) + (c["L"] // c["moe_every"]) * (c["E"] * D + c["extra_ffn"] * D)


def file_size(c, version, G=0):
    n = n_params(c)
    if version == 1:
        return HEADER_BYTES + 4 * n
    if version == 2:
        return HEADER_BYTES + 2 * n
    nq = n - n_float(c)
    return HEADER_BYTES + 4 * n_float(c) + nq + 4 * (nq // G)


def config_problem(c):
    """why the C code cannot run config C (openmoe.h config_check), or None"""
    for k in HEADER_ORDER:
        if k != "extra_ffn" and c[k] <= 0:
            return "%s = %d, must be > 0" % (k, c[k])
    if c["max_seq_len"] > MAX_SEQ_LEN:
        return "max_seq_len = %d > %d" % (c["max_seq_len"], MAX_SEQ_LEN)
    if c["H"] * c["Hd"] > INT32_MAX or 2 * max(c["F"], c["Fe"]) > INT32_MAX:
        return "H*Hd = %d, 2F = %d or 2Fe = %d does not fit an int32" % (c["H"] * c["Hd"], 2 * c["F"], 2 * c["Fe"])
    if c["K"] > c["E"]:
        return "K = %d > E = %d" % (c["K"], c["E"])
    if c["Hd"] % 2:
        return "Hd = %d is odd (RoPE pairs i with i+Hd/2)" % c["Hd"]
    if c["extra_ffn"] not in (0, 1):
        return "extra_ffn = %d, must be 0 or 1" % c["extra_ffn"]
    return None


def group_problem(c, G):
    """why G cannot be version 3's group size for config C, or None"""
    if G <= 0 or G % GROUP_ALIGN:
        return "is not a positive multiple of %d" % GROUP_ALIGN
    for name, width in (("D", c["D"]), ("H*Hd", c["H"] * c["Hd"]), ("F", c["F"]), ("Fe", c["Fe"])):
        if width % G:
            return "does not divide %s = %d" % (name, width)
    return None


# ----------------------------------------------------------------------------
# the encodings: float32 <-> bf16 bits (uint16) <-> scales and int8 values

def bf16_bits(a):
    """float32 -> bf16 bits, rounded to nearest even"""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def widen_bf16(bits):
    u = bits.astype(np.uint32)
    u <<= 16  # in place: one fp32-sized array, not two
    return u.view(np.float32)


def quantize(w, G):
    """(scales [n/G], int8 values [n]) of float32 weights W in groups of G
    consecutive elements, by the rule of this file's docstring"""
    g = np.ascontiguousarray(w, np.float32).reshape(-1, G)
    s = np.abs(g).max(axis=1)
    s /= np.float32(INT8_MAX)
    r = g / np.where(s == 0, np.float32(1), s)[:, None]  # s is 0 only where every |w| <= 127·2^-150: w/1 rounds to 0
    q = np.trunc(r)
    r -= q  # the fraction, exact
    q += np.copysign(np.abs(r) >= 0.5, r, dtype=np.float32)  # halves away from zero
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return s, q.astype(np.int8).reshape(-1)


def dequantize(s, q, G):
    """float32 weights s·q of scales S [n/G] and int8 values Q [n]"""
    w = q.reshape(-1, G).astype(np.float32)
    w *= s[:, None]
    return w.reshape(-1)


def scales_ok(s):
    """which scales S are >= 0 with s·127 finite: no NaN, no infinity, and
    no decoded weight s·q infinite"""
    with np.errstate(over="ignore", invalid="ignore"):
        return (s >= 0) & (s * np.float32(INT8_MAX) <= np.finfo(np.float32).max)


def n_not_finite(a):
    """the values of A (float32, or bf16 bits) that are NaN or infinite"""
    if a.dtype == np.uint16:
        return np.count_nonzero((a & 0x7F80) == 0x7F80)  # exponent all ones
    return a.size - np.count_nonzero(np.isfinite(a))


# ----------------------------------------------------------------------------
# writing: a model file of any version, a piece at a time at each tensor's place

class ModelWriter:
    """a model file of version VERSION (G: version 3's group) for config C,
    written into OUT, an open binary file that has its final size from the
    start; the caller puts every tensor's rows"""

    def __init__(self, out, c, version, G=0):
        self.out, self.c, self.version, self.G = out, c, version, G
        header = np.zeros(HEADER_INTS, "<i4")
        header[0], header[1] = MODEL_MAGIC, version
        header[2:14] = [c[k] for k in HEADER_ORDER]
        if version == 3:
            header[GROUP_WORD] = G
        out.write(header.tobytes())
        out.truncate(file_size(c, version, G))

    def put(self, t, row, a, where):
        """rows ROW.. of tensor T from A, [rows, T.cols]: float32, or bf16
        bits (uint16), which version 2 copies as they are. WHERE names the
        values' source in a refusal: a value not finite, one that rounds to
        infinity in bf16, a group whose s·127 overflows in int8."""
        bad = n_not_finite(a)
        if bad:
            raise Refused("%s has %d values that are not finite (NaN or inf)" % (where, bad))
        if self.version == 2:
            if a.dtype != np.uint16:
                a = bf16_bits(a)
                bad = n_not_finite(a)
                if bad:
                    raise Refused("%s has %d values that round to infinity in bfloat16" % (where, bad))
            self.write(t.offset + 2 * row * t.cols, a)
            return
        if a.dtype == np.uint16:
            a = widen_bf16(a)
        if self.version == 3 and t.quantized:
            s, q = quantize(a, self.G)
            bad = s.size - np.count_nonzero(scales_ok(s))
            if bad:
                raise Refused("%s has %d groups whose s·127 overflows: weights too near the largest float for int8"
                              % (where, bad))
            self.put_int8(t, row, s, q)
        else:
            self.write(t.offset + 4 * row * t.cols, a.astype("<f4", copy=False))

    def put_int8(self, t, row, s, q):
        """rows ROW.. of quantized tensor T as scales S and int8 values Q"""
        G = self.G
        self.write(t.offset + 4 * (row * t.cols // G), s.astype("<f4", copy=False))
        self.write(t.offset + 4 * (t.rows * t.cols // G) + row * t.cols, q)

    def write(self, offset, a):
        self.out.seek(offset)
        self.out.write(np.ascontiguousarray(a).data)


# ----------------------------------------------------------------------------
# reading: a model file of any version, checked, a piece at a time

class ModelFile:
    """a model file of version 1, 2 or 3: its header and size checked when
    it opens (SPEC §6, §11), its tensors read a piece at a time"""

    def __init__(self, path):
        self.path = path
        self.f, size = open_regular(path, what="model file")
        head = self.f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            self.refuse("not a model file: %d bytes, shorter than the %d-byte header" % (size, HEADER_BYTES))
        h = [int(v) for v in np.frombuffer(head, "<i4")]
        if h[0] != MODEL_MAGIC:
            self.refuse("bad magic %d (a model file starts with %d)" % (h[0], MODEL_MAGIC))
        self.version = h[1]
        if self.version not in DTYPES.values():
            self.refuse("unknown version %d (versions 1, 2 and 3 are read)" % self.version)
        used = GROUP_WORD + 1 if self.version == 3 else GROUP_WORD
        for i in range(used, HEADER_INTS):
            if h[i]:
                self.refuse("header word %d is %d, must be 0" % (i, h[i]))
        self.c = dict(zip(HEADER_ORDER, h[2:2 + len(HEADER_ORDER)]))
        why = config_problem(self.c)
        if why:
            self.refuse("inconsistent header: %s" % why)
        self.G = h[GROUP_WORD] if self.version == 3 else 0
        if self.version == 3:
            why = group_problem(self.c, self.G)
            if why:
                self.refuse("header word %d: G = %d %s" % (GROUP_WORD, self.G, why))
        want = file_size(self.c, self.version, self.G)
        if size != want:
            self.refuse("size %d bytes, but its header describes %d parameters in version %d (%d bytes)"
                        % (size, n_params(self.c), self.version, want))

    def refuse(self, what):
        raise Refused("%s: %s" % (self.path, what))

    def read(self, offset, count, dtype):
        dtype = np.dtype(dtype)
        n = count * dtype.itemsize
        data = os.pread(self.f.fileno(), n, offset)
        if len(data) != n:
            self.refuse("shorter than its header says (it changed while read?)")
        return np.frombuffer(data, dtype)

    def pieces(self, t):
        """(first row, values) of tensor T (of tensors(c, version, G)), at
        most PIECE elements at a time: float32 [rows, cols], bf16 bits in
        version 2, (scales, int8 values) for version 3's quantized tensors,
        whose scales and values are checked (ModelWriter.put checks the
        others)"""
        step = max(1, PIECE // t.cols)
        for row in range(0, t.rows, step):
            n = (min(t.rows, row + step) - row) * t.cols
            if self.version == 3 and t.quantized:
                G = self.G
                s = self.read(t.offset + 4 * (row * t.cols // G), n // G, "<f4")
                bad = np.flatnonzero(~scales_ok(s))
                if bad.size:
                    self.refuse("tensor %s: scale %d is %r; a scale is >= 0 with s·127 finite"
                                % (t.name, row * t.cols // G + bad[0], float(s[bad[0]])))
                q = self.read(t.offset + 4 * (t.rows * t.cols // G) + row * t.cols, n, "i1")
                bad = np.flatnonzero(q < -INT8_MAX)
                if bad.size:
                    self.refuse("tensor %s: int8 value %d is %d, outside ±%d"
                                % (t.name, row * t.cols + bad[0], q[bad[0]], INT8_MAX))
                yield row, (s, q)
                continue
            if self.version == 2:
                a = self.read(t.offset + 2 * row * t.cols, n, "<u2")
            else:
                a = self.read(t.offset + 4 * row * t.cols, n, "<f4")
            yield row, a.reshape(-1, t.cols)


def convert(src, out_path, version, G):
    """SRC, a ModelFile, as a model file of version VERSION (group G)"""
    c = src.c
    try:
        with atomic_output(out_path) as out:
            dst = ModelWriter(out, c, version, G)
            for ts, td in zip(tensors(c, src.version, src.G), tensors(c, version, G)):
                where = "%s: tensor %s" % (src.path, ts.name)
                for row, v in src.pieces(ts):
                    if isinstance(v, tuple):
                        v = dequantize(*v, src.G).reshape(-1, td.cols)
                    dst.put(td, row, v, where)
    except OSError as e:
        raise Refused("%s: cannot write (%s)" % (out_path, e.strerror or e))


def printable(msg):
    """one line of printable characters: a message may quote a file's bytes"""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in msg)


def dtype_args(ap):
    """--dtype and --group, as this program and the importer take them"""
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="fp32 (version 1), bf16 (version 2) or int8 in groups (version 3)")
    ap.add_argument("--group", type=int, metavar="G",
                    help="int8's group size, a multiple of %d dividing D, H*Hd, F and Fe (default %d)"
                    % (GROUP_ALIGN, DEFAULT_GROUP))


def dtype_from_args(a):
    """(version, G) of the parsed --dtype and --group"""
    if a.group is not None and a.dtype != "int8":
        raise Refused("--group %d: only --dtype int8 has groups" % a.group)
    version = DTYPES[a.dtype]
    return version, (DEFAULT_GROUP if a.group is None else a.group) if version == 3 else 0


def check_group(c, version, G):
    """refuses a --group that config C cannot take"""
    why = group_problem(c, G) if version == 3 else None
    if why:
        raise Refused("--group %d %s" % (G, why))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", metavar="IN.bin")
    ap.add_argument("output", metavar="OUT.bin")
    dtype_args(ap)
    a = ap.parse_args()
    try:
        version, G = dtype_from_args(a)
        src = ModelFile(a.input)
        check_group(src.c, version, G)
        convert(src, a.output, version, G)
        print("%s: version %d%s from %s (version %d), %d parameters, %d bytes"
              % (a.output, version, " G=%d" % G if G else "", a.input, src.version, n_params(src.c),
                 file_size(src.c, version, G)))
    except Refused as e:
        sys.exit("error: %s" % printable(str(e)))


if __name__ == "__main__":
    main()
