#!/usr/bin/python3
"""The model file versions of SPEC §11 (dev/convert_model.py writes them),
checked another way: the layout from test/reference.py's parameter table,
bf16 rounding by torch, the int8 rule in float64 (one float64 operation
rounded once to float32 gives the IEEE float32 result: 53 >= 2·24 + 2 bits).

    check_model_files.py checks < LINES      one "NAME|CHECK FILE FILE" a line; prints PASS/FAIL NAME
    check_model_files.py inputs V1 V3 DIR    writes DIR/edges.bin and the defective files of DEFECTS
    check_model_files.py pieces N PROGRAM ARGS...
                                             runs dev/PROGRAM (import_openmoe.py, convert_model.py)
                                             converting N elements at a time, not PIECE

CHECKs:
  bf16 V1 V2       V2's bits are torch's bf16 of V1's floats
  bf16-copy V1 V2  V1's floats are bf16 values (their lower 16 bits 0): V2 holds their upper halves
  int8 V1 V3       V3 is V1 in int8 by SPEC §11's rule (scales and values equal, the norms and routers
                   V1's), and each weight whose group's scale is a normal float decodes to within
                   s/2 of V1's (both rounding steps allowed for)
  decoded V V1     V1 holds the decoded values of V (version 2: widened; 3: s·q), bit for bit
"""
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import CONFIG_FIELDS, HEADER_INTS, MODEL_MAGIC, Config, param_specs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_WORD = 14


# ----------------------------------------------------------------------------
# the files: header, and each tensor's bytes by SPEC §6 and §11

def stored(s):
    """int8 in version 3: every matrix but the router"""
    return s.matrix and not s.name.endswith("router")


