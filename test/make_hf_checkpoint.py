#!/usr/bin/python3
"""Writes a synthetic OpenMoE checkpoint in the layout of the released ones
(SPEC §9: Hugging Face directory, config.json plus weights, as ColossalAI's
convert_openmoe_ckpt.py saves them), so that the importer and the oracle
(test/openmoe_hf.py) can be tested without the real weights.

    make_hf_checkpoint.py OUT_DIR [--preset micro|base|8b] [--format bin|bin-sharded|st|st-sharded]
                          [--dtype f32|f16|bf16] [--spelling base|8b] [--skew S] [--seed N]
                          [--bad KIND] [--set KEY=JSON ...] [--stream]

--preset 8b (OpenMoE-8B's shapes, 11.9 billion parameters: 24 GB in bf16)
is written as it goes, a piece of a tensor at a time into safetensors
shards of at most 5 GB, never the whole model in memory. Its weights are
drawn fast: each tensor's elements pick at random from a table of 65536
draws of its distribution (the same as the small presets', N(0, 1/fan_in)
for a matrix and the router, N(0, 1) for the embedding, 1 + N(0, 0.01) for
a norm). It takes no --bad, --chain or --skew. --stream writes any preset
that way.

--skew S adds S times one shared direction to every embedding row and to the
router row of expert 0, so that many tokens choose expert 0 and capacity
drops some of them. --bad writes a directory that the importer
must refuse (see BAD_KINDS), or one whose expert tensors are laid out wrong
but fit the expected shapes (transposed, gate-up-swapped). --chain "A B C"
writes a model whose every block outputs 0 and whose lm_head maps token A to
B and B to C, so that greedy generation from A follows the chain. --set KEY=JSON
sets a config.json key to a JSON value (2147483648, 48.0, "48", true, ...).

The --bad kinds of issue 27 write what a malicious or broken download holds:
pickle-exec (a .bin whose pickle calls os.system to create OUT_DIR/EXECUTED;
pickle-exec-legacy the same in torch's pre-1.6 format), shared-storage (two
.bin tensors on one storage, the second a view of the first), overlap (two
safetensors tensors on the same bytes, leaving a hole), duplicate-key (a
tensor twice in a safetensors header, the second with other offsets), nan and
inf (one weight not finite), lfs-pointer (the weights a Git LFS pointer, as a
clone without git-lfs leaves them).
"""
import argparse
import json
import os
import shlex
import struct
import sys

import numpy as np

PRESETS = {  # H*Hd != D, moe_layer_interval 2, V a multiple of 128 and larger than the tokenizer
    "micro": dict(vocab_size=384, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
                  intermediate_size=40, num_experts=8, moe_layer_interval=2, max_position_embeddings=64),
    "base": dict(vocab_size=256384, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, head_dim=64,
                 intermediate_size=2048, num_experts=16, moe_layer_interval=4, max_position_embeddings=2048),
    "8b": dict(vocab_size=256384, hidden_size=2048, num_hidden_layers=24, num_attention_heads=24, head_dim=128,
               intermediate_size=8192, num_experts=32, moe_layer_interval=6, max_position_embeddings=2048),
}
STREAMED = ["8b"]  # presets written as they are drawn
SHARD_BYTES = 5 << 30  # save_pretrained's default max_shard_size, 5GB
PIECE = 1 << 22  # elements drawn and written at once
TABLE = 1 << 16  # draws of each distribution that a streamed tensor picks from
BAD_KINDS = ["missing-tensor", "unexpected-tensor", "wrong-shape", "unknown-dtype", "topk-disagree",
             "kv-heads", "tied", "bad-eps", "no-config", "index-missing-file", "no-weights",
             "transposed", "gate-up-swapped",
             "pickle-exec", "pickle-exec-legacy", "shared-storage", "overlap", "duplicate-key", "nan", "inf",
             "lfs-pointer"]
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")


