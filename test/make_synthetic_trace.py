"""make_synthetic_trace.py DIR CASE: routing traces in train.c's format
(DIR/trace/*.bin, written by dev/analyze_routing.py's write_trace) whose
analysis has known answers, for test/t_analysis.sh. 2 MoE layers, E=8, K=2,
32 sequences of T=64 tokens drawn from 50 ids (about 40 of each).
  pure:      steps 0, 100, 200; the top-1 expert is id % 8 from step 100 on
             (random at step 0), rank 1 the next expert; only rank-1
             assignments at positions >= T/2 are dropped.
  random:    step 0 only; the top-1 expert ignores the token id, and 100
             tokens are ids seen once (which the id statistics over all ids
             "predict" trivially).
  perturbed: pure with three single changes, each of which a check must
             notice: at step 200 one occurrence of id 7 goes elsewhere, at
             step 100 id 3 maps elsewhere, and token 0's rank-0 choice
             (position 0) is dropped in every trace.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dev"))
from analyze_routing import write_trace  # noqa: E402

E, K, T, n_seq, n_moe = 8, 2, 64, 32, 2
N = T * n_seq


def write(d, step, tokens, top0, perturbed=False):
    pos = np.arange(N) % T
    expert = np.stack([np.stack([top0, (top0 + 1) % E], 1)] * n_moe)  # [n_moe, N, K]
    prob = np.stack([np.full(N, 0.6), np.full(N, 0.3)], 1)[None].repeat(n_moe, 0)
    kept = np.ones(expert.shape, bool)
    kept[:, pos >= T // 2, 1] = False
    if perturbed:
        kept[:, 0, 0] = False
    for domain in (0, 1):
        for cf in (1250, 2000):
            write_trace(f"{d}/trace/s{step:08d}_d{domain}_cf{cf}.bin", step, tokens, expert, prob, kept, T, E, cf,
                        domain)


def main():
    d, case = sys.argv[1], sys.argv[2]
    os.makedirs(f"{d}/trace", exist_ok=True)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50, N)
    if case == "random":
        tokens[rng.choice(N, 100, replace=False)] = 1000 + np.arange(100)
        write(d, 0, tokens, rng.integers(0, E, N))
        return
    assert case in ("pure", "perturbed"), f"unknown case {case}"
    p = case == "perturbed"
    write(d, 0, tokens, rng.integers(0, E, N), p)
    top0 = tokens % E
    mid = np.where(tokens == 3, 5, top0) if p else top0
    write(d, 100, tokens, mid, p)
    end = top0.copy()
    if p:
        end[np.flatnonzero(tokens == 7)[0]] = 0
    write(d, 200, tokens, end, p)


if __name__ == "__main__":
    main()
