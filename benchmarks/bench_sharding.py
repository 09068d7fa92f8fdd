"""A Criteo-shaped low-precision collection trained in 1 process and sharded over 2 by
TorchRec's DistributedModelParallel (gloo on 127.0.0.1, CPU): step time and bytes held per
process.

Every run trains the same global batches (forward, backward with a fixed gradient of the
pooled outputs, the fused update inside backward):
  1 process            qembed.torchrec.LowPrecisionEmbeddingBagCollection, the whole batch
  2 processes, <plan>  the collection sharded with QEmbedSharder, each process looking up
                       its half of the batch: row-wise (every table split by rows) and
                       table-wise (whole tables dealt to the ranks, largest first, to even
                       out their bytes)

  python benchmarks/bench_sharding.py            # D = 64, rows capped at 1M, batch 4096
  python benchmarks/bench_sharding.py --quick    # small smoke run

Each process runs --threads threads (default 1), so 2 processes use twice the cores of 1:
the step time is per global batch, "samples/s" the global batch over it. Bytes are the
tables held by each process (packed rows with their steps, row-wise Adagrad state); the
2-process rows give the larger of the two processes. Times are medians over --repeats
steps after --warmup. Writes results/sharding_cpu.{md,csv}.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import tempfile
import time

import torch

try:
    from common import RESULTS, stamp, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS, stamp, write_results

# Criteo (Kaggle display advertising) categorical features' cardinalities, C1..C26.
CRITEO_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
               27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


def configs(max_rows: int, dim: int):
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(num_embeddings=min(r, max_rows), embedding_dim=dim,
                               name=f"t{i}", feature_names=[f"c{i}"])
            for i, r in enumerate(CRITEO_ROWS)]


def batches(cfg, batch: int, count: int):
    """`count` global batches of one uniform id per feature, and the fixed gradients of the
    pooled outputs [batch, 26 D]."""
    from torchrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        values = torch.cat([torch.randint(0, c.num_embeddings, (batch,), generator=gen)
                            for c in cfg])
        kjt = KeyedJaggedTensor(keys=[c.feature_names[0] for c in cfg], values=values,
                                lengths=torch.ones(len(cfg) * batch, dtype=torch.long))
        grad = torch.randn(batch, sum(c.embedding_dim for c in cfg), generator=gen) * 1e-3
        out.append((kjt, grad))
    return out


def local_share(kjt, grad, rank: int, world_size: int):
    """Rank `rank`'s consecutive block of the samples of a one-id-per-feature batch."""
    from torchrec import KeyedJaggedTensor

    batch = kjt.stride() // world_size
    rows = slice(rank * batch, (rank + 1) * batch)
    values = kjt.values().view(len(kjt.keys()), -1)[:, rows].reshape(-1)
    return (KeyedJaggedTensor(keys=kjt.keys(), values=values,
                              lengths=torch.ones(values.numel(), dtype=torch.long)),
            grad[rows] * world_size)  # TorchRec divides the pooled gradients by the ranks


def collection(cfg, bits: int):
    from qembed.torchrec import LowPrecisionEmbeddingBagCollection

    return LowPrecisionEmbeddingBagCollection(cfg, bits=bits, seed=0)


def table_wise_ranks(cfg, world_size: int) -> dict:
    """Whole tables to ranks, largest first onto the rank holding the fewest rows."""
    held = [0] * world_size
    ranks = {}
    for c in sorted(cfg, key=lambda c: -c.num_embeddings):
        r = held.index(min(held))
        ranks[c.name] = r
        held[r] += c.num_embeddings
    return ranks


