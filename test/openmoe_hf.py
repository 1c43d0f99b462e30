#!/usr/bin/python3
"""An independent oracle for imported OpenMoE checkpoints: ColossalAI's
OpenMoeForCausalLM forward and greedy generation, ported to plain PyTorch
from its code (examples/language/openmoe/model/modeling_openmoe.py,
colossalai/moe/{layers,routers,experts}.py at ColossalAI dd2c28a32), reading
a Hugging Face directory as it is: the HF tensor names and layouts, not our
model file, and not dev/import_openmoe.py's mapping.

    openmoe_hf.py logits HF_DIR OUT_STATE [-B 2] [-T 16] [--seed 1]
        one forward over random tokens in eval mode (capacity factor 2.0,
        the whole batch one routing group, as ColossalAI); writes a SPEC §7
        debug state with the logits, lb, router z-loss and the dropped
        fraction; no targets and zero loss coefficients, so the expected
        total loss and every gradient are exactly 0.
    openmoe_hf.py generate HF_DIR -p "0 17 5" [-n 20] [--limit N] [--old-rope]
        greedy generation with a KV cache as transformers' generate drives
        OpenMoeForCausalLM (prefill the prompt, then one token per step),
        stopping at EOS (1); prints the ids, prompt included, then how many
        assignments capacity dropped in the prompt's forward (run
        routes each prompt token alone, so it matches only when that is 0),
        and at how many generated positions the argmax of one dropless
        forward over the whole sequence (no cache) agrees.
        --limit N only
        lets ids < N be chosen (run's rule for a tokenizer smaller than V).
        --old-rope rotates the decoding query at position + 1, as
        apply_rotary_embedding did before ColossalAI's fix (PR 5267).
    openmoe_hf.py batch < COMMANDS
        one command per line, "OUT_FILE logits|generate ...": its output to
        OUT_FILE (torch starts once for a whole test script).

Computes in float32, as ColossalAI does for an fp32 model (--fp64 for float64).
"""
import argparse
import json
import math
import os
import shlex
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev"))
from import_openmoe import CheckpointDir, Refused, TorchBinFile  # noqa: E402

STATE_MAGIC = 240201740
EOS_ID = 1


# ----------------------------------------------------------------------------
# the HF directory: config.json and the state dict

