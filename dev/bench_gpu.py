"""bench_gpu.py: the PyTorch twin of dev/bench_gpu.c, for dev/bench_gpu.sh.

The model is SPEC.md's (test/reference.py's functions where they suit a fast
GPU run), written as a PyTorch user would for speed:
  - bf16 autocast, fp32 master weights, torch.optim.AdamW(fused=True) with the
    same settings as the C code (betas 0.9/0.95, eps 1e-8, weight decay 0.1
    on matrices only, global gradient clipping at 1.0);
  - attention through F.scaled_dot_product_attention(is_causal=True, scale=1)
    (flash attention), RoPE as in the reference;
  - the MoE layer vectorised with static shapes, as GShard/OpenMoE dispatch:
    router in fp32, top-K, slot = rank-major position within the (group,
    expert) queue (a cumsum), tokens scattered into an [E, G*C, D] buffer,
    the experts as batched matmuls, outputs gathered and weighted by the
    full-softmax p. It computes all E*C slots of every group (padding
    included); the C code runs each expert on its kept rows only.
  - equal routing groups only (B*T a multiple of group_size), as the bench uses.

  bench_gpu.py step CONFIG B T STEPS eager|compile   median ms of a training step
  bench_gpu.py flops CONFIG T                        training FLOPs per token (for MFU)
  bench_gpu.py check                                 the MoE layer against reference.moe (float64, CPU)

FLOPs per token (flops below): 6 x the active parameters a token's matmuls
use (attention projections, dense and extra FFNs, K of the E experts, the
router, lm_head; not the embedding lookup, not the norms) plus the causal
attention products, 6 x L x H*Hd x T (q.k and p.v over T/2 keys on average,
forward and backward): half of PaLM's 12 L H Hd T, which counts no mask.
"""
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
import reference as ref  # noqa: E402
from bench_torch import parse_config  # noqa: E402  (a preset name or V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn)


def attention(x, wq, wk, wv, wo, H, Hd, cos, sin):
    """reference.attention with the fused causal kernel (no 1/sqrt(Hd): scale 1)."""
    B, T, _ = x.shape
    q = (x @ wq.T).view(B, T, H, Hd).transpose(1, 2)
    k = (x @ wk.T).view(B, T, H, Hd).transpose(1, 2)
    v = (x @ wv.T).view(B, T, H, Hd).transpose(1, 2)
    q, k = ref.rope(q, cos, sin).to(v.dtype), ref.rope(k, cos, sin).to(v.dtype)  # RoPE's fp32 tables promote
    try:
        out = Fn.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    except (AttributeError, TypeError):  # torch < 2.1: no scale argument
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = (q @ k.transpose(-2, -1)).masked_fill(future, float("-inf")).softmax(dim=-1)
        out = att.to(v.dtype) @ v
    return out.transpose(1, 2).reshape(B, T, H * Hd) @ wo.T


def f32(t):
    """at least float32 (float64 stays float64, for the check)"""
    return t if t.dtype == torch.float64 else t.float()


def moe(x, router, w_gate, w_up, w_down, K, s):
    """SPEC §3 with static shapes. x [B, T, D] -> out [B, T, D], lb, rz, dropped count (tensor)."""
    B, T, D = x.shape
    N, E = B * T, router.shape[0]
    gs = N if s.group_size == 0 or s.group_size > N else s.group_size
    assert N % gs == 0, "bench: B*T must be a multiple of the group size"
    G = N // gs
    C = ref.capacity(gs, E, K, s)
    xf = x.reshape(N, D)
    with torch.autocast(x.device.type, enabled=False):
        z = f32(xf) @ f32(router).T                       # [N, E] fp32
        p = z.softmax(dim=-1)
    top = torch.topk(p.detach(), K, dim=-1).indices              # [N, K] rank 0 best
    onehot = Fn.one_hot(top, E)                                  # [N, K, E]
    # priority within a group: all rank-0 choices in token order, then rank 1, ...
    prio = onehot.view(G, gs, K, E).transpose(1, 2).reshape(G, K * gs, E)
    pos = ((prio.cumsum(1) - 1) * prio).sum(-1)                  # [G, K*gs] place in its expert's queue
    pos = pos.view(G, K, gs).transpose(1, 2).reshape(N, K)
    kept = pos < C
    g_of = torch.arange(N, device=x.device) // gs
    slot = torch.where(kept, (g_of[:, None] * E + top) * C + pos, torch.full_like(pos, G * E * C))
    buf = xf.new_zeros(G * E * C + 1, D)                         # the last row takes the dropped
    buf = buf.index_put((slot.reshape(-1),), xf[:, None, :].expand(N, K, D).reshape(N * K, D))
    xe = buf[:-1].view(G, E, C, D).transpose(0, 1).reshape(E, G * C, D)
    F = w_up.shape[1]
    ab = torch.bmm(xe, w_gate.transpose(1, 2))                   # [E, G*C, 2F]
    u = torch.bmm(xe, w_up.transpose(1, 2))                      # [E, G*C, F]
    h = ab[..., :F] * Fn.silu(ab[..., F:]) * u
    ye = torch.bmm(h, w_down.transpose(1, 2))                    # [E, G*C, D]
    ye = ye.view(E, G, C, D).transpose(0, 1).reshape(G * E * C, D)
    ye = torch.cat([ye, ye.new_zeros(1, D)])
    w = p.gather(1, top) * kept                                  # [N, K] full-softmax weights, 0 if dropped
    out = (w[..., None] * ye[slot.reshape(-1)].view(N, K, D).to(p.dtype)).sum(1)
    f = onehot.sum(1).to(p.dtype).view(G, gs, E).mean(1)         # [G, E]
    P = p.view(G, gs, E).mean(1)
    lb = (E * (f * P).sum(-1)).mean()
    rz = torch.logsumexp(z, dim=-1).pow(2).mean()
    return out.view(B, T, D), lb, rz, (~kept).sum()