def timed_steps(step, inputs, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step(*inputs[i % len(inputs)])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_process(cfg, bits: int, inputs, warmup: int, repeats: int) -> dict:
    module = collection(cfg, bits)

    def step(kjt, grad):
        module(kjt).values().backward(grad)

    seconds = timed_steps(step, inputs, warmup, repeats)
    return dict(seconds=seconds, nbytes=module.nbytes)


def _rank(rank, world_size, store, out, cfg, bits, plan_name, inputs, warmup, repeats,
          threads):
    os.environ.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        construct_module_sharding_plan,
        row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    from qembed.torchrec import QEmbedSharder

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=600))
    module = torch.nn.Module()
    module.sparse = collection(cfg, bits)
    sharder = QEmbedSharder()
    per_table = ({c.name: row_wise() for c in cfg} if plan_name == "row-wise" else
                 {n: table_wise(rank=r) for n, r in table_wise_ranks(cfg, world_size).items()})
    plan = ShardingPlan({"sparse": construct_module_sharding_plan(
        module.sparse, per_table, sharder=sharder, local_size=world_size,
        world_size=world_size, device_type="cpu")})
    dmp = DistributedModelParallel(module, device=torch.device("cpu"), plan=plan,
                                   sharders=[sharder])
    sharded = dmp.module.sparse
    del module
    mine = [local_share(kjt, grad, rank, world_size) for kjt, grad in inputs]

    def step(kjt, grad):
        out = sharded(kjt).wait()
        out.values().backward(_regroup(out, grad, cfg))

    dist.barrier()
    seconds = timed_steps(step, mine, warmup, repeats)
    result = torch.tensor([seconds, float(sharded.nbytes)], dtype=torch.float64)
    gathered = [torch.zeros_like(result) for _ in range(world_size)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save([g.tolist() for g in gathered], out)
    dist.destroy_process_group()


def _regroup(keyed, grad, cfg):
    """The gradient [B, 26 D] in config order rearranged to the KeyedTensor's key order."""
    dim = cfg[0].embedding_dim
    column = {c.feature_names[0]: i * dim for i, c in enumerate(cfg)}
    return torch.cat([grad[:, column[k]: column[k] + dim] for k in keyed.keys()], dim=1)


def two_processes(cfg, bits: int, plan_name: str, inputs, warmup: int, repeats: int,
                  threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        procs = [ctx.Process(target=_rank, args=(r, 2, os.path.join(tmp, "store"), out, cfg,
                                                 bits, plan_name, inputs, warmup, repeats,
                                                 threads))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank of the {plan_name} run failed")
        per_rank = torch.load(out)
    return dict(seconds=max(s for s, _ in per_rank), nbytes=int(max(b for _, b in per_rank)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="global batch (samples per step)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="small tables and batch: a smoke run")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args()
    if a.quick:
        a.max_rows, a.batch, a.warmup, a.repeats = 20_000, 256, 1, 3
    torch.set_num_threads(a.threads)
    cfg = configs(a.max_rows, a.dim)
    inputs = batches(cfg, a.batch, 4)
    rows = []
    for bits in a.bits:
        base = one_process(cfg, bits, inputs, a.warmup, a.repeats)
        runs = [("1 process", base)] + [
            (f"2 processes, {plan}", two_processes(cfg, bits, plan, inputs, a.warmup,
                                                   a.repeats, a.threads))
            for plan in ("row-wise", "table-wise")]
        for name, r in runs:
            rows.append(dict(bits=bits, run=name, step_ms=r["seconds"] * 1e3,
                             samples_per_s=a.batch / r["seconds"],
                             speedup=base["seconds"] / r["seconds"],
                             table_MB_per_process=r["nbytes"] / 2**20,
                             bytes_vs_1_process=r["nbytes"] / base["nbytes"]))
            print(rows[-1], flush=True)
    notes = (f"{len(CRITEO_ROWS)} tables, Criteo's cardinalities capped at {a.max_rows:,} rows, "
             f"D = {a.dim}, one id per feature, global batch {a.batch}; row-wise Adagrad, "
             f"learned per-row steps, stochastic rounding; {a.threads} thread(s) per process; "
             f"medians of {a.repeats} steps after {a.warmup}.")
    print(write_results("sharding_cpu", rows, "Criteo-shaped collection sharded over 2 "
                        "processes (CPU, gloo)", notes, a.out))
    print(stamp())


if __name__ == "__main__":
    main()
