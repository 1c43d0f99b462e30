"""gpu_cases.py OUTDIR [--quick]: reference cases for the CUDA backend beyond
test/reference.py's, in the same files (NAME.model.bin, NAME.state.bin,
cases.txt), float64 PyTorch on the CPU:

  - routing groups of 3 tokens, where the padded expert layout does not fit
    and openmoe.cu takes its exact layout (one matmul per expert);
  - preset shapes: the tiny preset (several routing groups; its full context)
    and the small preset's widths (V 32000, D 512, E 8), where test_gpu is also
    judged against test_cpu -o;
  - flash attention (bf16 mode) at head widths 32, 64 and 128 over several
    64-row tiles with T not a multiple of 64, and with packed rows (SPEC §10);
  - sharp attention: wq and wk scaled up so that attention logits reach ~100
    and the softmax's running max moves from one key tile to the next (with
    reference.py's small logits a flash kernel that never rescales passes).

--quick leaves out the small-preset case (for dev/cuda_emu, which is slow)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from dataclasses import replace  # noqa: E402


def write_scaled(outdir, case, qk_scale):
    """write_cases for one case whose wq and wk are multiplied by qk_scale
    (then rounded to float32), with reference.py's routing margin."""
    cfg = case.cfg
    for seed in range(case.seed, case.seed + ref.MAX_RESEEDS):
        params = ref.init_params(cfg, seed)
        for l in range(cfg.L):
            for w in ("wq", "wk"):
                params[f"l{l}.{w}"] = (params[f"l{l}.{w}"] * qk_scale).float().double()
        x, y = ref.make_batch(case, seed)
        with torch.no_grad():
            _, _, routing = ref.forward(params, cfg, x, None, case.s)
        if ref.routing_margin(routing, cfg.K) > ref.MARGIN:
            break
    else:
        raise RuntimeError(f"{case.name}: no seed keeps the routing margin")
    logits, losses, grads, _ = ref.forward_backward(params, cfg, x, y, case.s)
    base = os.path.join(outdir, case.name)
    ref.write_model(base + ".model.bin", cfg, ref.flatten(cfg, params))
    ref.write_state(base + ".state.bin", cfg, case.s, ref._np(x), ref._np(y), logits, losses, grads)
    print(f"{case.name:11s} seed {seed}  total {losses[0]:.6f}  (wq, wk x {qk_scale})")


def main():
    outdir, quick = sys.argv[1], "--quick" in sys.argv[2:]
    os.makedirs(outdir, exist_ok=True)
    tiny, small = ref.PRESETS["tiny"], ref.PRESETS["small"]
    attn = lambda Hd, ctx: ref.Config(64, ctx, 2, 64, 2, Hd, 64, 4, 2, 2, 48, 1)  # noqa: E731
    cases = [
        ref.Case("tiny_g64", tiny, 4, 64, ref.Settings(group_size=64), seed=11000,
                 about="tiny preset, 4 routing groups of 64"),
        ref.Case("tiny_t256", tiny, 2, 256, ref.Settings(cf1000=1000, group_size=0), seed=12000, ignore=0.2,
                 about="tiny preset at its full context, CF 1.0, one group"),
        ref.Case("tiny_groups", ref.Config(64, 32, 2, 32, 2, 16, 48, 8, 2, 1, 32, 1), 2, 15,
                 ref.Settings(group_size=3, min_capacity=4), seed=14000,
                 about="groups of 3, min_capacity 4 > 3: openmoe.cu takes its exact expert-row layout"),
        ref.Case("flash32", attn(32, 160), 2, 150, ref.Settings(group_size=100), seed=21000, ignore=0.1,
                 about="Hd 32, T 150: three query tiles, the last partial; groups 100+100+100"),
        ref.Case("flash64", attn(64, 160), 1, 130, ref.Settings(group_size=0), seed=22000,
                 about="Hd 64, T 130"),
        ref.Case("flash128", replace(attn(128, 160), L=1, H=1), 1, 129, ref.Settings(group_size=0), seed=23000,
                 about="Hd 128, T 129 (a one-row last tile)"),
        ref.Case("flash64_packed", attn(64, 200), 2, 150, ref.Settings(group_size=0), seed=24000, ignore=0.3,
                 packing=(((40, 0), (80, 0), (-30, 0)), ((100, 10), (50, 0))),
                 about="Hd 64, SPEC §10's packed rows: examples starting inside and at the edge of 64-row"
                       " tiles, padding, positions from 10"),
    ]
    if not quick:
        cases.append(ref.Case("small_l2", replace(small, L=2, max_seq_len=128), 2, 128, ref.Settings(group_size=128),
                              seed=13000, about="small preset's widths (V 32000, D 512, E 8), 2 layers"))
    ref.write_cases(outdir, cases)
    sharp = [
        ref.Case("sharp64", attn(64, 160), 1, 140, ref.Settings(group_size=0), seed=31000),
        ref.Case("sharp32", attn(32, 200), 2, 200, ref.Settings(group_size=64), seed=32000),
    ]
    for case in sharp:
        write_scaled(outdir, case, 4.0)
    with open(os.path.join(outdir, "cases.txt"), "a") as f:
        for case in sharp:
            f.write(case.name + "\n")


if __name__ == "__main__":
    main()
