"""plot_loss.py RUN_DIR [OUT.png]: the loss curve of a training run from
RUN_DIR/log.tsv (train.c's log): training CE per step (and its running mean),
validation CE at the evaluation capacity factor, and the dropped share of
expert assignments."""
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    run = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else f"{run}/loss.png"
    try:
        log = np.genfromtxt(f"{run}/log.tsv", delimiter="\t", names=True)
    except OSError as e:
        sys.exit(f"error: {run}/log.tsv: {e}")
    log = np.atleast_1d(log)
    step, ce = log["step"], log["ce"]
    win = max(1, len(ce) // 50)
    smooth = np.convolve(ce, np.ones(win) / win, mode="valid")
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    a.plot(step, ce, color="0.8", lw=0.8, label="train CE (per step)")
    a.plot(step[win - 1:], smooth, color="C0", label=f"train CE (mean of {win})")
    val = ~np.isnan(log["val_ce"])
    a.plot(step[val], log["val_ce"][val], "o-", color="C3", label="validation CE (eval capacity factor)")
    a.set_ylabel("cross-entropy (nats)")
    a.set_title(f"openmoe.c training: {run}")
    a.grid(alpha=0.3)
    a.legend()
    b.plot(step, log["dropped"], color="C2", lw=0.8)
    b.set_ylabel("dropped share")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
