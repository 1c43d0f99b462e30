"""analyze_routing.py RUN_DIR [--tokenizer MODEL] [--min-count N]: the OpenMoE
paper's three routing findings (arXiv 2402.01739, section 5) on a model
trained here.

Reads the routing traces that `train -a N` writes, RUN_DIR/trace/*.bin, and
writes RUN_DIR/analysis/: specialization.png, early_routing.png,
drop_position.png, summary.md and metrics.json (every number of the summary).
--tokenizer: the SentencePiece model that decodes token ids in the summary
(default data/kjv/tokenizer.model; ids are shown when it or python3-
sentencepiece is missing). --min-count: per-id statistics use the ids seen at
least this often (default 10), since an id seen once is "predicted" trivially.

Trace file, little-endian: int32 header[256]:
  [0] magic 240201742  [1] version 1  [2] training step  [3] n_moe (MoE layers)
  [4] E  [5] K  [6] N tokens (= sequences x T)  [7] T  [8] capacity factor x 1000
  [9] routing group size (0: the whole batch)  [10] domain (0 in-domain
  validation text, 1 out-of-domain)  [11] L  [16 .. 16+n_moe) each MoE layer's
  model layer; the rest 0. Then int32 tokens[N]; then per MoE layer: int32
  expert[N*K], float32 prob[N*K], uint8 kept[N*K], entry n*K+r being token n's
  rank-r choice (rank 0 the most probable), kept 0 when capacity dropped it.
  Token n sits at position n % T of its sequence. train.c runs the traced
  sequences through the model in its training batch size, so routing groups
  are as in training. Of the two capacity factors traced, the larger is taken
  for the evaluation one.

The statistics (top-1 = the rank-0 choice; "shuffled" = the same statistic
after permuting the top-1 experts across all tokens, which keeps the experts'
loads but breaks any link with token id or position):
  1. context-independent specialisation, on the final in-domain trace at the
     evaluation capacity factor, per MoE layer:
     - id predictability: for each token id, the share of its occurrences sent
       to its most frequent expert, averaged weighted by count (ids seen
       >= min-count times; also over all ids), against the shuffled value;
     - entropy (bits) of the top-1 expert given the token id (mean over ids,
       weighted by count) and given the position (mean over positions), each
       with its shuffled value (the same estimator on the same counts, so its
       small-sample bias is matched), and overall;
     - transfer: the share of the out-of-domain text's top-1 routing that the
       in-domain id -> expert map predicts (ids seen >= min-count times in
       domain): the same token, a different context;
     - each expert's share of the top-1 routing and its top tokens: the ids
       whose most frequent expert it is, by count.
     Verdict: holds when id predictability beats its shuffled value by >= 20
     points in every MoE layer.
  2. early routing learning, on the in-domain traces at the evaluation capacity
     factor, per MoE layer: the agreement of each checkpoint's id -> top-1
     expert map with the final one (ids seen >= min-count times in the final
     trace, weighted by count), and its chance value (the agreement of two
     unrelated maps with the same expert loads). Verdict: holds when the first
     checkpoint at or after a quarter of training (and before the end) agrees
     >= 70% in every layer; no verdict without such a checkpoint.
  3. drop-towards-the-end, on the final traces: the dropped share of all K
     assignments and of the top-1 assignments alone, mean over MoE layers, in
     16 bins of position, for each text and capacity factor. Verdict: holds
     when, in-domain at the evaluation factor, the last quarter of positions
     drops >= 1.2x as much as the first quarter (and some drop). Whether the
     out-of-domain text drops more is reported beside it. (At the training
     factor 1.25 with K=2, >= 37.5% of all assignments drop wherever they sit,
     since capacity does not grow with K: look at the top-1 curve there.)
"""
import argparse
import glob
import json
import os
import re
import sys

import numpy as np

MAGIC = 240201742
HEADER_BYTES = 1024
BINS = 16  # position bins of the drop curves
SPEC_GAIN = 0.20  # verdict 1: id predictability minus shuffled, every layer
EARLY_AGREE = 0.70  # verdict 2: agreement at a quarter of training, every layer
DROP_RATIO = 1.2  # verdict 3: last quarter of positions vs first, in-domain eval cf


