#!/usr/bin/python3
"""Converts a released OpenMoE checkpoint (a Hugging Face directory written by
ColossalAI's convert_openmoe_ckpt.py: OrionZheng/openmoe-base, -8b, -8b-chat,
-34b-200B) to the model file of SPEC §6, and optionally its SentencePiece
tokenizer to tokenizer.bin.

    /usr/bin/python3 dev/import_openmoe.py HF_DIR OUT.bin [--tokenizer OUT_TOK.bin] [--spm FILE.model]

Weights: model.safetensors, sharded safetensors with model.safetensors.index.json,
pytorch_model.bin, or sharded pytorch_model-*.bin with their index json
(safetensors preferred when both exist, as transformers does); fp32, fp16 and
bf16 tensors. Safetensors files are parsed from their documented layout (u64
header length, JSON header, raw data) and memory-mapped; .bin shards need
torch and are loaded one at a time. Each tensor is converted to fp32 and
written at its offset in the output, so peak memory is about the largest
.bin shard (or, for safetensors, one expert's slice) plus one tensor. The
output is written to OUT.bin.tmp and renamed only when every tensor is in.

The tensor names, shapes and the config mapping are SPEC §9's. Everything
that does not fit (a missing or unexpected tensor, a wrong shape, an unknown
dtype, a config key with a value we cannot run, an index naming a missing
file) is refused with a message naming the key or file.
"""
import argparse
import json
import os
import struct
import subprocess
import sys

import numpy as np

MODEL_MAGIC = 240201739
HEADER_INTS = 256
RMS_EPS = 1e-6  # the only epsilon the C code computes with (SPEC §2)


class Refused(Exception):
    pass


# ----------------------------------------------------------------------------
# config.json -> SPEC §6 header values

