"""experiments_summary.py OUT: the table, plots and verdicts of `make experiments`.

Reads OUT/variants.tsv (name, train flags), and for each variant
OUT/NAME/log.tsv (train.c's log) and OUT/NAME/analysis/metrics.json
(dev/analyze_routing.py's numbers). Writes OUT/summary.md, OUT/summary.json
and OUT/experiments.png. Columns, each for the variant's final model:
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
    with open(f"{out}/summary.md", "w") as f:
        f.write("\n".join(lines))
    with open(f"{out}/summary.json", "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "ce_curve"} for r in rows], f, indent=1)
    plot(out, rows)
    print("\n".join(lines))
    print(f"wrote {out}/summary.md, summary.json, experiments.png")


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


if __name__ == "__main__":
    main()
