"""The largest table one machine can train: an int4 ALPT table (row-wise Adagrad, learned
per-row steps, stochastic rounding) of 250M rows x 64, trained for a few hundred steps.

The table is built in chunks of rows (no fp32 table ever exists: an fp32 table with Adagrad
would need 4 * 64 + 4 = 260 bytes a row, 65 GB at 250M rows; int4 + step + Adagrad needs
32 + 4 + 4 = 40). Each step looks up a batch of bags, computes a small loss against fixed
targets and backpropagates; backward updates the touched rows in place. Reports the
construction time, the median step time, the peak resident memory and the bytes per row,
with a progress bar over the steps; writes benchmarks/results/<name>.md and .csv.

    python benchmarks/bench_scale.py                      # 250M rows, 300 steps
    python benchmarks/bench_scale.py --rows 10000000      # a smaller proof run

Before a large run it checks that the machine has the memory the table needs (MemAvailable
in /proc/meminfo, with --headroom-gb to spare) and stops otherwise.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np
import torch

import qembed
from qembed.formats import row_bytes

try:
    from common import RESULTS, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS, write_results

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def batch_indices(dist: str, n: int, rows: int, rng: np.random.Generator) -> torch.Tensor:
    """n ids: uniform, or Zipf (alpha 1.05) over ranks with the hot ranks scattered over the
    table by a multiplicative hash (a permutation of 250M ids would itself take 2 GB)."""
    if dist == "uniform":
        return torch.from_numpy(rng.integers(0, rows, n, dtype=np.int64))
    ranks = rng.zipf(1.05, 2 * n)
    ranks = ranks[ranks <= rows][:n]
    while ranks.size < n:  # rare: draws past the table are dropped
        more = rng.zipf(1.05, n)
        ranks = np.concatenate([ranks, more[more <= rows]])[:n]
    ids = ((ranks - 1).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) % np.uint64(rows)
    return torch.from_numpy(ids.astype(np.int64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=250_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--bags", type=int, default=2048)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--dist", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--lr", type=float, default=1e-3, help="row-wise Adagrad's learning rate")
    p.add_argument("--headroom-gb", type=float, default=2.0,
                   help="memory to leave free beyond the table's")
    p.add_argument("--name", default=None, help="results file name (default scale_train_<rows>)")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)

    per_row = row_bytes(a.dim, a.bits, "symmetric") + 4  # packed row with its step + Adagrad
    need = a.rows * per_row
    free = available_bytes()
    print(f"{a.rows:,} rows x {a.dim}, int{a.bits}: {per_row} bytes a row, "
          f"{need / 2**30:.2f} GiB of table and state; {free / 2**30:.1f} GiB available",
          flush=True)
    if need + a.headroom_gb * 2**30 > free:
        sys.exit(f"bench_scale: not enough memory for {a.rows:,} rows "
                 f"({need / 2**30:.1f} GiB + {a.headroom_gb} GiB headroom > "
                 f"{free / 2**30:.1f} GiB available); try --rows smaller")

    rss0 = peak_rss_bytes()
    t0 = time.perf_counter()
    emb = qembed.LowPrecisionEmbeddingBag(a.rows, a.dim, mode="mean", bits=a.bits,
                                          optimizer="adagrad", lr=a.lr, learn_step=True)
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_bytes()
    print(f"built in {build_s:.1f} s; {emb.nbytes / a.rows:.1f} bytes a row; "
          f"peak RSS {rss_built / 2**30:.2f} GiB", flush=True)

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    n = a.bags * a.length
    offsets = torch.arange(0, n, a.length)
    targets = torch.randn(a.bags, a.dim, generator=gen) * 0.003
    times, losses = [], []
    steps = range(a.steps)
    bar = tqdm(steps, desc="steps", unit="step", file=sys.stdout) if tqdm else steps
    for i in bar:
        idx = batch_indices(a.dist, n, a.rows, rng)
        t = time.perf_counter()
        loss = ((emb(idx, offsets) - targets) ** 2).mean()
        loss.backward()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if tqdm is None and (i + 1) % max(a.steps // 10, 1) == 0:
            print(f"step {i + 1}/{a.steps}: {times[-1] * 1e3:.1f} ms, loss {losses[-1]:.4g}",
                  flush=True)
    warm = times[min(5, len(times) - 1):]
    row = dict(rows=a.rows, dim=a.dim, bits=a.bits, dist=a.dist, steps=a.steps,
               batch=f"{a.bags} x {a.length}", construction_s=build_s,
               step_ms_median=statistics.median(warm) * 1e3,
               step_ms_p90=sorted(warm)[int(0.9 * (len(warm) - 1))] * 1e3,
               bytes_per_row=emb.nbytes / a.rows,
               table_state_gib=emb.nbytes / 2**30,
               peak_rss_gib=peak_rss_bytes() / 2**30,
               rss_before_table_gib=rss0 / 2**30,
               fp32_adagrad_gib=a.rows * (4 * a.dim + 4) / 2**30,
               loss_first=losses[0], loss_last=losses[-1])
    notes = (f"int{a.bits} ALPT (learned per-row steps, SGD on the step), row-wise Adagrad lr "
             f"{a.lr}, stochastic rounding; loss = mean squared distance of each mean-pooled "
             "bag to a fixed random target (few rows repeat across steps at this size, so it "
             "says little about learning). Step time: forward + backward with the fused update, "
             "median over the steps after the first five. fp32_adagrad_gib: the same table in "
             "fp32 with row-wise Adagrad state.")
    table = write_results(a.name or f"scale_train_{a.rows}", [row],
                          "Training the largest table: int4 ALPT, row-wise Adagrad", notes,
                          a.out)
    print(table)


if __name__ == "__main__":
    main()
