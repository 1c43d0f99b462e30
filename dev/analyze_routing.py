"""analyze_routing.py RUN_DIR [--tokenizer MODEL]: the OpenMoE paper's three
routing findings (arXiv 2402.01739, section 5) on a model trained here.

Reads the routing traces that `train -a N` writes, RUN_DIR/trace/*.bin, and
writes RUN_DIR/analysis/: specialization.png, early_routing.png,
drop_position.png, summary.md and metrics.json (every number of the summary).

Trace file, little-endian: int32 header[256]:
  [0] magic 240201742  [1] version 1  [2] training step  [3] n_moe (MoE layers)
  [4] E  [5] K  [6] N tokens (= sequences x T)  [7] T  [8] capacity factor x 1000
  [9] routing group size (0: the whole batch)  [10] domain (0 in-domain
  validation text, 1 out-of-domain)  [11] L  [16 .. 16+n_moe) each MoE layer's
  model layer; the rest 0. Then int32 tokens[N]; then per MoE layer: int32
  expert[N*K], float32 prob[N*K], uint8 kept[N*K], entry n*K+r being token n's
  rank-r choice (rank 0 the most probable). Token n sits at position n % T of
  its sequence. The traces run the sequences through the model in the
  training batch size, so routing groups are as in training.

The three findings and the verdicts computed here:
  1. context-independent specialisation: the share of top-1 routing that the
     token id alone predicts (each id sent to its most frequent expert, ids
     seen >= 10 times, weighted by count), against the same statistic after
     shuffling the experts across tokens. Holds when it beats the shuffle by
     20 points.
  2. early routing learning: agreement of each checkpoint's id -> top-1
     expert map with the final one (same ids, weighted by count). Holds when
     the checkpoint at a quarter of training already agrees on >= 70%.
  3. drop-towards-the-end: the dropped share of assignments against position.
     Holds when the last quarter of positions drops >= 1.2x the first quarter
     in-domain at the evaluation capacity factor (at the training factor
     1.25 with K=2, at least 37.5% of assignments drop whatever their
     position, since C does not grow with K); the paper also finds
     out-of-domain text dropped more.
"""
import glob
import json
import os
import sys

import numpy as np

MAGIC = 240201742
MIN_COUNT = 10  # token ids seen fewer times are left out of per-id statistics


# -----------------------------------------------------------------------------
# reading traces