class RunsCommand:
    """pickles as a call of os.system(command), as a malicious checkpoint does"""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hf_config(p, spelling):
    """config.json as the releases spell it: the base file router_topk and
    router_capacity_factor_*, the 8b file topk and capacity_factor_* (SPEC §9)."""
    cfg = {"architectures": ["OpenMoeForCausalLM"], "hidden_act": "swiglu", "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "num_key_value_heads": p["num_attention_heads"], **p}
    if spelling == "base":
        cfg.update(router_topk=2, router_capacity_factor_train=1.25, router_capacity_factor_eval=2.0,
                   router_min_capacity=4, mlp_gated=True)
    else:
        cfg.update(topk=2, capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4, gated=True)
    return cfg


def hf_specs(p):
    """(name, shape, kind) of every tensor, in the order and shapes of the
    released files; kind: "embedding", "norm", "router", or a matrix's fan-in"""
    V, D, L = p["vocab_size"], p["hidden_size"], p["num_hidden_layers"]
    H, Hd, F, E = p["num_attention_heads"], p["head_dim"], p["intermediate_size"], p["num_experts"]
    yield "model.embed_tokens.weight", (V, D), "embedding"
    for i in range(L):
        pre = "model.layers.%d." % i
        yield pre + "input_layernorm.weight", (D,), "norm"
        for w in "qkv":
            yield pre + "self_attn.%s_proj.weight" % w, (H * Hd, D), D
        yield pre + "self_attn.o_proj.weight", (D, H * Hd), H * Hd
        yield pre + "post_attention_layernorm.weight", (D,), "norm"
        mlp = "mlp." if (i + 1) % p["moe_layer_interval"] else "extra_mlp."
        if mlp == "extra_mlp.":
            yield pre + "mlp.gate_weight", (E, D), "router"
            yield pre + "mlp.experts.wi_gate", (E, D, 2 * F), D
            yield pre + "mlp.experts.wi_up", (E, D, F), D
            yield pre + "mlp.experts.wo", (E, F, D), F
            yield pre + "pre_extra_mlp_layernorm.weight", (D,), "norm"
        yield pre + mlp + "gate_proj.weight", (2 * F, D), D
        yield pre + mlp + "up_proj.weight", (F, D), D
        yield pre + mlp + "down_proj.weight", (D, F), F
    yield "model.norm.weight", (D,), "norm"
    yield "lm_head.weight", (V, D), D


def hf_tensors(p, rng, skew):
    """name -> fp32 array, in the order and shapes of the released files.
    Scales keep activations O(1) so that logits are well conditioned."""
    D = p["hidden_size"]
    shared = rng.standard_normal(D).astype(np.float32)
    shared /= np.linalg.norm(shared) / np.sqrt(D)
    t = {}
    for name, shape, kind in hf_specs(p):
        if kind == "embedding":
            t[name] = (rng.standard_normal(shape) + skew * shared).astype(np.float32)
        elif kind == "norm":
            t[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = D if kind == "router" else kind
            t[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
            if kind == "router":
                t[name][0] += skew * shared / np.sqrt(D)
    return t


def chain_model(t, chain):
    """blocks that add nothing to the residual (their output projections 0),
    so that logits = lm_head · RMSNorm(wte[x]); lm_head row b then gets a
    large multiple of wte[a] for each consecutive pair a, b of the chain"""
    for name, w in t.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.wo")):
            w[...] = 0
    wte, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    head *= 0.01
    for a, b in zip(chain, chain[1:]):
        head[b] += 5 * wte[a] / np.linalg.norm(wte[a])


def to_bf16_bits(a):
    """fp32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


ST_DTYPES = {"f32": ("F32", lambda a: a.astype(np.float32)), "f16": ("F16", lambda a: a.astype(np.float16)),
             "bf16": ("BF16", to_bf16_bits), "i32": ("I32", lambda a: a.astype(np.int32))}


def write_safetensors(path, tensors, dtype, bad=None):
    """The documented format: u64 header length, JSON header, raw little-endian data.
    bad "overlap": the second of two same-sized tensors on the first one's
    bytes; "duplicate-key": the last tensor listed a second time, on the
    first one's bytes."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        st_name, conv = ST_DTYPES[dtype.get(name, dtype["*"])]
        b = conv(a).tobytes()
        header[name] = {"dtype": st_name, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    names = list(tensors)
    if bad == "overlap":
        same = [n for n in names if header[n]["shape"] == header[names[1]]["shape"]]
        header[same[1]]["data_offsets"] = header[same[0]]["data_offsets"]
    h = json.dumps(header).encode()
    if bad == "duplicate-key":
        entry = dict(header[names[-1]], data_offsets=header[names[0]]["data_offsets"])
        h = h[:-1] + b", " + json.dumps(names[-1]).encode() + b": " + json.dumps(entry).encode() + b"}"
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_streamed(out, p, fmt, dtype, rng):
    """the weights of hf_specs(P) as safetensors (a single file, or shards of
    at most SHARD_BYTES with their index), drawn and written a piece at a
    time: each element picks at random from TABLE draws of its tensor's
    distribution"""
    st_name, conv = ST_DTYPES[dtype]
    size = conv(np.zeros(1, np.float32)).itemsize
    specs = list(hf_specs(p))
    shards, used = [[]], 0
    for spec in specs:
        n = int(np.prod(spec[1])) * size
        if fmt == "st-sharded" and shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += n
    names = ["model.safetensors"] if fmt == "st" else \
        ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))]
    for fname, part in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in part:
            n = int(np.prod(shape)) * size
            header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for name, shape, kind in part:
                if kind == "embedding":
                    table = rng.standard_normal(TABLE)
                elif kind == "norm":
                    table = 1.0 + 0.1 * rng.standard_normal(TABLE)
                else:
                    table = rng.standard_normal(TABLE) / np.sqrt(p["hidden_size"] if kind == "router" else kind)
                table = conv(table.astype(np.float32))
                n = int(np.prod(shape))
                for i in range(0, n, PIECE):
                    f.write(table[rng.integers(0, TABLE, min(PIECE, n - i), dtype=np.uint16)].data)
        print("%s: %d tensors, %.1f GB" % (fname, len(part), off / 1e9), file=sys.stderr)
    if fmt == "st-sharded":
        weight_map = {name: fname for fname, part in zip(names, shards) for name, _, _ in part}
        total = sum(int(np.prod(shape)) * size for _, shape, _ in specs)
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_bin(path, tensors, dtype, bad=None):
    """torch.save's zip format; bad "pickle-exec": one more entry whose
    unpickling runs a command that creates EXECUTED beside the file
    ("pickle-exec-legacy": in the pre-1.6 format); "shared-storage": the
    second of two same-shaped tensors a view of the first"""
    import torch
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32}
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)).to(tdt[dtype.get(k, dtype["*"])]) for k, v in tensors.items()}
    if bad in ("pickle-exec", "pickle-exec-legacy"):
        marker = os.path.join(os.path.dirname(os.path.abspath(path)), "EXECUTED")
        sd["model.layers.0.input_layernorm.weight"] = RunsCommand("touch " + shlex.quote(marker))
    if bad == "shared-storage":
        sd["model.layers.0.post_attention_layernorm.weight"] = sd["model.layers.0.input_layernorm.weight"].view(-1)
    torch.save(sd, path, _use_new_zipfile_serialization=bad != "pickle-exec-legacy")