# -----------------------------------------------------------------------------
# reading and writing traces


def fail(msg):
    sys.exit(f"error: {msg}")


def read_trace(path):
    """-> dict with the header fields and tokens [N], expert, prob, kept [n_moe, N, K]."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < HEADER_BYTES:
        fail(f"{path}: {raw.size} bytes, shorter than the {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, "<i4", 256).astype(np.int64)
    if h[0] != MAGIC:
        fail(f"{path}: bad magic {h[0]} (a routing trace starts with {MAGIC})")
    if h[1] != 1:
        fail(f"{path}: unknown trace version {h[1]} (this script reads version 1)")
    step, nm, E, K, N, T, cf, group, domain, L = (int(v) for v in h[2:12])
    if not (0 < nm <= min(L, 240) and 0 < K <= E and N > 0 and T > 0 and N % T == 0 and cf > 0 and group >= 0
            and domain in (0, 1) and step >= 0):
        fail(f"{path}: inconsistent header (step {step}, n_moe {nm}, E {E}, K {K}, N {N}, T {T}, "
             f"cf1000 {cf}, group {group}, domain {domain}, L {L})")
    layers = [int(v) for v in h[16:16 + nm]]
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= L:
        fail(f"{path}: MoE layer ids {layers} are not increasing within [0, L = {L})")
    reserved = [i for i in list(range(12, 16)) + list(range(16 + nm, 256)) if h[i] != 0]
    if reserved:
        fail(f"{path}: reserved header word {reserved[0]} is {h[reserved[0]]}, must be 0")
    want = HEADER_BYTES + 4 * N + nm * N * K * 9
    if raw.size != want:
        fail(f"{path}: size {raw.size} bytes, its header (n_moe {nm}, N {N}, K {K}) describes {want}")
    name = re.fullmatch(r"s(\d+)_d(\d)_cf(\d+)\.bin", os.path.basename(path))
    if name and (int(name[1]), int(name[2]), int(name[3])) != (step, domain, cf):
        fail(f"{path}: its header says step {step}, domain {domain}, cf1000 {cf}, unlike its name")
    at = HEADER_BYTES
    tokens = np.frombuffer(raw, "<i4", N, at).astype(np.int64)
    at += 4 * N
    expert = np.empty((nm, N, K), np.int64)
    prob = np.empty((nm, N, K), np.float32)
    kept = np.empty((nm, N, K), bool)
    for i in range(nm):
        expert[i] = np.frombuffer(raw, "<i4", N * K, at).reshape(N, K)
        at += 4 * N * K
        prob[i] = np.frombuffer(raw, "<f4", N * K, at).reshape(N, K)
        at += 4 * N * K
        kept[i] = raw[at:at + N * K].reshape(N, K) != 0
        at += N * K
    if tokens.min() < 0:
        fail(f"{path}: a negative token id")
    if expert.min() < 0 or expert.max() >= E:
        fail(f"{path}: an expert id outside [0, {E})")
    return dict(path=path, step=step, n_moe=nm, E=E, K=K, N=N, T=T, cf=cf, group=group, domain=domain, L=L,
                layers=layers, tokens=tokens, expert=expert, prob=prob, kept=kept)


def write_trace(path, step, tokens, expert, prob, kept, T, E, cf1000, domain, group=4096, layers=None):
    """the inverse of read_trace (train.c writes them; tests make synthetic ones).
    tokens [N]; expert, prob, kept [n_moe, N, K]."""
    nm, N, K = np.shape(expert)
    layers = layers if layers is not None else [2 * i + 1 for i in range(nm)]
    h = np.zeros(256, "<i4")
    h[:12] = [MAGIC, 1, step, nm, E, K, N, T, cf1000, group, domain, max(layers) + 1]
    h[16:16 + nm] = layers
    with open(path, "wb") as f:
        f.write(h.tobytes())
        f.write(np.asarray(tokens, "<i4").tobytes())
        for i in range(nm):
            f.write(np.asarray(expert[i], "<i4").tobytes())
            f.write(np.asarray(prob[i], "<f4").tobytes())
            f.write(np.asarray(kept[i], np.uint8).tobytes())


def load_traces(run):
    paths = sorted(glob.glob(os.path.join(run, "trace", "*.bin")))
    if not paths:
        fail(f"{run}/trace holds no trace files: train with -a N (e.g. -a 32) to write them")
    traces = [read_trace(p) for p in paths]
    first = traces[0]
    for t in traces[1:]:
        if (t["n_moe"], t["E"], t["K"], t["T"], t["layers"]) != (first["n_moe"], first["E"], first["K"], first["T"],
                                                                  first["layers"]):
            fail(f"{t['path']}: a different model (n_moe, E, K, T or MoE layers) from {first['path']}: "
                 f"traces of one run only, please")
    return traces


# -----------------------------------------------------------------------------
# statistics


def id_expert_counts(tokens, top1, E):
    """the ids present, and counts [n_ids, E] of (token id, top-1 expert)."""
    ids, inv = np.unique(tokens, return_inverse=True)
    counts = np.zeros((ids.size, E), np.int64)
    np.add.at(counts, (inv.ravel(), top1), 1)
    return ids, counts


def id_predictability(tokens, top1, E, min_count):
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


def entropy_by_id(tokens, top1, E, min_count):
    """mean entropy of the top-1 expert given the token id, ids seen >= min_count times, weighted by count."""
    _, counts = id_expert_counts(tokens, top1, E)
    counts = counts[counts.sum(1) >= min_count]
    w = counts.sum(1)
    return float((entropy(counts) * w).sum() / w.sum()) if w.sum() else float("nan")


def entropy_by_position(top1, T, E):
    """entropy of the top-1 expert at each position [T]."""
    counts = np.zeros((T, E), np.int64)
    np.add.at(counts, (np.arange(top1.size) % T, top1), 1)
    return entropy(counts)


def id_map(tr, layer, ids):
    """each id's most frequent top-1 expert in trace tr (-1 where tr lacks the id)."""
    known, counts = id_expert_counts(tr["tokens"], tr["expert"][layer, :, 0], tr["E"])
    out = np.full(len(ids), -1)
    at = np.searchsorted(known, ids)
    found = (at < known.size) & (known[np.minimum(at, known.size - 1)] == ids)
    out[found] = counts[at[found]].argmax(1)
    return out