def config_from_hf(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise Refused("%s: cannot read (%s)" % (path, e.strerror))
    except ValueError as e:
        raise Refused("%s: not valid JSON (%s)" % (path, e))

    def get(key, default=None, required=True):
        v = cfg.get(key, default)
        if v is None and required:
            raise Refused("%s: key '%s' is missing" % (path, key))
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise Refused("%s: key '%s' = %r, needs a whole number > 0" % (path, key, v))
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
    kv = get("num_key_value_heads", required=False)
    if kv is not None and kv != H:
        raise Refused("%s: 'num_key_value_heads' = %d, but only %d (= num_attention_heads) is supported"
                      % (path, kv, H))
    if cfg.get("tie_word_embeddings", False) is not False:
        raise Refused("%s: 'tie_word_embeddings' = %r, OpenMoE's lm_head is not tied"
                      % (path, cfg["tie_word_embeddings"]))
    for key in ("hidden_act", "mlp_activation"):
        if cfg.get(key, "swiglu") != "swiglu":
            raise Refused("%s: '%s' = %r, only swiglu is supported" % (path, key, cfg[key]))
    for key in ("mlp_gated", "gated"):
        if cfg.get(key, True) is not True:
            raise Refused("%s: '%s' = %r, only the gated FFN is supported" % (path, key, cfg[key]))
    for key in ("rms_norm_eps", "layer_norm_epsilon"):
        if key in cfg and not (isinstance(cfg[key], (int, float)) and abs(cfg[key] - RMS_EPS) <= 1e-12):
            raise Refused("%s: '%s' = %r, the C code computes RMSNorm with %g" % (path, key, cfg[key], RMS_EPS))
    if c["K"] > c["E"]:
        raise Refused("%s: top-k %d > num_experts %d" % (path, c["K"], c["E"]))
    if c["Hd"] % 2:
        raise Refused("%s: head_dim %d is odd (RoPE pairs i with i + head_dim/2)" % (path, c["Hd"]))
    if c["moe_every"] > c["L"]:
        raise Refused("%s: moe_layer_interval %d > num_hidden_layers %d: no MoE layer"
                      % (path, c["moe_every"], c["L"]))
    return c


HEADER_ORDER = ["V", "max_seq_len", "L", "D", "H", "Hd", "F", "E", "K", "moe_every", "Fe", "extra_ffn"]


# ----------------------------------------------------------------------------
# the expected tensors: HF name -> (HF shape, offset in floats, transpose last two dims)

def expected_tensors(c):
    V, L, D, H, Hd, F, E, Fe = (c[k] for k in ("V", "L", "D", "H", "Hd", "F", "E", "Fe"))
    HHd = H * Hd
    out, off = {}, 0

    def add(name, shape, transpose=False):
        nonlocal off
        out[name] = (tuple(shape), off, transpose)
        off += int(np.prod(shape))

    add("model.embed_tokens.weight", (V, D))  # wte
    for i in range(L):
        pre = "model.layers.%d." % i
        add(pre + "input_layernorm.weight", (D,))
        for w in "qkv":
            add(pre + "self_attn.%s_proj.weight" % w, (HHd, D))
        add(pre + "self_attn.o_proj.weight", (D, HHd))
        add(pre + "post_attention_layernorm.weight", (D,))
        if (i + 1) % c["moe_every"]:
            ffn = [pre + "mlp."]
        else:
            add(pre + "mlp.gate_weight", (E, D))  # router
            add(pre + "mlp.experts.wi_gate", (E, D, 2 * Fe), True)  # -> [E, 2Fe, D]
            add(pre + "mlp.experts.wi_up", (E, D, Fe), True)  # -> [E, Fe, D]
            add(pre + "mlp.experts.wo", (E, Fe, D), True)  # -> [E, D, Fe]
            add(pre + "pre_extra_mlp_layernorm.weight", (D,))
            ffn = [pre + "extra_mlp."]
        for p in ffn:
            add(p + "gate_proj.weight", (2 * F, D))
            add(p + "up_proj.weight", (F, D))
            add(p + "down_proj.weight", (D, F))
    add("model.norm.weight", (D,))
    add("lm_head.weight", (V, D))
    return out, off


# ----------------------------------------------------------------------------
# weight files

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def bf16_to_f32(bits):
    u = bits.astype(np.uint32)
    u <<= 16  # in place: one fp32-sized array, not two
    return u.view(np.float32)


class SafetensorsFile:
    """name -> (dtype, shape, array view) of one file, memory-mapped"""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise Refused("%s: shorter than the 8-byte safetensors header length" % path)
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise Refused("%s: header length %d runs past the end of the file (%d bytes)" % (path, n, size))
            try:
                self.header = json.loads(f.read(n))
            except ValueError as e:
                raise Refused("%s: the safetensors header is not valid JSON (%s)" % (path, e))
        self.header.pop("__metadata__", None)
        self.data_start, self.size = 8 + n, size
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)

    def names(self):
        return list(self.header)

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def array(self, name, index=None):
        """the tensor (or its slice [index] along dim 0) as fp32"""
        info = self.header[name]
        dt = ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise Refused("%s: tensor %s has dtype %s; only F32, F16 and BF16 are supported"
                          % (self.path, name, info["dtype"]))
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        if not (0 <= b <= e and self.data_start + e <= self.size and e - b == int(np.prod(shape)) * dt.itemsize):
            raise Refused("%s: tensor %s: data_offsets %r do not fit its shape %r and the file size"
                          % (self.path, name, info["data_offsets"], list(shape)))
        a = self.mm[self.data_start + b:self.data_start + e].view(dt).reshape(shape)
        if index is not None:
            a = a[index]
        return bf16_to_f32(a) if info["dtype"] == "BF16" else a.astype(np.float32)


class TorchBinFile:
    """one pytorch_model*.bin shard, loaded whole (torch pickles cannot be read lazily)"""

    def __init__(self, path):
        import torch
        self.path = path
        try:
            self.sd = torch.load(path, map_location="cpu")
        except Exception as e:  # torch raises many kinds for a bad pickle
            raise Refused("%s: cannot be loaded by torch.load (%s)" % (path, e))
        if not isinstance(self.sd, dict):
            raise Refused("%s: holds a %s, not a state dict" % (path, type(self.sd).__name__))
        self.torch = torch

    def names(self):
        return list(self.sd)

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def array(self, name, index=None):
        t = self.sd[name]
        if t.dtype not in (self.torch.float32, self.torch.float16, self.torch.bfloat16):
            raise Refused("%s: tensor %s has dtype %s; only float32, float16 and bfloat16 are supported"
                          % (self.path, name, t.dtype))
        if index is not None:
            t = t[index]
        return t.float().numpy()

    def close(self):
        self.sd = None


