#!/usr/bin/python3
"""Converts a released OpenMoE checkpoint (a Hugging Face directory written by
ColossalAI's convert_openmoe_ckpt.py: OrionZheng/openmoe-base, -8b, -8b-chat,
-34b-200B) to the model file of SPEC §6 and §11, and optionally its
SentencePiece tokenizer to tokenizer.bin.

    /usr/bin/python3 dev/import_openmoe.py HF_DIR OUT.bin [--dtype fp32|bf16|int8] [--group G]
                                           [--tokenizer OUT_TOK.bin] [--spm FILE.model]

--dtype picks the model file's version: fp32 (1, the default), bf16 (2: a
bf16 checkpoint's bits are copied as they are, so nothing is lost) or int8
in groups of G (3; G a multiple of 4 dividing D, H·Hd, F and Fe, 64 by
default); dev/convert_model.py defines the encodings and converts between
them.

Weights: model.safetensors, sharded safetensors with model.safetensors.index.json,
pytorch_model.bin, or sharded pytorch_model-*.bin with their index json
(safetensors preferred when both exist, as transformers does); fp32, fp16 and
bf16 tensors. Both formats are parsed here and memory-mapped: safetensors
from its documented layout (u64 header length, JSON header, raw data), .bin
from torch.save's zip archive, whose pickle is read by an unpickler that
knows only tensors and refuses anything else it names, so that a malicious
file runs nothing (no torch.load). Each tensor is converted a piece at a
time (rows of at most convert_model.PIECE elements; an expert stack one
expert at a time, its last two dims transposed) and written at its offset
in the output, and the pages of the checkpoint read for a piece are let go
after it: peak memory is a few pieces, whatever the model's size.

A downloaded checkpoint is untrusted input. Before anything is written,
config.json's values are checked against the model file's limits (int32
header words, openmoe.h's config_check), every file is resolved and must be
a regular file inside HF_DIR (or, for a Hugging Face cache snapshot, in its
blobs), every JSON file must be valid without duplicated keys or NaN, every
header or pickle must be well formed (safetensors tensors tile the data
exactly), and every tensor must be expected, once, where the index puts it,
in its shape and dtype (SPEC §9's names, shapes and config mapping). A weight
that is not finite is refused while writing. Every refusal is one line,
"error: FILE: what is wrong", and an exit status of 1. The output goes to a
fresh temporary file beside OUT.bin (never a planted OUT.bin.tmp), renamed
when every tensor is in.
"""
import argparse
import collections
import json
import math
import mmap
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

from convert_model import (HEADER_ORDER, PIECE, ModelWriter, check_group, dtype_args, dtype_from_args, n_params,
                           printable, tensors)
from export_tokenizer import Refused, atomic_output, open_regular, read_model, tokenizer_bytes

RMS_EPS = 1e-6  # the only epsilon the C code computes with (SPEC §2)
INT32_MAX = 2**31 - 1  # the model file's header words, and the widths the C code holds in an int
MAX_SEQ_LEN = 1 << 20  # openmoe.h: RoPE tables and the KV cache are allocated for the whole context
MAX_JSON_BYTES = 100_000_000  # safetensors' own limit on its header; config.json and the index are far smaller
MAX_PICKLE_BYTES = 1 << 24  # a state dict's data.pkl takes about 200 bytes a tensor


def brief(v):
    """a value from a file, as a message shows it: its repr, cut short"""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def json_kind(v):
    return {dict: "an object", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
            int: "a JSON number", float: "a JSON number", type(None): "JSON null"}[type(v)]


# ----------------------------------------------------------------------------
# the checkpoint directory: a file's name is resolved and checked before it
# is opened, and only regular files inside the directory are read