def read(path):
    """(config, version, G, name -> (spec, values)): float32 [n] in version 1,
    bf16 bits [n] in version 2, (scales, int8 values) or float32 in 3"""
    raw = np.fromfile(path, np.uint8)
    h = raw[:4 * HEADER_INTS].view("<i4")
    assert h[0] == MODEL_MAGIC, "%s: magic %d" % (path, h[0])
    version, G = int(h[1]), int(h[GROUP_WORD]) if h[1] == 3 else 0
    cfg = Config(*[int(v) for v in h[2:2 + len(CONFIG_FIELDS)]])
    off, tensors = 4 * HEADER_INTS, {}
    for s in param_specs(cfg):
        n = s.numel
        if version == 2:
            v, off = raw[off:off + 2 * n].view("<u2"), off + 2 * n
        elif version == 3 and stored(s):
            v = (raw[off:off + 4 * (n // G)].view("<f4"), raw[off + 4 * (n // G):off + 4 * (n // G) + n].view("i1"))
            off += 4 * (n // G) + n
        else:
            v, off = raw[off:off + 4 * n].view("<f4"), off + 4 * n
        tensors[s.name] = (s, v)
    assert off == raw.size, "%s: %d bytes, its header describes %d" % (path, raw.size, off)
    return cfg, version, G, tensors


def int8_rule(w, G):
    """(scales, int8 values) of float32 weights W by SPEC §11, in float64"""
    g = w.astype(np.float64).reshape(-1, G)
    s = (np.abs(g).max(axis=1) / 127).astype(np.float32)
    s64 = s.astype(np.float64)[:, None]
    r = np.divide(g, s64, out=np.zeros_like(g), where=s64 != 0).astype(np.float32).astype(np.float64)
    # |r| + 1/2 is exact in float64 for |r| >= 2^-22, and stays below 1 for smaller |r|
    q = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -127, 127)
    return s, q.astype(np.int8).reshape(-1)


def decoded(v, G):
    """float32 weights of stored values V: widened bf16 bits, or s·q"""
    if isinstance(v, tuple):
        s, q = v
        return (q.astype(np.float64).reshape(-1, G) * s.astype(np.float64)[:, None]).astype(np.float32).reshape(-1)
    if v.dtype == np.uint16:
        return (v.astype(np.uint32) << 16).view(np.float32)
    return v


def torch_bf16(w):
    import torch
    return torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def first_difference(name, a, b, what):
    i = np.flatnonzero(a != b)
    return "%s: %s differ at %d of %d places, first %d: %r, expected %r" % (
        name, what, i.size, a.size, i[0], a[i[0]], b[i[0]]) if i.size else None


# ----------------------------------------------------------------------------
# the checks: each returns None, or what is wrong

def check_bf16(p1, p2, copy=False):
    _, v1, _, t1 = read(p1)
    _, v2, _, t2 = read(p2)
    if (v1, v2) != (1, 2):
        return "versions %d and %d, not 1 and 2" % (v1, v2)
    for name, (_, w) in t1.items():
        u = w.view(np.uint32)
        if copy and np.any(u & 0xFFFF):
            return "%s: %s holds values that are not bf16" % (name, p1)
        want = (u >> 16).astype(np.uint16) if copy else torch_bf16(w)
        why = first_difference(name, t2[name][1], want, "bf16 bits")
        if why:
            return why
    return None


def check_int8(p1, p3):
    _, v1, _, t1 = read(p1)
    _, v3, G, t3 = read(p3)
    if (v1, v3) != (1, 3):
        return "versions %d and %d, not 1 and 3" % (v1, v3)
    tiny = np.finfo(np.float32).tiny
    for name, (spec, w) in t1.items():
        v = t3[name][1]
        if not stored(spec):
            why = first_difference(name, v.view(np.uint32), w.view(np.uint32), "float32 bits")
            if why:
                return why
            continue
        s, q = int8_rule(w, G)
        why = (first_difference(name, v[0].view(np.uint32), s.view(np.uint32), "scales")
               or first_difference(name, v[1], q, "int8 values"))
        if why:
            return why
        err = np.abs(decoded(v, G).astype(np.float64) - w).reshape(-1, G)
        bound = 0.5 * s.astype(np.float64) * (1 + 2.0**-10)
        bad = np.flatnonzero(((err > bound[:, None]) & (s[:, None] >= tiny)).reshape(-1))
        if bad.size:
            return "%s: weight %d decodes %g from its value, more than s/2 = %g" % (
                name, bad[0], err.reshape(-1)[bad[0]], bound[bad[0] // G])
    return None


def check_decoded(p, p1):
    _, v, G, t = read(p)
    _, v1, _, t1 = read(p1)
    if v1 != 1:
        return "%s: version %d, not 1" % (p1, v1)
    for name, (_, stored_values) in t.items():
        why = first_difference(name, t1[name][1].view(np.uint32), decoded(stored_values, G).view(np.uint32),
                               "float32 bits")
        if why:
            return why
    return None


CHECKS = {"bf16": check_bf16, "bf16-copy": lambda a, b: check_bf16(a, b, copy=True), "int8": check_int8,
          "decoded": check_decoded}


def checks():
    failed = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        name, _, args = line.strip().partition("|")
        kind, *files = args.split()
        why = CHECKS[kind](*files)
        print("PASS %s" % name if why is None else "FAIL %s: %s" % (name, why))
        failed += why is not None
    return failed


# ----------------------------------------------------------------------------
# inputs: a version-1 file with groups at the rule's edges, and defective
# version-3 files

def edge_groups(G, rng):
    """groups of G float32 weights at the edges of the int8 rule: all 0;
    s = 1 exactly (max 127) with halves, which round away from zero; the
    largest float below 1/2; -0; a negative maximum; subnormal weights whose
    s rounds to 0, and whose s is so coarse that w/s passes 127 (clamped);
    the largest floats"""
    f32 = np.float32
    below_half = np.nextafter(f32(0.5), f32(0))
    sub = np.finfo(np.float32).smallest_subnormal
    groups = [np.zeros(G, f32),
              [127, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5],
              [127, below_half, -below_half, 3.5, 4.5, -126.5, 0, -0.0],
              [-127, 63.5, -63.5, 1, -1, 0.25, 125.5, -125.5],
              [7 * sub, sub, -5 * sub, 0, 2 * sub, -sub, 3 * sub, 0],
              [189 * sub, 188 * sub, -189 * sub, 64 * sub, sub, -sub, 127 * sub, 128 * sub],
              [3.4e38, -3.4e38, 1e38, -1e-38, 2.5e38, 0, 1, -3.3e38]]
    out = []
    for g in groups:
        g = np.asarray(g, f32)
        out.append(np.resize(g, G) if G != len(g) else g)
    out += [rng.standard_normal(G).astype(f32) * f32(10.0**e) for e in (-30, -3, 0, 3, 30)]
    return out


def corrupt(raw, spec_offset, kind, G, n):
    """the bytes of a version-3 file with one defect in the tensor whose
    scales start at SPEC_OFFSET (N elements)"""
    raw = raw.copy()
    h = raw[:4 * HEADER_INTS].view("<i4")
    scales = raw[spec_offset:spec_offset + 4 * (n // G)].view("<f4")
    q = raw[spec_offset + 4 * (n // G):spec_offset + 4 * (n // G) + n].view("i1")
    if kind == "nan-scale":
        scales[3] = np.nan
    elif kind == "inf-scale":
        scales[3] = np.inf
    elif kind == "huge-scale":  # s·127 overflows
        scales[3] = np.finfo(np.float32).max / 100
    elif kind == "negative-scale":
        scales[3] = -scales[3] - 1
    elif kind == "int8-min":
        q[5] = -128
    elif kind == "version-2":  # and word 14 0, as version 2 has it
        h[1], h[GROUP_WORD] = 2, 0
    elif kind == "version-4":
        h[1] = 4
    elif kind == "group-half":
        h[GROUP_WORD] = G // 2
    elif kind == "group-not-dividing":
        h[GROUP_WORD] = 16
    elif kind == "word-15":
        h[GROUP_WORD + 1] = 1
    elif kind == "truncated":
        raw = raw[:-1]
    return raw


DEFECTS = ["nan-scale", "inf-scale", "huge-scale", "negative-scale", "int8-min", "version-2", "version-4", "group-half",
           "group-not-dividing", "word-15", "truncated"]


def inputs(p1, p3, out):
    """OUT/edges.bin: P1 with edge_groups in its first layer's wq; OUT/max.bin:
    that with the largest float; OUT/DEFECT.bin for each of DEFECTS: P3 with
    that defect (in its first layer's wq)"""
    cfg, _, G, t3 = read(p3)
    raw = np.fromfile(p1, np.uint8)
    off = 4 * HEADER_INTS
    for s in param_specs(cfg):
        if s.name == "l0.wq":
            w = raw[off:off + 4 * s.numel].view("<f4")
            edges = np.concatenate(edge_groups(G, np.random.default_rng(5)))
            w[:edges.size] = edges
            break
        off += 4 * s.numel
    raw.tofile(os.path.join(out, "edges.bin"))
    w[0] = np.finfo(np.float32).max
    raw.tofile(os.path.join(out, "max.bin"))
    raw = np.fromfile(p3, np.uint8)
    off = 4 * HEADER_INTS
    for s in param_specs(cfg):
        if s.name == "l0.wq":
            break
        off += 4 * (s.numel // G) + s.numel if stored(s) else 4 * s.numel
    for kind in DEFECTS:
        corrupt(raw, off, kind, G, s.numel).tofile(os.path.join(out, kind + ".bin"))


def pieces(n, program, args):
    """runs dev/PROGRAM with ARGS, converting N elements at a time"""
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    import convert_model
    module = importlib.import_module(os.path.splitext(program)[0])
    convert_model.PIECE = module.PIECE = n
    sys.argv = [program] + args
    module.main()


def main():
    if sys.argv[1] == "checks":
        sys.exit(1 if checks() else 0)
    elif sys.argv[1] == "inputs":
        inputs(*sys.argv[2:5])
    elif sys.argv[1] == "pieces":
        pieces(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
