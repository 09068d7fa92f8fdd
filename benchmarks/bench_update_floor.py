"""Where a low-precision training step's time goes, per row: the update's arithmetic alone
(its rows in the caches) against the same update on rows spread over a large table, with the
forward lookup and the backward per id beside them.

  python benchmarks/bench_update_floor.py                 # int8 and int4, D = 64 and 128
  python benchmarks/bench_update_floor.py --quick         # a smoke run

The training-step target "step <= 5x the forward lookup" leaves, per id of the batch,
5 * (forward ns per id) for the lookup, the backward and the update together. The update
costs per distinct row; with 2048 x 32 uniform ids over 4M rows nearly every id is a distinct
row. This script times `ops.lowp_update` on

- hot rows: a table of `--hot-rows` rows, every row updated in each call, timed over
  calls right after a first one so that its rows, state and gradients sit in the caches
  (L2/L3): what is left is the arithmetic SPEC.md fixes (dequantize, optimizer, LSQ,
  re-quantize with its IEEE divisions, Philox for stochastic rounding) and the op's fixed
  cost per call (about 16 us, spread over the rows);
- cold rows: the distinct rows of a batch of uniform ids over a `--rows`-row table;

each under four settings that peel the arithmetic off layer by layer: the default training
update (row-wise Adagrad, learned per-row step, stochastic rounding), without the learned
step, with nearest rounding instead of stochastic, and SGD with nearest rounding. Beside them:
the forward lookup and `embedding_bag_backward` of the batch, per id. Every case runs in
turns with the others in each repeat; medians. Writes results/update_floor.{md,csv}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qembed
from qembed import ops

try:
    from common import RESULTS, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS, write_results

SETTINGS = {  # name -> lowp_update options
    "adagrad + learned step + stochastic": dict(optimizer="adagrad", learn_step=True,
                                                stochastic=True),
    "adagrad + stochastic": dict(optimizer="adagrad", learn_step=False, stochastic=True),
    "adagrad + nearest": dict(optimizer="adagrad", learn_step=False, stochastic=False),
    "sgd + nearest": dict(optimizer="sgd", learn_step=False, stochastic=False),
}


def make_table(rows: int, dim: int, bits: int):
    return qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", bits=bits, optimizer="adagrad",
                                           learn_step=True)


HOT_CALLS = 4  # timed calls per turn on the hot table, after one that brings it in


def timed(fn):
    """fn as a case: one call, returns its seconds."""
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def update_case(emb, unique_rows, grad, options, hot=False):
    """A case running lowp_update on emb's rows unique_rows: one call, or on a hot table one
    untimed call then HOT_CALLS timed ones; returns seconds per call."""
    counter = [0]

    def update():
        counter[0] += 1
        ops.lowp_update(emb.qweight, emb.step, emb.state, emb.step_state, unique_rows, grad,
                        emb.bits, emb.embedding_dim, emb.format, lr=1e-3, step_lr=1e-4,
                        iteration=counter[0], counter=counter[0], seed=7, **options)

    if not hot:
        return timed(update)

    def run():
        update()
        t0 = time.perf_counter()
        for _ in range(HOT_CALLS):
            update()
        return (time.perf_counter() - t0) / HOT_CALLS
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4_000_000, help="rows of the cold table")
    p.add_argument("--hot-rows", type=int, default=8192, help="rows of the hot table")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--bags", type=int, default=2048)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default="update_floor")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.dims, a.bits, a.repeats, a.name = 200_000, [64], [8], 3, a.name + "_quick"
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    n = a.bags * a.length
    offsets = torch.arange(0, n, a.length)
    results = []
    for dim in a.dims:
        for bits in a.bits:
            cold = make_table(a.rows, dim, bits)
            hot = make_table(a.hot_rows, dim, bits)
            idx = torch.randint(0, a.rows, (n,), generator=gen)
            grad_out = torch.randn(a.bags, dim, generator=gen) * 1e-3
            cold_rows, cold_grad = ops.embedding_bag_backward(grad_out, idx, offsets, None,
                                                              "sum")
            hot_rows = torch.arange(a.hot_rows)
            hot_grad = torch.randn(a.hot_rows, dim, generator=gen) * 1e-3
            cases = {}  # name -> (run, count it is divided by)

            def lookup(table=cold, idx=idx):
                with torch.no_grad():
                    table(idx, offsets)

            cases["forward lookup, per id"] = (timed(lookup), n)
            cases["backward, per id"] = (timed(
                lambda g=grad_out, i=idx: ops.embedding_bag_backward(g, i, offsets, None, "sum")),
                n)
            for name, options in SETTINGS.items():
                cases[f"update, hot rows: {name}"] = (
                    update_case(hot, hot_rows, hot_grad, options, hot=True), a.hot_rows)
                cases[f"update, cold rows: {name}"] = (
                    update_case(cold, cold_rows, cold_grad, options), cold_rows.numel())
            times = {name: [] for name in cases}
            names = list(cases)
            for i in range(a.repeats + 2):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    run, _ = cases[name]
                    seconds = run()
                    if i >= 2:  # two warm-up rounds
                        times[name].append(seconds)
            forward_ns = statistics.median(times["forward lookup, per id"]) / n * 1e9
            for name, (_, count) in cases.items():
                ns = statistics.median(times[name]) / count * 1e9
                results.append(dict(bits=bits, dim=dim, case=name, ns=round(ns, 2),
                                    ns_per_value=round(ns / dim, 3),
                                    vs_forward_per_id=round(ns / forward_ns, 2)))
                print(f"int{bits} D={dim:<4} {name:<58} {ns:9.1f} ns "
                      f"({ns / forward_ns:5.2f}x forward per id)", flush=True)
            del cold, hot
    notes = (f"ns per id (forward, backward: {a.bags} bags x {a.length} uniform ids over "
             f"{a.rows:,} rows) or per distinct row (updates). Hot rows: a {a.hot_rows}-row "
             f"table, every row updated in each of {HOT_CALLS} timed calls after an untimed one "
             f"(in the caches: the arithmetic alone, with the op's fixed cost per call). Cold rows: "
             f"the {a.bags} x {a.length} batch's distinct rows of the {a.rows:,}-row table. "
             f"vs_forward_per_id: the case's ns over the forward lookup's ns per id; the target "
             f"step <= 5x forward allows 5 for forward + backward + update together, per id. "
             f"{a.threads} thread(s); median of {a.repeats} turns, the cases alternating.")
    print(write_results(a.name, results, "Training-step costs per row: arithmetic and memory",
                        notes, a.out))


if __name__ == "__main__":
    main()
