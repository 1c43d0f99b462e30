"""experiments_summary.py OUT: the table, plots and verdicts of `make experiments`.

Reads OUT/variants.tsv (name, train flags), and for each variant
OUT/NAME/log.tsv (train.c's log) and OUT/NAME/analysis/metrics.json
(dev/analyze_routing.py's numbers). Writes OUT/summary.md, OUT/summary.json
and OUT/experiments.png (with the long runs also OUT/ul2.json and
OUT/ul2.png). Columns, each for the variant's final model:
  val CE     validation cross-entropy at the evaluation capacity factor (2.0),
             the log's last val_ce;
  drop Q1/Q4 dropped share of all K assignments in the first and the last
             quarter of positions of the in-domain validation traces, at the
             evaluation factor (eval) and at the training factor 1.25 (train),
             and out of domain (the fortunes text) at the evaluation factor;
  lb         load-balance loss, mean over the last tenth of the steps (K = 2
             is uniform);
  tok/s      training tokens per second, the median over the steps.
Verdict, per variant: Drop-towards-the-End remains when the in-domain last
quarter drops >= 1.2x the first quarter at the evaluation factor (the rule
of dev/analyze_routing.py); its cost is the val CE and tok/s against the
default's.

Then, from OUT/objectives.tsv, the two long runs: causal LM throughout
("long") and UL2 for the first half ("ul2", --ul2-steps S = half the steps),
same seed, data and batch, so equal tokens. Their validation CE (the causal
LM's, on the usual validation windows) over the steps goes to OUT/ul2.png
with the UL2 run's UL2 loss (val_ul2_ce), and the paper's Fig. 2 question
(does UL2 help early and stall later?) gets a verdict:
  helps early   the UL2 run's validation CE is below the causal run's on
                average over the validations of the first quarter of steps;
  stalls later  from a quarter of the steps to the switch S the UL2 run's
                validation CE falls less than the causal run's;
and the difference at the end, after the causal steps, and each run's lowest
validation CE with its step. Early Routing Learning on the long runs:
dev/analyze_routing.py's verdict (the id -> top-1 expert map of the first
checkpoint at or after a quarter of training agrees >= 70% with the final
one in every MoE layer).
"""
import json
import os
import sys

import numpy as np

RATIO = 1.2   # as dev/analyze_routing.py's Drop-towards-the-End verdict


