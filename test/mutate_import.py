#!/usr/bin/python3
"""mutate_import.py WORK TOK.bin N SEED: the seeded structural mutation test
of dev/import_openmoe.py (issue 27).

Three small valid checkpoints (test/make_hf_checkpoint.py: one safetensors
file, two safetensors shards with their index, two .bin shards with theirs)
are imported once for reference outputs. Each mutant is a copy of one of
them with one structural change, drawn from these families (the first
mutants take every change once, in order; the rest are drawn at random):

  header   the safetensors header: not an object, an entry not an object or
           nested, a field missing, duplicated keys, __metadata__ not an
           object, the length word, bytes that are not UTF-8 or not JSON,
           NaN; the keys reordered or re-spaced (must import the same)
  offsets  data_offsets out of range, reversed, overlapping, not integers,
           of another length; two same-sized tensors swapped (still valid)
  dtypes   another dtype of another size, an unknown or non-string dtype
  shapes   a dimension changed, dropped, added, negative, not an integer,
           huge; the same product in another shape
  paths    the index's weight_map not an object, a value that is not a file
           name (../, absolute, in a subdirectory, empty, not a string), a
           missing file, a shard that is a FIFO, a directory, a symlink out
           of the directory (refused) or within it (must import the same)
  config   a value 0, negative, past int32, 2^32 + itself, a float, string,
           bool, null, list; max_position_embeddings past MAX_SEQ_LEN;
           num_hidden_layers 10^6; the object a list; duplicated keys; an
           unknown key or a dropped optional one (must import the same)
  weights  one weight NaN or infinite, in a safetensors file or a .bin storage
  pickle   a .bin shard's data.pkl naming another global (os.system, eval),
           a storage of another type or size, a storage key outside the
           archive, a tensor past its storage, random bytes changed; the zip
           cut short

The importer runs in this process (one Python start for all), under an
alarm that cuts a hang. Every mutant must either import (exit 0) to a file
the C reader (./run, with TOK.bin) loads, or be refused: exit 1, the last
stderr line the only "error: " line, no traceback, and neither the output
nor a temporary file left behind. Beyond that, each change says what a
correct importer does with it: "refuse", "same" (import to the reference
output byte for byte) or "either". Prints one PASS/FAIL line per family.

IMPORTER=path tests another copy of the importer (an older one).
"""
import io
import json
import os
import pickletools
import random
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import zipfile
from contextlib import redirect_stderr, redirect_stdout

WORK, TOK, N, SEED = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTER = os.environ.get("IMPORTER", os.path.join(ROOT, "dev", "import_openmoe.py"))
PY = sys.executable
TIMEOUT = 20  # seconds: a FIFO read without care blocks forever
MARKER = os.path.abspath(os.path.join(WORK, "EXECUTED"))  # what a mutant's pickle_runs_command creates
INT32_MAX, MAX_SEQ_LEN = 2**31 - 1, 1 << 20
BASES = {"st": ["--format", "st", "--dtype", "bf16", "--seed", "1"],
         "st-sharded": ["--format", "st-sharded", "--dtype", "f16", "--seed", "2"],
         "bin-sharded": ["--format", "bin-sharded", "--dtype", "f32", "--seed", "3"]}


def load_importer():
    sys.path.insert(0, os.path.dirname(os.path.abspath(IMPORTER)))
    import importlib.util
    spec = importlib.util.spec_from_file_location("importer_under_test", IMPORTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -----------------------------------------------------------------------------
# the files of a checkpoint directory

def files(d, ext):
    return sorted(n for n in os.listdir(d) if n.endswith(ext) and os.path.isfile(os.path.join(d, n)))


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header, body, length=None):
    """header: an object (dumped as JSON) or the raw header bytes"""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length) + h + body)


def tensor_names(header):
    return [k for k in header if k != "__metadata__"]


def edit_json(path, fn):
    with open(path) as f:
        j = json.load(f)
    j = fn(j)
    with open(path, "w") as f:
        f.write(j if isinstance(j, str) else json.dumps(j, indent=2))


def zip_entries(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def write_zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)


def pickle_of(entries):
    return next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))


