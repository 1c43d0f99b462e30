"""bench_torch.py: the PyTorch twin of dev/bench_cpu.c, for dev/bench.sh.

The model is the test reference (test/reference.py) in float32, eager mode,
trained with torch.optim.AdamW under the same settings as the C code
(betas 0.9/0.95, weight decay 0.1 on matrices only, global clip 1.0).

  bench_torch.py step CONFIG B T STEPS   median ms of a training step
  bench_torch.py matmul N IN OUT         GFLOP/s of x @ w.T and its backward
  bench_torch.py decode CONFIG TOKENS    tokens/s of greedy generation with a KV cache
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


def make_params(cfg):
    params = ref.init_params(cfg, 1, dtype=torch.float32)
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


def bench_step(cfg, B, T, steps):
    params = make_params(cfg)
    norms = ("attn_norm", "mlp_norm", "extra_norm", "final_norm")
    decay = [p for k, p in params.items() if not k.endswith(norms)]
    no_decay = [p for k, p in params.items() if k.endswith(norms)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, cfg.V, (B, T), generator=g)
    y = torch.randint(0, cfg.V, (B, T), generator=g)
    s = ref.Settings(cf1000=1250, min_capacity=4, group_size=4096)
    times = []
    for i in range(steps + 1):  # one warm-up step
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, losses, _ = ref.forward(params, cfg, x, y, s)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if i > 0:
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    print(f"step_ms {times[len(times) // 2]:.2f} loss {float(losses['total']):.4f}")


def bench_matmul(N, IN, OUT):
    x = torch.rand(N, IN) - 0.5
    w = torch.rand(OUT, IN) - 0.5
    best_f = best_b = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        out = x @ w.T
        t1 = time.perf_counter()
        dx = out @ w       # the two products of the backward
        dw = out.T @ x
        t2 = time.perf_counter()
        best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
    del dx, dw
    flop = 2.0 * N * IN * OUT
    print(f"fwd_gflops {flop / best_f / 1e9:.1f} bwd_gflops {2 * flop / best_b / 1e9:.1f}")


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
    if len(a) == 5 and a[0] == "step":
        bench_step(parse_config(a[1]), int(a[2]), int(a[3]), int(a[4]))
    elif len(a) == 4 and a[0] == "matmul":
        bench_matmul(int(a[1]), int(a[2]), int(a[3]))
    elif len(a) == 3 and a[0] == "decode":
        bench_decode(parse_config(a[1]), int(a[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