def read_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    n = struct.unpack_from("<Q", buf, 0)[0]
    header = json.loads(buf[8:8 + n])
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = bytearray(buf[8 + n + b:8 + n + e])
        t = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]) if raw else torch.zeros(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def read_bin(path):
    """a .bin shard as torch reads it (weights_only=True), after the
    importer's reader has checked it: its pickle may call nothing but the
    rebuilding of tensors. torch.load would run whatever the pickle calls,
    and weights_only=True is not safe before torch 2.6 (CVE-2025-32434)."""
    try:
        TorchBinFile(CheckpointDir(os.path.dirname(path)), os.path.basename(path))
    except Refused as e:
        sys.exit("error: %s" % e)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(d):
    for index, single, reader in (("model.safetensors.index.json", "model.safetensors", read_safetensors),
                                  ("pytorch_model.bin.index.json", "pytorch_model.bin", read_bin)):
        if os.path.exists(os.path.join(d, index)):
            with open(os.path.join(d, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(d, single)):
            files = [single]
        else:
            continue
        sd = {}
        for fname in files:
            sd.update(reader(os.path.join(d, fname)))
        return sd
    sys.exit("%s: no weights" % d)


class Config:
    """the LlamaConfig fields OpenMoeForCausalLM reads, with LlamaConfig's
    defaults, after set_openmoe_args (ColossalAI's infer.py calls it with its
    defaults: top-k 2, eval capacity factor 2.0, min capacity 4)"""

    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            j = json.load(f)
        self.vocab_size = j["vocab_size"]
        self.hidden_size = j["hidden_size"]
        self.num_hidden_layers = j["num_hidden_layers"]
        self.num_attention_heads = j["num_attention_heads"]
        self.head_dim = j.get("head_dim", self.hidden_size // self.num_attention_heads)
        self.intermediate_size = j["intermediate_size"]
        self.num_experts = j["num_experts"]
        self.moe_layer_interval = j["moe_layer_interval"]
        self.max_position_embeddings = j.get("max_position_embeddings", 2048)
        self.rms_norm_eps = j.get("rms_norm_eps", 1e-6)
        self.router_topk = 2
        self.router_capacity_factor_eval = 2.0
        self.router_min_capacity = 4


# ----------------------------------------------------------------------------
# the model, as modeling_openmoe.py computes it (eval mode, no kernels)

def rms_norm(x, w, eps):  # LlamaRMSNorm
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def fixed_pos_embedding(features, length):
    """generate_fixed_pos_embedding: sin, cos [length, features], float32,
    the angles of the two halves repeated (rotate-half pairing)"""
    fraction = torch.arange(0, features, 2, dtype=torch.float32) / features
    timescale = 1.0 * (10000.0 / 1.0) ** fraction
    inp = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float32), 1.0 / timescale)
    inp = torch.cat([inp, inp], dim=-1)
    return torch.sin(inp), torch.cos(inp)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(q, k, cos, sin, position_ids, old_rope):
    """q [B, qlen, H, Hd], k [B, klen, H, Hd] (the whole cache, unrotated),
    cos, sin [max_position_embeddings, Hd]. A one-token query (decode) is
    rotated at its position (position + 1 with old_rope); otherwise q and k
    at 0..qlen-1. Keys always at 0..klen-1."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    qlen, klen = q.shape[1], k.shape[1]
    if qlen == 1 and position_ids is not None:
        idx = position_ids + 1 if old_rope else position_ids  # [B, 1]
        qcos, qsin = cos[idx].unsqueeze(2), sin[idx].unsqueeze(2)
        kcos, ksin = cos[:klen][None, :, None, :], sin[:klen][None, :, None, :]
    else:
        qcos, qsin = cos[:qlen][None, :, None, :], sin[:qlen][None, :, None, :]
        kcos, ksin = qcos, qsin
    return q * qcos + rotate_half(q) * qsin, k * kcos + rotate_half(k) * ksin


def swiglu(x):
    x1, x2 = torch.split(x, x.shape[-1] // 2, -1)
    return x1 * (x2 * torch.sigmoid(x2))


def dense_mlp(x, w, pre):  # OpenMoeMLP
    return F.linear(swiglu(F.linear(x, w[pre + "gate_proj.weight"])) * F.linear(x, w[pre + "up_proj.weight"]),
                    w[pre + "down_proj.weight"])


def get_capacity(cfg, n_tokens):  # MoeRouter.get_capacity in eval mode
    capacity = math.floor(cfg.router_topk * cfg.router_capacity_factor_eval * n_tokens / cfg.num_experts)
    capacity += capacity % 2
    return int(max(capacity, cfg.router_min_capacity))


def top2_router(logits, cfg, dropless=False):
    """Top2Router.forward (use_norm False): softmax in fp32, top-1 by argmax,
    top-2 by argmax with the top-1 masked to -inf, slots by cumsum (all first
    choices before all second choices), assignments at or past capacity
    dropped. Returns the combine weights [N, E, C], the dispatch mask, the
    load-balance and z losses and the number of dropped assignments."""
    probs = F.softmax(logits, dim=-1)
    N, E = probs.shape
    capacity = N if dropless else get_capacity(cfg, N)
    top1 = torch.argmax(probs, dim=-1)
    mask1 = F.one_hot(top1, E).to(torch.int32)
    top2 = torch.argmax(probs.masked_fill(mask1.bool(), float("-inf")), dim=-1)
    mask2 = F.one_hot(top2, E).to(torch.int32)
    # set_aux_loss, set_z_loss
    expert_mask = torch.maximum(mask1, mask2).to(probs.dtype)
    aux = E ** 2 * torch.mean(expert_mask.mean(0) * probs.mean(0))
    z = torch.sum(torch.logsumexp(logits, dim=-1) ** 2) / N
    rank1 = torch.cumsum(mask1, dim=0) - 1
    rank2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    dropped = int((mask1 * (rank1 >= capacity)).sum() + (mask2 * (rank2 >= capacity)).sum())
    mask1 = mask1 * (rank1 < capacity)
    mask2 = mask2 * (rank2 < capacity)
    rank1 = torch.sum(mask1 * rank1, dim=-1)
    rank2 = torch.sum(mask2 * rank2, dim=-1)
    weight1, weight2 = mask1 * probs, mask2 * probs
    cb = torch.zeros(N, E, capacity, dtype=probs.dtype)
    sec = torch.zeros(N, E, capacity, dtype=torch.bool)
    n = torch.arange(N)
    cb[n, top1, rank1] += weight1[n, top1]
    cb[n, top2, rank2] += weight2[n, top2]
    sec[n, top1, rank1] |= mask1.bool()[n, top1]
    sec[n, top2, rank2] |= mask2.bool()[n, top2]
    return cb, sec, aux, z, dropped


def sparse_mlp(x, w, pre, cfg, stats, dropless=False):
    """SparseMLP.forward without expert parallelism or kernels: router in
    fp32, tokens dispatched into [E, C, D] slots, MLPExperts, combined"""
    shape = x.shape
    tokens = x.reshape(-1, cfg.hidden_size)
    gate_output = F.linear(tokens, w[pre + "gate_weight"])
    cb, sec, aux, z, dropped = top2_router(gate_output, cfg, dropless)
    stats.append((aux.item(), z.item(), dropped))
    dispatch = torch.matmul(sec.to(tokens.dtype).permute(1, 2, 0), tokens)  # [E, C, D]
    wi_gate, wi_up, wo = w[pre + "experts.wi_gate"], w[pre + "experts.wi_up"], w[pre + "experts.wo"]
    out = torch.stack([torch.mm(swiglu(torch.mm(dispatch[e], wi_gate[e])) * torch.mm(dispatch[e], wi_up[e]), wo[e])
                       for e in range(cfg.num_experts)])
    ans = torch.matmul(cb.reshape(cb.shape[0], -1), out.reshape(-1, out.shape[-1]))
    return ans.reshape(shape)


class OpenMoeOracle:
    def __init__(self, hf_dir, dtype):
        self.cfg = Config(hf_dir)
        self.w = {k: v.to(dtype) for k, v in load_state_dict(hf_dir).items()}
        self.sin, self.cos = fixed_pos_embedding(self.cfg.head_dim, self.cfg.max_position_embeddings)
        self.dtype = dtype

    def attention(self, x, pre, mask, position_ids, past, old_rope):
        c, w = self.cfg, self.w
        B, T, _ = x.shape
        H, Hd = c.num_attention_heads, c.head_dim
        q = F.linear(x, w[pre + "q_proj.weight"]).view(B, T, H, Hd).transpose(1, 2)
        k = F.linear(x, w[pre + "k_proj.weight"]).view(B, T, H, Hd).transpose(1, 2)
        v = F.linear(x, w[pre + "v_proj.weight"]).view(B, T, H, Hd).transpose(1, 2)
        if past is not None:  # the cache holds keys before RoPE
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        qr, kr = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), self.cos, self.sin, position_ids, old_rope)
        qr, kr = qr.transpose(1, 2), kr.transpose(1, 2)
        scores = torch.matmul(qr, kr.transpose(2, 3))  # no 1/sqrt(Hd): folded into Wq's init
        scores = scores + mask
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(qr.dtype)
        out = torch.matmul(p, v).transpose(1, 2).reshape(B, T, H * Hd)
        return F.linear(out, w[pre + "o_proj.weight"]), present

    def forward(self, ids, past=None, position_ids=None, old_rope=False, dropless=False):
        """ids [B, T] -> logits [B, T, V] (float32), the new cache, router stats per MoE layer.
        dropless: capacity N (for checking the cached decode against one forward)"""
        c, w = self.cfg, self.w
        B, T = ids.shape
        past_len = past[0][0].shape[2] if past is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T).unsqueeze(0)
        # _prepare_decoder_attention_mask: causal, finfo.min above the diagonal
        mask = torch.full((T, T), torch.finfo(self.dtype).min, dtype=self.dtype)
        cond = torch.arange(T)
        mask.masked_fill_(cond < (cond + 1).view(T, 1), 0)
        mask = torch.cat([torch.zeros(T, past_len, dtype=self.dtype), mask], dim=-1)[None, None]
        h = w["model.embed_tokens.weight"][ids]
        cache, stats = [], []
        for i in range(c.num_hidden_layers):
            pre = "model.layers.%d." % i
            a, present = self.attention(rms_norm(h, w[pre + "input_layernorm.weight"], c.rms_norm_eps),
                                        pre + "self_attn.", mask, position_ids,
                                        past[i] if past is not None else None, old_rope)
            cache.append(present)
            h = h + a
            x = rms_norm(h, w[pre + "post_attention_layernorm.weight"], c.rms_norm_eps)
            if (i + 1) % c.moe_layer_interval == 0:
                h = h + sparse_mlp(x, w, pre + "mlp.", c, stats, dropless)
                h = h + dense_mlp(rms_norm(h, w[pre + "pre_extra_mlp_layernorm.weight"], c.rms_norm_eps), w,
                                  pre + "extra_mlp.")
            else:
                h = h + dense_mlp(x, w, pre + "mlp.")
        h = rms_norm(h, w["model.norm.weight"], c.rms_norm_eps)
        return F.linear(h, w["lm_head.weight"]).float(), cache, stats

    def generate(self, prompt, max_new, limit, old_rope):
        """transformers' greedy generate with use_cache: the prompt in one
        forward, then the last token with position_ids = its position"""
        ids = list(prompt)
        logits, past, stats = self.forward(torch.tensor([ids]), old_rope=old_rope)
        self.prefill_dropped = sum(s[2] for s in stats)
        for _ in range(max_new):
            nxt = int(torch.argmax(logits[0, -1, :limit]))
            ids.append(nxt)
            if nxt == EOS_ID:
                break
            logits, past, _ = self.forward(torch.tensor([[nxt]]), past, torch.tensor([[len(ids) - 1]]), old_rope)
        self.generated_ids = ids
        return ids


# ----------------------------------------------------------------------------

def n_params(c):
    """SPEC §6 parameter count of this config (for the debug state's gradients)"""
    D, HHd, F_, E = c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size, c.num_experts
    dense = 3 * D * F_ + D * F_
    n = 2 * c.vocab_size * D + D
    for i in range(c.num_hidden_layers):
        n += 2 * D + 4 * HHd * D
        n += dense if (i + 1) % c.moe_layer_interval else E * D + E * 4 * D * F_ + D + dense
    return n


def write_state(path, oracle, x, logits, stats):
    c = oracle.cfg
    B, T = x.shape
    h = np.zeros(256, "<i4")
    h[:6] = [STATE_MAGIC, 1, B, T, int(round(c.router_capacity_factor_eval * 1000)), c.router_min_capacity]
    h[9], h[10] = 0, 1  # group_size 0 (the whole batch), capacity rule colossalai; loss coefficients 0
    n_moe = len(stats)
    losses = np.zeros(8, "<f4")
    losses[2] = sum(s[0] for s in stats) / n_moe
    losses[3] = sum(s[1] for s in stats) / n_moe
    losses[5] = sum(s[2] for s in stats) / (B * T * c.router_topk * n_moe)
    with open(path, "wb") as f:
        h.tofile(f)
        x.numpy().astype("<i4").tofile(f)
        np.full(B * T, -1, "<i4").tofile(f)
        logits.numpy().astype("<f4").tofile(f)
        losses.tofile(f)
        np.zeros(n_params(c), "<f4").tofile(f)
    return losses


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["logits", "generate"])
    ap.add_argument("hf_dir")
    ap.add_argument("out", nargs="?")
    ap.add_argument("-B", type=int, default=2)
    ap.add_argument("-T", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-p", "--prompt", default="0")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--old-rope", action="store_true")
    ap.add_argument("--fp64", action="store_true")
    return ap


def run_command(a, out):
    oracle = OpenMoeOracle(a.hf_dir, torch.float64 if a.fp64 else torch.float32)
    if a.cmd == "logits":
        if not a.out:
            sys.exit("logits needs OUT_STATE")
        g = torch.Generator().manual_seed(a.seed)
        x = torch.randint(0, oracle.cfg.vocab_size, (a.B, a.T), generator=g)
        logits, _, stats = oracle.forward(x)
        losses = write_state(a.out, oracle, x, logits, stats)
        print("%s: B=%d T=%d lb %.6f rz %.6f dropped %.6f (%s)" % (a.out, a.B, a.T, losses[2], losses[3],
              losses[5], " ".join(str(s[2]) for s in stats)), file=out)
    else:
        prompt = [int(t) for t in a.prompt.split()]
        print(" ".join(map(str, oracle.generate(prompt, a.n, a.limit or oracle.cfg.vocab_size, a.old_rope))),
              file=out)
        print("prefill: %d assignments dropped" % oracle.prefill_dropped, file=out)
        ids = oracle.generated_ids
        full, _, _ = oracle.forward(torch.tensor([ids[:-1]]), dropless=True)  # at once, no cache
        n_prompt = len(prompt)
        agree = sum(int(torch.argmax(full[0, p, :a.limit or oracle.cfg.vocab_size])) == ids[p + 1]
                    for p in range(n_prompt - 1, len(ids) - 1))
        print("full forward agrees: %d/%d" % (agree, len(ids) - n_prompt), file=out)


def main():
    """one command from the arguments, or with "batch" one per line of stdin,
    each line OUT_FILE then the command, its output going to OUT_FILE (one
    start of torch for a whole test script)"""
    torch.set_num_threads(1)
    with torch.no_grad():
        if sys.argv[1:] == ["batch"]:
            for line in sys.stdin:
                words = shlex.split(line)
                if words:
                    with open(words[0], "w") as out:
                        run_command(parser().parse_args(words[1:]), out)
        else:
            run_command(parser().parse_args(), sys.stdout)


if __name__ == "__main__":
    main()