def read_trace(path):
    """-> dict with the header fields and tokens [N], expert, prob, kept [n_moe, N, K]."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 1024:
        sys.exit(f"error: {path}: {raw.size} bytes, shorter than the 1024-byte header")
    h = raw[:1024].view(np.int32)
    if h[0] != MAGIC:
        sys.exit(f"error: {path}: bad magic {h[0]} (a trace starts with {MAGIC})")
    if h[1] != 1:
        sys.exit(f"error: {path}: unknown version {h[1]}")
    step, nm, E, K, N, T, cf, group, domain, L = (int(v) for v in h[2:12])
    if min(nm, E, K, N, T) <= 0 or K > E or N % T:
        sys.exit(f"error: {path}: inconsistent header (n_moe {nm}, E {E}, K {K}, N {N}, T {T})")
    want = 1024 + 4 * N + nm * N * K * 9
    if raw.size != want:
        sys.exit(f"error: {path}: size {raw.size} bytes, its header describes {want}")
    at = 1024
    tokens = raw[at:at + 4 * N].view(np.int32)
    at += 4 * N
    expert = np.empty((nm, N, K), np.int32)
    prob = np.empty((nm, N, K), np.float32)
    kept = np.empty((nm, N, K), bool)
    for i in range(nm):
        expert[i] = raw[at:at + 4 * N * K].view(np.int32).reshape(N, K)
        at += 4 * N * K
        prob[i] = raw[at:at + 4 * N * K].view(np.float32).reshape(N, K)
        at += 4 * N * K
        kept[i] = raw[at:at + N * K].reshape(N, K) != 0
        at += N * K
    if expert.min() < 0 or expert.max() >= E:
        sys.exit(f"error: {path}: an expert id outside [0, {E})")
    return dict(step=step, n_moe=nm, E=E, K=K, N=N, T=T, cf=cf, group=group, domain=domain, L=L,
                layers=[int(v) for v in h[16:16 + nm]], tokens=tokens, expert=expert, prob=prob, kept=kept)


def write_trace(path, step, tokens, expert, prob, kept, T, E, cf1000, domain, group=4096, layers=None):
    """the inverse of read_trace (train.c writes them; tests make synthetic ones).
    tokens [N]; expert, prob, kept [n_moe, N, K]."""
    nm, N, K = expert.shape
    layers = layers if layers is not None else [2 * i + 1 for i in range(nm)]
    h = np.zeros(256, np.int32)
    h[:12] = [MAGIC, 1, step, nm, E, K, N, T, cf1000, group, domain, max(layers) + 1]
    h[16:16 + nm] = layers
    with open(path, "wb") as f:
        f.write(h.tobytes())
        f.write(np.asarray(tokens, np.int32).tobytes())
        for i in range(nm):
            f.write(np.asarray(expert[i], np.int32).tobytes())
            f.write(np.asarray(prob[i], np.float32).tobytes())
            f.write(np.asarray(kept[i], np.uint8).tobytes())


def load_traces(run):
    paths = sorted(glob.glob(os.path.join(run, "trace", "*.bin")))
    if not paths:
        sys.exit(f"error: {run}/trace holds no trace files: train with -a N (e.g. -a 32) to write them")
    return [read_trace(p) for p in paths]


# -----------------------------------------------------------------------------
# statistics


def id_expert_counts(tokens, top1, E):
    """counts [n_ids, E] of (token id, top-1 expert) over the ids present, and the ids."""
    ids, inv = np.unique(tokens, return_inverse=True)
    counts = np.zeros((ids.size, E), np.int64)
    np.add.at(counts, (inv, top1), 1)
    return ids, counts


def id_predictability(tokens, top1, E, min_count=MIN_COUNT):
    """share of top-1 routing that sending each id to its most frequent expert
    gets right, over ids seen >= min_count times (1.0: a pure function of id)."""
    _, counts = id_expert_counts(tokens, top1, E)
    counts = counts[counts.sum(1) >= min_count]
    return float(counts.max(1).sum() / counts.sum()) if counts.size else float("nan")


def entropy(counts):
    """entropy (bits) of each row of counts."""
    p = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0).sum(-1)


def specialization(tr, layer, rng):
    tokens, top1, E, T = tr["tokens"], tr["expert"][layer, :, 0], tr["E"], tr["T"]
    ids, counts = id_expert_counts(tokens, top1, E)
    often = counts.sum(1) >= MIN_COUNT
    share = np.bincount(top1, minlength=E) / top1.size
    pos_counts = np.zeros((T, E), np.int64)
    np.add.at(pos_counts, (np.arange(tokens.size) % T, top1), 1)
    w = counts[often].sum(1)
    return dict(
        predictability=id_predictability(tokens, top1, E),
        shuffled=id_predictability(tokens, rng.permutation(top1), E),
        expert_share=share.tolist(),
        entropy_overall=float(entropy(np.bincount(top1, minlength=E)[None])[0]),
        entropy_by_id=float((entropy(counts[often]) * w).sum() / max(w.sum(), 1)),
        entropy_by_position=entropy(pos_counts).tolist(),
        top_tokens=[[int(t) for t in ids[np.argsort(-counts[:, e], kind="stable")[:8]] if counts[:, e].any()]
                    for e in range(E)],
    )


def id_map(tr, layer, ids):
    """top-1 expert of each id in ids (most frequent; -1 when absent)."""
    known, counts = id_expert_counts(tr["tokens"], tr["expert"][layer, :, 0], tr["E"])
    where = {int(t): i for i, t in enumerate(known)}
    return np.array([counts[where[t]].argmax() if t in where else -1 for t in ids])


def agreement_curve(traces, layer):
    """[(step, agreement with the final map)] for the in-domain traces at one cf."""
    final = traces[-1]
    ids, counts = id_expert_counts(final["tokens"], final["expert"][layer, :, 0], final["E"])
    keep = counts.sum(1) >= MIN_COUNT
    ids, weight = ids[keep], counts[keep].sum(1)
    target = id_map(final, layer, ids)
    return [(tr["step"], float(((id_map(tr, layer, ids) == target) * weight).sum() / max(weight.sum(), 1)))
            for tr in traces]


def drop_by_position(tr, bins=16):
    """dropped share of all assignments, mean over layers, per bin of position in sequence."""
    dropped = ~tr["kept"]                                    # [n_moe, N, K]
    per_token = dropped.mean(axis=(0, 2))                    # [N]
    pos = np.arange(tr["N"]) % tr["T"]
    return np.array([per_token[(pos * bins // tr["T"]) == b].mean() for b in range(bins)])


# -----------------------------------------------------------------------------
# report


def decode_ids(tokenizer):
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=tokenizer)
        return lambda ids: [sp.id_to_piece(int(i)) for i in ids]
    except Exception:  # no tokenizer model or no sentencepiece: show ids
        return lambda ids: [str(int(i)) for i in ids]


def plot_all(out, spec, curves, drops, final):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nm = len(spec)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(nm)
    axes[0].bar(x - 0.2, [s["predictability"] for s in spec], 0.4, label="token id predicts")
    axes[0].bar(x + 0.2, [s["shuffled"] for s in spec], 0.4, label="shuffled baseline")
    axes[0].set_xticks(x, [f"layer {l}" for l in final["layers"]])
    axes[0].set_ylabel("share of top-1 routing")
    axes[0].set_title("1. routing predicted by token id alone")
    axes[0].legend()
    for i, s in enumerate(spec):
        axes[1].plot(s["entropy_by_position"], label=f"layer {final['layers'][i]}: by position")
        axes[1].axhline(s["entropy_by_id"], ls="--", color=f"C{i}", label=f"layer {final['layers'][i]}: by token id")
    axes[1].set_xlabel("position in sequence")
    axes[1].set_ylabel("entropy of top-1 expert (bits)")
    axes[1].set_title("routing entropy: given position vs given token id")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/specialization.png", dpi=100)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(curves):
        ax.plot([s for s, _ in c], [a for _, a in c], "o-", label=f"layer {final['layers'][i]}")
    ax.set_xlabel("training step")
    ax.set_ylabel("agreement with the final id -> expert map")
    ax.set_ylim(0, 1.02)
    ax.set_title("2. early routing learning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/early_routing.png", dpi=100)

    fig, ax = plt.subplots(figsize=(6, 4))
    for (domain, cf), curve in sorted(drops.items()):
        T = final["T"]
        centers = (np.arange(len(curve)) + 0.5) * T / len(curve)
        ax.plot(centers, curve, "o-" if domain == 0 else "s--",
                label=f"{'KJV (in-domain)' if domain == 0 else 'fortunes (out-of-domain)'}, cf {cf / 1000:g}")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("dropped share of assignments")
    ax.set_title("3. drop-towards-the-end")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/drop_position.png", dpi=100)


def verdicts(spec, curves, drops, steps, eval_cf):
    gain = min(s["predictability"] - s["shuffled"] for s in spec)
    v1 = gain >= 0.2
    quarter = steps[-1] / 4
    at_quarter = min(next(a for s, a in c if s >= quarter) for c in curves)
    v2 = at_quarter >= 0.7
    kjv = drops[(0, eval_cf)]
    q = len(kjv) // 4
    first, last = float(kjv[:q].mean()), float(kjv[-q:].mean())
    v3 = last >= 1.2 * first and last > 0
    ood = drops.get((1, eval_cf))
    return dict(
        specialization=dict(holds=bool(v1), min_gain_over_shuffle=gain),
        early_routing=dict(holds=bool(v2), agreement_at_quarter=at_quarter, quarter_step=quarter),
        drop_towards_end=dict(holds=bool(v3), first_quarter=first, last_quarter=last,
                              ood_mean=float(ood.mean()) if ood is not None else None,
                              kjv_mean=float(kjv.mean())),
    )


def main():
    args = sys.argv[1:]
    tokenizer = "data/kjv/tokenizer.model"
    if "--tokenizer" in args:
        i = args.index("--tokenizer")
        tokenizer = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    run = args[0]
    out = os.path.join(run, "analysis")
    os.makedirs(out, exist_ok=True)
    traces = load_traces(run)
    steps = sorted({t["step"] for t in traces})
    cfs = sorted({t["cf"] for t in traces})
    eval_cf = cfs[-1]  # the larger factor is the evaluation one
    last = [t for t in traces if t["step"] == steps[-1]]
    final = next(t for t in last if t["domain"] == 0 and t["cf"] == eval_cf)
    rng = np.random.default_rng(0)
    spec = [specialization(final, i, rng) for i in range(final["n_moe"])]
    series = [t for t in traces if t["domain"] == 0 and t["cf"] == eval_cf]
    curves = [agreement_curve(series, i) for i in range(final["n_moe"])]
    drops = {(t["domain"], t["cf"]): drop_by_position(t) for t in last}
    v = verdicts(spec, curves, drops, steps, eval_cf)
    metrics = dict(run=run, steps=steps, layers=final["layers"], E=final["E"], K=final["K"], T=final["T"],
                   tokens_per_trace=final["N"], specialization=spec, early_routing=curves,
                   drop_by_position={f"domain{d}_cf{c}": drops[(d, c)].tolist() for d, c in drops}, verdicts=v)
    with open(f"{out}/metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    plot_all(out, spec, curves, drops, final)

    piece = decode_ids(tokenizer)
    lines = [f"# Routing analysis of {run}", "",
             f"Traces of {final['N']} in-domain tokens ({final['N'] // final['T']} sequences of {final['T']}) "
             f"at steps {', '.join(map(str, steps))}; MoE layers {final['layers']}, E={final['E']}, K={final['K']}.",
             "", "## 1. Context-independent specialisation", "",
             "| layer | token id predicts top-1 | shuffled | entropy by id (bits) | by position (mean) | overall |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(spec):
        lines.append(f"| {final['layers'][i]} | {s['predictability']:.1%} | {s['shuffled']:.1%} | "
                     f"{s['entropy_by_id']:.2f} | {np.mean(s['entropy_by_position']):.2f} | {s['entropy_overall']:.2f} |")
    lines += ["", f"Top tokens of each expert, layer {final['layers'][0]} (share of top-1 routing):", ""]
    for e, toks in enumerate(spec[0]["top_tokens"]):
        lines.append(f"- expert {e} ({spec[0]['expert_share'][e]:.1%}): {' '.join(piece(toks))}")
    s1 = v["specialization"]
    lines += ["", f"**Verdict: {'holds' if s1['holds'] else 'does not hold'}** — token id beats the shuffled "
              f"baseline by at least {s1['min_gain_over_shuffle']:.1%} in every MoE layer (criterion: 20 points).",
              "", "## 2. Early routing learning", "", "| step | " + " | ".join(f"layer {l}" for l in final["layers"]) + " |",
              "|---|" + "---|" * len(curves)]
    for j, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{c[j][1]:.1%}" for c in curves) + " |")
    s2 = v["early_routing"]
    lines += ["", f"**Verdict: {'holds' if s2['holds'] else 'does not hold'}** — at a quarter of training the "
              f"id -> expert map already agrees {s2['agreement_at_quarter']:.1%} with the final one (criterion: 70%).",
              "", "## 3. Drop-towards-the-end", "", "Dropped share of assignments by position (16 bins):", "",
              "| text, cf | first bin | middle | last bin | mean |", "|---|---|---|---|---|"]
    for (d, c), curve in sorted(drops.items()):
        lines.append(f"| {'KJV' if d == 0 else 'fortunes'}, {c / 1000:g} | {curve[0]:.3f} | {curve[len(curve) // 2]:.3f} "
                     f"| {curve[-1]:.3f} | {curve.mean():.3f} |")
    s3 = v["drop_towards_end"]
    ood = f"; out-of-domain mean {s3['ood_mean']:.3f} vs in-domain {s3['kjv_mean']:.3f}" if s3["ood_mean"] is not None else ""
    lines += ["", f"**Verdict: {'holds' if s3['holds'] else 'does not hold'}** — at the evaluation capacity factor the "
              f"last quarter of positions drops {s3['last_quarter']:.3f} against {s3['first_quarter']:.3f} in the first "
              f"(criterion: 1.2x){ood}.", "",
              "Plots: specialization.png, early_routing.png, drop_position.png; numbers: metrics.json."]
    with open(f"{out}/summary.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}/summary.md, metrics.json and 3 plots")


if __name__ == "__main__":
    main()