def weight_files(hf_dir):
    """the shard paths, in index order, and the reader class for them"""
    for index, single, cls in (("model.safetensors.index.json", "model.safetensors", SafetensorsFile),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinFile)):
        ipath = os.path.join(hf_dir, index)
        if os.path.exists(ipath):
            try:
                with open(ipath) as f:
                    wm = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise Refused("%s: not an index json with a weight_map (%s)" % (ipath, e))
            shards = sorted(set(wm.values()))
            for s in shards:
                if not os.path.exists(os.path.join(hf_dir, s)):
                    raise Refused("%s: names shard %s, which is missing" % (ipath, s))
            return [os.path.join(hf_dir, s) for s in shards], cls, wm
        spath = os.path.join(hf_dir, single)
        if os.path.exists(spath):
            return [spath], cls, None
    raise Refused("%s: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                  "pytorch_model.bin.index.json" % hf_dir)


# ----------------------------------------------------------------------------
# conversion

def write_tensor(out, offset, reader, name, shape, transpose):
    """fp32 at float offset; expert stacks one expert at a time, last two dims transposed"""
    if transpose:
        rows, cols = shape[1], shape[2]
        for e in range(shape[0]):
            out.seek(1024 + 4 * (offset + e * rows * cols))
            np.ascontiguousarray(reader.array(name, e).T, dtype="<f4").tofile(out)
    else:
        out.seek(1024 + 4 * offset)
        np.ascontiguousarray(reader.array(name), dtype="<f4").tofile(out)


def convert(hf_dir, out_path, log):
    c = config_from_hf(os.path.join(hf_dir, "config.json"))
    want, n_params = expected_tensors(c)
    paths, cls, weight_map = weight_files(hf_dir)
    tmp = out_path + ".tmp"
    done = set()
    try:
        with open(tmp, "wb") as out:
            header = np.zeros(HEADER_INTS, "<i4")
            header[0], header[1] = MODEL_MAGIC, 1
            header[2:14] = [c[k] for k in HEADER_ORDER]
            header.tofile(out)
            out.truncate(1024 + 4 * n_params)
            for path in paths:
                reader = cls(path)
                for name in reader.names():
                    if name not in want:
                        raise Refused("%s: unexpected tensor %s (not in an OpenMoE model of this config)"
                                      % (path, name))
                    if weight_map is not None and weight_map.get(name) != os.path.basename(path):
                        raise Refused("%s: tensor %s is not where the index puts it (%s)"
                                      % (path, name, weight_map.get(name)))
                    shape, offset, transpose = want[name]
                    if reader.shape(name) != shape:
                        raise Refused("%s: tensor %s has shape %s, expected %s"
                                      % (path, name, list(reader.shape(name)), list(shape)))
                    if name in done:
                        raise Refused("%s: tensor %s appears twice" % (path, name))
                    write_tensor(out, offset, reader, name, shape, transpose)
                    done.add(name)
                log("%s: %d tensors" % (os.path.basename(path), len(reader.names())))
                del reader
            missing = [n for n in want if n not in done]
            if missing:
                raise Refused("%s: tensor %s is missing%s" % (hf_dir, missing[0],
                              " (and %d more)" % (len(missing) - 1) if len(missing) > 1 else ""))
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return c, n_params


def export_tokenizer(hf_dir, spm, out_tok, V):
    if spm is None:
        names = [n for n in ("tokenizer.model", "spiece.model") if os.path.exists(os.path.join(hf_dir, n))]
        if not names:
            raise Refused("%s: no tokenizer.model or spiece.model; OpenMoE uses umT5's "
                          "(google/umt5-small spiece.model): pass it with --spm" % hf_dir)
        spm = os.path.join(hf_dir, names[0])
    exporter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_tokenizer.py")
    r = subprocess.run([sys.executable, exporter, spm, out_tok])
    if r.returncode:
        raise Refused("%s: the tokenizer exporter failed" % spm)
    with open(out_tok, "rb") as f:
        n = struct.unpack("<3i", f.read(12))[2]
    if n > V:
        os.remove(out_tok)
        raise Refused("%s: %d pieces, more than the model's vocabulary %d" % (spm, n, V))
    return spm, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--tokenizer", metavar="OUT_TOK.bin", help="also export the SentencePiece model")
    ap.add_argument("--spm", metavar="FILE.model", help="the SentencePiece model, when HF_DIR has none")
    a = ap.parse_args()
    try:
        c, n = convert(a.hf_dir, a.out, lambda s: print(s, file=sys.stderr))
        print("%s: %s, %d parameters" % (a.out, " ".join("%s=%d" % (k, c[k]) for k in HEADER_ORDER), n))
        if a.tokenizer:
            spm, pieces = export_tokenizer(a.hf_dir, a.spm, a.tokenizer, c["V"])
            print("%s: %d pieces from %s" % (a.tokenizer, pieces, spm))
    except Refused as e:
        sys.exit("error: %s" % e)


if __name__ == "__main__":
    main()
