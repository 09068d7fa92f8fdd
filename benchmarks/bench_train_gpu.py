"""One training step of an embedding table on a CUDA device: lookup + backward + optimizer.

qembed's LowPrecisionEmbeddingBag in int8 (row-wise Adagrad, fused into backward, stochastic
rounding, ALPT one-pass per-row step) against an fp32 nn.EmbeddingBag(sparse=True) stepped
by torch.optim.SparseAdam and by torch.optim.Adagrad (sparse gradients). Times are medians of
CUDA-event timings of whole steps after a warm-up, rotating through index batches. Also
reports the bytes of table plus optimizer state. Writes train_gpu.{md,csv}.

  python benchmarks/bench_train_gpu.py --out DIR            # R = 10M rows, D 64/128/256
  python benchmarks/bench_train_gpu.py --out DIR --quick    # small smoke run
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

try:
    from common import fp32_train_method, make_indices, require_cuda_kernel, stamp, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import fp32_train_method, make_indices, require_cuda_kernel, stamp, write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train_gpu.{md,csv}")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--bags", type=int, default=65_536)
    p.add_argument("--bag-len", type=int, default=32)
    p.add_argument("--dists", nargs="+", default=["uniform", "zipf"])
    p.add_argument("--batches", type=int, default=3, help="index batches rotated through")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="100k rows, D 64, 4096 bags")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dims, args.bags, args.repeats = 100_000, [64], 4096, 5
    return args


def step_time(step, batches, grad, repeats: int, warmup: int = 3) -> float:
    """Median seconds of step(indices, offsets, grad) by CUDA events, rotating batches."""
    for i in range(warmup):
        step(*batches[i % len(batches)], grad)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*batches[i % len(batches)], grad)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def qembed_method(rows: int, dim: int, bits: int):
    import qembed

    emb = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", bits=bits, optimizer="adagrad",
                                          rounding="stochastic", device="cuda")

    def step(idx, off, grad):
        emb(idx, off).backward(grad)
    return step, lambda: emb.nbytes


METHODS = {
    "fp32 + SparseAdam": lambda r, d: fp32_train_method(r, d, "sparse_adam", "cuda"),
    "fp32 + Adagrad (sparse)": lambda r, d: fp32_train_method(r, d, "adagrad", "cuda"),
    "qembed int8 (rw-Adagrad, SR, ALPT)": lambda r, d: qembed_method(r, d, 8),
}


def run(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    n = args.bags * args.bag_len
    offsets = torch.arange(0, n, args.bag_len, device="cuda")
    results = []
    for dim in args.dims:
        grad = torch.randn(args.bags, dim, device="cuda")
        for dist in args.dists:
            batches = [(make_indices(dist, n, args.rows, gen).cuda(), offsets)
                       for _ in range(args.batches)]
            distinct = statistics.mean(int(torch.unique(i).numel()) for i, _ in batches)
            base = None
            for name, make in METHODS.items():
                # One table (and its optimizer state) on the device at a time.
                step, nbytes = make(args.rows, dim)
                t = step_time(step, batches, grad, args.repeats)
                base = base or t
                row = dict(dim=dim, dist=dist, method=name, ms=t * 1e3,
                           mlookups_s=n / t / 1e6, speedup_vs_sparse_adam=base / t,
                           state_gb=nbytes() / 1e9, distinct_rows=int(distinct))
                results.append(row)
                print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
                del step, nbytes
                gc.collect()
                torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda_kernel("bench_train_gpu", "lowp_update")
    print(stamp())
    results = run(args)
    notes = (f"R = {args.rows:,} rows, {args.bags:,} bags x {args.bag_len} (int64 indices), "
             f"mode sum; one step = forward + backward + optimizer update, timed with CUDA "
             f"events, median of {args.repeats} after a warm-up, {args.batches} index batches "
             f"rotated. qembed: int8 codes with inline per-row steps, row-wise Adagrad fused "
             f"into backward, stochastic rounding, ALPT one-pass per-row step learning. "
             f"state_gb: table + optimizer state. distinct_rows: mean per batch.")
    print(write_results("train_gpu", results, "Training step on GPU", notes, out_dir=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