class CheckpointDir:
    def __init__(self, path):
        self.path = path
        real = os.path.realpath(path)
        self.roots = [real]
        # a Hugging Face cache snapshot, models--ORG--NAME/snapshots/REV/,
        # links its files to models--ORG--NAME/blobs/
        if os.path.basename(os.path.dirname(real)) == "snapshots":
            self.roots.append(os.path.realpath(os.path.join(real, "..", "..", "blobs")))

    def shown(self, name):
        return os.path.join(self.path, name)

    def has(self, name):
        return os.path.lexists(self.shown(name))

    def resolve(self, name, where=None):
        """the real path of file NAME, which must be a plain file name that
        resolves inside the directory (or, for a cache snapshot, its blobs);
        WHERE says who named it"""
        where = where or self.path + ":"
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
            raise Refused("%s %s is not a file name in the checkpoint directory" % (where, brief(name)))
        real = os.path.realpath(os.path.join(self.roots[0], name))
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise Refused("%s: links to %s, outside the checkpoint directory" % (self.shown(name), real))
        return real

    def open(self, name):
        """(binary file, size) of regular file NAME"""
        return open_regular(self.resolve(name), self.shown(name))

    def json(self, name):
        """the object in JSON file NAME"""
        f, size = self.open(name)
        with f:
            if size > MAX_JSON_BYTES:
                raise Refused("%s: %d bytes, more than the %d a JSON file may have here"
                              % (self.shown(name), size, MAX_JSON_BYTES))
            j = parse_json(f.read(size), self.shown(name))
        if not isinstance(j, dict):
            raise Refused("%s: holds %s, not an object" % (self.shown(name), json_kind(j)))
        return j


def parse_json(data, shown):
    """DATA (UTF-8 bytes) as JSON. A key twice and NaN or Infinity are
    refused: readers disagree on what they mean."""
    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise Refused("%s: key %s appears twice" % (shown, brief(k)))
            d[k] = v
        return d

    def no_constant(name):
        raise Refused("%s: %s is not a JSON number" % (shown, name))

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise Refused("%s: not valid JSON (%s)" % (shown, e))


# ----------------------------------------------------------------------------
# config.json -> SPEC §6 header values, each checked against the model file's
# limits (openmoe.h config_check) before anything else is read

