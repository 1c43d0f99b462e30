"""bench_torch.py: the PyTorch twin of dev/bench_cpu.c, for dev/bench.sh.

The training step is the same math as test/reference.py (SPEC §2-§4) written
for speed in float32 eager mode, as a user who wanted it fast would: Q, K, V
in one matmul, the causal mask made once, experts as batched matmuls over
their kept rows (tokens gathered into [E, capacity, D] slots), one fused
log-softmax over V shared by cross-entropy and z-loss, torch.optim.AdamW (foreach)
under the C code's settings (betas 0.9/0.95, weight decay 0.1 on matrices
only, global clip 1.0). No Python loop runs over tokens.

  bench_torch.py step CONFIG B T STEPS [MODEL]  median ms of a training step, and
                                                the losses of the first two steps on
                                                MODEL's weights and bench_cpu's batch
  bench_torch.py matmul N:IN:OUT ...            GFLOP/s of x @ w.T and its backward
  bench_torch.py matmul -                       the same for each shape read from stdin,
                                                a line each, answered as it comes
  bench_torch.py decode CONFIG TOKENS           tokens/s of greedy generation with a KV cache
  bench_torch.py blas                           the OpenBLAS core in use, its worst error
                                                against float64 and its GFLOP/s
"""
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
import reference as ref  # noqa: E402

def parse_config(s):
    """A preset name, or V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn as bench_cpu takes it."""
    if s in ref.PRESETS:
        return ref.PRESETS[s]
    V, L, D, H, Hd, F, E, K, every, Fe, extra = (int(a) for a in s.split(","))
    return ref.Config(V, 2048, L, D, H, Hd, F, E, K, every, Fe, extra)


def make_params(cfg, model_path=None):
    if model_path is None:
        params = ref.init_params(cfg, 1, dtype=torch.float32)
    else:
        file_cfg, flat = ref.read_model(model_path)
        if file_cfg != cfg:
            sys.exit(f"{model_path}: config {file_cfg} is not the benchmark's {cfg}")
        params = ref.unflatten(cfg, flat, dtype=torch.float32)
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


def bench_batch(cfg, B, T):
    """x, y [B, T]: bench_cpu's batch, from openmoe.h's rng_u64 seeded 7."""
    mask, s, out = (1 << 64) - 1, 7, []
    for _ in range(2 * B * T):
        s = (s + 0x9E3779B97F4A7C15) & mask
        z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) % cfg.V)
    xy = torch.tensor(out, dtype=torch.int64).view(B * T, 2)  # drawn x, y, x, y, ...
    return xy[:, 0].reshape(B, T).contiguous(), xy[:, 1].reshape(B, T).contiguous()


def route_slots(p, K, s):
    """ref.route's top-K and capacity (SPEC §3), vectorised, returning each
    assignment's slot in its expert instead of the group bookkeeping.
    p [N, E] -> expert [N, K], kept [N, K] bool, slot [N, K] (0-based), capacity."""
    N, E = p.shape
    gs = N if s.group_size == 0 else s.group_size
    if gs < N or s.drop_policy != ref.DROP_POSITION:
        sys.exit("route_slots: the benchmark routes one group (group_size >= B*T) by position")
    cap = ref.capacity(N, E, K, s)
    expert = torch.sort(p, dim=1, descending=True, stable=True).indices[:, :K]  # [N, K]
    onehot = Fn.one_hot(expert.t().reshape(-1), E)                              # [K*N, E] rank-major priority
    position = (onehot.cumsum(0) * onehot).sum(1).view(K, N).t() - 1           # [N, K]
    return expert, position < cap, position, cap


def ffn_batched(x, w_gate, w_up, w_down):
    """ref.ffn on a batch of experts: x [E, C, D]; w_gate [E, 2F, D];
    w_up [E, F, D]; w_down [E, D, F] -> [E, C, D]."""
    F = w_up.shape[1]
    ab = torch.bmm(x, w_gate.transpose(1, 2))                # [E, C, 2F]
    h = ab[..., :F] * Fn.silu(ab[..., F:]) * torch.bmm(x, w_up.transpose(1, 2))
    return torch.bmm(h, w_down.transpose(1, 2))


def moe_fast(x, router, w_gate, w_up, w_down, K, s):
    """ref.moe with the kept rows of every expert in one [E, capacity, D]
    batch. x [N, D] -> out [N, D], lb, rz."""
    N, D = x.shape
    E = router.shape[0]
    z = x @ router.T                                          # [N, E]
    lse = torch.logsumexp(z, dim=-1)                          # [N]
    p = torch.exp(z - lse[:, None])
    expert, kept, slot, cap = route_slots(p.detach(), K, s)
    tok = torch.arange(N)[:, None].expand(N, K)[kept]         # [M] token of each kept assignment
    row = (expert * cap + slot)[kept]                         # [M] its row in the expert batch
    xe = x.new_zeros(E * cap, D).index_copy(0, row, x[tok])
    ye = ffn_batched(xe.view(E, cap, D), w_gate, w_up, w_down).view(E * cap, D)
    weight = p.gather(1, expert)[kept][:, None]               # [M, 1] the full-softmax p
    out = x.new_zeros(N, D).index_add(0, tok, weight * ye[row])
    f = Fn.one_hot(expert, E).sum(1).to(p.dtype).mean(0)      # fraction choosing e, before dropping
    lb = E * (f * p.mean(0)).sum()
    rz = lse.pow(2).mean()
    return out, lb, rz