def quarters(curve):
    q = max(1, len(curve) // 4)
    return float(np.mean(curve[:q])), float(np.mean(curve[-q:]))


def load(out, name):
    log = np.genfromtxt(f"{out}/{name}/log.tsv", names=True, delimiter="\t")
    with open(f"{out}/{name}/analysis/metrics.json") as f:
        m = json.load(f)
    cf = m["eval_cf1000"]
    drops = m["drop_by_position"]
    train_cf = min(int(k.split("_cf")[1]) for k in drops)
    r = dict(name=name, val_ce=float(log["val_ce"][~np.isnan(log["val_ce"])][-1]),
             lb=float(log["lb"][-max(1, len(log) // 10):].mean()), tok_s=float(np.median(log["tok_s"])),
             steps=int(log["step"][-1]), ce_curve=log["ce"].tolist(),
             curve_eval=drops[f"domain0_cf{cf}"], curve_train=drops[f"domain0_cf{train_cf}"])
    r["eval_q"] = quarters(r["curve_eval"])
    r["train_q"] = quarters(r["curve_train"])
    ood = drops.get(f"domain1_cf{cf}")
    r["ood_q"] = quarters(ood) if ood else (float("nan"), float("nan"))
    return r


def verdict(r, base):
    q1, q4 = r["eval_q"]
    cost = (f"val CE {r['val_ce'] - base['val_ce']:+.3f} and {r['tok_s'] / base['tok_s']:.2f}x the default's"
            " tokens/s")
    if q4 == 0 and q1 == 0:
        return "no drops at the evaluation factor: nothing can drop towards the end; " + cost
    remains = q4 > 0 and q4 >= RATIO * q1
    return (("remains" if remains else "gone") + f" (last/first quarter {q4 / q1 if q1 else float('inf'):.2f}x); "
            + cost)


def pct(x):
    return "n/a" if np.isnan(x) else f"{100 * x:.1f}%"


def load_objectives(out):
    """name -> dict(flags, log, metrics) of OUT/objectives.tsv's runs; {} without it."""
    path = f"{out}/objectives.tsv"
    if not os.path.exists(path):
        return {}
    runs = {}
    for line in open(path):
        if not line.strip():
            continue
        name, flags = (line.rstrip("\n").split("\t") + [""])[:2]
        log = np.atleast_1d(np.genfromtxt(f"{out}/{name}/log.tsv", names=True, delimiter="\t"))
        with open(f"{out}/{name}/analysis/metrics.json") as f:
            metrics = json.load(f)
        runs[name] = dict(name=name, flags=flags.strip(), log=log, metrics=metrics)
    return runs


def val_at(log, col="val_ce"):
    """steps, values of a log column where it was measured"""
    ok = ~np.isnan(log[col])
    return log["step"][ok].astype(int), log[col][ok]


def ul2_verdict(causal, ul2):
    """the Fig. 2 numbers of the two long runs (see the module's docstring)"""
    flags = ul2["flags"].split()
    switch = int(flags[flags.index("--ul2-steps") + 1])
    steps, ce_c = val_at(causal["log"])
    steps_u, ce_u = val_at(ul2["log"])
    assert (steps == steps_u).all(), "the two runs validated at other steps"
    n = int(steps[-1])
    at = lambda s: int(np.flatnonzero(steps >= s)[0])  # noqa: E731  the first validation at or after step s
    early = steps <= n / 4
    q, sw = at(n / 4), at(switch)
    d_early = float(np.mean(ce_u[early] - ce_c[early]))
    fall_c, fall_u = float(ce_c[q] - ce_c[sw]), float(ce_u[q] - ce_u[sw])
    targets = lambda r, phase: float(r["log"]["targets"][phase(r["log"]["step"])].sum())  # noqa: E731
    first = lambda s: s <= switch  # noqa: E731
    bc, bu = int(np.argmin(ce_c)), int(np.argmin(ce_u))
    return dict(switch=switch, steps=n, d_early=d_early, helps_early=d_early < 0, quarter_step=int(steps[q]),
                best_causal=float(ce_c[bc]), best_causal_step=int(steps[bc]), best_ul2=float(ce_u[bu]),
                best_ul2_step=int(steps[bu]),
                switch_step=int(steps[sw]), fall_causal=fall_c, fall_ul2=fall_u, stalls_later=fall_u < fall_c,
                end_causal=float(ce_c[-1]), end_ul2=float(ce_u[-1]), d_end=float(ce_u[-1] - ce_c[-1]),
                targets_share=targets(ul2, first) / targets(causal, first),
                table=[(int(steps[at(f * n)]), float(ce_c[at(f * n)]), float(ce_u[at(f * n)]))
                       for f in (0.1, 0.25, 0.5, 0.75, 1.0)])


def early_routing_line(r):
    v = r["metrics"]["verdicts"]["early_routing"]
    if v["holds"] is None:
        return f"no verdict (no checkpoint between a quarter of the {v['final_step']} steps and the end)"
    stays = (f"; >= {v['criterion']:.0%} in every layer from step {v['stays_above_from']} on"
             if v["stays_above_from"] is not None else "; never >= the criterion in every layer to the end")
    return (f"{'holds' if v['holds'] else 'does not hold'} — at step {v['step']}, the first checkpoint at or after a"
            f" quarter of the {v['final_step']} steps, the id -> top-1 expert map agrees {pct(v['agreement'])} with"
            f" the final one in its worst MoE layer (chance {pct(v['chance'])}; criterion {v['criterion']:.0%})"
            + stays)


def objectives_lines(runs):
    """summary.md's section on the long runs"""
    causal, ul2 = runs["long"], runs["ul2"]
    v = ul2_verdict(causal, ul2)
    lines = ["", f"# UL2 against causal LM, tiny, {v['steps']} steps each (same seed, data and batch: equal tokens)",
             "", f"`ul2`: `{ul2['flags']}` (SPEC §10's mixture of denoisers for steps 1..{v['switch']}, causal LM"
             " after); `long`: causal LM throughout. Validation CE is the causal LM's, on the usual validation"
             f" windows, at the evaluation capacity factor. In its UL2 steps the `ul2` run trained on"
             f" {100 * v['targets_share']:.0f}% of the targets the causal run trained on in the same steps"
             " (the loss is on the targets alone, and packing leaves padding).", "",
             "| step | causal LM val CE | UL2 then causal val CE | difference |", "|---|---|---|---|"]
    for step, c, u in v["table"]:
        lines.append(f"| {step} | {c:.4f} | {u:.4f} | {u - c:+.4f} |")
    lines += ["", f"- **UL2 helps early: {'yes' if v['helps_early'] else 'no'}** — over the validations up to step"
              f" {v['steps'] // 4} (a quarter), UL2 minus causal {v['d_early']:+.3f} nats on average.",
              f"- **UL2 stalls later: {'yes' if v['stalls_later'] else 'no'}** — from step {v['quarter_step']} to the"
              f" switch at step {v['switch_step']} the UL2 run's validation CE fell {v['fall_ul2']:.3f} nats, the"
              f" causal run's {v['fall_causal']:.3f}.",
              f"- **At the end** (step {v['steps']}, {v['steps'] - v['switch']} causal steps after the switch):"
              f" {v['end_ul2']:.4f} against {v['end_causal']:.4f} ({v['d_end']:+.4f} nats).",
              f"- **Lowest validation CE**: causal {v['best_causal']:.4f} at step {v['best_causal_step']}, UL2 then"
              f" causal {v['best_ul2']:.4f} at step {v['best_ul2_step']} (a best before the end is a run that"
              " overfits its data after it).",
              "", "Early Routing Learning on the long runs:", ""]
    for r in (causal, ul2):
        lines.append(f"- **{r['name']}**: {early_routing_line(r)}.")
    lines += ["", "Plot: ul2.png.", ""]
    return lines, v


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "out/experiments"
    variants = [line.rstrip("\n").split("\t") for line in open(f"{out}/variants.tsv") if line.strip()]
    rows = [load(out, v[0]) for v in variants]
    flags = {v[0]: (v[1] if len(v) > 1 else "").strip() for v in variants}
    base = next(r for r in rows if r["name"] == "default")
    lines = [f"# Routing variants, tiny, {base['steps']} steps each (same seed and data)", "",
             "| variant | train flags | val CE | drop Q1 / Q4 eval | drop Q1 / Q4 train | drop Q1 / Q4 ood |"
             " lb | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{flags[r['name']] or '(none)'}` | {r['val_ce']:.4f} | "
                     f"{pct(r['eval_q'][0])} / {pct(r['eval_q'][1])} | {pct(r['train_q'][0])} / {pct(r['train_q'][1])}"
                     f" | {pct(r['ood_q'][0])} / {pct(r['ood_q'][1])} | {r['lb']:.3f} | {r['tok_s']:.0f} |")
    lines += ["", "Verdicts (Drop-towards-the-End at the evaluation capacity factor, in domain):", ""]
    for r in rows:
        lines.append(f"- **{r['name']}**: {verdict(r, base)}")
    lines += ["", "Columns: see dev/experiments_summary.py. Plot: experiments.png.", ""]
    runs = load_objectives(out)
    if runs:
        more, v = objectives_lines(runs)
        lines += more
        v["early_routing"] = {n: r["metrics"]["verdicts"]["early_routing"] for n, r in runs.items()}
        with open(f"{out}/ul2.json", "w") as f:
            json.dump(v, f, indent=1)
        plot_ul2(out, runs, v)
    with open(f"{out}/summary.md", "w") as f:
        f.write("\n".join(lines))
    with open(f"{out}/summary.json", "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "ce_curve"} for r in rows], f, indent=1)
    plot(out, rows)
    print("\n".join(lines))
    print(f"wrote {out}/summary.md, summary.json, experiments.png" + (", ul2.json, ul2.png" if runs else ""))


def plot(out, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in rows:
        bins = len(r["curve_eval"])
        x = (np.arange(bins) + 0.5) / bins
        ax[0].plot(x, 100 * np.array(r["curve_eval"]), marker=".", label=r["name"])
        ax[1].plot(x, 100 * np.array(r["curve_train"]), marker=".", label=r["name"])
        ce = np.array(r["ce_curve"])
        w = max(1, len(ce) // 50)
        ax[2].plot(np.convolve(ce, np.ones(w) / w, mode="valid"), label=r["name"])
    ax[0].set_title("dropped share by position, in domain, eval CF")
    ax[1].set_title("dropped share by position, in domain, train CF")
    for a in ax[:2]:
        a.set_xlabel("position in the sequence (fraction of T)")
        a.set_ylabel("% of assignments dropped")
    ax[2].set_title("training CE (moving mean)")
    ax[2].set_xlabel("step")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "experiments.png"), dpi=90)


def plot_ul2(out, runs, v):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for r, label in ((runs["long"], "causal LM throughout"), (runs["ul2"], f"UL2 to step {v['switch']}, then causal")):
        ax[0].plot(*val_at(r["log"]), marker=".", label=label)
    ax[1].plot(*val_at(runs["ul2"]["log"], "val_ul2_ce"), marker=".", color="C1", label="UL2 run: UL2 loss")
    for a in ax:
        a.axvline(v["switch"], color="0.6", lw=1, ls="--", label=f"switch to causal LM (step {v['switch']})")
        a.set_xlabel("step")
        a.set_ylabel("cross-entropy (nats)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax[0].set_title("validation CE of causal LM (the usual windows)")
    ax[1].set_title("validation CE of packed UL2 examples (their targets)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ul2.png"), dpi=90)


if __name__ == "__main__":
    main()
