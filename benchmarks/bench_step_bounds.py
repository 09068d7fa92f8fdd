"""What bounds the collection's training step: the Criteo-shaped int8 step of
bench_collection.py with parts of its backward-and-update op made free, beside FBGEMM's fp32
step with fused row-wise Adagrad, all timed in turns in one process.

  fbgemm fp32 adagrad   FBGEMM's table-batched training step (the baseline)
  qembed int8           LowPrecisionEmbeddingBagCollection's step, as bench_collection times it
  gradient cached       the same, every gradient row read from the output gradient's first
                        256 KB (the caches): the step if reading the output gradient cost nothing
  no update             the rows' gradients summed but no row updated: the step if the update
                        (its arithmetic and its table rows) cost nothing
  both                  both of the above: the lookup, the op's preparation and its sums
  lookup                the forward alone (no autograd)

The free parts need a build with benchmarks/patches/op_parts_free.patch applied (it reads
QEMBED_BOUND_GRAD_CACHED and QEMBED_BOUND_NO_UPDATE in the op); the script checks that the
build honours them and stops otherwise:

  git apply benchmarks/patches/op_parts_free.patch && python setup.py build_ext --inplace
  python benchmarks/bench_step_bounds.py
  git apply -R benchmarks/patches/op_parts_free.patch && python setup.py build_ext --inplace

Perfect overlap of the output gradient's reads with the update would leave the "gradient
cached" step at best; its ratio to FBGEMM's step bounds what hiding memory waits can give.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_collection import batches, configs, fbgemm_tbe, torchrec_fp32
from common import RESULTS, stamp, write_results

from qembed.torchrec import LowPrecisionEmbeddingBagCollection

FREE = ("QEMBED_BOUND_GRAD_CACHED", "QEMBED_BOUND_NO_UPDATE")


def set_free(env: dict) -> None:
    for name in FREE:
        os.environ.pop(name, None)
    os.environ.update(env)


def check_patched(coll, kjt, grad) -> None:
    """Stops unless a step with QEMBED_BOUND_NO_UPDATE leaves the rows it reads as they were."""
    name = next(iter(coll.embedding_bags))
    table = coll.embedding_bags[name].qweight
    values = kjt[coll.embedding_bag_configs()[0].feature_names[0]].values()
    before = table[values].clone()
    set_free({"QEMBED_BOUND_NO_UPDATE": "1"})
    coll(kjt).values().backward(grad)
    set_free({})
    if not torch.equal(table[values], before):
        sys.exit("bench_step_bounds: this build updates rows under QEMBED_BOUND_NO_UPDATE; apply "
                 "benchmarks/patches/op_parts_free.patch and rebuild first (see the docstring)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--suffix", default="")
    a = p.parse_args()
    cfg = configs(a.max_rows, a.dim)
    inputs = batches(cfg, a.batch, 1, 4, "uniform", torch.Generator().manual_seed(0))
    grad = torch.randn(a.batch, sum(c.embedding_dim for c in cfg))
    tbe = fbgemm_tbe(cfg, optimizer=True)
    coll = LowPrecisionEmbeddingBagCollection.from_torchrec(torchrec_fp32(cfg, tbe), bits=8,
                                                            optimizer="adagrad", learn_step=False)
    check_patched(coll, inputs[0][0], grad)

    def fbgemm_step(kjt):
        tbe(kjt.values(), kjt.offsets()).backward(grad)

    def step(kjt):
        coll(kjt).values().backward(grad)

    def lookup(kjt):
        with torch.no_grad():
            coll(kjt)

    variants = [("fbgemm fp32 adagrad", fbgemm_step, {}), ("qembed int8", step, {}),
                ("gradient cached", step, {FREE[0]: "1"}), ("no update", step, {FREE[1]: "1"}),
                ("both", step, {FREE[0]: "1", FREE[1]: "1"}), ("lookup", lookup, {})]
    times = {name: [] for name, _, _ in variants}
    call = 0
    for turn in range(a.turns + 2):  # two turns of warm-up
        shift = turn % len(variants)
        for name, fn, env in variants[shift:] + variants[:shift]:
            set_free(env)
            for _ in range(2):  # two steps a turn: the second finds its own data in the caches
                t0 = time.perf_counter()
                fn(*inputs[call % len(inputs)])
                if turn >= 2:
                    times[name].append(time.perf_counter() - t0)
                call += 1
    set_free({})
    base = statistics.median(times["fbgemm fp32 adagrad"])
    rows = []
    for name, t in times.items():
        t = sorted(t)
        rows.append(dict(variant=name, min_ms=t[0] * 1e3, q25_ms=t[len(t) // 4] * 1e3,
                         median_ms=statistics.median(t) * 1e3,
                         fbgemm_over_this=base / statistics.median(t)))
        print(rows[-1], flush=True)
    notes = (f"{len(cfg)} tables, Criteo's cardinalities capped at {a.max_rows:,} rows, D = "
             f"{a.dim}, batch {a.batch}, one uniform id per feature; {a.turns} turns, each "
             "variant two steps a turn, the order rotated; fbgemm_over_this: FBGEMM's median "
             "over the variant's. Free parts through benchmarks/patches/op_parts_free.patch.")
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    if malloc:
        notes += f" Run with {malloc}."
    print(write_results(f"step_bounds{a.suffix}", rows, "Collection training step: bounds",
                        notes=notes, out_dir=a.out))
    print(stamp())


if __name__ == "__main__":
    main()