def write_weights(out, tensors, fmt, dtype, bad=None):
    """single file or two shards with an index json, as save_pretrained writes
    them; bad applies to the (first) file"""
    st = fmt.startswith("st")
    single, index = ("model.safetensors", "model.safetensors.index.json") if st else \
        ("pytorch_model.bin", "pytorch_model.bin.index.json")
    write = write_safetensors if st else write_bin
    if not fmt.endswith("sharded"):
        write(os.path.join(out, single), tensors, dtype, bad)
        return
    names = list(tensors)
    half = len(names) // 2
    ext = "safetensors" if st else "bin"
    prefix = "model" if st else "pytorch_model"
    shards = [names[:half], names[half:]]
    weight_map = {}
    for s, part in enumerate(shards):
        fname = "%s-%05d-of-%05d.%s" % (prefix, s + 1, len(shards), ext)
        write(os.path.join(out, fname), {k: tensors[k] for k in part}, dtype, bad if s == 0 else None)
        weight_map.update({k: fname for k in part})
    total = sum(a.size * 4 for a in tensors.values())
    with open(os.path.join(out, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", default="micro", choices=PRESETS)
    ap.add_argument("--format", default="st-sharded", choices=["bin", "bin-sharded", "st", "st-sharded"])
    ap.add_argument("--dtype", default="bf16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--spelling", default="base", choices=["base", "8b"])
    ap.add_argument("--skew", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bad", choices=BAD_KINDS)
    ap.add_argument("--chain", help="ids: each one's successor under greedy generation")
    ap.add_argument("--stream", action="store_true", help="write as --preset 8b is written, whatever the preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a config.json value")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    cfg = hf_config(p, a.spelling)
    for kv in a.set:
        key, _, value = kv.partition("=")
        cfg[key] = json.loads(value)
    if a.stream or a.preset in STREAMED:
        if a.bad or a.chain or a.skew or not a.format.startswith("st"):
            sys.exit("--stream (and --preset %s): a safetensors --format, no --bad, --chain or --skew"
                     % "/".join(STREAMED))
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_streamed(a.out, p, a.format, a.dtype, np.random.default_rng(a.seed))
        return
    t = hf_tensors(p, np.random.default_rng(a.seed), a.skew)
    dtype = {"*": a.dtype}
    E, D, F = p["num_experts"], p["hidden_size"], p["intermediate_size"]
    moe = "model.layers.%d.mlp." % (p["moe_layer_interval"] - 1)
    if a.bad == "missing-tensor":
        del t[moe + "experts.wo"]
    elif a.bad == "unexpected-tensor":
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(p["head_dim"] // 2, np.float32)
    elif a.bad == "wrong-shape":
        t[moe + "experts.wi_up"] = t[moe + "experts.wi_up"][:, :, :-1].copy()
    elif a.bad == "unknown-dtype":
        dtype["model.norm.weight"] = "i32"
    elif a.bad == "topk-disagree":
        cfg["topk"] = 1
    elif a.bad == "kv-heads":
        cfg["num_key_value_heads"] = 1
    elif a.bad == "tied":
        cfg["tie_word_embeddings"] = True
    elif a.bad == "bad-eps":
        cfg["rms_norm_eps"] = 1e-5
    elif a.bad == "transposed":  # [E, 2F, D] data stored as if it were [E, D, 2F]: shapes fit, layout wrong
        g = t[moe + "experts.wi_gate"]
        t[moe + "experts.wi_gate"] = np.ascontiguousarray(g.transpose(0, 2, 1)).reshape(g.shape)
    elif a.bad == "gate-up-swapped":  # the SiLU on the first half instead of the second
        g = t[moe + "experts.wi_gate"]
        t[moe + "experts.wi_gate"] = np.concatenate([g[:, :, F:], g[:, :, :F]], axis=2)
    elif a.bad in ("nan", "inf"):
        t["model.norm.weight"][3] = float(a.bad)
    needs = {"pickle-exec": "bin", "pickle-exec-legacy": "bin", "shared-storage": "bin", "overlap": "st",
             "duplicate-key": "st"}
    if a.bad in needs and not a.format.startswith(needs[a.bad]):
        sys.exit("--bad %s needs a %s --format" % (a.bad, needs[a.bad]))
    if a.chain:
        chain_model(t, [int(i) for i in a.chain.split()])
    os.makedirs(a.out, exist_ok=True)
    if a.bad != "no-config":
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    if a.bad != "no-weights":
        write_weights(a.out, t, a.format, dtype, a.bad)
    if a.bad == "lfs-pointer":
        for name in os.listdir(a.out):
            if name.endswith((".safetensors", ".bin")):
                with open(os.path.join(a.out, name), "wb") as f:
                    f.write(LFS_POINTER)
    if a.bad == "index-missing-file":
        shard = sorted(n for n in os.listdir(a.out) if n.endswith(("of-00002.safetensors", "of-00002.bin")))
        if not shard:
            sys.exit("--bad index-missing-file needs a sharded --format")
        os.remove(os.path.join(a.out, shard[-1]))


if __name__ == "__main__":
    main()