def transfer(src, dst, layer, min_count, rng):
    """share of dst's top-1 routing (ids seen >= min_count times in src) that
    src's id -> expert map predicts, and the same after shuffling dst's experts."""
    ids, counts = id_expert_counts(src["tokens"], src["expert"][layer, :, 0], src["E"])
    ids = ids[counts.sum(1) >= min_count]
    if not ids.size:
        return float("nan"), float("nan"), 0.0
    top1 = dst["expert"][layer, :, 0]
    at = np.searchsorted(ids, dst["tokens"])
    sel = (at < ids.size) & (ids[np.minimum(at, ids.size - 1)] == dst["tokens"])
    if not sel.any():
        return float("nan"), float("nan"), 0.0
    guess = id_map(src, layer, ids)[at[sel]]
    hit = float((guess == top1[sel]).mean())
    base = float((guess == rng.permutation(top1)[sel]).mean())
    return hit, base, float(sel.mean())


def specialization(tr, layer, rng, min_count, ood=None):
    tokens, top1, E, T = tr["tokens"], tr["expert"][layer, :, 0], tr["E"], tr["T"]
    shuffled = rng.permutation(top1)
    ids, counts = id_expert_counts(tokens, top1, E)
    often = counts.sum(1) >= min_count
    owner = counts.argmax(1)
    top_tokens = []
    for e in range(E):  # the ids whose most frequent expert is e, by count
        mine = np.flatnonzero((owner == e) & (counts[:, e] > 0))
        mine = mine[np.argsort(-counts[mine, e], kind="stable")][:8]
        top_tokens.append([[int(ids[j]), int(counts[j, e]), float(counts[j, e] / counts[j].sum())] for j in mine])
    by_pos = entropy_by_position(top1, T, E)
    out = dict(
        predictability=id_predictability(tokens, top1, E, min_count),
        shuffled=id_predictability(tokens, shuffled, E, min_count),
        predictability_all=id_predictability(tokens, top1, E, 1),
        shuffled_all=id_predictability(tokens, shuffled, E, 1),
        ids_often=int(often.sum()),
        tokens_often=float(counts[often].sum() / tokens.size),
        expert_share=(np.bincount(top1, minlength=E) / top1.size).tolist(),
        entropy_overall=float(entropy(np.bincount(top1, minlength=E)[None])[0]),
        entropy_by_id=entropy_by_id(tokens, top1, E, min_count),
        entropy_by_id_shuffled=entropy_by_id(tokens, shuffled, E, min_count),
        entropy_by_position=by_pos.tolist(),
        entropy_by_position_mean=float(by_pos.mean()),
        entropy_by_position_shuffled_mean=float(entropy_by_position(shuffled, T, E).mean()),
        top_tokens=top_tokens,
    )
    if ood is not None:
        out["transfer_ood"], out["transfer_ood_shuffled"], out["transfer_ood_covered"] = \
            transfer(tr, ood, layer, min_count, rng)
    return out