def config_from_hf(cdir):
    path = cdir.shown("config.json")
    cfg = cdir.json("config.json")

    def get(key, default=None, required=True):
        v = cfg.get(key, default)
        if v is None:
            if required:
                raise Refused("%s: key '%s' is missing" % (path, key))
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= INT32_MAX:
            raise Refused("%s: key '%s' = %s, needs a whole number in 1 .. %d" % (path, key, brief(v), INT32_MAX))
        return v

    D, H = get("hidden_size"), get("num_attention_heads")
    Hd = get("head_dim", required=False)
    if Hd is None:
        if D % H:
            raise Refused("%s: no 'head_dim', and hidden_size %d is not a multiple of num_attention_heads %d"
                          % (path, D, H))
        Hd = D // H
    K = None
    for key in ("router_topk", "topk"):  # the base release spells router_topk, the 8b release topk
        if key in cfg:
            k = get(key)
            if K is not None and k != K:
                raise Refused("%s: 'router_topk' = %d and 'topk' = %d disagree" % (path, K, k))
            K = k
    c = dict(V=get("vocab_size"), max_seq_len=get("max_position_embeddings", 2048), L=get("num_hidden_layers"),
             D=D, H=H, Hd=Hd, F=get("intermediate_size"), E=get("num_experts"), K=K or 2,
             moe_every=get("moe_layer_interval"), Fe=None, extra_ffn=1)
    c["Fe"] = c["F"]
    if c["max_seq_len"] > MAX_SEQ_LEN:
        raise Refused("%s: 'max_position_embeddings' = %d > %d, the longest context the C code allocates"
                      % (path, c["max_seq_len"], MAX_SEQ_LEN))
    if H * Hd > INT32_MAX:
        raise Refused("%s: num_attention_heads * head_dim = %d does not fit an int32" % (path, H * Hd))
    if 2 * c["F"] > INT32_MAX:
        raise Refused("%s: 2 * intermediate_size = %d does not fit an int32" % (path, 2 * c["F"]))
    kv = get("num_key_value_heads", required=False)
    if kv is not None and kv != H:
        raise Refused("%s: 'num_key_value_heads' = %d, but only %d (= num_attention_heads) is supported"
                      % (path, kv, H))
    if cfg.get("tie_word_embeddings", False) is not False:
        raise Refused("%s: 'tie_word_embeddings' = %s, OpenMoE's lm_head is not tied"
                      % (path, brief(cfg["tie_word_embeddings"])))
    for key in ("hidden_act", "mlp_activation"):
        if cfg.get(key, "swiglu") != "swiglu":
            raise Refused("%s: '%s' = %s, only swiglu is supported" % (path, key, brief(cfg[key])))
    for key in ("mlp_gated", "gated"):
        if cfg.get(key, True) is not True:
            raise Refused("%s: '%s' = %s, only the gated FFN is supported" % (path, key, brief(cfg[key])))
    for key in ("rms_norm_eps", "layer_norm_epsilon"):
        v = cfg.get(key, RMS_EPS)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v - RMS_EPS) <= 1e-12:
            raise Refused("%s: '%s' = %s, the C code computes RMSNorm with %g" % (path, key, brief(v), RMS_EPS))
    if c["K"] > c["E"]:
        raise Refused("%s: top-k %d > num_experts %d" % (path, c["K"], c["E"]))
    if c["Hd"] % 2:
        raise Refused("%s: head_dim %d is odd (RoPE pairs i with i + head_dim/2)" % (path, c["Hd"]))
    if c["moe_every"] > c["L"]:
        raise Refused("%s: moe_layer_interval %d > num_hidden_layers %d: no MoE layer"
                      % (path, c["moe_every"], c["L"]))
    return c


# ----------------------------------------------------------------------------
# the expected tensors, in the order of the model file

def model_tensors(c):
    """yields (HF name, HF shape, transpose last two dims) of every tensor"""
    V, L, D, H, Hd, F, E, Fe = (c[k] for k in ("V", "L", "D", "H", "Hd", "F", "E", "Fe"))
    HHd = H * Hd
    yield "model.embed_tokens.weight", (V, D), False  # wte
    for i in range(L):
        pre = "model.layers.%d." % i
        yield pre + "input_layernorm.weight", (D,), False
        for w in "qkv":
            yield pre + "self_attn.%s_proj.weight" % w, (HHd, D), False
        yield pre + "self_attn.o_proj.weight", (D, HHd), False
        yield pre + "post_attention_layernorm.weight", (D,), False
        if (i + 1) % c["moe_every"]:
            ffn = pre + "mlp."
        else:
            yield pre + "mlp.gate_weight", (E, D), False  # router
            yield pre + "mlp.experts.wi_gate", (E, D, 2 * Fe), True  # -> [E, 2Fe, D]
            yield pre + "mlp.experts.wi_up", (E, D, Fe), True  # -> [E, Fe, D]
            yield pre + "mlp.experts.wo", (E, Fe, D), True  # -> [E, D, Fe]
            yield pre + "pre_extra_mlp_layernorm.weight", (D,), False
            ffn = pre + "extra_mlp."
        yield ffn + "gate_proj.weight", (2 * F, D), False
        yield ffn + "up_proj.weight", (F, D), False
        yield ffn + "down_proj.weight", (D, F), False
    yield "model.norm.weight", (D,), False
    yield "lm_head.weight", (V, D), False


