"""bf16_tolerance.py: how far PyTorch's own bf16 autocast lands from the
float64 reference states, in units of SPEC §7's fp32 tolerances. It sets the
scale of test/g_gpu.sh's bf16 tolerance (BF16_TOL).

    /usr/bin/python3 dev/bf16_tolerance.py [CASES_DIR]   (default build/test/cases)

The model is test/reference.py's, run under torch.autocast(bfloat16) on the
CPU, with its MoE layer made autocast-safe (the router in fp32 as openmoe.cu
has it; the experts' weighted outputs added in fp32)."""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))
import reference as ref  # noqa: E402


def moe_autocast(x, router, w_gate, w_up, w_down, K, s):
    """reference.moe with the router in fp32 and fp32 accumulation of the experts"""
    B, T, D = x.shape
    E = router.shape[0]
    xf = x.reshape(B * T, D).float()
    with torch.autocast(x.device.type, enabled=False):
        z = xf @ router.float().T
        p = z.softmax(dim=-1)
    expert, kept, gid, sizes = ref.route(p, K, s)
    out = torch.zeros_like(xf)
    for e in range(E):
        tok = ((expert == e) & kept).any(dim=1).nonzero(as_tuple=True)[0]
        if tok.numel() == 0:
            continue
        y = ref.ffn(xf[tok], w_gate[e], w_up[e], w_down[e])
        out = out.index_add(0, tok, (p[tok, e:e + 1] * y).float())
    G = sizes.numel()
    chosen = Fn.one_hot(expert, E).sum(1).to(p.dtype)
    n_g = sizes.to(p.dtype)[:, None]
    f = torch.zeros(G, E, dtype=p.dtype).index_add(0, gid, chosen) / n_g
    P = torch.zeros(G, E, dtype=p.dtype).index_add(0, gid, p) / n_g
    lb = (E * (f * P).sum(dim=1)).mean()
    rz = torch.logsumexp(z, dim=-1).pow(2).mean()
    return out.view(B, T, D), lb, rz, int((~kept).sum()), (p.detach(), expert, kept)


def main():
    ref.moe = moe_autocast
    ref._np = lambda t: t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    cases = sys.argv[1] if len(sys.argv) > 1 else "build/test/cases"
    for name in [line.split()[0] for line in open(f"{cases}/cases.txt")]:
        cfg, flat = ref.read_model(f"{cases}/{name}.model.bin")
        st = ref.read_state(f"{cases}/{name}.state.bin", cfg)
        params = ref.unflatten(cfg, flat.astype(np.float64), dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, losses, grads, _ = ref.forward_backward(params, cfg, torch.tensor(st["x"]), torch.tensor(st["y"]),
                                                            st["settings"])
        chk = ref.compare(cfg, dict(logits=st["logits"], losses=st["losses"], grads=st["grads"]),
                          dict(logits=logits, losses=losses, grads=grads))
        lw = max(e / t for w, e, t in chk if w == "logits")
        lo = max(e / t for w, e, t in chk if w.startswith("loss"))
        gw, gname = max((e / t, w) for w, e, t in chk if w.startswith("grad"))
        print(f"{name:11s} PyTorch bf16 autocast: logits {lw:6.1f}x  losses {lo:5.1f}x  worst gradient {gw:6.1f}x ({gname})")


if __name__ == "__main__":
    main()