def agreement_curve(series, layer, min_count):
    """[(step, agreement with the final map, chance agreement)] over the traces of series (by step)."""
    final = series[-1]
    ids, counts = id_expert_counts(final["tokens"], final["expert"][layer, :, 0], final["E"])
    keep = counts.sum(1) >= min_count
    ids, w = ids[keep], counts[keep].sum(1)
    if not w.sum():
        return [(tr["step"], float("nan"), float("nan")) for tr in series]
    target = id_map(final, layer, ids)
    E = final["E"]
    load_final = np.bincount(target, weights=w, minlength=E) / w.sum()
    curve = []
    for tr in series:
        m = id_map(tr, layer, ids)
        load = np.bincount(m[m >= 0], weights=w[m >= 0], minlength=E) / w.sum()
        curve.append((tr["step"], float(((m == target) * w).sum() / w.sum()), float(load @ load_final)))
    return curve


def drop_by_position(tr, rank0=False):
    """dropped share of assignments (all K, or rank 0 only), mean over MoE layers, per bin of position."""
    dropped = ~tr["kept"][:, :, :1] if rank0 else ~tr["kept"]  # [n_moe, N, K or 1]
    per_token = dropped.mean(axis=(0, 2))  # [N]
    b = (np.arange(tr["N"]) % tr["T"]) * BINS // tr["T"]
    n = np.bincount(b, minlength=BINS)
    return np.bincount(b, weights=per_token, minlength=BINS) / np.maximum(n, 1)


