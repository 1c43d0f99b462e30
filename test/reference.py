"""
test/reference.py: the independent PyTorch reference of SPEC.md (OpenMoE).

It is written from SPEC.md and the file formats of openmoe.h only, never from
openmoe.c, so that comparing the two really checks something. It is

  - a module: the model of SPEC §2-§4 in plain vectorised PyTorch, for any
    dtype and device (float64 for the test cases, float32 for dev/bench),
    with SPEC §10's packed rows (a segment and a position per token),
    the optimizers of openmoe.h section 6 in float64 numpy, and readers and
    writers of the model file (SPEC §6) and the debug state file (SPEC §7);
  - a CLI that writes the test cases that test_cpu / test_gpu compare with:
        /usr/bin/python3 test/reference.py OUTDIR
  - a self-test: /usr/bin/python3 test/reference.py --selfcheck
    (fp32 against fp64 under SPEC §7's tolerances, with the headroom, and
    checks that the comparison, the router and the optimizers can fail).

Shapes in comments: B batch, T time, D width, H heads, Hd head width,
N = B*T flattened tokens (n = b*T + t), E experts, K experts per token,
V vocabulary, G routing groups.
"""
import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as Fn

MODEL_MAGIC = 240201739
STATE_MAGIC = 240201740
HEADER_INTS = 256
N_LOSSES = 8
LOSS_NAMES = ("total", "ce", "lb", "rz", "lz", "dropped")

# -----------------------------------------------------------------------------
# config (SPEC §1) and per-call settings (SPEC §3, §4, §7)

CONFIG_FIELDS = ("V", "max_seq_len", "L", "D", "H", "Hd", "F", "E", "K", "moe_every", "Fe", "extra_ffn")
# openmoe.h's upper bounds (MAX_*) of the fields, used by the model or not
CONFIG_BOUNDS = dict(V=1 << 22, max_seq_len=1 << 20, L=512, D=1 << 16, H=1 << 16, Hd=1 << 16, F=1 << 16, E=4096,
                     K=32, moe_every=513, Fe=1 << 16)


@dataclass(frozen=True)
class Config:
    V: int
    max_seq_len: int
    L: int
    D: int
    H: int
    Hd: int
    F: int
    E: int
    K: int
    moe_every: int
    Fe: int
    extra_ffn: int = 1

    def is_moe(self, l):
        return (l + 1) % self.moe_every == 0

    @property
    def n_moe(self):
        return self.L // self.moe_every

    def check(self):
        """SPEC §6's header rules; returns None or what is wrong."""
        for f in CONFIG_FIELDS[:-1]:
            if getattr(self, f) <= 0:
                return f"{f} = {getattr(self, f)}, must be > 0"
        for f, hi in CONFIG_BOUNDS.items():
            if getattr(self, f) > hi:
                return f"{f} = {getattr(self, f)}, must be in [1, {hi}]"
        if self.H * self.Hd > CONFIG_BOUNDS["D"]:
            return f"H*Hd = {self.H * self.Hd}, must be <= {CONFIG_BOUNDS['D']}"
        if self.K > self.E:
            return f"K = {self.K} > E = {self.E}"
        if self.Hd % 2:
            return f"Hd = {self.Hd} is odd (RoPE pairs i with i+Hd/2)"
        if self.extra_ffn not in (0, 1):
            return f"extra_ffn = {self.extra_ffn}, must be 0 or 1"
        return None


PRESETS = {  # SPEC §1, the same table as openmoe.h
    "tiny": Config(4096, 256, 4, 128, 4, 32, 384, 8, 2, 2, 384, 1),
    "small": Config(32000, 1024, 8, 512, 8, 64, 1536, 8, 2, 2, 1536, 1),
    "base": Config(256384, 2048, 12, 768, 12, 64, 2048, 16, 2, 4, 2048, 1),
    "8b": Config(256384, 2048, 24, 2048, 24, 128, 8192, 32, 2, 6, 8192, 1),
    "34b": Config(256384, 2048, 32, 3072, 24, 128, 12288, 32, 2, 4, 12288, 1),
}


@dataclass(frozen=True)
class Settings:
    """Routing and loss settings of one call, as the state file stores them:
    integers, the coefficients in units of 1e-6."""
    cf1000: int = 1250       # capacity factor x 1000
    min_capacity: int = 4
    group_size: int = 4096   # tokens per routing group, 0 = all B*T tokens
    lb_e6: int = 10000       # lb_coef 0.01
    rz_e6: int = 100         # rz_coef 1e-4
    lz_e6: int = 100         # lz_coef 1e-4
    capacity_rule: int = 0   # SPEC §8: 0 t5x, 1 colossalai, 2 none (dropless)
    drop_policy: int = 0     # SPEC §8: 0 position, 1 probs

    @property
    def lb_coef(self):
        return self.lb_e6 * 1e-6

    @property
    def rz_coef(self):
        return self.rz_e6 * 1e-6

    @property
    def lz_coef(self):
        return self.lz_e6 * 1e-6


# -----------------------------------------------------------------------------
# the parameter table (SPEC §6, openmoe.h section 3): names, shapes, file order


@dataclass(frozen=True)
class TensorSpec:
    name: str     # "wte", "l3.router", "l3.w_gate", "l3.x_gate", ...
    slices: int   # E for expert stacks, else 1
    rows: int     # 1 for vectors (norm weights)
    cols: int
    matrix: bool  # weight decay / factored Adafactor; False for norm weights
    shape: tuple  # the torch shape: (cols,), (rows, cols) or (E, rows, cols)

    @property
    def numel(self):
        return self.slices * self.rows * self.cols


def param_specs(cfg):
    """Every tensor of the model in file order (SPEC §6)."""
    specs = []

    def vec(name):
        specs.append(TensorSpec(name, 1, 1, cfg.D, False, (cfg.D,)))

    def mat(name, rows, cols):
        specs.append(TensorSpec(name, 1, rows, cols, True, (rows, cols)))

    def experts(name, rows, cols):
        specs.append(TensorSpec(name, cfg.E, rows, cols, True, (cfg.E, rows, cols)))

    HHd = cfg.H * cfg.Hd
    mat("wte", cfg.V, cfg.D)
    for l in range(cfg.L):
        p = f"l{l}."
        vec(p + "attn_norm")
        mat(p + "wq", HHd, cfg.D)
        mat(p + "wk", HHd, cfg.D)
        mat(p + "wv", HHd, cfg.D)
        mat(p + "wo", cfg.D, HHd)
        vec(p + "mlp_norm")
        if not cfg.is_moe(l):
            mat(p + "w_gate", 2 * cfg.F, cfg.D)
            mat(p + "w_up", cfg.F, cfg.D)
            mat(p + "w_down", cfg.D, cfg.F)
        else:
            mat(p + "router", cfg.E, cfg.D)
            experts(p + "w_gate", 2 * cfg.Fe, cfg.D)
            experts(p + "w_up", cfg.Fe, cfg.D)
            experts(p + "w_down", cfg.D, cfg.Fe)
            if cfg.extra_ffn:
                vec(p + "extra_norm")
                mat(p + "x_gate", 2 * cfg.F, cfg.D)
                mat(p + "x_up", cfg.F, cfg.D)
                mat(p + "x_down", cfg.D, cfg.F)
    vec("final_norm")
    mat("lm_head", cfg.V, cfg.D)
    return specs