class OutputLosses(torch.autograd.Function):
    """ref.output_losses for targets that are all >= 0, fused: one
    log-softmax over V gives both losses, and the backward is one pass,
    d/dlogits = softmax * (dce + 2 lse dlz) / N - onehot(y) dce / N."""

    @staticmethod
    def forward(ctx, logits, y):                              # logits [N, V], y [N]
        logp = Fn.log_softmax(logits, dim=-1)
        lse = logits[:, 0] - logp[:, 0]                       # logsumexp = logit - log p, any column
        ctx.save_for_backward(logp, lse, y)
        return -logp.gather(1, y[:, None]).mean(), lse.pow(2).mean()

    @staticmethod
    def backward(ctx, dce, dlz):
        logp, lse, y = ctx.saved_tensors
        N = logp.shape[0]
        dlogits = logp.exp_() * ((dce + 2.0 * dlz * lse) / N)[:, None]  # logp is not needed again
        dlogits.scatter_add_(1, y[:, None], (-dce / N).expand(N, 1))
        return dlogits, None


def forward_fast(w, cfg, x, y, s, cos, sin, future):
    """ref.forward's total loss for one routing group of B*T tokens."""
    B, T = x.shape
    N, H, Hd = B * T, cfg.H, cfg.Hd
    h = Fn.embedding(x.reshape(N), w["wte"])                  # [N, D]
    lbs, rzs = [], []
    for l in range(cfg.L):
        p = f"l{l}."
        a = ref.rmsnorm(h, w[p + "attn_norm"])
        qkv = (a @ torch.cat([w[p + "wq"], w[p + "wk"], w[p + "wv"]]).T).view(B, T, 3, H, Hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                  # [B, H, T, Hd] each
        q, k = ref.rope(q, cos, sin), ref.rope(k, cos, sin)
        att = (q @ k.transpose(-2, -1)).masked_fill(future, float("-inf")).softmax(dim=-1)
        h = h + (att @ v).transpose(1, 2).reshape(N, H * Hd) @ w[p + "wo"].T
        h, res = ref.mlp_block(h, w, cfg, l, lambda *a: moe_fast(*a, cfg.K, s))
        if res:
            lbs.append(res[1])
            rzs.append(res[2])
    logits = ref.rmsnorm(h, w["final_norm"]) @ w["lm_head"].T  # [N, V]
    ce, lz = OutputLosses.apply(logits, y.reshape(N))
    zero = logits.new_zeros(())
    lb = torch.stack(lbs).mean() if lbs else zero
    rz = torch.stack(rzs).mean() if rzs else zero
    return ce + s.lb_coef * lb + s.rz_coef * rz + s.lz_coef * lz


def bench_step(cfg, B, T, steps, model_path=None):
    params = make_params(cfg, model_path)
    norms = ("attn_norm", "mlp_norm", "extra_norm", "final_norm")
    decay = [p for k, p in params.items() if not k.endswith(norms)]
    no_decay = [p for k, p in params.items() if k.endswith(norms)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    x, y = bench_batch(cfg, B, T)
    s = ref.Settings()
    cos, sin = ref.rope_tables(T, cfg.Hd, torch.float32, "cpu")
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    times, first = [], []
    for i in range(steps + 1):  # one warm-up step; the first two losses are the check against C
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = forward_fast(params, cfg, x, y, s, cos, sin, future)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if i > 0:
            times.append(1e3 * (time.perf_counter() - t0))
        first.append(float(loss))
    times.sort()
    print(f"step_ms {times[len(times) // 2]:.2f} loss0 {first[0]:.7f} loss1 {first[1]:.7f}")


def bench_matmul(shapes):
    for shape in shapes:
        N, IN, OUT = (int(a) for a in shape.split(":"))
        x = torch.rand(N, IN) - 0.5
        w = torch.rand(OUT, IN) - 0.5
        # the products write into tensors made once, as the C side's do: a
        # new result each time can come from fresh pages, whose faults cost
        # OpenBLAS up to three quarters of its speed here (2048 x 32000 logits)
        out, dx, dw = torch.empty(N, OUT), torch.empty(N, IN), torch.empty(OUT, IN)
        best_f = best_b = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(x, w.T, out=out)
            t1 = time.perf_counter()
            torch.mm(out, w, out=dx)       # the two products of the backward
            torch.mm(out.T, x, out=dw)
            t2 = time.perf_counter()
            best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
        flop = 2.0 * N * IN * OUT
        print(f"{shape} fwd_gflops {flop / best_f / 1e9:.1f} bwd_gflops {2 * flop / best_b / 1e9:.1f}")


def bench_blas():
    """The OpenBLAS core (OPENBLAS_VERBOSE=2 makes OpenBLAS print it on
    stderr when torch loads it), the worst relative error of float32 products
    of the benchmark's kinds against float64, and GFLOP/s at 1024^3."""
    g = torch.Generator().manual_seed(0)
    err = 0.0
    for n, k, m in ((2048, 128, 768), (320, 1536, 512), (1024, 512, 4096), (37, 131, 71)):
        a, b = torch.rand(n, k, generator=g) - 0.5, torch.rand(m, k, generator=g) - 0.5
        for got, want in ((a @ b.T, a.double() @ b.double().T),
                          ((a @ b.T).T @ a, (a.double() @ b.double().T).T @ a.double()),
                          (torch.bmm(a[None], b.T[None])[0], a.double() @ b.double().T)):
            err = max(err, float((got.double() - want).abs().max() / want.abs().max()))
    a, b = torch.rand(1024, 1024, generator=g), torch.rand(1024, 1024, generator=g)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    print(f"blas_rel_err {err:.3g} blas_gflops {2 * 1024 ** 3 / best / 1e9:.1f}")


@torch.no_grad()
def decode_token(w, cfg, cache, tok, pos, cos, sin):
    """One token through the model with a KV cache (each token routed alone,
    as model_decode does). cache: per layer [k, v] lists of [H, Hd]."""
    h = w["wte"][tok][None, :]                               # [1, D]
    for l in range(cfg.L):
        p = f"l{l}."
        x = ref.rmsnorm(h, w[p + "attn_norm"])
        q = (x @ w[p + "wq"].T).view(cfg.H, 1, cfg.Hd)
        k = (x @ w[p + "wk"].T).view(cfg.H, 1, cfg.Hd)
        v = (x @ w[p + "wv"].T).view(cfg.H, 1, cfg.Hd)
        q, k = ref.rope(q, cos[pos:pos + 1], sin[pos:pos + 1]), ref.rope(k, cos[pos:pos + 1], sin[pos:pos + 1])
        cache[l][0].append(k)
        cache[l][1].append(v)
        K_, V_ = torch.cat(cache[l][0], dim=1), torch.cat(cache[l][1], dim=1)   # [H, pos+1, Hd]
        att = (q @ K_.transpose(1, 2)).softmax(-1)                              # [H, 1, pos+1]
        h = h + (att @ V_).transpose(0, 1).reshape(1, -1) @ w[p + "wo"].T
        if cfg.is_moe(l):
            x = ref.rmsnorm(h, w[p + "mlp_norm"])
            prob = (x @ w[p + "router"].T).softmax(-1)[0]
            top = torch.topk(prob, cfg.K).indices
            out = torch.zeros_like(h)
            for e in top.tolist():
                out = out + prob[e] * ref.ffn(x, w[p + "w_gate"][e], w[p + "w_up"][e], w[p + "w_down"][e])
            h = h + out
            if cfg.extra_ffn:
                h = h + ref.ffn(ref.rmsnorm(h, w[p + "extra_norm"]), w[p + "x_gate"], w[p + "x_up"], w[p + "x_down"])
        else:
            h = h + ref.ffn(ref.rmsnorm(h, w[p + "mlp_norm"]), w[p + "w_gate"], w[p + "w_up"], w[p + "w_down"])
    return (ref.rmsnorm(h, w["final_norm"]) @ w["lm_head"].T)[0]


def bench_decode(cfg, tokens):
    w = ref.init_params(cfg, 1, dtype=torch.float32)
    cos, sin = ref.rope_tables(tokens, cfg.Hd, torch.float32, "cpu")
    cache = [[[], []] for _ in range(cfg.L)]
    tok = 1
    t0 = time.perf_counter()
    for pos in range(tokens):
        tok = int(decode_token(w, cfg, cache, tok, pos, cos, sin).argmax())
    print(f"decode_tok_s {tokens / (time.perf_counter() - t0):.1f}")


def main():
    a = sys.argv[1:]
    torch.manual_seed(0)
    if len(a) in (5, 6) and a[0] == "step":
        bench_step(parse_config(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5] if len(a) == 6 else None)
    elif a == ["matmul", "-"]:
        for line in sys.stdin:
            bench_matmul([line.strip()])
            sys.stdout.flush()
    elif len(a) >= 2 and a[0] == "matmul":
        bench_matmul(a[1:])
    elif len(a) == 3 and a[0] == "decode":
        bench_decode(parse_config(a[1]), int(a[2]))
    elif len(a) == 1 and a[0] == "blas":
        bench_blas()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