def quarters(curve):
    q = max(1, len(curve) // 4)
    return float(np.mean(curve[:q])), float(np.mean(curve[-q:]))


# -----------------------------------------------------------------------------
# verdicts


def verdicts(spec, curves, drops, drops0, steps, eval_cf):
    gain = min(s["predictability"] - s["shuffled"] for s in spec)
    v1 = dict(holds=bool(gain >= SPEC_GAIN), min_gain_over_shuffle=gain, criterion=SPEC_GAIN)

    quarter = steps[-1] / 4
    early = [s for s in steps[:-1] if s >= quarter]
    if early:
        at = steps.index(early[0])
        agree = min(c[at][1] for c in curves)
        v2 = dict(holds=bool(agree >= EARLY_AGREE), step=early[0], agreement=agree,
                  chance=max(c[at][2] for c in curves))
    else:
        v2 = dict(holds=None, step=None, agreement=None, chance=None)
    reach = [s for j, s in enumerate(steps[:-1]) if all(a >= EARLY_AGREE for c in curves for _, a, _ in c[j:])]
    v2.update(criterion=EARLY_AGREE, quarter_step=quarter, final_step=steps[-1],
              stays_above_from=reach[0] if reach else None)

    first, last = quarters(drops[(0, eval_cf)])
    first0, last0 = quarters(drops0[(0, eval_cf)])
    v3 = dict(holds=bool(last > 0 and last >= DROP_RATIO * first), criterion=DROP_RATIO, cf1000=eval_cf,
              first_quarter=first, last_quarter=last, first_quarter_top1=first0, last_quarter_top1=last0,
              kjv_mean=float(drops[(0, eval_cf)].mean()), ood_mean=None, ood_first_quarter=None,
              ood_last_quarter=None, ood_drops_more=None)
    if (1, eval_cf) in drops:
        ood = drops[(1, eval_cf)]
        v3["ood_mean"] = float(ood.mean())
        v3["ood_first_quarter"], v3["ood_last_quarter"] = quarters(ood)
        v3["ood_drops_more"] = bool(v3["ood_mean"] > v3["kjv_mean"])
    return dict(specialization=v1, early_routing=v2, drop_towards_end=v3)


# -----------------------------------------------------------------------------
# report


def decoder(tokenizer):
    """-> function from a token id to a printable piece (the id itself without a tokenizer)."""
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=tokenizer)
    except Exception:  # no model file, or no python3-sentencepiece
        print(f"note: no tokenizer {tokenizer} (or no python3-sentencepiece): showing token ids")
        return lambda i: str(i)

    def piece(i):
        try:
            p = sp.id_to_piece(int(i))
        except Exception:
            return str(i)
        return "`` " + p + " ``" if "`" in p else "`" + p + "`"
    return piece


def domain_name(d):
    return "KJV (in-domain)" if d == 0 else "fortunes (out-of-domain)"


