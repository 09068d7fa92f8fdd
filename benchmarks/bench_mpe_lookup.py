"""Mixed-width lookup (mpe_embedding_bag) against single-width lookups (embedding_bag,
symmetric_table format) on CPU, per byte fetched.

  python benchmarks/bench_mpe_lookup.py            # R = 2M rows, D = 64
  python benchmarks/bench_mpe_lookup.py --quick

The mixed table has rows at 1, 2, 4 and 8 bits (a quarter each) plus the int32 row map; the
single-width tables have every row at one width. Bytes fetched per lookup: the row's codes
(+ 4 for the mixed table's map entry) and the index; the output row per bag. Times are
medians over batches rotating through several index sets; ratios are against int8 in the
same run.
"""
from __future__ import annotations

import argparse

import torch

from qembed import ops
from qembed.formats import code_bytes, row_bytes
from qembed.nn import MixedPrecisionEmbeddingBag

try:
    from common import make_indices, median_time, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import make_indices, median_time, write_results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bags", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=32)
    parser.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.bags = 100_000, 256
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    r, d = args.rows, args.dim
    n = args.bags * args.pooling
    inputs = [(make_indices(args.dist, n, r, gen),
               torch.arange(0, n, args.pooling)) for _ in range(4)]
    weight = torch.randn(r, d, generator=gen) * 0.05

    rows = []

    def record(name, fn, row_fetch):
        t = median_time(fn, inputs, repeats=15)
        fetched = n * (row_fetch + 8) + args.bags * d * 4
        rows.append({"table": name, "ms": t * 1e3, "bytes_per_lookup": row_fetch,
                     "GB/s": fetched / t / 1e9, "Mlookups/s": n / t / 1e6})

    for bits in (8, 4, 2, 1):
        step = torch.tensor([0.01])
        table = ops.quantize(weight, bits, "symmetric_table", step)
        record(f"int{bits} single width",
               lambda i, o, t=table, b=bits, s=step: ops.embedding_bag(
                   t, i, o, b, d, "symmetric_table", s, mode="sum"),
               row_bytes(d, bits, "symmetric_table"))
    row_bits = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (r,), generator=gen)]
    mixed = MixedPrecisionEmbeddingBag(r, d, row_bits, mode="sum", trainable=False)
    mixed.load_float_weight(weight, torch.full((4,), 0.01), torch.zeros(d))
    mixed.eval()
    avg = sum(code_bytes(d, b) for b in (1, 2, 4, 8)) / 4
    record("mixed 1/2/4/8 bits", lambda i, o: mixed(i, o), avg + 4)
    base = next(x["ms"] for x in rows if x["table"].startswith("int8"))
    for x in rows:
        x["time_vs_int8"] = x["ms"] / base
    table = write_results(
        "mpe_lookup_cpu", rows,
        f"Mixed-width vs single-width pooled lookup, CPU, R={r}, D={d}, {args.bags} bags x "
        f"{args.pooling}, {args.dist}",
        "bytes_per_lookup: row bytes read (codes, +4 for the mixed table's row map); GB/s "
        "counts rows, indices (8 bytes) and outputs.")
    print(table)


if __name__ == "__main__":
    main()