# -----------------------------------------------------------------------------
# the changes: each takes (rng, directory), changes the directory, and
# returns what a correct importer does with it (or None: not applicable to
# this directory, draw again)

def on_st(fn):
    """a change to one safetensors file of the directory, given (rng, header, body)"""
    def change(rng, d):
        names = files(d, ".safetensors")
        if not names:
            return None
        path = os.path.join(d, rng.choice(names))
        header, body = read_st(path)
        r = fn(rng, header, body)
        if r is None:
            return None
        expect, new = r[0], r[1:]
        write_st(path, *new)
        return expect
    change.__name__ = fn.__name__
    return change


def pick(rng, header):
    return rng.choice(tensor_names(header))


def bad_value(rng, v):
    """something of another type than v, or an integer out of any range"""
    return rng.choice([None, True, "0", [v], {"v": v}, 1.5, -1, 2**64, 2**70, float(v) if isinstance(v, int) else 0])


@on_st
def header_not_object(rng, h, body):
    return "refuse", rng.choice([[h], "header", 42, None, True]), body


@on_st
def header_nested(rng, h, body):
    return "refuse", {"__metadata__": h.get("__metadata__", {}), "tensors": {k: h[k] for k in tensor_names(h)}}, body


@on_st
def entry_not_object(rng, h, body):
    h[pick(rng, h)] = rng.choice([[1, 2], "F32", 7, None])
    return "refuse", h, body


@on_st
def entry_nested(rng, h, body):
    k = pick(rng, h)
    h[k] = {"tensor": h[k]}
    return "refuse", h, body


@on_st
def entry_field_missing(rng, h, body):
    del h[pick(rng, h)][rng.choice(["dtype", "shape", "data_offsets"])]
    return "refuse", h, body


@on_st
def duplicate_tensor_key(rng, h, body):
    k = pick(rng, h)
    raw = json.dumps(h).encode()
    return "refuse", raw[:-1] + b", " + json.dumps(k).encode() + b": " + json.dumps(h[k]).encode() + b"}", body


@on_st
def metadata_not_object(rng, h, body):
    h["__metadata__"] = rng.choice([["pt"], "pt", 1])
    return "refuse", h, body


@on_st
def length_word(rng, h, body):
    raw = json.dumps(h).encode() + b"   "
    return "refuse", raw, body, rng.choice([len(raw) - 1, len(raw) + 1, 0, len(raw) + len(body) + 1, 2**63, 2**64 - 1])


@on_st
def header_not_utf8(rng, h, body):
    raw = json.dumps(h).encode()
    i = raw.index(b'"', 1) + 1  # inside the first key
    return "refuse", raw[:i] + b"\xff\xfe" + raw[i:], body


@on_st
def header_not_json(rng, h, body):
    raw = json.dumps(h).encode()
    return "refuse", raw[:rng.randrange(1, len(raw))], body


@on_st
def header_nan(rng, h, body):
    raw = json.dumps(h).encode()
    k = pick(rng, h)
    b, e = h[k]["data_offsets"]
    return "refuse", raw.replace(b'"data_offsets": [%d, %d]' % (b, e), b'"data_offsets": [NaN, %d]' % e, 1), body


@on_st
def header_reordered(rng, h, body):
    keys = list(h)
    rng.shuffle(keys)
    return "same", json.dumps({k: h[k] for k in keys}, indent=rng.choice([None, 1, 4])).encode() + b"\n  ", body