def loss_fn(w, cfg, x, y, s, cos, sin):
    """SPEC §2-§4: the total loss."""
    h = w["wte"][x]
    lbs, rzs = [], []
    for l in range(cfg.L):
        p = f"l{l}."
        h = h + attention(ref.rmsnorm(h, w[p + "attn_norm"]), w[p + "wq"], w[p + "wk"], w[p + "wv"], w[p + "wo"],
                          cfg.H, cfg.Hd, cos, sin)
        h, res = ref.mlp_block(h, w, cfg, l, lambda *a: moe(*a, cfg.K, s))
        if res:
            lbs.append(res[1])
            rzs.append(res[2])
    logits = ref.rmsnorm(h, w["final_norm"]) @ w["lm_head"].T
    lse = torch.logsumexp(f32(logits), dim=-1)                # all targets are set in the bench
    ce = (lse - f32(logits).gather(-1, y[..., None])[..., 0]).mean()
    lz = lse.pow(2).mean()
    total = ce + s.lz_coef * lz
    if lbs:
        total = total + s.lb_coef * torch.stack(lbs).mean() + s.rz_coef * torch.stack(rzs).mean()
    return total


def bench_step(cfg, B, T, steps, mode):
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    params = {k: v.requires_grad_(True) for k, v in ref.init_params(cfg, 1, dtype=torch.float32, device=dev).items()}
    norms = ("attn_norm", "mlp_norm", "extra_norm", "final_norm")
    decay = [p for k, p in params.items() if not k.endswith(norms)]
    no_decay = [p for k, p in params.items() if k.endswith(norms)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, cfg.V, (B, T), generator=g).to(dev)
    y = torch.randint(0, cfg.V, (B, T), generator=g).to(dev)
    s = ref.Settings(cf1000=1250, min_capacity=4, group_size=4096)
    cos, sin = ref.rope_tables(T, cfg.Hd, torch.float32, dev)
    fn = loss_fn if mode == "eager" else torch.compile(loss_fn)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(params, cfg, x, y, s, cos, sin)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0, foreach=True)
        opt.step()
        return loss

    times = []
    for i in range(steps + 3):  # three warm-up steps (torch.compile compiles in the first)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    ms = times[len(times) // 2]
    print(f"step_ms {ms:.2f} tok_s {B * T / (ms / 1e3):.0f} loss {float(loss):.4f} "
          f"mem_gb {torch.cuda.max_memory_allocated() / 1e9:.1f}")


def flops_per_token(cfg, T):
    D, HHd = cfg.D, cfg.H * cfg.Hd
    active = cfg.V * D  # lm_head
    for l in range(cfg.L):
        active += 4 * D * HHd
        if cfg.is_moe(l):
            active += cfg.E * D + cfg.K * 4 * D * cfg.Fe + (4 * D * cfg.F if cfg.extra_ffn else 0)
        else:
            active += 4 * D * cfg.F
    return 6 * active + 6 * cfg.L * HHd * T, active


def check():
    """The static-shape MoE against reference.moe in float64 on the CPU: outputs,
    losses and gradients (routing with margins, equal groups)."""
    torch.manual_seed(0)
    cfg = ref.Config(50, 16, 2, 16, 2, 8, 24, 6, 2, 1, 20, 1)
    s = ref.Settings(cf1000=900, min_capacity=2, group_size=12)
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    w = {k: v.requires_grad_(True) for k, v in ref.init_params(cfg, 3).items()}
    args = (w["l0.router"], w["l0.w_gate"], w["l0.w_up"], w["l0.w_down"], cfg.K, s)
    a = ref.moe(x, *args)
    b = moe(x, *args)
    assert a[3] == int(b[3]), (a[3], int(b[3]))
    worst = 0.0
    for i in range(3):
        worst = max(worst, float((a[i] - b[i]).abs().max()))
    la = a[0].pow(2).sum() + a[1] + a[2]
    lb = b[0].pow(2).sum() + b[1] + b[2]
    ga = torch.autograd.grad(la, [x] + list(w.values())[:0] + [args[0], args[1], args[2], args[3]])
    gb = torch.autograd.grad(lb, [x] + [args[0], args[1], args[2], args[3]])
    for u, v in zip(ga, gb):
        worst = max(worst, float((u - v).abs().max()))
    print(f"moe check: dropped {a[3]} of {2 * 12 * cfg.K}, worst |difference| {worst:.2e}")
    assert worst < 1e-10
    # the whole loss, against reference.forward
    cfg = ref.Config(50, 16, 4, 16, 2, 8, 24, 6, 2, 2, 20, 1)
    w = ref.init_params(cfg, 4)
    xt = torch.randint(0, cfg.V, (2, 12))
    yt = torch.randint(0, cfg.V, (2, 12))
    cos, sin = ref.rope_tables(12, cfg.Hd, torch.float64, "cpu")
    la = ref.forward(w, cfg, xt, yt, s)[1]["total"]
    lb = loss_fn(w, cfg, xt, yt, s, cos, sin)
    print(f"loss check: reference {float(la):.12f}, bench model {float(lb):.12f}")
    assert abs(float(la) - float(lb)) < 1e-10
    print("PASS")


def main():
    a = sys.argv[1:]
    if len(a) == 6 and a[0] == "step":
        bench_step(parse_config(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5])
    elif len(a) == 3 and a[0] == "flops":
        f, active = flops_per_token(parse_config(a[1]), int(a[2]))
        print(f"flops_per_token {f} active_params {active}")
    elif a == ["check"]:
        check()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
