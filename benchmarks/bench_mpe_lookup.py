"""Mixed-width lookup (mpe_embedding_bag) against single-width lookups (embedding_bag,
symmetric_table format) on CPU, per byte fetched.

  python benchmarks/bench_mpe_lookup.py            # R = 2M rows, D = 64
  python benchmarks/bench_mpe_lookup.py --quick

The mixed tables have rows at 1, 2, 4 and 8 bits (a quarter each), located two ways: with a
row map (int32 here; every row's width drawn at random, so that only a map can say where it
is) or with row ranges (128 groups of consecutive ids, each at a random width, as when ids
are numbered by frequency: about a hundred ranges, which stay in L1). The single-width
tables have every row at one width. A random lookup into a large table waits on memory,
which moves whole 64-byte cache lines: bytes fetched per lookup are counted in lines, the
row's (averaged over where rows start within a line) plus, for the row map, its entry's.
The row bytes themselves are listed too. Times are the lookup thread's CPU time (one
thread), medians over repeats in which every table is timed in turn, rotating through
several index sets.
"""
from __future__ import annotations

import argparse
import time

import torch

from qembed import ops
from qembed.formats import code_bytes, row_bytes
from qembed.nn import MixedPrecisionEmbeddingBag

try:
    from common import interleaved_median_times, make_indices, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import interleaved_median_times, make_indices, write_results

LINE = 64


def lines_per_row(stride: int, nbytes: int) -> float:
    """Cache lines a read of the first nbytes of a row touches, averaged over the rows of a
    64-byte aligned table with that row stride."""
    starts = [(r * stride) % LINE for r in range(LINE)]
    return sum((o + nbytes - 1) // LINE + 1 for o in starts) / LINE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bags", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=32)
    parser.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="mpe_lookup_cpu", help="results file name")
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

    fns, fetch = {}, {}
    for bits in (8, 4, 2, 1):
        step = torch.tensor([0.01])
        table = ops.quantize(weight, bits, "symmetric_table", step)
        stride = row_bytes(d, bits, "symmetric_table")
        fns[f"int{bits} single width"] = (
            lambda i, o, t=table, b=bits, s=step: ops.embedding_bag(
                t, i, o, b, d, "symmetric_table", s, mode="sum"))
        fetch[f"int{bits} single width"] = (code_bytes(d, bits),
                                            lines_per_row(stride, code_bytes(d, bits)))
    widths = torch.tensor([1, 2, 4, 8])
    groups = 128
    layouts = {"row map": widths[torch.randint(0, 4, (r,), generator=gen)],
               "row ranges": torch.repeat_interleave(
                   widths[torch.randperm(groups, generator=gen) % 4],
                   torch.full((groups,), r // groups)).tolist() + [8] * (r % groups)}
    for layout, row_bits in layouts.items():
        mixed = MixedPrecisionEmbeddingBag(r, d, torch.as_tensor(row_bits), mode="sum",
                                           trainable=False)
        assert (mixed.location.dim() == 2) == (layout == "row ranges")
        mixed.load_float_weight(weight, torch.full((4,), 0.01), torch.zeros(d))
        mixed.eval()
        segs = {b: s.shape[1] for b, s in zip(mixed.widths, mixed.segments())}
        map_entry = mixed.location.element_size() if layout == "row map" else 0
        name = f"mixed 1/2/4/8 bits, {layout}"
        fns[name] = lambda i, o, m=mixed: m(i, o)
        fetch[name] = (sum(code_bytes(d, b) for b in (1, 2, 4, 8)) / 4 + map_entry,
                       sum(lines_per_row(segs[b], code_bytes(d, b)) for b in (1, 2, 4, 8)) / 4
                       + (1 if map_entry else 0))
    with torch.no_grad():
        times = interleaved_median_times(fns, inputs, repeats=40, clock=time.thread_time)
    rows = []
    for name, t in times.items():
        row_b, lines = fetch[name]
        rows.append({"table": name, "ms": t * 1e3, "row_bytes_per_lookup": row_b,
                     "lines_per_lookup": lines, "ns_per_line": t * 1e9 / (n * lines),
                     "GB/s_in_lines": n * lines * LINE / t / 1e9, "Mlookups/s": n / t / 1e6})
    # What the same rows would cost per line read from single-width tables, a quarter each.
    single = sum(x["ns_per_line"] for x in rows if "single" in x["table"]) / 4
    for x in rows:
        x["ns_per_line_vs_single_mix"] = x["ns_per_line"] / single
    table = write_results(
        args.name, rows,
        f"Mixed-width vs single-width pooled lookup, CPU, R={r}, D={d}, {args.bags} bags x "
        f"{args.pooling}, {args.dist}",
        "lines_per_lookup: 64-byte cache lines a lookup reads (its row's, + 1 for a row "
        "map's entry); ns_per_line_vs_single_mix: time per line against the mean of the four "
        "single-width tables (the mixed tables hold a quarter of each width).")
    print(table)


if __name__ == "__main__":
    main()
