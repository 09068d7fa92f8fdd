"""A Criteo-shaped collection on CPU: 26 tables with Criteo's cardinalities (capped), one
KeyedJaggedTensor batch for all of them.

Lookup, one call per batch for every candidate:
  torchrec fp32       TorchRec's EmbeddingBagCollection as it runs unsharded (a loop over
                      nn.EmbeddingBag and a cat)
  fbgemm fp32         FBGEMM's SplitTableBatchedEmbeddingBagsCodegen (what TorchRec runs
                      once sharded), sharing its fp32 tables with the one above
  torchrec intN       TorchRec's QuantEmbeddingBagCollection (FBGEMM's int-N kernels), 8 and 4
  qembed loop intN    TorchRec's collection looping over per-table qembed modules, 8 and 4
  qembed intN         qembed.torchrec.QuantizedEmbeddingBagCollection, 8, 4 and 2 bits
Training step (forward, backward and the update of the rows read):
  fbgemm fp32 adagrad FBGEMM's table-batched training with fused row-wise Adagrad
  qembed lowp intN    qembed.torchrec.LowPrecisionEmbeddingBagCollection, row-wise Adagrad,
                      8 and 4 bits

  python benchmarks/bench_collection.py             # D = 64 and 128, rows capped at 2M
  python benchmarks/bench_collection.py --quick     # small smoke run
  MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
      python benchmarks/bench_collection.py --suffix _kept_memory  # freed memory reused

Memory: at D = 128 and 2M rows per table (10.6M rows in all) the run holds about 11 GB.
Times are medians over repeats that time every candidate in turn (the order rotating), over
several batches; ratios are against candidates measured in the same run. Bytes are the
tables' (and for training their optimizer state); "line bound" is fp32's cache lines per
row read over the candidate's, the speed-up a lookup bound by memory could reach.
Writes results/collection_cpu.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time

import torch

try:
    from common import RESULTS, interleaved_median_times, make_indices, stamp, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS, interleaved_median_times, make_indices, stamp, write_results

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

import qembed
from qembed.formats import row_bytes
from qembed.torchrec import LowPrecisionEmbeddingBagCollection, QuantizedEmbeddingBagCollection

# Criteo (Kaggle display advertising) categorical features' cardinalities, C1..C26.
CRITEO_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
               27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def configs(max_rows: int, dim: int) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(num_embeddings=min(r, max_rows), embedding_dim=dim,
                               name=f"t{i}", feature_names=[f"c{i}"])
            for i, r in enumerate(CRITEO_ROWS)]


def batches(cfg, batch: int, ids: int, count: int, dist: str, gen: torch.Generator):
    """KJTs of `batch` bags of `ids` ids per feature."""
    out = []
    for _ in range(count):
        values = torch.cat([make_indices(dist, batch * ids, c.num_embeddings, gen) for c in cfg])
        lengths = torch.full((len(cfg) * batch,), ids, dtype=torch.long)
        out.append((KeyedJaggedTensor(keys=[c.feature_names[0] for c in cfg], values=values,
                                      lengths=lengths),))
    return out


def fbgemm_tbe(cfg, optimizer: bool) -> SplitTableBatchedEmbeddingBagsCodegen:
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(c.num_embeddings, c.embedding_dim, EmbeddingLocation.HOST,
                          ComputeDevice.CPU) for c in cfg],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD if optimizer else EmbOptimType.NONE,
        learning_rate=0.01, pooling_mode=PoolingMode.SUM)


def torchrec_fp32(cfg, tbe) -> EmbeddingBagCollection:
    """TorchRec's collection on the meta device, its tables then made views of FBGEMM's
    (one fp32 copy for both)."""
    ebc = EmbeddingBagCollection(tables=cfg, device=torch.device("meta"))
    for c, weight in zip(cfg, tbe.split_embedding_weights()):
        ebc.embedding_bags[c.name].weight = torch.nn.Parameter(weight, requires_grad=False)
    return ebc


def torchrec_quantized(ebc, bits: int) -> QuantEmbeddingBagCollection:
    dtype = {8: torch.qint8, 4: torch.quint4x2}[bits]
    ebc.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=dtype))
    return QuantEmbeddingBagCollection.from_float(ebc)


def qembed_loop(cfg, collection) -> EmbeddingBagCollection:
    """TorchRec's collection looping over the qembed collection's own per-table modules."""
    loop = EmbeddingBagCollection(tables=cfg, device=torch.device("meta"))
    for name, module in collection.embedding_bags.items():
        loop.embedding_bags[name] = module
    return loop


def nbytes_of(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) +
               list(module.buffers()) if t.device.type != "meta")


def lines(row: int) -> float:
    """64-byte lines a row of a 64-byte aligned table touches, on average over its rows
    (rows start at every multiple of gcd(row, 64) within a line alike)."""
    step = math.gcd(row, 64)
    return statistics.mean(-(-(o + row) // 64) for o in range(0, 64, step))


def lookup_rows(cfg, inputs, repeats, tbe, ebc, bits_list, clock):
    ids = inputs[0][0].values().numel()
    fp32_row = cfg[0].embedding_dim * 4
    cands = {"torchrec fp32": (lambda kjt: ebc(kjt).values(), nbytes_of(tbe), fp32_row),
             "fbgemm fp32": (lambda kjt: tbe(kjt.values(), kjt.offsets()), nbytes_of(tbe),
                             fp32_row)}
    for bits in (b for b in bits_list if b in (8, 4)):
        q = torchrec_quantized(ebc, bits)
        nbytes = nbytes_of(q)
        cands[f"torchrec int{bits}"] = (lambda kjt, q=q: q(kjt).values(), nbytes,
                                        nbytes // sum(c.num_embeddings for c in cfg))
    for bits in bits_list:
        coll = QuantizedEmbeddingBagCollection.from_torchrec(ebc, bits=bits)
        row = row_bytes(cfg[0].embedding_dim, bits, "affine")
        if bits in (8, 4):
            loop = qembed_loop(cfg, coll)
            cands[f"qembed loop int{bits}"] = (lambda kjt, m=loop: m(kjt).values(), coll.nbytes,
                                               row)
        cands[f"qembed int{bits}"] = (lambda kjt, m=coll: m(kjt).values(), coll.nbytes, row)
    with torch.no_grad():
        times = interleaved_median_times({k: v[0] for k, v in cands.items()}, inputs, repeats,
                                         clock)
    rows = []
    for name, (_, nbytes, row) in cands.items():
        t = times[name]
        width = name.split()[-1]
        same_width = f"torchrec {width}"
        rows.append(dict(
            candidate=name, ms=t * 1e3, lookups_per_s=ids / t, table_GB=nbytes / 1e9,
            vs_torchrec_fp32=times["torchrec fp32"] / t, vs_fbgemm_fp32=times["fbgemm fp32"] / t,
            vs_qembed_loop=(times[f"qembed loop {width}"] / t
                            if f"qembed loop {width}" in times and name.startswith("qembed int")
                            else ""),
            vs_torchrec_same_width=(times[same_width] / t
                                    if same_width in times and name.startswith("qembed")
                                    else ""),
            line_bound=lines(fp32_row) / lines(row)))
    return rows


def training_rows(cfg, inputs, repeats, tbe, ebc, train_bits, clock):
    batch = inputs[0][0].stride()
    width = sum(c.embedding_dim for c in cfg)
    grad = torch.randn(batch, width)

    def fbgemm_step(kjt):
        tbe(kjt.values(), kjt.offsets()).backward(grad)

    cands = {"fbgemm fp32 adagrad": (fbgemm_step, nbytes_of(tbe))}
    for bits in train_bits:
        coll = LowPrecisionEmbeddingBagCollection.from_torchrec(ebc, bits=bits, optimizer="adagrad",
                                                                learn_step=False)

        def step(kjt, m=coll):
            m(kjt).values().backward(grad)

        cands[f"qembed lowp int{bits}"] = (step, coll.nbytes)
    times = interleaved_median_times({k: v[0] for k, v in cands.items()}, inputs, repeats, clock)
    base = times["fbgemm fp32 adagrad"]
    return [dict(candidate=name, ms=times[name] * 1e3, state_GB=nbytes / 1e9,
                 vs_fbgemm_fp32_adagrad=base / times[name])
            for name, (_, nbytes) in cands.items()]


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["dim"], r["ids_per_bag"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (dim, ids) in zip(axes[0], groups):
        sel = [r for r in rows if r["dim"] == dim and r["ids_per_bag"] == ids]
        ax.barh([r["candidate"] for r in sel], [r["vs_torchrec_fp32"] for r in sel])
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_title(f"D={dim}, {ids} id(s) per bag")
        ax.set_xlabel("speed-up over TorchRec fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-rows", type=int, default=2_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--multi-hot", type=int, default=20, help="ids per bag of the second variant")
    p.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batches", type=int, default=4, help="batches rotated through")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--train-bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); with 1, CPU time of the thread is "
                        "timed, which a loaded machine disturbs least")
    p.add_argument("--parts", nargs="+", default=["lookup", "training"],
                   choices=["lookup", "training"],
                   help="what to time (training alone needs far less memory: with glibc keeping "
                        "freed memory, both in one process can exhaust 24 GiB)")
    p.add_argument("--quick", action="store_true", help="small tables and batch: a smoke run")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--suffix", default="", help="appended to the results' file names")
    a = p.parse_args()
    if a.quick:
        a.max_rows, a.batch, a.repeats, a.batches, a.multi_hot = 20_000, 256, 3, 2, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    lookup, train = [], []
    for dim in a.dims:
        cfg = configs(a.max_rows, dim)
        tbe = fbgemm_tbe(cfg, optimizer=True)
        ebc = torchrec_fp32(cfg, tbe)
        for ids in (1, a.multi_hot) if "lookup" in a.parts else ():
            inputs = batches(cfg, a.batch, ids, a.batches, a.dist, gen)
            for r in lookup_rows(cfg, inputs, a.repeats, tbe, ebc, a.bits, clock):
                lookup.append(dict(dim=dim, ids_per_bag=ids, **r))
                print(lookup[-1], flush=True)
            gc.collect()
        if "training" in a.parts:
            inputs = batches(cfg, a.batch, 1, a.batches, a.dist, gen)
            for r in training_rows(cfg, inputs, a.repeats, tbe, ebc, a.train_bits, clock):
                train.append(dict(dim=dim, ids_per_bag=1, **r))
                print(train[-1], flush=True)
        del tbe, ebc
        gc.collect()
    notes = (f"{len(CRITEO_ROWS)} tables, Criteo's cardinalities capped at {a.max_rows:,} rows; "
             f"batch {a.batch}, {a.dist} ids; medians of {a.repeats} repeats over {a.batches} "
             f"batches, candidates timed in turn.")
    # The allocator's settings decide whether a step's fresh memory faults page by page,
    # which moves FBGEMM's step time by up to 2x: say which were set.
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith("MALLOC_") or k == "THP_MEM_ALLOC_ENABLE"]
    notes += f" Environment: {' '.join(env)}." if env else ""
    if lookup:
        print(write_results("collection_cpu" + a.suffix, lookup,
                            "Criteo-shaped collection lookup (CPU)", notes, a.out))
        plot(lookup, os.path.join(a.out, f"collection_cpu{a.suffix}.png"))
    if train:
        print(write_results("collection_train_cpu" + a.suffix, train,
                            "Criteo-shaped collection training step (CPU)", notes, a.out))
    print(stamp())


if __name__ == "__main__":
    qembed.ops  # the extension is loaded before timing starts
    main()