@on_st
def offsets_out_of_range(rng, h, body):
    k = pick(rng, h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = rng.choice([[b, e + 1], [b - 1, e], [b + len(body), e + len(body)], [-2, e],
                                       [b, 2**64], [2**63, 2**63 + e - b], [e, b] if e > b else [b, e + 2]])
    return "refuse", h, body


@on_st
def offsets_not_integers(rng, h, body):
    k = pick(rng, h)
    b, e = h[k]["data_offsets"]
    i = rng.randrange(2)
    offs = [b, e]
    offs[i] = rng.choice([float(offs[i]), offs[i] + 0.5, str(offs[i]), None, [offs[i]], i == 1])
    h[k]["data_offsets"] = offs
    return "refuse", h, body


@on_st
def offsets_length(rng, h, body):
    k = pick(rng, h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = rng.choice([[b], [b, e, e], [], {"begin": b, "end": e}, b])
    return "refuse", h, body


@on_st
def offsets_overlap(rng, h, body):
    """one tensor on the bytes of another of the same size: a hole elsewhere"""
    sizes = {}
    for k in tensor_names(h):
        b, e = h[k]["data_offsets"]
        sizes.setdefault(e - b, []).append(k)
    pairs = [v for v in sizes.values() if len(v) > 1]
    if not pairs:
        return None
    a, c = rng.sample(rng.choice(pairs), 2)
    h[c]["data_offsets"] = list(h[a]["data_offsets"])
    return "refuse", h, body


@on_st
def offsets_overlap_no_gap(rng, h, body):
    """the last tensor moved back into the one before it, the file cut to
    its new end: no byte without a tensor, but some with two"""
    names = sorted(tensor_names(h), key=lambda k: h[k]["data_offsets"])
    b, e = h[names[-1]]["data_offsets"]
    pb, pe = h[names[-2]]["data_offsets"]
    k = rng.randrange(1, min(e - b, pe - pb) // 2 + 1) * 2  # whole elements of any dtype
    h[names[-1]]["data_offsets"] = [b - k, e - k]
    return "refuse", h, body[:-k]


@on_st
def offsets_swapped(rng, h, body):
    """two tensors of the same dtype and shape trade bytes: a valid file"""
    groups = {}
    for k in tensor_names(h):
        groups.setdefault((h[k]["dtype"], tuple(h[k]["shape"])), []).append(k)
    pairs = [v for v in groups.values() if len(v) > 1]
    if not pairs:
        return None
    a, c = rng.sample(rng.choice(pairs), 2)
    h[a]["data_offsets"], h[c]["data_offsets"] = h[c]["data_offsets"], h[a]["data_offsets"]
    return "either", h, body


@on_st
def data_prefixed(rng, h, body):
    """bytes before the first tensor that belong to no tensor"""
    return "refuse", h, bytes(8) + body


@on_st
def dtype_other_size(rng, h, body):
    k = pick(rng, h)
    h[k]["dtype"] = {"F32": "BF16", "F16": "F32", "BF16": "F32"}[h[k]["dtype"]]
    return "refuse", h, body


@on_st
def dtype_unknown(rng, h, body):
    h[pick(rng, h)]["dtype"] = rng.choice(["I32", "F64", "BOOL", "F8_E4M3", "bf16", "", ["BF16"], 16, None])
    return "refuse", h, body


@on_st
def dtype_same_size(rng, h, body):
    """F16 read as BF16 or back: valid, other values (perhaps not finite)"""
    k = pick(rng, h)
    if h[k]["dtype"] == "F32":
        return None
    h[k]["dtype"] = {"F16": "BF16", "BF16": "F16"}[h[k]["dtype"]]
    return "either", h, body


@on_st
def shape_changed(rng, h, body):
    k = pick(rng, h)
    s = h[k]["shape"]
    j = rng.randrange(len(s))
    h[k]["shape"] = rng.choice([s[:j] + [s[j] + 1] + s[j + 1:], s[:j] + [s[j] - 1] + s[j + 1:], s[:j] + s[j + 1:],
                                s + [1], [1] + s, s[:j] + [-s[j]] + s[j + 1:],
                                s[:j] + [bad_value(rng, s[j])] + s[j + 1:], s[:j] + [2**63] + s[j + 1:],
                                s[0] if s else 0, [], None])
    return "refuse", h, body


@on_st
def shape_same_product(rng, h, body):
    k = pick(rng, h)
    s = h[k]["shape"]
    if len(s) < 2 or s[0] == s[-1]:
        return None
    h[k]["shape"] = list(reversed(s))
    return "refuse", h, body


def index_path(d):
    names = files(d, ".index.json")
    return os.path.join(d, names[0]) if names else None


def shard_names(d):
    return [n for n in os.listdir(d) if n.endswith((".safetensors", ".bin"))]


def weight_map_not_object(rng, d):
    ip = index_path(d)
    if not ip:
        return None
    edit_json(ip, lambda j: dict(j, weight_map=rng.choice([list(j["weight_map"].items()), "x", None, 3])))
    return "refuse"


def index_not_object(rng, d):
    ip = index_path(d)
    if not ip:
        return None
    edit_json(ip, lambda j: rng.choice([[j], {"metadata": j["metadata"]}, "index"]))
    return "refuse"


def index_duplicate_key(rng, d):
    ip = index_path(d)
    if not ip:
        return None
    edit_json(ip, lambda j: json.dumps(j)[:-2] + ', "x": 1}, "weight_map": {}}')
    return "refuse"


def weight_map_not_a_name(rng, d):
    """a shard named as a path, its file really there: every tensor of it
    (absolute, in a subdirectory), or one"""
    ip = index_path(d)
    if not ip:
        return None
    with open(ip) as f:
        wm = json.load(f)["weight_map"]
    k = rng.choice(sorted(wm))
    shard = wm[k]
    kind = rng.choice(["parent", "absolute", "subdir", "empty", "dot", "number", "list", "null"])
    if kind == "parent":
        os.makedirs(os.path.join(WORK, "outside"), exist_ok=True)
        shutil.copy(os.path.join(d, shard), os.path.join(WORK, "outside", shard))
        v = "../outside/" + shard
    elif kind == "absolute":
        v = os.path.abspath(os.path.join(d, shard))
    elif kind == "subdir":
        os.makedirs(os.path.join(d, "sub"))
        shutil.move(os.path.join(d, shard), os.path.join(d, "sub", shard))
        v = "sub/" + shard
    else:
        v = {"empty": "", "dot": ".", "number": 1, "list": [shard], "null": None}[kind]
    every = kind in ("absolute", "subdir")
    edit_json(ip, lambda j: dict(j, weight_map={n: v if n == k or every and s == shard else s
                                                for n, s in j["weight_map"].items()}))
    return "refuse"


def weight_map_moved(rng, d):
    """one tensor put in the other shard by the index, or a name no shard has added"""
    ip = index_path(d)
    if not ip:
        return None
    with open(ip) as f:
        wm = json.load(f)["weight_map"]
    shards = sorted(set(wm.values()))
    k = rng.choice(sorted(wm))
    if rng.random() < 0.5:
        wm[k] = [s for s in shards if s != wm[k]][0]
    else:
        wm["model.layers.0.mlp.extra.weight"] = shards[0]
    edit_json(ip, lambda j: dict(j, weight_map=wm))
    return "refuse"


def weight_map_missing_file(rng, d):
    ip = index_path(d)
    if not ip:
        return None
    edit_json(ip, lambda j: dict(j, weight_map={k: "model-00009-of-00009" + os.path.splitext(v)[1]
                                                 for k, v in j["weight_map"].items()}))
    return "refuse"


def index_metadata(rng, d):
    ip = index_path(d)
    if not ip:
        return None
    edit_json(ip, lambda j: dict(j, metadata={"total_size": rng.choice([0, -1, "x"])}))
    return "same"


def shard_special(rng, d):
    """a shard (or the single file) replaced by a FIFO, a directory, a symlink
    out of the directory; a symlink within it is fine"""
    shard = rng.choice(sorted(shard_names(d)))
    path = os.path.join(d, shard)
    kind = rng.choice(["fifo", "dir", "link-out", "link-in", "link-dangling"])
    if kind == "link-out":
        os.makedirs(os.path.join(WORK, "outside"), exist_ok=True)
        shutil.move(path, os.path.join(WORK, "outside", shard))
        os.symlink(os.path.join("..", "outside", shard), path)
    elif kind == "link-in":
        os.rename(path, path + ".real")
        os.symlink(shard + ".real", path)
        return "same"
    else:
        os.remove(path)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            os.mkdir(path)
        else:
            os.symlink("nowhere", path)
    return "refuse"


CONFIG_INTS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
               "intermediate_size", "num_experts", "moe_layer_interval", "max_position_embeddings", "router_topk"]


def config_value(rng, d):
    key = rng.choice(CONFIG_INTS)

    def change(j):
        v = j[key]
        j[key] = rng.choice([0, -v, INT32_MAX + 1, 2**32 + v, 2**63, 2**64 + v, float(v), str(v), True, None, [v], {}])
        return j
    edit_json(os.path.join(d, "config.json"), change)
    return "refuse"


def config_limit(rng, d):
    key, v, expect = rng.choice([("max_position_embeddings", MAX_SEQ_LEN + 1, "refuse"),
                                 ("max_position_embeddings", 128, "either"),
                                 ("num_hidden_layers", 10**6, "refuse"),
                                 ("num_hidden_layers", 5, "refuse"),
                                 ("num_attention_heads", 2**27, "refuse"),  # H*Hd past int32
                                 ("intermediate_size", 2**30, "refuse"),    # 2F past int32
                                 ("router_topk", 9, "refuse"),              # > num_experts
                                 ("router_topk", 1, "either"),
                                 ("head_dim", 15, "refuse"),                # odd
                                 ("moe_layer_interval", 5, "refuse")])      # > num_hidden_layers
    edit_json(os.path.join(d, "config.json"), lambda j: dict(j, **{key: v}))
    return expect


def config_structure(rng, d):
    kind = rng.choice(["list", "string", "duplicate", "nan", "unknown-key", "drop-eps"])

    def change(j):
        if kind == "list":
            return [j]
        if kind == "string":
            return "config"
        if kind == "duplicate":
            return json.dumps(j)[:-1] + ', "hidden_size": %d}' % (2 * j["hidden_size"])
        if kind == "nan":
            return json.dumps(dict(j, rms_norm_eps=float("nan")))
        if kind == "unknown-key":
            return dict(j, router_aux_loss_coef=0.01, torch_dtype="bfloat16")
        del j["rms_norm_eps"]
        return j
    edit_json(os.path.join(d, "config.json"), change)
    return "same" if kind in ("unknown-key", "drop-eps") else "refuse"


def on_pickle(fn):
    """a change to data.pkl of one .bin shard, given (rng, pickle bytes); the zip rewritten with valid CRCs"""
    def change(rng, d):
        names = files(d, ".bin")
        if not names:
            return None
        path = os.path.join(d, rng.choice(names))
        entries = zip_entries(path)
        i = pickle_of(entries)
        r = fn(rng, entries[i][1], entries)
        if r is None:
            return None
        expect, entries[i] = r[0], (entries[i][0], r[1])
        write_zip(path, entries)
        return expect
    change.__name__ = fn.__name__
    return change


@on_pickle
def pickle_global(rng, pk, entries):
    old = rng.choice([b"torch._utils\n_rebuild_tensor_v2\n", b"torch\nFloatStorage\n", b"collections\nOrderedDict\n"])
    if old not in pk:
        return None
    new = rng.choice([b"posix\nsystem\n", b"builtins\neval\n", b"torch\nload\n", b"torch._utils\n_rebuild_parameter\n",
                      b"torch\nIntStorage\n", b"torch\nDoubleStorage\n", b"numpy\nndarray\n"])
    return "refuse", pk.replace(old, new, 1)


def ops(pk):
    return list(pickletools.genops(pk))


@on_pickle
def pickle_runs_command(rng, pk, entries):
    """a call that creates WORK/EXECUTED put before the state dict (its
    result popped), as a malicious file does"""
    module, name, arg = rng.choice([(b"posix", b"system", "touch '%s'" % MARKER),
                                    (b"builtins", b"exec", "open(%r, 'w').close()" % MARKER)])
    a = arg.encode()
    call = b"c" + module + b"\n" + name + b"\n(X" + struct.pack("<I", len(a)) + a + b"tR0"
    return "refuse", pk[:2] + call + pk[2:]


@on_pickle
def pickle_storage_key(rng, pk, entries):
    """the persistent id of the first storage names another archive entry"""
    o = ops(pk)
    i = next(j for j, (op, arg, _) in enumerate(o) if op.name == "BINUNICODE" and arg == "storage")
    _, key, pos = next(x for x in o[i + 1:] if x[0].name == "BINUNICODE")
    new = rng.choice([b"../../etc/passwd", b"/etc/passwd", b"9999", b"", b"0/../1"])
    return "refuse", pk[:pos] + b"X" + struct.pack("<I", len(new)) + new + pk[pos + 5 + len(key.encode()):]


@on_pickle
def pickle_storage_size(rng, pk, entries):
    """a storage shorter than its tensors, or its entry cut short"""
    j = next(i for i, (n, _) in enumerate(entries) if "/data/" in n)
    name, data = entries[j]
    entries[j] = (name, data[:rng.randrange(len(data))])
    return "refuse", pk


@on_pickle
def pickle_tensor_past_storage(rng, pk, entries):
    """the storage offset of the first tensor (the integer after BINPERSID)
    past the end of its storage, or negative"""
    o = ops(pk)
    i = next(j for j, x in enumerate(o) if x[0].name == "BINPERSID")
    start, end = o[i + 1][2], o[i + 2][2]
    return "refuse", pk[:start] + b"J" + struct.pack("<i", rng.choice([2**30, 2**31 - 1, -1])) + pk[end:]


@on_pickle
def pickle_bytes(rng, pk, entries):
    """random bytes of the pickle changed: whatever they make, never a traceback"""
    b = bytearray(pk)
    for _ in range(rng.choice([1, 1, 2, 4])):
        j = rng.randrange(2, len(b))
        b[j] = rng.randrange(256) if rng.random() < 0.5 else b[j] ^ (1 << rng.randrange(8))
    return "either", bytes(b)


NOT_FINITE = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"],  # NaN, inf, -inf
              "F16": [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"], "BF16": [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"]}


@on_st
def weight_not_finite(rng, h, body):
    """one element of one tensor NaN or infinite"""
    k = pick(rng, h)
    b, e = h[k]["data_offsets"]
    v = rng.choice(NOT_FINITE[h[k]["dtype"]])
    if e == b:
        return None
    i = b + rng.randrange((e - b) // len(v)) * len(v)
    return "refuse", h, body[:i] + v + body[i + len(v):]


@on_pickle
def storage_not_finite(rng, pk, entries):
    """one element of one fp32 storage NaN or infinite"""
    j = rng.choice([i for i, (n, _) in enumerate(entries) if "/data/" in n])
    name, data = entries[j]
    v = rng.choice(NOT_FINITE["F32"])
    i = rng.randrange(len(data) // 4) * 4
    entries[j] = (name, data[:i] + v + data[i + 4:])
    return "refuse", pk


def bin_cut(rng, d):
    names = files(d, ".bin")
    if not names:
        return None
    path = os.path.join(d, rng.choice(names))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:rng.randrange(len(data))])
    return "refuse"


FAMILIES = {
    "header": [header_not_object, header_nested, entry_not_object, entry_nested, entry_field_missing,
               duplicate_tensor_key, metadata_not_object, length_word, header_not_utf8, header_not_json, header_nan,
               header_reordered],
    "offsets": [offsets_out_of_range, offsets_not_integers, offsets_length, offsets_overlap, offsets_overlap_no_gap,
                offsets_swapped, data_prefixed],
    "dtypes": [dtype_other_size, dtype_unknown, dtype_same_size],
    "shapes": [shape_changed, shape_same_product],
    "paths": [weight_map_not_object, index_not_object, index_duplicate_key, weight_map_not_a_name, weight_map_moved,
              weight_map_missing_file, index_metadata, shard_special],
    "config": [config_value, config_limit, config_structure],
    "weights": [weight_not_finite, storage_not_finite],
    "pickle": [pickle_global, pickle_runs_command, pickle_storage_key, pickle_storage_size, pickle_tensor_past_storage,
               pickle_bytes, bin_cut],
}


# -----------------------------------------------------------------------------
# running the importer and judging its outcome

class Hang(Exception):
    pass


def on_alarm(signum, frame):
    raise Hang("no answer after %d s" % TIMEOUT)


def run_importer(imp, d, out):
    """(exit status, stderr) of one import in this process; status
    "traceback" for an exception other than SystemExit"""
    err, status = io.StringIO(), 0
    sys.argv = ["import_openmoe.py", d, out]
    signal.alarm(TIMEOUT)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            imp.main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=err)
            status = 1
        else:
            status = e.code or 0
    except BaseException:  # noqa: the outcome under test
        err.write(traceback.format_exc())
        status = "traceback"
    finally:
        signal.alarm(0)
    return status, err.getvalue()