def n_model_tensors(c):
    """what model_tensors yields, counted without walking it: wte, final
    norm, lm_head; 9 per layer, 5 more per MoE layer"""
    return 3 + 9 * c["L"] + 5 * (c["L"] // c["moe_every"])


def tensor_table(c, sources, hf_dir, version, G):
    """HF name -> (shape, transpose, its convert_model.Tensor in a model file
    of version VERSION and group G) of every tensor. Walks the config's
    tensors only as far as the files have them: a config that describes
    more than the files hold (10^6 layers) costs no more than one that fits
    them."""
    table = {}
    for (name, shape, transpose), t in zip(model_tensors(c), tensors(c, version, G)):
        if name not in sources:
            raise Refused("%s: tensor %s is missing (config.json describes %d tensors, the weight files hold %d)"
                          % (hf_dir, name, n_model_tensors(c), len(sources)))
        table[name] = (shape, transpose, t)
    for name, reader in sources.items():
        if name not in table:
            raise Refused("%s: unexpected tensor %s (not in an OpenMoE model of this config)" % (reader.shown, name))
        if reader.shape(name) != table[name][0]:
            raise Refused("%s: tensor %s has shape %s, expected %s"
                          % (reader.shown, name, list(reader.shape(name)), list(table[name][0])))
    return table


# ----------------------------------------------------------------------------
# weight files. Each reader checks its whole header (or pickle) when it
# opens the file, keeps the data on disk (mmap), and gives a tensor as a view
# of the mapping in its own dtype: float32, float16, or bf16 as its bits
# (uint16).

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class MappedFile:
    """a weight file mapped into memory (self.mm, None when empty)"""

    def map(self, f, size):
        """the bytes of open file F as a uint8 array"""
        self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        return np.frombuffer(self.mm, np.uint8) if size else np.zeros(0, np.uint8)

    def drop_pages(self):
        """lets go of the pages read so far: they stay in the page cache, but
        no longer count in this process's memory"""
        if self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED)


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile(MappedFile):
    """one .safetensors file: u64 header length, JSON header, raw data. The
    header must be what the format (and its reference reader) allows: an
    object of tensors, each exactly {dtype, shape, data_offsets}, whose data
    tile the data area without gaps or overlaps."""

    def __init__(self, cdir, name):
        self.name, self.shown = name, cdir.shown(name)
        f, size = cdir.open(name)
        with f:
            head = f.read(8)
            if len(head) < 8:
                raise Refused("%s: shorter than the 8-byte safetensors header length" % self.shown)
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise Refused("%s: header length %d runs past the end of the file (%d bytes)" % (self.shown, n, size))
            if n > MAX_JSON_BYTES:
                raise Refused("%s: header length %d, more than safetensors allows (%d)"
                              % (self.shown, n, MAX_JSON_BYTES))
            header = parse_json(f.read(n), self.shown)
            self.data = self.map(f, size)[8 + n:]
        self.tensors = self.check(header)

    def check(self, header):
        """name -> (dtype, shape, begin, end) of the header's tensors"""
        if not isinstance(header, dict):
            raise Refused("%s: the header is %s, not an object" % (self.shown, json_kind(header)))
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict):
            raise Refused("%s: '__metadata__' is %s, not an object" % (self.shown, json_kind(meta)))
        tensors = {}
        for name, info in header.items():
            if not isinstance(info, dict) or sorted(info) != ["data_offsets", "dtype", "shape"]:
                raise Refused("%s: tensor %s: its entry holds %s, not dtype, shape and data_offsets"
                              % (self.shown, name, brief(info)))
            dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dt, str) or dt not in ST_DTYPES:
                raise Refused("%s: tensor %s has dtype %s; only F32, F16 and BF16 are supported"
                              % (self.shown, name, dt if isinstance(dt, str) else brief(dt)))
            if not isinstance(shape, list) or not all(is_count(d) for d in shape):
                raise Refused("%s: tensor %s: shape %s, needs a list of whole numbers >= 0"
                              % (self.shown, name, brief(shape)))
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise Refused("%s: tensor %s: data_offsets %s, needs two whole numbers 0 <= begin <= end"
                              % (self.shown, name, brief(offsets)))
            b, e = offsets
            nbytes = math.prod(shape) * ST_DTYPES[dt].itemsize
            if e - b != nbytes:
                raise Refused("%s: tensor %s: data_offsets %s hold %d bytes, its shape %s in %s needs %d"
                              % (self.shown, name, offsets, e - b, shape, dt, nbytes))
            tensors[name] = (ST_DTYPES[dt], tuple(shape), b, e)
        end, last = 0, None
        for name, (_, _, b, e) in sorted(tensors.items(), key=lambda t: (t[1][2], t[1][3], t[0])):
            if b < end:
                raise Refused("%s: tensors %s and %s overlap (data_offsets [%d, %d] and %s)"
                              % (self.shown, last, name, b, e, list(tensors[last][2:])))
            if b > end:
                raise Refused("%s: bytes %d .. %d of the data belong to no tensor" % (self.shown, end, b))
            end, last = e, name
        if end != len(self.data):
            raise Refused("%s: the tensors end at byte %d of the data, which has %d"
                          % (self.shown, end, len(self.data)))
        return tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return self.tensors[name][1]

    def source(self, name):
        dt, shape, b, e = self.tensors[name]
        return self.data[b:e].view(dt).reshape(shape)