def n_params(cfg):
    return sum(s.numel for s in param_specs(cfg))


def flatten(cfg, params):
    """dict name -> tensor/array  ->  one float64 numpy vector in file order."""
    return np.concatenate([np.asarray(_np(params[s.name]), dtype=np.float64).reshape(-1)
                           for s in param_specs(cfg)])


def unflatten(cfg, flat, dtype=torch.float64, device="cpu"):
    """one vector in file order -> dict name -> torch tensor of its shape."""
    out, off = {}, 0
    flat = np.asarray(flat)
    for s in param_specs(cfg):
        a = flat[off:off + s.numel].reshape(s.shape)
        out[s.name] = torch.tensor(a, dtype=dtype, device=device)
        off += s.numel
    assert off == flat.size, f"{flat.size} values for {off} parameters"
    return out


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def init_params(cfg, seed, dtype=torch.float64, device="cpu", router_var=0.5, norm_std=0.1):
    """Random weights in the spirit of SPEC §5, drawn from a seeded torch
    generator (CPU, float64, then cast): wte N(0,1); matrices N(0, 0.1/fan_in);
    Wq also / sqrt(Hd); router N(0, router_var/D) so that routing is far from
    uniform; norm weights N(1, norm_std^2) so that their gradients matter.
    The values are rounded to float32 (what a model file holds), so a float64
    computation uses exactly the weights the C code reads."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for s in param_specs(cfg):
        leaf = s.name.split(".")[-1]
        z = torch.randn(s.shape, generator=g, dtype=torch.float64)
        if not s.matrix:
            w = 1.0 + norm_std * z
        elif leaf == "wte":
            w = z
        elif leaf == "router":
            w = z * math.sqrt(router_var / cfg.D)
        else:
            w = z * math.sqrt(0.1 / s.cols)
            if leaf == "wq":
                w = w / math.sqrt(cfg.Hd)
        params[s.name] = w.float().to(dtype=dtype, device=device)
    return params


# -----------------------------------------------------------------------------
# the model (SPEC §2): one function per idea


def rmsnorm(x, w, eps=1e-6):
    """x [..., D], w [D] -> x / sqrt(mean(x^2) + eps) * w."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(T, Hd, dtype, device):
    """cos, sin [T, Hd/2]: angle pos * 10000^(-2i/Hd), computed in float64."""
    i = torch.arange(Hd // 2, dtype=torch.float64)
    inv_freq = 10000.0 ** (-2.0 * i / Hd)                    # [Hd/2]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, Hd/2]
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


def rope_at(position, Hd, dtype, device):
    """cos, sin [B, 1, T, Hd/2] of each token's position [B, T] (SPEC §10),
    for rope() on [B, H, T, Hd]: the rows of rope_tables at the positions."""
    cos, sin = rope_tables(int(position.max()) + 1, Hd, dtype, device)
    return cos[position][:, None], sin[position][:, None]


def rope(x, cos, sin):
    """Rotate-half RoPE over the full head: x [B, H, T, Hd], element i pairs
    with i + Hd/2 and both turn by the angle of pair i (cos, sin [T, Hd/2],
    or [B, 1, T, Hd/2] per token)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]                          # [B, H, T, Hd/2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x, wq, wk, wv, wo, H, Hd, cos, sin, segment=None):
    """Causal multi-head attention, no 1/sqrt(Hd) (it is folded into Wq's init).
    x [B, T, D]; wq, wk, wv [H*Hd, D]; wo [D, H*Hd] -> [B, T, D]. With
    segment [B, T] (SPEC §10) a query sees only the keys of its own segment
    (padding, -1, is one more segment)."""
    B, T, _ = x.shape
    q = (x @ wq.T).view(B, T, H, Hd).transpose(1, 2)         # [B, H, T, Hd]
    k = (x @ wk.T).view(B, T, H, Hd).transpose(1, 2)
    v = (x @ wv.T).view(B, T, H, Hd).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    scores = q @ k.transpose(-2, -1)                          # [B, H, T, T]
    hidden = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)   # [T, T] the future
    if segment is not None:
        hidden = hidden | (segment[:, None, :] != segment[:, :, None])[:, None]  # [B, 1, T, T]
    att = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, T, H * Hd)     # [B, T, H*Hd]
    return out @ wo.T


def ffn(x, w_gate, w_up, w_down):
    """OpenMoE's gated FFN: [a | b] = x Wg^T, ((a * silu(b)) * (x Wu^T)) Wd^T.
    x [..., D]; w_gate [2F, D]; w_up [F, D]; w_down [D, F] -> [..., D]."""
    F = w_up.shape[0]
    ab = x @ w_gate.T                                         # [..., 2F]
    a, b = ab[..., :F], ab[..., F:]
    return (a * Fn.silu(b) * (x @ w_up.T)) @ w_down.T


CAP_T5X, CAP_COLOSSALAI, CAP_NONE = 0, 1, 2
DROP_POSITION, DROP_PROBS = 0, 1


def capacity(n_tokens, E, K, s):
    """Expert capacity of a group of n_tokens, in integers, by s.capacity_rule:
    t5x (SPEC §3 step 3) max(min_capacity, round(CF * N / E)); colossalai
    (SPEC §8) floor(K * CF * N / E), odd made even, at least min_capacity;
    none: N, so that nothing is dropped."""
    if s.capacity_rule == CAP_NONE:
        return n_tokens
    if s.capacity_rule == CAP_COLOSSALAI:
        c = K * s.cf1000 * n_tokens // (1000 * E)
        return max(s.min_capacity, c + c % 2)
    return max(s.min_capacity, (s.cf1000 * n_tokens + 500 * E) // (1000 * E))


def route(p, K, s):
    """Top-K choice and capacity dropping (SPEC §3 steps 2-4), constants for
    autograd. p [N, E] router probabilities of the call's N tokens.
    Returns expert [N, K] (rank 0 = best), kept [N, K] bool, gid [N] the
    routing group of each token, and sizes [G] the tokens of each group."""
    N, E = p.shape
    dev = p.device
    p = p.detach()
    gs = N if s.group_size == 0 else s.group_size
    gid = torch.arange(N, device=dev) // gs                   # [N] group of token n
    sizes = torch.bincount(gid)                               # [G]
    G = sizes.numel()
    cap = torch.tensor([capacity(int(n), E, K, s) for n in sizes.tolist()],
                       device=dev)                            # [G]
    # top-K by probability; a stable sort puts the lower expert first on ties
    expert = torch.sort(p, dim=1, descending=True, stable=True).indices[:, :K]  # [N, K]
    if s.drop_policy == DROP_PROBS:
        return expert, keep_by_probs(p, expert, gid, cap), gid, sizes
    onehot = Fn.one_hot(expert, E)                            # [N, K, E] int64
    # priority within a group is rank-major: all rank-0 choices in token
    # order, then rank 1, ...; sort the N*K assignments by (group, rank, token)
    n = torch.arange(N, device=dev)[:, None].expand(N, K)
    k = torch.arange(K, device=dev)[None, :].expand(N, K)
    key = (gid[:, None] * K + k) * N + n                      # [N, K], all distinct
    perm = torch.argsort(key.reshape(-1))                     # [N*K] priority order
    oh = onehot.reshape(N * K, E)[perm]                       # [N*K, E]
    g_of = gid[:, None].expand(N, K).reshape(-1)[perm]        # [N*K] group of each
    # GShard's position in expert: a cumsum of the one-hot in priority order,
    # less what earlier groups put in the same expert
    per_group = torch.zeros(G, E, dtype=oh.dtype, device=dev).index_add_(0, gid, onehot.sum(1))
    earlier = per_group.cumsum(0) - per_group                 # [G, E] exclusive prefix
    position = ((oh.cumsum(0) - earlier[g_of]) * oh).sum(1)   # [N*K], 1-based slot
    kept_sorted = position <= cap[g_of]
    kept = torch.empty_like(kept_sorted)
    kept[perm] = kept_sorted
    return expert, kept.view(N, K), gid, sizes


def keep_by_probs(p, expert, gid, cap):
    """Drop policy probs (SPEC §8): in each group, expert e keeps the cap[g]
    assignments that chose it with the largest p_e(n); ties to the lower rank,
    then the lower n. Returns kept [N, K] bool."""
    N, K = expert.shape
    pe = _np(p.gather(1, expert)).reshape(-1)                 # [N*K] p of each assignment
    e = _np(expert).reshape(-1)
    r = np.tile(np.arange(K), N)
    n = np.repeat(np.arange(N), K)
    g = _np(gid)[n]
    order = np.lexsort((n, r, -pe, e, g))                     # by group, expert, then priority
    ge = (g * p.shape[1] + e)[order]
    first = np.searchsorted(ge, ge, side="left")              # start of each (group, expert) run
    rank = np.arange(N * K) - first                           # 0-based place in its expert's queue
    kept = np.zeros(N * K, dtype=bool)
    kept[order] = rank < _np(cap)[g[order]]
    return torch.from_numpy(kept.reshape(N, K)).to(p.device)


def route_slow(p, K, s):
    """route() as a plain loop over assignments, for the self-test."""
    p = p.detach().cpu().double().numpy()
    N, E = p.shape
    gs = N if s.group_size == 0 else s.group_size
    expert = np.zeros((N, K), dtype=np.int64)
    kept = np.zeros((N, K), dtype=bool)
    for n in range(N):
        order = sorted(range(E), key=lambda e: (-p[n, e], e))
        expert[n] = order[:K]
    for g0 in range(0, N, gs):
        g1 = min(N, g0 + gs)
        cap = capacity(g1 - g0, E, K, s)
        if s.drop_policy == DROP_PROBS:
            for e in range(E):
                chose = [(-p[n, e], k, n) for n in range(g0, g1) for k in range(K) if expert[n, k] == e]
                for _, k, n in sorted(chose)[:cap]:
                    kept[n, k] = True
            continue
        load = [0] * E
        for k in range(K):
            for n in range(g0, g1):
                e = expert[n, k]
                if load[e] < cap:
                    load[e] += 1
                    kept[n, k] = True
    return expert, kept


def moe(x, router, w_gate, w_up, w_down, K, s):
    """One MoE layer (SPEC §3) and its router losses (SPEC §4).
    x [B, T, D]; router [E, D]; w_gate [E, 2Fe, D]; w_up [E, Fe, D];
    w_down [E, D, Fe]. Returns out [B, T, D], lb, rz (scalars), the number of
    dropped assignments, and the routing (p [N, E], expert, kept [N, K])."""
    B, T, D = x.shape
    E = router.shape[0]
    xf = x.reshape(B * T, D)                                  # [N, D], n = b*T + t
    z = xf @ router.T                                         # [N, E] router logits
    p = z.softmax(dim=-1)                                     # [N, E] full softmax
    expert, kept, gid, sizes = route(p, K, s)
    out = torch.zeros_like(xf)
    for e in range(E):
        tok = ((expert == e) & kept).any(dim=1).nonzero(as_tuple=True)[0]  # [n_e] tokens kept by e
        if tok.numel() == 0:
            continue
        y = ffn(xf[tok], w_gate[e], w_up[e], w_down[e])       # [n_e, D]
        out = out.index_add(0, tok, p[tok, e:e + 1] * y)      # weight: the full-softmax p
    # load balance per group: E * sum_e f_e P_e, f from the top-K before dropping
    G = sizes.numel()
    chosen = Fn.one_hot(expert, E).sum(1).to(p.dtype)         # [N, E] 1 if e in top-K of n
    n_g = sizes.to(p.dtype)[:, None]                          # [G, 1]
    f = torch.zeros(G, E, dtype=p.dtype, device=p.device).index_add(0, gid, chosen) / n_g
    P = torch.zeros(G, E, dtype=p.dtype, device=p.device).index_add(0, gid, p) / n_g
    lb = (E * (f * P).sum(dim=1)).mean()                      # mean over groups
    rz = torch.logsumexp(z, dim=-1).pow(2).mean()             # mean over all B*T tokens
    n_dropped = int((~kept).sum())
    return out.view(B, T, D), lb, rz, n_dropped, (p.detach(), expert, kept)


def output_losses(logits, y):
    """CE and output z-loss over target positions (y >= 0), both 0 without
    targets. logits [B, T, V], y [B, T] int64."""
    mask = y >= 0
    if not bool(mask.any()):
        zero = logits.new_zeros(())
        return zero, zero
    lg = logits[mask]                                         # [M, V]
    lse = torch.logsumexp(lg, dim=-1)                         # [M]
    ce = (lse - lg.gather(1, y[mask][:, None])[:, 0]).mean()
    lz = lse.pow(2).mean()
    return ce, lz


def mlp_block(h, w, cfg, l, moe_fn):
    """Layer l's second half (SPEC §2) on the residual stream h: the MoE, then
    the extra FFN, or the dense FFN. moe_fn(x, router, w_gate, w_up, w_down)
    returns a tuple whose first item is the MoE's output. Returns the new h
    and moe_fn's tuple (None in a dense layer)."""
    p = f"l{l}."
    if not cfg.is_moe(l):
        return h + ffn(rmsnorm(h, w[p + "mlp_norm"]), w[p + "w_gate"], w[p + "w_up"], w[p + "w_down"]), None
    res = moe_fn(rmsnorm(h, w[p + "mlp_norm"]), w[p + "router"], w[p + "w_gate"], w[p + "w_up"], w[p + "w_down"])
    h = h + res[0]
    if cfg.extra_ffn:  # sequential after the MoE, as OpenMoE's code does
        h = h + ffn(rmsnorm(h, w[p + "extra_norm"]), w[p + "x_gate"], w[p + "x_up"], w[p + "x_down"])
    return h, res


def forward(params, cfg, x, y, s, segment=None, position=None):
    """SPEC §2-§4. params: dict name -> tensor (one dtype, one device);
    x [B, T] int64 tokens; y [B, T] int64 targets (-1 ignored) or None;
    segment, position [B, T] int64 (SPEC §10) or None: one segment per row,
    positions 0..T-1. Returns logits [B, T, V], losses (dict of scalars:
    total, ce, lb, rz, lz as tensors, dropped as a float) and the routing of
    each MoE layer."""
    B, T = x.shape
    w = params
    if position is None:
        cos, sin = rope_tables(T, cfg.Hd, w["wte"].dtype, w["wte"].device)
    else:
        cos, sin = rope_at(position, cfg.Hd, w["wte"].dtype, w["wte"].device)
    h = w["wte"][x]                                           # [B, T, D]
    lbs, rzs, routing, n_dropped = [], [], [], 0
    for l in range(cfg.L):
        p = f"l{l}."
        h = h + attention(rmsnorm(h, w[p + "attn_norm"]), w[p + "wq"], w[p + "wk"], w[p + "wv"],
                          w[p + "wo"], cfg.H, cfg.Hd, cos, sin, segment)
        h, res = mlp_block(h, w, cfg, l, lambda *a: moe(*a, cfg.K, s))
        if res:
            _, lb, rz, nd, r = res
            lbs.append(lb)
            rzs.append(rz)
            routing.append(r)
            n_dropped += nd
    logits = rmsnorm(h, w["final_norm"]) @ w["lm_head"].T     # [B, T, V]
    zero = logits.new_zeros(())
    lb = torch.stack(lbs).mean() if lbs else zero
    rz = torch.stack(rzs).mean() if rzs else zero
    losses = {"lb": lb, "rz": rz,
              "dropped": n_dropped / (B * T * cfg.K * cfg.n_moe) if cfg.n_moe else 0.0}
    if y is not None:
        ce, lz = output_losses(logits, y)
        losses["ce"], losses["lz"] = ce, lz
        losses["total"] = ce + s.lb_coef * lb + s.rz_coef * rz + s.lz_coef * lz
    return logits, losses, routing


def forward_backward(params, cfg, x, y, s, segment=None, position=None):
    """forward() and the gradients of the total loss. Returns numpy arrays in
    float64: logits [B*T*V], losses [8] (state file order), grads [n_params]
    (file order; zero for a parameter the loss does not reach), and the routing."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    logits, L, routing = forward(leaves, cfg, x, y, s, segment, position)
    L["total"].backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    losses = np.zeros(N_LOSSES)
    for i, name in enumerate(LOSS_NAMES):
        losses[i] = float(L[name])
    return (_np(logits).astype(np.float64).reshape(-1), losses,
            flatten(cfg, grads), routing)


# -----------------------------------------------------------------------------
# optimizers (openmoe.h section 6), float64 numpy on flat vectors in file order


@dataclass(frozen=True)
class AdamWSettings:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class AdafactorSettings:
    lr: float = 0.01
    decay: float = 0.8
    clip_threshold: float = 1.0
    eps1: float = 1e-30
    eps2: float = 1e-3
    min_dim: int = 128


def as_float32_values(o):
    """The C side holds optimizer settings as float (OptSettings); use the
    same numbers, promoted to double, so that only arithmetic differs."""
    return replace(o, **{k: float(np.float32(v)) for k, v in o.__dict__.items() if isinstance(v, float)})


def _slices(cfg):
    """(spec, offset) of every tensor, for per-tensor / per-slice loops."""
    off = 0
    for s in param_specs(cfg):
        yield s, off
        off += s.numel


def adamw_step(cfg, w, g, m, v, t, o):
    """One AdamW step t (1-based), in place on float64 vectors w, m, v.
    g is scaled by min(1, clip / global_norm) first; weight decay on
    matrices only. Returns the global gradient norm before clipping."""
    norm = math.sqrt(float(np.dot(g, g)))
    scale = min(1.0, o.grad_clip / norm) if norm > 0 else 1.0
    g = g * scale
    m *= o.beta1
    m += (1 - o.beta1) * g
    v *= o.beta2
    v += (1 - o.beta2) * g * g
    mhat = m / (1 - o.beta1 ** t)
    vhat = v / (1 - o.beta2 ** t)
    decay = np.zeros_like(w)
    for s, off in _slices(cfg):
        if s.matrix:
            decay[off:off + s.numel] = o.weight_decay
    w -= o.lr * mhat / (np.sqrt(vhat) + o.eps) + o.lr * decay * w
    return norm


def adafactor_factored(spec, min_dim):
    return spec.matrix and spec.rows >= min_dim and spec.cols >= min_dim


def adafactor_step(cfg, w, g, state, t, o):
    """One Adafactor step t (1-based), in place on the float64 vector w.
    state: dict (tensor name, slice) -> second-moment arrays, filled on the
    first call. Each slice [rows, cols] is its own matrix: factored when both
    dims >= min_dim, else per element; no momentum, no weight decay."""
    beta = 1.0 - t ** (-o.decay)
    for s, off in _slices(cfg):
        for j in range(s.slices):
            a = off + j * s.rows * s.cols
            W = w[a:a + s.rows * s.cols].reshape(s.rows, s.cols)   # a view: updates w
            Gr = g[a:a + s.rows * s.cols].reshape(s.rows, s.cols)
            g2 = Gr * Gr + o.eps1
            if adafactor_factored(s, o.min_dim):
                r, c = state.setdefault((s.name, j), (np.zeros(s.rows), np.zeros(s.cols)))
                r *= beta
                r += (1 - beta) * g2.mean(axis=1)                  # [rows] row means
                c *= beta
                c += (1 - beta) * g2.mean(axis=0)                  # [cols] column means
                u = Gr / np.sqrt(r / r.mean())[:, None] / np.sqrt(c)[None, :]
            else:
                (vv,) = state.setdefault((s.name, j), (np.zeros((s.rows, s.cols)),))
                vv *= beta
                vv += (1 - beta) * g2
                u = Gr / np.sqrt(vv)
            u = u / max(1.0, math.sqrt(float(np.mean(u * u))) / o.clip_threshold)
            rms_w = math.sqrt(float(np.mean(W * W)))               # before the update
            W -= o.lr * max(o.eps2, rms_w) * u


def run_optimizer(cfg, params_flat, grads_flat, kind, o, steps=3):
    """steps optimizer steps t = 1..steps from params_flat, each with the
    same gradient; float64 throughout. Returns the new parameter vector."""
    w = np.array(params_flat, dtype=np.float64)
    g = np.array(grads_flat, dtype=np.float64)
    if kind == "adamw":
        m, v = np.zeros_like(w), np.zeros_like(w)
        for t in range(1, steps + 1):
            adamw_step(cfg, w, g, m, v, t, o)
    else:
        state = {}
        for t in range(1, steps + 1):
            adafactor_step(cfg, w, g, state, t, o)
    return w


# -----------------------------------------------------------------------------
# files (SPEC §6, §7): little-endian int32 header[256], then the payload


def _atomic_write(path, chunks):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c.tobytes())
    os.replace(tmp, path)


def write_model(path, cfg, params_flat):
    """Model file: header, then n_params float32 in file order."""
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = MODEL_MAGIC, 1
    h[2:14] = [getattr(cfg, f) for f in CONFIG_FIELDS]
    flat = np.asarray(params_flat)
    assert flat.size == n_params(cfg)
    _atomic_write(path, [h, flat.astype("<f4")])


def read_model(path):
    """Returns (cfg, float32 vector of the parameters); raises ValueError
    naming the file and the problem for anything SPEC §6 rejects."""
    raw = open(path, "rb").read()
    if len(raw) < 4 * HEADER_INTS:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the 1024-byte header")
    h = np.frombuffer(raw[:4 * HEADER_INTS], dtype="<i4")
    if h[0] != MODEL_MAGIC:
        raise ValueError(f"{path}: bad magic {h[0]}")
    if h[1] != 1:
        raise ValueError(f"{path}: unknown version {h[1]}")
    if np.any(h[14:] != 0):
        raise ValueError(f"{path}: header words 14..255 must be 0")
    cfg = Config(*[int(v) for v in h[2:14]])
    why = cfg.check()
    if why:
        raise ValueError(f"{path}: inconsistent header: {why}")
    n = n_params(cfg)
    if len(raw) != 4 * HEADER_INTS + 4 * n:
        raise ValueError(f"{path}: size {len(raw)} bytes, header describes {n} parameters")
    return cfg, np.frombuffer(raw[4 * HEADER_INTS:], dtype="<f4").copy()


def write_state(path, cfg, s, x, y, logits, losses, grads, segment=None, position=None):
    """Debug state file: header, x, y int32 [B*T], with segment and position
    (word [12] = 1: SPEC §10) segment, position int32 [B*T], then logits
    [B*T*V], losses [8], grads [n_params] float32."""
    B, T = x.shape
    packed = segment is not None
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:13] = [STATE_MAGIC, 1, B, T, s.cf1000, s.min_capacity, s.lb_e6, s.rz_e6, s.lz_e6, s.group_size,
              s.capacity_rule, s.drop_policy, int(packed)]
    assert logits.size == B * T * cfg.V and len(losses) == N_LOSSES and grads.size == n_params(cfg)
    ints = [np.asarray(a).astype("<i4").reshape(-1) for a in ((x, y, segment, position) if packed else (x, y))]
    _atomic_write(path, [h] + ints + [np.asarray(logits).astype("<f4"), np.asarray(losses).astype("<f4"),
                                      np.asarray(grads).astype("<f4")])


def read_state(path, cfg):
    """Returns a dict: B, T, settings, x, y [B, T] int64, segment, position
    [B, T] int64 or None (word [12] 0), logits, losses, grads (float32 vectors)."""
    raw = open(path, "rb").read()
    h = np.frombuffer(raw[:4 * HEADER_INTS], dtype="<i4")
    if h[0] != STATE_MAGIC or h[1] != 1 or h[12] not in (0, 1) or np.any(h[13:] != 0):
        raise ValueError(f"{path}: not a version 1 state file")
    B, T, packed = int(h[2]), int(h[3]), bool(h[12])
    s = Settings(cf1000=int(h[4]), min_capacity=int(h[5]), lb_e6=int(h[6]), rz_e6=int(h[7]),
                 lz_e6=int(h[8]), group_size=int(h[9]), capacity_rule=int(h[10]), drop_policy=int(h[11]))
    BT, n = B * T, n_params(cfg)
    if len(raw) != 4 * (HEADER_INTS + (4 if packed else 2) * BT + BT * cfg.V + N_LOSSES + n):
        raise ValueError(f"{path}: size {len(raw)} does not match B={B} T={T} V={cfg.V} n_params={n}")
    off = 4 * HEADER_INTS

    def take(count, dt):
        nonlocal off
        a = np.frombuffer(raw, dtype=dt, count=count, offset=off).copy()
        off += 4 * count
        return a
    x = take(BT, "<i4").astype(np.int64).reshape(B, T)
    y = take(BT, "<i4").astype(np.int64).reshape(B, T)
    segment = take(BT, "<i4").astype(np.int64).reshape(B, T) if packed else None
    position = take(BT, "<i4").astype(np.int64).reshape(B, T) if packed else None
    logits = take(BT * cfg.V, "<f4")
    losses = take(N_LOSSES, "<f4")
    grads = take(n, "<f4")
    return dict(B=B, T=T, settings=s, x=x, y=y, segment=segment, position=position, logits=logits, losses=losses,
                grads=grads)


# -----------------------------------------------------------------------------
# the test cases


@dataclass(frozen=True)
class Case:
    name: str
    cfg: Config
    B: int
    T: int
    s: Settings
    seed: int
    ignore: float = 0.0       # fraction of targets set to -1 (1.0: all)
    router_var: float = 0.5   # init_params' router variance x D: larger routes more unevenly
    optimizers: tuple = ()    # ("adamw", "adafactor") for cases with optimizer files:
                              # moe_basic, moe_drop (grad norm < 1), hhd_ne_d (> 1, AdamW clips)
    packing: tuple = ()       # SPEC §10's packed rows, one tuple per row of (length, first position)
                              # per segment, a length < 0 being that much padding; () one segment per row
    about: str = ""


CASES = [
    Case("moe_basic", Config(97, 24, 4, 32, 4, 8, 64, 8, 2, 2, 48, 1), 3, 16,
         Settings(group_size=0), seed=1000, optimizers=("adamw", "adafactor"),
         about="L=4, MoE layers 1 and 3, F != Fe, one group, default settings;"
               " optimizer files with a gradient norm < 1 (AdamW does not clip)"),
    Case("hhd_ne_d", Config(61, 16, 2, 48, 3, 10, 40, 4, 2, 1, 24, 1), 2, 12,
         Settings(group_size=0), seed=2000, optimizers=("adamw", "adafactor"),
         about="H*Hd = 30 != D = 48; every layer MoE (moe_every 1); optimizer files with"
               " a gradient norm > 1 (AdamW clips) and router [4, D] below min_dim"),
    Case("dense_only", Config(50, 10, 3, 32, 2, 16, 40, 4, 2, 4, 16, 1), 2, 10,
         Settings(group_size=0), seed=3000,
         about="moe_every > L: no MoE layer, lb = rz = dropped = 0; T = max_seq_len"),
    Case("moe_drop", Config(40, 32, 2, 24, 2, 12, 32, 6, 2, 1, 16, 1), 3, 18,
         Settings(cf1000=500, min_capacity=2, group_size=20, lb_e6=50000, rz_e6=2000, lz_e6=1000),
         seed=4000, ignore=0.3, optimizers=("adamw", "adafactor"),
         about="CF 0.5: heavy drops; groups 20+20+14 (last shorter, min_capacity binds);"
               " 30% targets ignored; non-default coefficients; optimizer files with"
               " router [6, D] below min_dim"),
    Case("no_extra", Config(64, 20, 2, 32, 4, 8, 48, 4, 2, 2, 32, 0), 2, 16,
         Settings(group_size=0), seed=5000,
         about="extra_ffn = 0"),
    Case("top1", Config(80, 16, 2, 32, 2, 16, 32, 8, 1, 2, 24, 1), 4, 8,
         Settings(group_size=16, lb_e6=20000), seed=6000,
         about="K = 1; two equal groups of 16"),
    Case("top3", Config(70, 16, 2, 32, 4, 8, 32, 5, 3, 1, 24, 1), 2, 15,
         Settings(cf1000=2000, group_size=0), seed=7000,
         about="K = 3 of E = 5, eval capacity factor 2.0"),
    Case("no_targets", Config(60, 16, 4, 32, 4, 8, 32, 4, 2, 2, 24, 1), 2, 12,
         Settings(group_size=0, lb_e6=100000, rz_e6=10000), seed=8000, ignore=1.0,
         about="all y = -1: ce = lz = 0, gradients from lb and rz only"),
    Case("colossalai", Config(40, 32, 2, 24, 2, 12, 32, 6, 2, 1, 16, 1), 3, 20,
         Settings(group_size=0, capacity_rule=1), seed=10000,
         about="colossalai capacity: floor(2 * 1.25 * 60 / 6) = 25 is odd, so C = 26,"
               " and an expert holds more than 26 assignments: the round-up keeps one more"),
    Case("probs", Config(40, 32, 2, 24, 2, 12, 32, 6, 2, 1, 16, 1), 3, 18,
         Settings(cf1000=1000, group_size=20, drop_policy=1), seed=11000,
         about="drop policy probs: groups 20+20+14, each drops; the kept are the most"
               " probable, not the first in priority order"),
    Case("dropless", Config(6, 32, 2, 24, 2, 12, 32, 6, 2, 1, 16, 1), 4, 16,
         Settings(group_size=32, capacity_rule=2), seed=12000, router_var=20.0,
         about="capacity none: 6 token ids and a sharp router send one expert far more"
               " than CF*N/E tokens of each group of 32; nothing is dropped"),
    Case("tiny_like", Config(512, 128, 4, 64, 4, 16, 192, 8, 2, 2, 128, 1), 4, 64,
         Settings(), seed=9000,
         about="near the tiny preset's shape, default settings (group_size 4096 > B*T)"),
    Case("deep", Config(700, 160, 2, 32, 2, 16, 48, 4, 2, 2, 24, 1), 4, 160,
         Settings(group_size=0), seed=13000,
         about="B*T = 640 and V = 700 past 512: the weight gradients' products and lm_head's"
               " input gradient run deeper than one depth slice of the CPU matmul, with ragged"
               " ends, and lm_head's 700 columns take more than one range"),
    Case("stream", Config(1040, 258, 1, 32, 2, 16, 48, 4, 2, 1, 24, 1), 4, 258,
         Settings(), seed=14000,
         about="logits of 1032 x 1040 floats, past the 4 MB above which the CPU matmul streams"
               " C's last pass to memory (rows on cache lines, a ragged last panel of 16 columns)"),
    Case("packed", Config(97, 24, 4, 32, 4, 8, 64, 8, 2, 2, 48, 1), 3, 16,
         Settings(cf1000=1000, group_size=24), seed=15000, ignore=0.3,
         packing=(((5, 0), (7, 0), (-4, 0)), ((3, 0), (4, 0), (4, 0), (5, 0)), ((16, 5),)),
         about="SPEC §10: rows of 2 examples and padding, of 4 examples, of one example at positions"
               " 5..20 (not its columns; RoPE is relative, so a RoPE by column shows at the padding, all at"
               " position 0); 30% of the targets ignored, none at padding; groups of 24 that drop"),
    Case("packed_long", Config(80, 200, 2, 32, 2, 16, 48, 4, 2, 2, 32, 1), 2, 160,
         Settings(group_size=0), seed=16000, ignore=0.5,
         packing=(((70, 0), (60, 0), (-30, 0)), ((130, 0), (30, 40))),
         about="SPEC §10 across 64-token tiles: examples starting at 70 and 130, so that rows"
               " see no key of the first tiles (flash attention's running max starts later); padding;"
               " an example at positions 40..69; half the targets ignored"),
]

ADAMW_TEST = AdamWSettings(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
ADAFACTOR_TEST = AdafactorSettings(lr=0.01, decay=0.8, clip_threshold=1.0, eps1=1e-30, eps2=1e-3, min_dim=8)
MARGIN = 1e-4      # required gap between consecutive top-(K+1) probabilities, relative to the max
MAX_RESEEDS = 100


def make_packing(case):
    """segment, position [B, T] int64 of case.packing (SPEC §10): segments
    0, 1, ... in each row, padding -1 at position 0; (None, None) without."""
    if not case.packing:
        return None, None
    segment = torch.zeros(case.B, case.T, dtype=torch.int64)
    position = torch.zeros(case.B, case.T, dtype=torch.int64)
    assert len(case.packing) == case.B
    for b, row in enumerate(case.packing):
        t = 0
        for k, (n, first) in enumerate(row):
            segment[b, t:t + abs(n)] = k if n > 0 else -1
            position[b, t:t + abs(n)] = torch.arange(first, first + n) if n > 0 else 0
            t += abs(n)
        assert t == case.T, f"{case.name}: row {b} holds {t} tokens, not T = {case.T}"
    return segment, position


def make_batch(case, seed):
    """x, y [B, T] int64 from a seeded generator; a share case.ignore of y is
    -1, and every target at padding (make_packing)."""
    g = torch.Generator().manual_seed(seed + 1)
    c = case.cfg
    x = torch.randint(0, c.V, (case.B, case.T), generator=g)
    y = torch.randint(0, c.V, (case.B, case.T), generator=g)
    if case.ignore >= 1.0:
        y[:] = -1
    elif case.ignore > 0:
        y[torch.rand(case.B, case.T, generator=g, dtype=torch.float64) < case.ignore] = -1
    segment, _ = make_packing(case)
    if segment is not None:
        y[segment < 0] = -1
    return x, y


def routing_margin(routing, K):
    """Smallest gap between consecutive probabilities among each token's top
    K+1 (top K when K = E), relative to its top probability, over all
    tokens of all MoE layers (inf with no MoE layer)."""
    worst = math.inf
    for p, _, _ in routing:
        top = torch.sort(p, dim=1, descending=True).values[:, :K + 1]   # [N, K+1]
        if top.shape[1] > 1:
            gaps = (top[:, :-1] - top[:, 1:]) / top[:, :1]
            worst = min(worst, float(gaps.min()))
    return worst


def build_case(case):
    """Weights and batch of a case: the first seed case.seed, case.seed + 1,
    ... whose float64 routing keeps every top-(K+1) gap above MARGIN.
    Deterministic. Returns (seed used, params float64 dict, x, y)."""
    for seed in range(case.seed, case.seed + MAX_RESEEDS):
        params = init_params(case.cfg, seed, router_var=case.router_var)
        x, y = make_batch(case, seed)
        with torch.no_grad():
            _, _, routing = forward(params, case.cfg, x, None, case.s, *make_packing(case))
        if routing_margin(routing, case.cfg.K) > MARGIN:
            return seed, params, x, y
    raise RuntimeError(f"{case.name}: no seed in {case.seed}..+{MAX_RESEEDS} keeps the routing margin")


def write_cases(outdir, cases=CASES):
    os.makedirs(outdir, exist_ok=True)
    lines = []
    for case in cases:
        t0 = time.time()
        cfg = case.cfg
        seed, params, x, y = build_case(case)
        segment, position = make_packing(case)
        logits, losses, grads, _ = forward_backward(params, cfg, x, y, case.s, segment, position)
        base = os.path.join(outdir, case.name)
        params_flat = flatten(cfg, params)                   # exactly float32 values
        write_model(base + ".model.bin", cfg, params_flat)
        write_state(base + ".state.bin", cfg, case.s, _np(x), _np(y), logits, losses, grads,
                    *(None if a is None else _np(a) for a in (segment, position)))
        # the optimizers start from the model file and take the stored float32 gradient
        _, p32 = read_model(base + ".model.bin")
        g32 = read_state(base + ".state.bin", cfg)["grads"]
        for kind in case.optimizers:
            o = as_float32_values(ADAMW_TEST if kind == "adamw" else ADAFACTOR_TEST)
            w = run_optimizer(cfg, p32.astype(np.float64), g32.astype(np.float64), kind, o, steps=3)
            write_model(f"{base}.{kind}.bin", cfg, w)
        lines.append(" ".join((case.name,) + tuple(case.optimizers)))
        print(f"{case.name:11s} seed {seed}  total {losses[0]:.6f}  ce {losses[1]:.6f}  lb {losses[2]:.6f}"
              f"  rz {losses[3]:.6f}  lz {losses[4]:.6f}  dropped {losses[5]:.4f}"
              f"  max|grad| {np.abs(grads).max():.3e}  ({time.time() - t0:.2f} s)")
    with open(os.path.join(outdir, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


# -----------------------------------------------------------------------------
# self-test: the tolerances of SPEC §7, fp32 against fp64, and that it can fail


def compare(cfg, ref, got):
    """SPEC §7's checks of got against ref (dicts of numpy arrays: logits,
    losses, grads). Returns [(what, err, tol)], one per check: logits and
    the losses element-wise |a-b| <= 1e-4 (1+|b|); each gradient tensor
    max|a-b| <= 1e-4 max|b| + 1e-7, expert stacks one slice at a time; the
    dropped fraction within 1e-7. A check holds when err <= tol."""
    out = []

    def elementwise(what, a, b):
        # worst err/tol ratio element-wise, reported as (err, tol) of that element
        err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        tol = 1e-4 * (1 + np.abs(np.asarray(b, np.float64)))
        i = int(np.argmax(err / tol))
        out.append((what, float(err.flat[i]), float(tol.flat[i])))

    elementwise("logits", got["logits"], ref["logits"])
    for i, name in enumerate(LOSS_NAMES[:5]):
        elementwise(f"loss {name}", got["losses"][i], ref["losses"][i])
    out.append(("dropped", abs(float(got["losses"][5]) - float(ref["losses"][5])), 1e-7))
    for s, off in _slices(cfg):
        for j in range(s.slices):
            a = off + j * s.rows * s.cols
            b = ref["grads"][a:a + s.rows * s.cols].astype(np.float64)
            g = got["grads"][a:a + s.rows * s.cols].astype(np.float64)
            what = f"grad {s.name}" + (f"[{j}]" if s.slices > 1 else "")
            out.append((what, float(np.abs(g - b).max()), 1e-4 * float(np.abs(b).max()) + 1e-7))
    return out


def worst(checks):
    """(headroom = min tol/err, what) over the checks; inf when all exact."""
    h, what = math.inf, "-"
    for w, err, tol in checks:
        r = tol / err if err > 0 else math.inf
        if r < h:
            h, what = r, w
    return h, what


def compute(params, cfg, x, y, s, dtype, segment=None, position=None):
    p = {k: v.to(dtype) for k, v in params.items()}
    logits, losses, grads, routing = forward_backward(p, cfg, x, y, s, segment, position)
    return dict(logits=logits, losses=losses, grads=grads), routing


def finite_difference_check(case, params, x, y, grads, per_tensor=2, h=1e-5):
    """Central differences of the float64 total loss at per_tensor random
    elements of every tensor, against the autograd gradient grads (file
    order). Returns (ok, verdict text)."""
    cfg = case.cfg
    flat = flatten(cfg, params)
    rng = np.random.default_rng(case.seed)
    worst_rel, where = 0.0, "-"
    gmax = np.abs(grads).max()
    for s, off in _slices(cfg):
        for i in off + rng.choice(s.numel, size=min(per_tensor, s.numel), replace=False):
            def total(delta):
                f = flat.copy()
                f[i] += delta
                with torch.no_grad():
                    return float(forward(unflatten(cfg, f), cfg, x, y, case.s, *make_packing(case))[1]["total"])
            fd = (total(h) - total(-h)) / (2 * h)
            rel = abs(fd - grads[i]) / (abs(grads[i]) + 1e-3 * gmax)
            if rel > worst_rel:
                worst_rel, where = rel, s.name
    return worst_rel < 1e-4, (f"reference autograd == finite differences {case.name}"
                              f" (worst relative diff {worst_rel:.1e} at {where})")


def packing_check():
    """SPEC §10 another way than attention()'s mask: in a model without MoE
    layers (routing would couple the tokens of a group), each example of
    the packed case's rows gives the logits it gives alone, as a row of its
    own at its positions; and a state file keeps segments and positions."""
    case = next(c for c in CASES if c.name == "packed")
    cfg = replace(case.cfg, moe_every=case.cfg.L + 1)
    params = init_params(cfg, case.seed)
    x, y = make_batch(case, case.seed)
    segment, position = make_packing(case)
    worst, n = 0.0, 0
    with torch.no_grad():
        packed = forward(params, cfg, x, None, case.s, segment, position)[0]      # [B, T, V]
        for b in range(case.B):
            for k in sorted(set(segment[b].tolist()) - {-1}):
                cols = (segment[b] == k).nonzero()[:, 0]
                alone = forward(params, cfg, x[b:b + 1, cols], None, case.s, None, position[b:b + 1, cols])[0]
                worst = max(worst, float((alone - packed[b:b + 1, cols]).abs().max()))
                n += 1
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.bin")
        zeros = np.zeros(case.B * case.T * cfg.V)
        write_state(path, cfg, case.s, _np(x), _np(y), zeros, np.zeros(N_LOSSES), np.zeros(n_params(cfg)),
                    _np(segment), _np(position))
        st = read_state(path, cfg)
        kept = np.array_equal(st["segment"], _np(segment)) and np.array_equal(st["position"], _np(position))
    return (worst < 1e-12 and n == 7 and kept,
            f"reference packing: {n} examples of packed rows give their logits alone (max diff {worst:.1e});"
            f" a state file keeps segments and positions")


def selfcheck():
    results = []

    def verdict(ok, name):
        results.append(ok)
        print(("PASS " if ok else "FAIL ") + name, flush=True)

    t0 = time.time()
    headrooms = []
    for case in CASES:
        cfg = case.cfg
        seed, params, x, y = build_case(case)
        packing = make_packing(case)
        ref, routing = compute(params, cfg, x, y, case.s, torch.float64, *packing)
        got, routing32 = compute(params, cfg, x, y, case.s, torch.float32, *packing)
        checks = compare(cfg, ref, got)
        h, what = worst(checks)
        headrooms.append((case.name, h, what))
        bad = [c for c in checks if not c[1] <= c[2]]
        verdict(not bad and h >= 100,
                f"reference fp32-vs-fp64 {case.name}: headroom {h:.0f}x (worst: {what})"
                + (f"; fails {bad[:3]}" if bad else ""))
        # the vectorised router against a plain loop, on the fp64 probabilities
        same = True
        for p, expert, kept in routing:
            e2, k2 = route_slow(p, cfg.K, case.s)
            same &= np.array_equal(_np(expert), e2) and np.array_equal(_np(kept), k2)
        for (_, e32, k32), (_, e64, k64) in zip(routing32, routing):
            same &= torch.equal(e32, e64) and torch.equal(k32, k64)
        verdict(same, f"reference routing {case.name}: vectorised == loop, fp32 == fp64"
                      f" (margin {routing_margin(routing, cfg.K):.2e})")

        # autograd against central differences in float64, on a few elements
        # of every tensor (routing stays put under a 1e-5 step: the margin)
        if case.name in ("moe_drop", "no_targets", "top3", "packed"):
            verdict(*finite_difference_check(case, params, x, y, ref["grads"]))

    # the comparison can fail: a perturbed gradient, logit, loss, dropped fraction
    case = CASES[0]
    cfg = case.cfg
    seed, params, x, y = build_case(case)
    ref, _ = compute(params, cfg, x, y, case.s, torch.float64)
    specs = {s.name: (s, off) for s, off in _slices(cfg)}

    def caught(mutate, label):
        bad = {k: np.array(v, dtype=np.float64) for k, v in ref.items()}
        mutate(bad)
        fails = [c for c in compare(cfg, ref, bad) if not c[1] <= c[2]]
        verdict(len(fails) >= 1, f"reference compare catches {label}"
                + (f" (flags {fails[0][0]})" if fails else " (NOT flagged)"))

    def grad_elem(name, j):
        s, off = specs[name]
        a = off + j * s.rows * s.cols
        blk = ref["grads"][a:a + s.rows * s.cols]
        return a + int(np.argmin(np.abs(blk))), float(np.abs(blk).max())

    i, mx = grad_elem("l1.wq", 0)
    caught(lambda d: d["grads"].__setitem__(i, d["grads"][i] + 1e-3 * mx), "l1.wq grad +1e-3*max at its smallest element")
    i2, mx2 = grad_elem("l3.w_down", 5)
    caught(lambda d: d["grads"].__setitem__(i2, d["grads"][i2] - 1e-3 * mx2), "one expert slice l3.w_down[5] -1e-3*max")
    caught(lambda d: d["logits"].__setitem__(7, d["logits"][7] + 1e-3), "a logit +1e-3")
    caught(lambda d: d["losses"].__setitem__(2, d["losses"][2] * (1 + 1e-3)), "lb * (1+1e-3)")
    caught(lambda d: d["losses"].__setitem__(5, d["losses"][5] + 1.0 / (case.B * case.T * cfg.K * cfg.n_moe)),
           "one more dropped assignment")

    # files round-trip and cases are reproducible
    with tempfile.TemporaryDirectory() as d:
        flat = flatten(cfg, params)
        write_model(os.path.join(d, "m.bin"), cfg, flat)
        write_state(os.path.join(d, "s.bin"), cfg, case.s, _np(x), _np(y), ref["logits"], ref["losses"], ref["grads"])
        cfg2, flat2 = read_model(os.path.join(d, "m.bin"))
        st = read_state(os.path.join(d, "s.bin"), cfg)
        ok = (cfg2 == cfg and np.array_equal(flat2, flat) and st["settings"] == case.s
              and np.array_equal(st["x"], _np(x)) and np.array_equal(st["y"], _np(y))
              and np.array_equal(st["grads"], ref["grads"].astype(np.float32))
              and os.path.getsize(os.path.join(d, "m.bin")) == 1024 + 4 * n_params(cfg))
        raw = bytearray(open(os.path.join(d, "m.bin"), "rb").read())
        raw[0] ^= 1
        open(os.path.join(d, "bad.bin"), "wb").write(bytes(raw))
        try:
            read_model(os.path.join(d, "bad.bin"))
            ok = False
        except ValueError:
            pass
    verdict(ok, "reference files: model and state round-trip, bad magic rejected")
    seed2, params2, x2, y2 = build_case(case)
    verdict(seed2 == seed and np.array_equal(flatten(cfg, params2), flatten(cfg, params))
            and torch.equal(x2, x) and torch.equal(y2, y), "reference cases are deterministic")
    verdict(*packing_check())

    # AdamW against torch.optim.AdamW (float64): same clipping, decay on
    # matrices only; once with this case's gradient, once 10x (clipped)
    o = as_float32_values(ADAMW_TEST)
    for mult in (1.0, 10.0):
        g = ref["grads"] * mult
        mine = run_optimizer(cfg, flatten(cfg, params), g, "adamw", o, steps=3)
        tp, tg = unflatten(cfg, flatten(cfg, params)), unflatten(cfg, g)
        norm = math.sqrt(float(np.dot(g, g)))
        scale = min(1.0, o.grad_clip / norm)
        mats = [tp[s.name] for s in param_specs(cfg) if s.matrix]
        vecs = [tp[s.name] for s in param_specs(cfg) if not s.matrix]
        opt = torch.optim.AdamW([{"params": mats, "weight_decay": o.weight_decay},
                                 {"params": vecs, "weight_decay": 0.0}],
                                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        for _ in range(3):
            for k in tp:
                tp[k].grad = tg[k] * scale
            opt.step()
        err = np.abs(flatten(cfg, tp) - mine).max()
        verdict(err < 1e-12, f"reference AdamW == torch.optim.AdamW, grad norm {norm:.2f}"
                             f" ({'clipped' if scale < 1 else 'not clipped'}; max diff {err:.1e})")

    # Adafactor: at t = 1 a rank-1 g^2 is factored exactly, so both paths agree
    one = Config(3, 4, 1, 16, 1, 2, 12, 2, 1, 2, 8, 1)     # dense layer: matrices [24,16] [12,16] [16,12]
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(n_params(one))
    gr = np.zeros_like(w0)
    for s, off in _slices(one):
        gr[off:off + s.numel] = np.outer(rng.uniform(0.5, 2, s.rows), rng.uniform(0.5, 2, s.cols)).reshape(-1) \
            * rng.choice([-1.0, 1.0], s.rows * s.cols)
    of = replace(ADAFACTOR_TEST, min_dim=8)
    wf = run_optimizer(one, w0, gr, "adafactor", of, steps=1)
    we = run_optimizer(one, w0, gr, "adafactor", replace(of, min_dim=10 ** 9), steps=1)
    wm = run_optimizer(one, w0, 100 * gr, "adafactor", of, steps=3)   # sign-only at t=1; t>1 runs too
    err = np.abs(wf - we).max()
    moved = np.abs(wf - w0).max()
    verdict(err < 1e-12 * moved + 1e-15 and moved > 0 and np.all(np.isfinite(wm)),
            f"reference Adafactor factored == per-element on rank-1 g^2 (max diff {err:.1e})")
    g = ref["grads"]
    tf = run_optimizer(cfg, flatten(cfg, params), g, "adafactor", ADAFACTOR_TEST, steps=1)
    te = run_optimizer(cfg, flatten(cfg, params), g, "adafactor", replace(ADAFACTOR_TEST, min_dim=10 ** 9), steps=1)
    verdict(np.abs(tf - te).max() > 0, "reference Adafactor min_dim matters (factored path taken)")

    print("headroom (tolerance / error, worst quantity) per case:")
    for name, h, what in headrooms:
        print(f"  {name:11s} {h:12.0f}x  {what}")
    print(f"selfcheck: {sum(results)} passed, {len(results) - sum(results)} failed, {time.time() - t0:.1f} s")
    return all(results)


# -----------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description="OpenMoE PyTorch reference: writes test cases, or checks itself")
    ap.add_argument("outdir", nargs="?", help="directory for NAME.model.bin, NAME.state.bin, ..., cases.txt")
    ap.add_argument("--selfcheck", action="store_true", help="fp32 against fp64 under SPEC §7's tolerances")
    args = ap.parse_args()
    if args.selfcheck:
        sys.exit(0 if selfcheck() else 1)
    if not args.outdir:
        ap.error("give OUTDIR or --selfcheck")
    t0 = time.time()
    write_cases(args.outdir)
    print(f"wrote {len(CASES)} cases to {args.outdir} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