def c_reader_loads(path):
    r = subprocess.run([os.path.join(ROOT, "run"), path, "-z", TOK, "-b", "5", "-n", "1", "-t", "0", "--ids"],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip()[-200:]


def judge(imp, d, reference):
    """(outcome, why): outcome "accepted", "same", "refused", or "bad" """
    out_dir = os.path.join(WORK, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "x.bin")
    status, err = run_importer(imp, d, out)
    if os.path.exists(MARKER):
        os.remove(MARKER)
        return "bad", "the pickle ran its command"
    left = sorted(os.listdir(out_dir))
    lines = [s for s in err.splitlines() if s.strip()]
    if status == 0:
        if left != ["x.bin"]:
            return "bad", "exit 0, but the output directory holds %s" % left
        with open(out, "rb") as f:
            if f.read() == reference:
                return "same", ""
        ok, why = c_reader_loads(out)
        return ("accepted", "") if ok else ("bad", "imported a file the C reader refuses: " + why)
    if status != 1 or "Traceback" in err or not lines or not lines[-1].startswith("error: ") \
            or sum(s.startswith("error: ") for s in lines) != 1:
        return "bad", "exit %s, stderr %r" % (status, err[-600:])
    if left:
        return "bad", "refused, but left %s behind" % left
    return "refused", lines[-1]


def main():
    signal.signal(signal.SIGALRM, on_alarm)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    imp = load_importer()
    rng = random.Random(SEED)
    bases, references = {}, {}
    for name, args in BASES.items():
        bases[name] = os.path.join(WORK, "base_" + name)
        subprocess.run([PY, os.path.join(ROOT, "test", "make_hf_checkpoint.py"), bases[name]] + args, check=True,
                       stdout=subprocess.DEVNULL)
        outcome, why = judge(imp, bases[name], None)
        if outcome != "accepted":
            print("FAIL import mutants: the valid checkpoint %s: %s %s" % (name, outcome, why))
            return
        with open(os.path.join(WORK, "out", "x.bin"), "rb") as f:
            references[name] = f.read()
    changes = [(fam, fn) for fam, fns in FAMILIES.items() for fn in fns]
    counts = {fam: {"refused": 0, "accepted": 0, "same": 0} for fam in FAMILIES}
    bad = {fam: [] for fam in FAMILIES}
    mutant = os.path.join(WORK, "mutant")
    i = tries = 0
    while i < max(N, len(changes)) and tries < 20 * max(N, len(changes)):
        fam, fn = changes[i] if i < len(changes) else rng.choice(changes)
        base = rng.choice(sorted(bases))
        tries += 1
        shutil.rmtree(mutant, ignore_errors=True)
        shutil.rmtree(os.path.join(WORK, "outside"), ignore_errors=True)
        shutil.copytree(bases[base], mutant, symlinks=True)
        expect = fn(rng, mutant)
        if expect is None:
            continue
        i += 1
        outcome, why = judge(imp, mutant, references[base])
        if outcome != "bad":
            if expect == "refuse" and outcome != "refused":
                outcome, why = "bad", "must be refused, but was imported"
            elif expect == "same" and outcome != "same":
                outcome, why = "bad", "must import as the valid checkpoint does, but: %s %s" % (outcome, why)
        if outcome == "bad":
            bad[fam].append("%s on %s: %s" % (fn.__name__, base, why))
        else:
            counts[fam][outcome] += 1
    for fam in FAMILIES:
        c = counts[fam]
        summary = "%d refused, %d imported as the original, %d imported otherwise" % (c["refused"], c["same"],
                                                                                   c["accepted"])
        if bad[fam]:
            print("FAIL import mutants: %s: %d bad (%s); first: %s" % (fam, len(bad[fam]), summary, bad[fam][0]))
            for b in bad[fam][1:4]:
                print("    also: " + b)
        else:
            print("PASS import mutants: %s (%s)" % (fam, summary))


if __name__ == "__main__":
    main()
