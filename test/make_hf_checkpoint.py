#!/usr/bin/python3
"""Writes a synthetic OpenMoE checkpoint in the layout of the released ones
(SPEC §9: Hugging Face directory, config.json plus weights, as ColossalAI's
convert_openmoe_ckpt.py saves them), so that the importer and the oracle
(test/openmoe_hf.py) can be tested without the real weights.

    make_hf_checkpoint.py OUT_DIR [--preset micro|base] [--format bin|bin-sharded|st|st-sharded]
                          [--dtype f32|f16|bf16] [--spelling base|8b] [--skew S] [--seed N]
                          [--bad KIND] [--set KEY=JSON ...]

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
}
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


def hf_tensors(p, rng, skew):
    """name -> fp32 array, in the order and shapes of the released files.
    Scales keep activations O(1) so that logits are well conditioned."""
    V, D, L = p["vocab_size"], p["hidden_size"], p["num_hidden_layers"]
    H, Hd, F, E = p["num_attention_heads"], p["head_dim"], p["intermediate_size"], p["num_experts"]

    def mat(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    shared = rng.standard_normal(D).astype(np.float32)
    shared /= np.linalg.norm(shared) / np.sqrt(D)
    t = {"model.embed_tokens.weight": (rng.standard_normal((V, D)) + skew * shared).astype(np.float32)}
    for i in range(L):
        pre = "model.layers.%d." % i
        t[pre + "input_layernorm.weight"] = norm()
        for w in "qkv":
            t[pre + "self_attn.%s_proj.weight" % w] = mat(H * Hd, D, fan_in=D)
        t[pre + "self_attn.o_proj.weight"] = mat(D, H * Hd, fan_in=H * Hd)
        t[pre + "post_attention_layernorm.weight"] = norm()
        mlp = "mlp." if (i + 1) % p["moe_layer_interval"] else "extra_mlp."
        if mlp == "extra_mlp.":
            router = mat(E, D, fan_in=D)
            router[0] += skew * shared / np.sqrt(D)
            t[pre + "mlp.gate_weight"] = router
            t[pre + "mlp.experts.wi_gate"] = mat(E, D, 2 * F, fan_in=D)
            t[pre + "mlp.experts.wi_up"] = mat(E, D, F, fan_in=D)
            t[pre + "mlp.experts.wo"] = mat(E, F, D, fan_in=F)
            t[pre + "pre_extra_mlp_layernorm.weight"] = norm()
        t[pre + mlp + "gate_proj.weight"] = mat(2 * F, D, fan_in=D)
        t[pre + mlp + "up_proj.weight"] = mat(F, D, fan_in=D)
        t[pre + mlp + "down_proj.weight"] = mat(D, F, fan_in=F)
    t["model.norm.weight"] = norm()
    t["lm_head.weight"] = mat(V, D, fan_in=D)
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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a config.json value")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    cfg = hf_config(p, a.spelling)
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
    for kv in a.set:
        key, _, value = kv.partition("=")
        cfg[key] = json.loads(value)
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