def plot_all(out, spec, curves, drops, drops0, final, v, min_count):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"layer {l}" for l in final["layers"]]
    x = np.arange(len(spec))

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    ax = axes[0]
    bars = [(f"token id (ids seen >= {min_count} times)", "predictability"), ("token id (all ids)", "predictability_all"),
            ("shuffled baseline", "shuffled")]
    if "transfer_ood" in spec[0]:
        bars.append(("in-domain map on fortunes", "transfer_ood"))
    wid = 0.8 / len(bars)
    for j, (label, key) in enumerate(bars):
        ax.bar(x + (j - (len(bars) - 1) / 2) * wid, [s[key] for s in spec], wid, label=label)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of top-1 routing predicted")
    ax.set_title("1. top-1 expert predicted by token id alone")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)

    ax = axes[1]
    bars = [("given token id", "entropy_by_id"), ("given token id, shuffled", "entropy_by_id_shuffled"),
            ("given position", "entropy_by_position_mean"),
            ("given position, shuffled", "entropy_by_position_shuffled_mean"), ("overall", "entropy_overall")]
    wid = 0.8 / len(bars)
    for j, (label, key) in enumerate(bars):
        ax.bar(x + (j - (len(bars) - 1) / 2) * wid, [s[key] for s in spec], wid, label=label)
    ax.axhline(np.log2(final["E"]), color="0.5", ls=":", lw=1)
    ax.set_xticks(x, names)
    ax.set_ylabel("entropy of the top-1 expert (bits)")
    ax.set_title(f"routing entropy (max log2 E = {np.log2(final['E']):.3g} bits)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)

    ax = axes[2]
    for i, s in enumerate(spec):
        ax.plot(s["entropy_by_position"], color=f"C{i}", lw=0.8, label=f"{names[i]}: given position")
        ax.axhline(s["entropy_by_id"], ls="--", color=f"C{i}", label=f"{names[i]}: given token id (mean)")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("entropy of the top-1 expert (bits)")
    ax.set_title("entropy given position vs given token id")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(f"{out}/specialization.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(curves):
        ax.plot([s for s, _, _ in c], [a for _, a, _ in c], "o-", color=f"C{i}", label=names[i])
        ax.plot([s for s, _, _ in c], [b for _, _, b in c], ":", color=f"C{i}", label=f"{names[i]}: chance")
    ax.axhline(EARLY_AGREE, color="0.5", ls="--", lw=1, label=f"verdict threshold {EARLY_AGREE:.0%}")
    ax.axvline(v["early_routing"]["quarter_step"], color="0.7", lw=1, label="a quarter of training")
    ax.set_xlabel("training step")
    ax.set_ylabel("agreement with the final id -> expert map")
    ax.set_ylim(0, 1.03)
    ax.set_title("2. early routing learning (in-domain, top-1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/early_routing.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    T = final["T"]
    centers = (np.arange(BINS) + 0.5) * T / BINS
    for ax, d, what in ((axes[0], drops, f"all {final['K']} assignments per token"),
                        (axes[1], drops0, "top-1 assignments only")):
        for j, ((domain, cf), curve) in enumerate(sorted(d.items())):
            ax.plot(centers, curve, "o-" if domain == 0 else "s--", color=f"C{j}",
                    label=f"{domain_name(domain)}, capacity factor {cf / 1000:g}")
        ax.set_xlabel("position in sequence")
        ax.set_ylabel("dropped share")
        ax.set_xlim(0, T)
        ax.set_ylim(bottom=0)
        ax.set_title(f"3. drop-towards-the-end: {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/drop_position.png", dpi=100)
    plt.close(fig)


def pct(v):
    return "n/a" if v is None or v != v else f"{v:.1%}"


def verdict_word(h):
    return "no verdict" if h is None else "holds" if h else "does not hold"


def summary(run, final, steps, spec, curves, drops, drops0, v, piece, min_count, step_drops):
    L = final["layers"]
    has_ood = "transfer_ood" in spec[0]
    out = [f"# Routing analysis of {run}", "",
           f"Traces of {final['N']} in-domain tokens ({final['N'] // final['T']} sequences of {final['T']}) at steps "
           f"{', '.join(map(str, steps))}; MoE layers {L} (model layers), E={final['E']}, K={final['K']}, routing "
           f"groups of {final['group'] or 'the whole batch'} tokens. Top-1 = each token's rank-0 expert; \"shuffled\" "
           f"= the same statistic with the top-1 experts permuted across tokens (same expert loads, no link to token "
           f"id or position). Per-id statistics use ids seen >= {min_count} times.", "",
           "## 1. Context-independent specialisation", "",
           f"Final checkpoint (step {final['step']}), in-domain, capacity factor {final['cf'] / 1000:g}.", "",
           "| layer | token id predicts top-1 | shuffled | all ids | all ids, shuffled | "
           + ("in-domain map on fortunes (shuffled) | " if has_ood else "")
           + "entropy given id (shuffled) | given position (shuffled) | overall |",
           "|---|---|---|---|---|" + ("---|" if has_ood else "") + "---|---|---|"]
    for i, s in enumerate(spec):
        out.append(f"| {L[i]} | {pct(s['predictability'])} | {pct(s['shuffled'])} | {pct(s['predictability_all'])} "
                   f"| {pct(s['shuffled_all'])} | "
                   + (f"{pct(s['transfer_ood'])} ({pct(s['transfer_ood_shuffled'])}) | " if has_ood else "")
                   + f"{s['entropy_by_id']:.2f} ({s['entropy_by_id_shuffled']:.2f}) | "
                   f"{s['entropy_by_position_mean']:.2f} ({s['entropy_by_position_shuffled_mean']:.2f}) | "
                   f"{s['entropy_overall']:.2f} |")
    s0 = spec[0]
    out += ["", f"{s0['ids_often']} token ids are seen >= {min_count} times, {s0['tokens_often']:.1%} of the tokens. "
            "Entropies in bits; \"given position\" is the mean over positions."]
    for i, s in enumerate(spec):
        out += ["", f"Experts of layer {L[i]}: share of top-1 routing; top tokens (the ids whose most frequent expert "
                "it is, with their count and the share of their occurrences it gets):", ""]
        for e, toks in enumerate(s["top_tokens"]):
            out.append(f"- expert {e} ({s['expert_share'][e]:.1%}): "
                       + (", ".join(f"{piece(t)} {c} ({f:.0%})" for t, c, f in toks) or "none"))
    v1 = v["specialization"]
    out += ["", f"**Verdict: {verdict_word(v1['holds'])}** — token id predicts "
            + ", ".join(f"{pct(s['predictability'])} (layer {L[i]})" for i, s in enumerate(spec))
            + " of top-1 routing against "
            + ", ".join(pct(s["shuffled"]) for s in spec) + f" shuffled (criterion: at least "
            f"{SPEC_GAIN * 100:.0f} points above the shuffle in every layer; least margin "
            f"{v1['min_gain_over_shuffle'] * 100:.1f}).",
            "", "## 2. Early routing learning", "",
            "Agreement of each checkpoint's id -> top-1 expert map with the final one (in-domain, capacity factor "
            f"{final['cf'] / 1000:g}, ids seen >= {min_count} times at the end, weighted by count); chance in "
            "brackets.", "",
            "| step | " + " | ".join(f"layer {l}" for l in L) + " |", "|---|" + "---|" * len(curves)]
    for j, step in enumerate(steps):
        out.append(f"| {step} | " + " | ".join(f"{pct(c[j][1])} ({pct(c[j][2])})" for c in curves) + " |")
    v2 = v["early_routing"]
    stays = (f"; it stays >= {EARLY_AGREE:.0%} from step {v2['stays_above_from']} on"
             if v2["stays_above_from"] is not None else "")
    if v2["holds"] is None:
        out += ["", f"**Verdict: no verdict** — no checkpoint between a quarter of training (step "
                f"{v2['quarter_step']:g}) and the end (criterion: agreement >= {EARLY_AGREE:.0%} there)."]
    else:
        out += ["", f"**Verdict: {verdict_word(v2['holds'])}** — at step {v2['step']}, the first checkpoint at or "
                f"after a quarter of training, the id -> expert map agrees {pct(v2['agreement'])} with the final one "
                f"in its worst layer (chance {pct(v2['chance'])}; criterion: >= {EARLY_AGREE:.0%} in every "
                f"layer){stays}."]
    out += ["", "## 3. Drop-towards-the-end", "",
            "Capacity slots go out in token order within a routing group, rank 0 first (SPEC section 3), so a "
            "sequence's later tokens queue behind its earlier ones.", "",
            f"Dropped share by position, final checkpoint, mean over MoE layers, {BINS} bins of "
            f"{final['T'] // BINS if final['T'] >= BINS else 'under 1'} positions: all K assignments (top-1 only).", "",
            "| text, capacity factor | first bin | middle bin | last bin | first quarter | last quarter | mean |",
            "|---|---|---|---|---|---|---|"]
    for key in sorted(drops):
        a, b = drops[key], drops0[key]
        (fa, la), (fb, lb) = quarters(a), quarters(b)
        out.append(f"| {domain_name(key[0])}, {key[1] / 1000:g} | {a[0]:.3f} ({b[0]:.3f}) | "
                   f"{a[BINS // 2]:.3f} ({b[BINS // 2]:.3f}) | {a[-1]:.3f} ({b[-1]:.3f}) | {fa:.3f} ({fb:.3f}) | "
                   f"{la:.3f} ({lb:.3f}) | {a.mean():.3f} ({b.mean():.3f}) |")
    if len(steps) > 1:
        out += ["", "Mean dropped share of all assignments at each traced step:", "",
                "| step | " + " | ".join(f"{'KJV' if d == 0 else 'fortunes'}, {c / 1000:g}" for d, c in
                                          sorted(step_drops)) + " |",
                "|---|" + "---|" * len(step_drops)]
        for step in steps:
            out.append(f"| {step} | " + " | ".join(
                next((f"{m:.3f}" for s, m, _ in step_drops[k] if s == step), "-") for k in sorted(step_drops)) + " |")
    v3 = v["drop_towards_end"]
    ood = (f" Out-of-domain text drops {'more' if v3['ood_drops_more'] else 'no more'} than in-domain text: "
           f"{v3['ood_mean']:.3f} against {v3['kjv_mean']:.3f} on average (first quarter {v3['ood_first_quarter']:.3f}, "
           f"last {v3['ood_last_quarter']:.3f})." if v3["ood_mean"] is not None else
           " (No out-of-domain trace: train with data/kjv/ood.bin present to compare.)")
    out += ["", f"**Verdict: {verdict_word(v3['holds'])}** — in-domain at capacity factor {v3['cf1000'] / 1000:g} the "
            f"last quarter of positions drops {v3['last_quarter']:.3f} of its assignments against "
            f"{v3['first_quarter']:.3f} in the first quarter (top-1: {v3['last_quarter_top1']:.3f} against "
            f"{v3['first_quarter_top1']:.3f}; criterion: >= {DROP_RATIO:g}x and some drop).{ood}", "",
            "Plots: specialization.png, early_routing.png, drop_position.png; every number: metrics.json."]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description="the OpenMoE paper's routing findings on RUN_DIR/trace/*.bin")
    ap.add_argument("run", metavar="RUN_DIR")
    ap.add_argument("--tokenizer", default="data/kjv/tokenizer.model", help="SentencePiece model to decode ids")
    ap.add_argument("--min-count", type=int, default=10, help="per-id statistics: ids seen at least this often")
    args = ap.parse_args()
    run, min_count = args.run, max(1, args.min_count)
    traces = load_traces(run)
    eval_cf = max(t["cf"] for t in traces)  # the larger factor is the evaluation one
    series = sorted((t for t in traces if t["domain"] == 0 and t["cf"] == eval_cf), key=lambda t: t["step"])
    if not series:
        fail(f"{run}/trace: no in-domain trace (d0) at capacity factor {eval_cf / 1000:g}")
    steps = [t["step"] for t in series]
    final = series[-1]
    last = [t for t in traces if t["step"] == final["step"]]
    ood_final = next((t for t in last if t["domain"] == 1 and t["cf"] == eval_cf), None)

    rng = np.random.default_rng(0)
    spec = [specialization(final, i, rng, min_count, ood_final) for i in range(final["n_moe"])]
    curves = [agreement_curve(series, i, min_count) for i in range(final["n_moe"])]
    drops = {(t["domain"], t["cf"]): drop_by_position(t) for t in last}
    drops0 = {(t["domain"], t["cf"]): drop_by_position(t, rank0=True) for t in last}
    step_drops = {}
    for t in sorted(traces, key=lambda t: t["step"]):
        step_drops.setdefault((t["domain"], t["cf"]), []).append(
            (t["step"], float((~t["kept"]).mean()), float((~t["kept"][:, :, 0]).mean())))
    v = verdicts(spec, curves, drops, drops0, steps, eval_cf)

    out = os.path.join(run, "analysis")
    os.makedirs(out, exist_ok=True)
    key = lambda d, c: f"domain{d}_cf{c}"  # noqa: E731
    metrics = dict(
        run=run, steps=steps, layers=final["layers"], E=final["E"], K=final["K"], T=final["T"],
        tokens_per_trace=final["N"], group_size=final["group"], eval_cf1000=eval_cf, min_count=min_count,
        position_bins=BINS, specialization=spec, early_routing=curves,
        drop_by_position={key(*k): drops[k].tolist() for k in sorted(drops)},
        drop_by_position_top1={key(*k): drops0[k].tolist() for k in sorted(drops0)},
        drop_by_step={key(*k): s for k, s in sorted(step_drops.items())}, verdicts=v)
    with open(f"{out}/metrics.json", "w") as f:
        json.dump(metrics, f, indent=1, allow_nan=True)
    plot_all(out, spec, curves, drops, drops0, final, v, min_count)
    text = summary(run, final, steps, spec, curves, drops, drops0, v, decoder(args.tokenizer), min_count, step_drops)
    with open(f"{out}/summary.md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}/summary.md, metrics.json, specialization.png, early_routing.png, drop_position.png")


if __name__ == "__main__":
    main()