# torch.save's storage types: the numpy dtype of their elements (bf16 as its
# bits) and torch's name of it
TORCH_STORAGES = {"FloatStorage": ("<f4", "float32"), "HalfStorage": ("<f2", "float16"),
                  "BFloat16Storage": ("<u2", "bfloat16"), "DoubleStorage": ("<f8", "float64"),
                  "LongStorage": ("<i8", "int64"), "IntStorage": ("<i4", "int32"), "ShortStorage": ("<i2", "int16"),
                  "CharStorage": ("i1", "int8"), "ByteStorage": ("u1", "uint8"), "BoolStorage": ("u1", "bool")}
TORCH_FLOATS = ("float32", "float16", "bfloat16")
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled 0x1950a86a20f9469cfc6c
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length (30 bytes)

# what the pickle's globals and persistent ids become: immutable, so that the
# pickle's BUILD cannot change one after it was checked
StorageType = collections.namedtuple("StorageType", "name")
Storage = collections.namedtuple("Storage", "kind key numel")
Tensor = collections.namedtuple("Tensor", "storage offset shape stride")


class StateDictUnpickler(pickle.Unpickler):
    """unpickles the data.pkl of torch.save's zip format knowing only what a
    state dict of tensors uses: OrderedDict, torch._utils._rebuild_tensor_v2
    and the storage types. Any other global (os.system, eval, ...) is refused
    before it is looked up, so nothing the file names is ever called; a
    tensor is a description checked against its storage. (torch.load runs
    the pickle; with weights_only=True it still did run code before torch
    2.6, CVE-2025-32434, and corrupt memory before 2.10, CVE-2026-24747.)"""

    def __init__(self, data, shown):
        super().__init__(data)
        self.shown, self.storages = shown, {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if module == "torch" and name in TORCH_STORAGES:
            return StorageType(name)
        raise Refused("%s: its pickle calls %s.%s, which a state dict of tensors never does (not run)"
                      % (self.shown, module, name))

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> Storage"""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and is_count(pid[4])):
            raise Refused("%s: a storage described as %s, not as torch.save describes one" % (self.shown, brief(pid)))
        st = Storage(pid[1].name, pid[2], pid[4])
        if self.storages.setdefault(st.key, st) != st:
            raise Refused("%s: storage %s described twice, differently" % (self.shown, brief(st.key)))
        return st

    def rebuild_tensor(self, storage, offset, shape, stride, requires_grad, hooks, metadata=None):
        if not (isinstance(storage, Storage) and is_count(offset) and isinstance(shape, tuple)
                and isinstance(stride, tuple) and len(shape) == len(stride)
                and all(is_count(v) for v in shape + stride)):
            raise Refused("%s: a tensor described as %s, not as torch.save describes one"
                          % (self.shown, brief((storage, offset, shape, stride))))
        if math.prod(shape) and offset + sum((n - 1) * s for n, s in zip(shape, stride)) >= storage.numel:
            raise Refused("%s: a tensor of shape %s (offset %d, strides %s) runs past its storage of %d elements"
                          % (self.shown, list(shape), offset, list(stride), storage.numel))
        return Tensor(storage, offset, shape, stride)


class TorchBinFile(MappedFile):
    """one pytorch_model*.bin shard in torch.save's zip format (torch >= 1.6):
    data.pkl, unpickled by StateDictUnpickler, and one stored (uncompressed)
    entry data/KEY per storage, mapped from the file"""

    def __init__(self, cdir, name):
        self.name, self.shown = name, cdir.shown(name)
        f, size = cdir.open(name)
        with f:
            if not zipfile.is_zipfile(f):
                f.seek(0)
                if f.read(len(TORCH_LEGACY_MAGIC)) == TORCH_LEGACY_MAGIC:
                    raise Refused("%s: torch's legacy (pre-1.6) format, which cannot be read without running its "
                                  "pickle: convert it to safetensors where that is safe" % self.shown)
                raise Refused("%s: not a zip archive, as torch.save writes since torch 1.6" % self.shown)
            try:
                self.sd, storages = self.read_pickle(zipfile.ZipFile(f))
                data = self.map(f, size)
                self.storages = {key: self.storage_data(f, size, data, info, st)
                                 for key, (info, st) in storages.items()}
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as e:
                raise Refused("%s: a broken zip archive (%s)" % (self.shown, e))

    def read_pickle(self, z):
        """(state dict, storage key -> (its archive entry, Storage))"""
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise Refused("%s: the archive holds an entry twice" % self.shown)
        pkls = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pkls) != 1:
            raise Refused("%s: the archive has %d ARCHIVE/data.pkl entries, not one" % (self.shown, len(pkls)))
        if pkls[0].file_size > MAX_PICKLE_BYTES:
            raise Refused("%s: data.pkl of %d bytes, more than a state dict's (%d)"
                          % (self.shown, pkls[0].file_size, MAX_PICKLE_BYTES))
        prefix = pkls[0].filename[:-len("data.pkl")]
        unpickler = StateDictUnpickler(z.open(pkls[0]), self.shown)
        try:
            sd = unpickler.load()
        except Refused:
            raise
        except Exception as e:  # the unpickler's many kinds, for a pickle that is not a state dict
            raise Refused("%s: data.pkl is not a state dict's pickle (%s: %s)" % (self.shown, type(e).__name__, e))
        if not isinstance(sd, dict):
            raise Refused("%s: holds %s, not a state dict" % (self.shown, type(sd).__name__))
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise Refused("%s: entry %s is %s, not a tensor" % (self.shown, brief(k), type(v).__name__))
            kind = TORCH_STORAGES[v.storage.kind][1]
            if kind not in TORCH_FLOATS:
                raise Refused("%s: tensor %s has dtype torch.%s; only float32, float16 and bfloat16 are supported"
                              % (self.shown, k, kind))
        # views of one storage are fine (a flat buffer saved in slices), views
        # that share elements are not: they would let a small file stand for
        # an arbitrarily large model (and OpenMoE ties no weights)
        used, held = sum(math.prod(t.shape) for t in sd.values()), sum(st.numel for st in unpickler.storages.values())
        if used > held:
            raise Refused("%s: its tensors have %d elements, more than the %d of its storages: they share elements"
                          % (self.shown, used, held))
        storages = {}
        for key, st in unpickler.storages.items():
            try:
                storages[key] = (z.getinfo(prefix + "data/" + key), st)
            except KeyError:
                raise Refused("%s: storage %s has no entry %sdata/%s" % (self.shown, brief(key), prefix, key))
        return sd, storages

    def storage_data(self, f, size, data, info, st):
        """the elements of storage ST, a view of the mapped file"""
        dt = np.dtype(TORCH_STORAGES[st.kind][0])
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise Refused("%s: entry %s is compressed; torch.save stores data as is" % (self.shown, info.filename))
        if info.file_size != st.numel * dt.itemsize:
            raise Refused("%s: entry %s has %d bytes, its storage of %d %s needs %d"
                          % (self.shown, info.filename, info.file_size, st.numel, st.kind, st.numel * dt.itemsize))
        f.seek(info.header_offset)
        local = f.read(ZIP_LOCAL_HEADER.size)
        if len(local) < ZIP_LOCAL_HEADER.size or ZIP_LOCAL_HEADER.unpack(local)[0] != b"PK\x03\x04":
            raise Refused("%s: entry %s has no local header" % (self.shown, info.filename))
        _, name_len, extra_len = ZIP_LOCAL_HEADER.unpack(local)
        start = info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > size:
            raise Refused("%s: entry %s runs past the end of the file" % (self.shown, info.filename))
        return data[start:start + info.file_size].view(dt)

    def names(self):
        return list(self.sd)

    def shape(self, name):
        return self.sd[name].shape

    def source(self, name):
        t = self.sd[name]
        base = self.storages[t.storage.key]
        return np.lib.stride_tricks.as_strided(base[t.offset:], t.shape, tuple(s * base.itemsize for s in t.stride),
                                               writeable=False)


def weight_files(cdir):
    """(the shard names, the reader class for them, the index's weight_map
    and path, or None and the single file's path)"""
    for index, single, cls in (("model.safetensors.index.json", "model.safetensors", SafetensorsFile),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinFile)):
        if cdir.has(index):
            ipath = cdir.shown(index)
            wm = cdir.json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise Refused("%s: 'weight_map' is %s, not an object naming the shards"
                              % (ipath, "missing" if wm is None else "empty" if wm == {} else json_kind(wm)))
            for shard in wm.values():
                cdir.resolve(shard, "%s: weight_map value" % ipath)
            shards = sorted(set(wm.values()))
            for shard in shards:
                if not cdir.has(shard):
                    raise Refused("%s: names shard %s, which is missing" % (ipath, shard))
            return shards, cls, wm, ipath
        if cdir.has(single):
            return [single], cls, None, cdir.shown(single)
    raise Refused("%s: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                  "pytorch_model.bin.index.json" % cdir.path)


def tensor_sources(readers, weight_map, index_path):
    """HF name -> the reader holding it; every tensor in one file, the one
    the index names"""
    sources = {}
    for r in readers:
        for name in r.names():
            if name in sources:
                raise Refused("%s: tensor %s appears twice (also in %s)" % (r.shown, name, sources[name].name))
            if weight_map is not None and weight_map.get(name) != r.name:
                raise Refused("%s: tensor %s is not where the index puts it (%s)"
                              % (r.shown, name, brief(weight_map.get(name))))
            sources[name] = r
    for name, shard in (weight_map or {}).items():
        if name not in sources:
            raise Refused("%s: puts tensor %s in %s, which does not hold it" % (index_path, brief(name), shard))
    return sources


# ----------------------------------------------------------------------------
# conversion

def write_tensor(writer, t, reader, name, transpose):
    """tensor NAME of READER as T (a convert_model.Tensor), PIECE elements
    at a time: expert stacks [E, a, b] one expert at a time, each as its
    [b, a] transpose; the pages read are let go after each piece"""
    a = reader.source(name)
    if transpose:
        parts = [(a[e].T, e * a.shape[2], " (expert %d)" % e) for e in range(a.shape[0])]
    else:
        parts = [(a.reshape(1, -1) if a.ndim == 1 else a, 0, "")]
    step = max(1, PIECE // t.cols)
    for m, first, what in parts:
        for row in range(0, m.shape[0], step):
            piece = m[row:row + step]
            # bf16 stays bits, so that version 2 copies it; fp16 and fp32 widen exactly to fp32
            piece = np.ascontiguousarray(piece, None if piece.dtype == np.uint16 else np.float32)
            writer.put(t, first + row, piece, "%s: tensor %s%s" % (reader.shown, name, what))
            reader.drop_pages()


def read_checkpoint(cdir, version, G):
    """(config, readers, tensor table) for a model file of version VERSION
    and group G: config, --group, files and every tensor's name, dtype and
    shape checked, nothing written"""
    c = config_from_hf(cdir)
    check_group(c, version, G)
    names, cls, weight_map, index_path = weight_files(cdir)
    readers = [cls(cdir, name) for name in names]  # headers (pickles) only: the data stays on disk
    table = tensor_table(c, tensor_sources(readers, weight_map, index_path), cdir.path, version, G)
    return c, readers, table


def write_model(c, readers, table, version, G, out_path, log):
    """the model file, through a fresh temporary beside OUT_PATH renamed when
    complete; a weight that is not finite is refused on the way"""
    try:
        with atomic_output(out_path) as out:
            writer = ModelWriter(out, c, version, G)
            for r in readers:
                for name in r.names():
                    _, transpose, t = table[name]
                    write_tensor(writer, t, r, name, transpose)
                log("%s: %d tensors" % (r.name, len(r.names())))
    except OSError as e:
        raise Refused("%s: cannot write (%s)" % (out_path, e.strerror or e))


def read_tokenizer(cdir, spm, V):
    """(the tokenizer.bin file, its SentencePiece model's path, its number of
    pieces) of --spm, or of the directory's tokenizer.model or spiece.model"""
    if spm is None:
        names = [n for n in ("tokenizer.model", "spiece.model") if cdir.has(n)]
        if not names:
            raise Refused("%s: no tokenizer.model or spiece.model; OpenMoE uses umT5's "
                          "(google/umt5-small spiece.model): pass it with --spm" % cdir.path)
        spm = cdir.shown(names[0])
        buf = read_model(cdir.resolve(names[0]), spm)
    else:
        buf = read_model(spm)
    data, n, _ = tokenizer_bytes(buf, spm)
    if n > V:
        raise Refused("%s: %d pieces, more than the model's vocabulary %d" % (spm, n, V))
    return data, spm, n


def write_tokenizer(data, out_tok):
    try:
        with atomic_output(out_tok) as f:
            f.write(data)
    except OSError as e:
        raise Refused("%s: cannot write (%s)" % (out_tok, e.strerror or e))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    dtype_args(ap)
    ap.add_argument("--tokenizer", metavar="OUT_TOK.bin", help="also export the SentencePiece model")
    ap.add_argument("--spm", metavar="FILE.model", help="the SentencePiece model, when HF_DIR has none")
    a = ap.parse_args()
    try:
        version, G = dtype_from_args(a)
        cdir = CheckpointDir(a.hf_dir)
        c, readers, table = read_checkpoint(cdir, version, G)
        if a.tokenizer:
            tok, spm, pieces = read_tokenizer(cdir, a.spm, c["V"])
        write_model(c, readers, table, version, G, a.out, lambda s: print(s, file=sys.stderr))
        print("%s: %s, %d parameters, version %d%s" % (a.out, " ".join("%s=%d" % (k, c[k]) for k in HEADER_ORDER),
                                                      n_params(c), version, " G=%d" % G if G else ""))
        if a.tokenizer:
            write_tokenizer(tok, a.tokenizer)
            print("%s: %d pieces from %s" % (a.tokenizer, pieces, spm))
    except Refused as e:
        sys.exit("error: %s" % printable(str(e)))


if __name__ == "__main__":
    main()
