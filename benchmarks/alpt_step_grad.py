"""Small measured comparison of ALPT's step-size gradient: "one_pass" (the row gradient of
the same backward) vs "two_pass" (a second forward/backward at the nearest-rounded updated
rows, the authors' way), with a fixed step (LPT) as the control, on a synthetic
click-through task.

A teacher with fp32 embeddings labels random multi-field samples; a student with a
low-precision table and a linear head learns them. Reports held-out log loss (mean over
seeds) after a fixed number of steps. Writes benchmarks/results/alpt_step_grad.{md,csv}.

    python benchmarks/alpt_step_grad.py [--quick]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import qembed

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def task(rows, fields, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, dim, generator=gen) * 0.5
    head = torch.randn(dim, generator=gen)
    # Zipf-like popularity, as in CTR data.
    probs = torch.arange(1, rows + 1, dtype=torch.float64).pow(-1.05)

    def sample(n):
        idx = torch.multinomial(probs, n * fields, replacement=True, generator=gen).view(n, fields)
        logit = teacher[idx].sum(1) @ head / fields ** 0.5
        return idx, torch.bernoulli(torch.sigmoid(logit), generator=gen)
    return sample


def run(opts, seed, steps, rows=20000, fields=8, dim=16, batch=512):
    torch.manual_seed(seed)
    sample = task(rows, fields, dim, seed)
    test = sample(20000)
    emb = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", optimizer="adagrad", lr=0.05,
                                          seed=seed, **opts)
    head = nn.Linear(dim, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    def loss_of(idx, y):
        return F.binary_cross_entropy_with_logits(head(emb(idx)).squeeze(1), y)

    for _ in range(steps):
        idx, y = sample(batch)
        opt.zero_grad()
        qembed.two_pass_backward(emb, lambda: loss_of(idx, y))
        opt.step()
    with torch.no_grad():
        return loss_of(*test).item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.seeds = 60, 1
    variants = []
    for bits in (2, 4):
        variants.append((bits, "LPT (fixed step)", dict(learn_step=False)))
        for lr in (1e-2, 1e-1):
            for grad in ("one_pass", "two_pass"):
                variants.append((bits, f"ALPT {grad}, step SGD lr {lr:g}",
                                 dict(step_grad=grad, step_lr=lr)))
    rows = []
    for bits, name, opts in variants:
        losses = [run(dict(bits=bits, **opts), s, a.steps) for s in range(a.seeds)]
        rows.append(dict(bits=bits, variant=name, logloss=statistics.mean(losses),
                         spread=max(losses) - min(losses)))
        print(f"{bits} bits  {name:<36} {rows[-1]['logloss']:.4f} (+-{rows[-1]['spread']:.4f})",
              flush=True)
    header = (f"torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
              f"command `python {' '.join(sys.argv)}`\n"
              f"Synthetic CTR (20k Zipf rows, 8 fields, D=16), row-wise Adagrad lr 0.05, "
              f"{a.steps} steps of 512, held-out log loss, mean of {a.seeds} seeds "
              f"(spread = max - min).\n")
    table = "| bits | variant | log loss | spread |\n|---:|---|---:|---:|\n" + "\n".join(
        f"| {r['bits']} | {r['variant']} | {r['logloss']:.4f} | {r['spread']:.4f} |" for r in rows)
    print("\n" + header + "\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    name = "alpt_step_grad" + ("_quick" if a.quick else "")
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write("# ALPT step gradient: one-pass vs two-pass\n\n" + header + "\n" + table + "\n")
    with open(os.path.join(RESULTS, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
