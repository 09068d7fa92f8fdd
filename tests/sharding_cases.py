"""What the sharding tests run in each process (tests/test_sharding.py): a launcher of
gloo process groups on 127.0.0.1 with a time bound, the collections, batches, plans and
the unsharded reference the sharded runs are compared with.

Each case runs on every rank, builds the same unsharded collection from the same seed,
shards it with DMP and compares what its rank holds or returns with the unsharded
collection run over the whole (global) batch in the same process.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import time
import traceback

import torch

# A rank that does not hear from the others fails after this long; the tests' time bounds
# are built from it.
PG_TIMEOUT_S = 20


# --- launching ranks ------------------------------------------------------------------------

def _rank_main(rank, world_size, store_dir, out_dir, case, kwargs, local_size, pg_timeout_s):
    os.environ.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                      LOCAL_WORLD_SIZE=str(local_size), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank % local_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    try:
        result = globals()[case](rank, world_size, **kwargs)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in a CI run a rank whose result was
    # saved aborted there ("terminate called without an active exception", a C++ object
    # destroyed at exit with its thread still running), failing a case that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(case: str, tmp_path, world_size: int = 2, local_size: int | None = None,
        timeout_s: float = 300, expect_failure: bool = False,
        pg_timeout_s: float = PG_TIMEOUT_S, **kwargs) -> list:
    """Runs case(rank, world_size, **kwargs) in `world_size` spawned processes joined by a
    gloo process group (timeout `pg_timeout_s`); returns each rank's result. Every process
    is killed once `timeout_s` has passed. With `expect_failure`, returns per rank (exit
    code, result or error text, seconds until it ended)."""
    ctx = multiprocessing.get_context("spawn")
    store, out = tmp_path / f"{case}_store", tmp_path / f"{case}_out"
    store.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_rank_main,
                         args=(r, world_size, str(store), str(out), case, kwargs,
                               local_size or world_size, pg_timeout_s))
             for r in range(world_size)]
    start = time.monotonic()
    for p in procs:
        p.start()
    ended = [None] * world_size
    for r, p in enumerate(procs):
        p.join(max(0.0, timeout_s - (time.monotonic() - start)))
        ended[r] = time.monotonic() - start
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r, p in enumerate(procs):
        err, res = out / f"error{r}.txt", out / f"result{r}.pt"
        value = (torch.load(res, weights_only=False) if res.exists()
                 else err.read_text() if err.exists() else None)
        results.append((p.exitcode, value, ended[r]))
    if hung:
        raise AssertionError(f"{case}: ranks {hung} still ran after {timeout_s} s")
    if expect_failure:
        return results
    failed = [(r, v) for r, (code, v, _) in enumerate(results) if code != 0]
    if failed:
        raise AssertionError(f"{case} failed on ranks {[r for r, _ in failed]}:\n" +
                             "\n".join(str(v) for _, v in failed))
    return [v for _, v, _ in results]


# --- collections, batches, plans --------------------------------------------------------------

def configs(dims=(16, 8, 32, 16), rows=(40, 30, 50, 20), mean=True):
    """Four tables, sum and (with `mean`) mean pooling, the first read by two features."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    names = [["f0", "f1"], ["f2"], ["f3"], ["f4"]]
    pooling = [PoolingType.SUM, PoolingType.MEAN if mean else PoolingType.SUM,
               PoolingType.SUM, PoolingType.MEAN if mean else PoolingType.SUM]
    return [EmbeddingBagConfig(num_embeddings=r, embedding_dim=d, name=f"t{i}",
                               feature_names=n, pooling=p)
            for i, (r, d, n, p) in enumerate(zip(rows, dims, names, pooling))]


def batch(cfg, batch_size, seed, max_len=3, one_hot=False, weighted=False):
    """A key-major KJT of all features in config order, drawn from `seed`; with `weighted`,
    per-sample weights in eighths (products with power-of-two steps stay exact)."""
    from torchrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for c in cfg:
        for name in c.feature_names:
            n = (torch.ones(batch_size, dtype=torch.long) if one_hot
                 else torch.randint(0, max_len + 1, (batch_size,), generator=gen))
            keys.append(name)
            lengths.append(n)
            values.append(torch.randint(0, c.num_embeddings, (int(n.sum()),), generator=gen))
    values = torch.cat(values)
    weights = (torch.randint(1, 17, values.shape, generator=gen) / 8.0 if weighted else None)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.cat(lengths),
                             weights=weights)


def local_batch(kjt, rank, world_size):
    """Rank `rank`'s share of a global batch: its consecutive block of samples."""
    from torchrec import KeyedJaggedTensor

    batch = kjt.stride() // world_size
    lengths = kjt.lengths().view(len(kjt.keys()), -1)
    offsets = kjt.offsets()
    values, weights, mine = [], [], []
    for f in range(len(kjt.keys())):
        start = int(offsets[f * kjt.stride() + rank * batch])
        end = int(offsets[f * kjt.stride() + (rank + 1) * batch])
        values.append(kjt.values()[start:end])
        if kjt.weights_or_none() is not None:
            weights.append(kjt.weights()[start:end])
        mine.append(lengths[f, rank * batch: (rank + 1) * batch])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values),
                             lengths=torch.cat(mine),
                             weights=torch.cat(weights) if weights else None)


def collection(kind, cfg, bits, **options):
    from qembed.torchrec import LowPrecisionEmbeddingBagCollection, QuantizedEmbeddingBagCollection

    if kind == "quantized":
        torch.manual_seed(1)
        return QuantizedEmbeddingBagCollection(cfg, bits=bits, **options)
    return LowPrecisionEmbeddingBagCollection(cfg, bits=bits, **options)


def power_of_two_steps(module, seed=3):
    """Sets a symmetric-format quantized collection's per-row steps to powers of two: every
    bag's sum is then exact in fp32, whatever the order its rows are added in."""
    from qembed.formats import param_offset

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.embedding_bags.values():
            po = param_offset(m.embedding_dim, m.bits)
            steps = 2.0 ** -torch.randint(4, 9, (m.num_embeddings,), generator=gen).float()
            m.qweight[:, po:po + 4] = steps.view(torch.uint8).view(-1, 4)


def plan_for(module, kinds: dict, world_size: int, local_size: int, sharder):
    """DMP's plan for `module` at path "sparse": kinds[table] is "table_wise:<rank>",
    "row_wise", "column_wise" (over all ranks) or "table_row_wise"."""
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    make = {"row_wise": lambda: row_wise(), "data_parallel": lambda: data_parallel(),
            "column_wise": lambda: column_wise(ranks=list(range(world_size))),
            "column_wise_swapped": lambda: column_wise(ranks=list(range(world_size))[::-1]),
            "table_row_wise": lambda: table_row_wise(host_index=0)}
    per_table = {}
    for name, kind in kinds.items():
        if kind.startswith("table_wise"):
            per_table[name] = table_wise(rank=int(kind.split(":")[1]))
        else:
            per_table[name] = make[kind]()
    module_plan = construct_module_sharding_plan(module, per_table, sharder=sharder,
                                                 local_size=local_size, world_size=world_size,
                                                 device_type="cpu")
    return ShardingPlan({"sparse": module_plan})


class Model(torch.nn.Module):
    """A collection under `sparse` (the tables' gradients come from the tests, fixed)."""

    def __init__(self, sparse):
        super().__init__()
        self.sparse = sparse

    def forward(self, kjt):
        return self.sparse(kjt)


def shard(module, kinds, world_size, local_size=None):
    """DMP over Model(module) with the plan `kinds`; returns (dmp, the sharded collection)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from qembed.torchrec import QEmbedSharder

    sharder = QEmbedSharder(type(module))
    model = Model(module)
    plan = plan_for(module, kinds, world_size, local_size or world_size, sharder)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                   sharders=[sharder])
    return dmp, dmp.module.sparse


def lookup(sharded, kjt) -> dict:
    """The sharded collection's output on `kjt`, by key."""
    from torchrec.distributed.types import LazyAwaitable

    out = sharded(kjt)
    return (out.wait() if isinstance(out, LazyAwaitable) else out).to_dict()


# --- cases --------------------------------------------------------------------------------------

PLANS = {
    "table_wise": {"t0": "table_wise:0", "t1": "table_wise:1", "t2": "table_wise:1",
                   "t3": "table_wise:0"},
    "row_wise": {t: "row_wise" for t in ("t0", "t1", "t2", "t3")},
    "column_wise": {"t0": "column_wise", "t1": "table_wise:1", "t2": "column_wise",
                    "t3": "column_wise"},
    "table_row_wise": {t: "table_row_wise" for t in ("t0", "t1", "t2", "t3")},
    # TorchRec 1.8's divisor defect: table-wise sum tables beside row-wise mean ones
    "mixed": {"t0": "table_wise:1", "t1": "row_wise", "t2": "table_row_wise",
              "t3": "column_wise"},
}


def forward_case(rank, world_size, kind, bits, plans, exact_steps, batch_size=6,
                 output_dtype=torch.float32, weighted=False):
    """Each plan's sharded forward on this rank's batches against the unsharded
    collection's on the global batches, one-hot and multi-hot (weighted: every table pooled
    by sum, per-sample weights): {(plan, batches): {output key: (max abs difference,
    bit-identical, the unsharded outputs' largest magnitude)}}."""
    cfg = configs(mean=not weighted)
    options = {"format": "symmetric"} if kind == "quantized" else {"seed": 5}
    module = collection(kind, cfg, bits, output_dtype=output_dtype, is_weighted=weighted,
                        **options)
    if exact_steps:
        power_of_two_steps(module)
    batches = {name: [batch(cfg, batch_size * world_size, seed, one_hot=name == "one-hot",
                            weighted=weighted)
                      for seed in (11, 12)] for name in ("one-hot", "multi-hot")}
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    report = {}
    for plan in plans:
        dmp, sharded = shard(module, PLANS[plan], world_size)
        for name, kjts in batches.items():
            diffs = {}
            for kjt in kjts:
                with torch.no_grad():
                    want = module(kjt).to_dict()
                    got = lookup(sharded, local_batch(kjt, rank, world_size))
                assert sorted(got) == sorted(want), (sorted(got), sorted(want))
                for key, value in got.items():
                    ref = want[key][rows]
                    assert value.dtype == ref.dtype == output_dtype
                    diff = float((value.float() - ref.float()).abs().max())
                    scale = float(ref.float().abs().max())
                    old = diffs.get(key, (0.0, True, 0.0))
                    diffs[key] = (max(old[0], diff), old[1] and torch.equal(value, ref),
                                  max(old[2], scale))
            report[(plan, name)] = diffs
    return report


def output_grads(cfg, batch_size, seed, scale=1.0):
    """Fixed gradients of the pooled outputs, by output key (the loss is sum(out * grad))."""
    from qembed.torchrec.modules import _embedding_names

    gen = torch.Generator().manual_seed(seed)
    keys = [k for names in _embedding_names(cfg) for k in names]
    dims = [c.embedding_dim for c in cfg for _ in c.feature_names]
    return {k: torch.randn(batch_size, d, generator=gen) * scale for k, d in zip(keys, dims)}


def shard_state(shard, full, row0, col0):
    """The unsharded table `full`'s values, steps and optimizer state over `shard`'s rows and
    columns, beside the shard's own: [(what, shard's, unsharded's)]."""
    from qembed.formats import param_offset

    rows = slice(row0, row0 + shard.num_embeddings)
    cols = slice(col0, col0 + shard.embedding_dim)
    pairs = [("values", shard.dequantize(), full.dequantize()[rows, cols]),
             ("num_updates", shard.num_updates, full.num_updates)]
    if shard.step is not None:
        pairs.append(("table step", shard.step, full.step))
    else:
        po, fpo = param_offset(shard.embedding_dim, shard.bits), param_offset(full.embedding_dim,
                                                                              full.bits)
        pairs.append(("row steps", shard.qweight[:, po:po + 4].contiguous().view(torch.float32),
                      full.qweight[rows, fpo:fpo + 4].contiguous().view(torch.float32)))
    if full.optimizer == "adagrad":
        pairs.append(("adagrad", shard.state, full.state[rows]))
    elif full.optimizer == "adam":
        d = full.embedding_dim
        pairs.append(("adam", shard.state, torch.cat([full.state[rows, cols],
                                                      full.state[rows, d + col0: d + cols.stop]], 1)))
    if full.step_per == "row":
        pairs.append(("step state", shard.step_state, full.step_state[rows]))
    return pairs


def train_case(rank, world_size, runs, steps=3, batch_size=6, grad_scale=1.0):
    """For each (plan, bits, options) of `runs`: `steps` training steps of the sharded
    collection (this rank's batches, fixed output gradients) and of the unsharded one (the
    global batches, the same gradients). Returns {run index: {"moved": whether the
    unsharded tables changed, (table, what): (bit-identical, max abs difference, how far
    the unsharded values moved over the shard's rows and columns, the table's largest
    quantization step)}} over this rank's shards."""
    cfg = configs()
    report = {}
    for i, (plan, bits, options) in enumerate(runs):
        reference = collection("lowp", cfg, bits, seed=5, **options)
        initial = {n: m.dequantize() for n, m in reference.embedding_bags.items()}
        module = collection("lowp", cfg, bits, seed=5, **options)
        dmp, sharded = shard(module, PLANS[plan], world_size)
        train_steps(reference, 0, steps, None, world_size, batch_size, grad_scale)
        train_steps(sharded, 0, steps, rank, world_size, batch_size, grad_scale)
        run = {"moved": all(not torch.equal(initial[n], m.dequantize())
                            for n, m in reference.embedding_bags.items())}
        for name, table in sharded.embedding_bags.items():
            full = reference.embedding_bags[name]
            step = float(full.dequantize().abs().max()) / max((1 << (bits - 1)) - 1, 1)
            for m, (_, row0, col0) in zip(table.shards, table.places):
                part = (slice(row0, row0 + m.num_embeddings), slice(col0, col0 + m.embedding_dim))
                moved = float((full.dequantize() - initial[name])[part].abs().max())
                for what, mine, want in shard_state(m, full, row0, col0):
                    same = torch.equal(mine, want)
                    diff = float((mine.float() - want.float()).abs().max()) if mine.numel() \
                        else 0.0
                    old = run.get((name, what), (True, 0.0, 0.0, step))
                    run[(name, what)] = (old[0] and same, max(old[1], diff), max(old[2], moved),
                                         step)
        report[i] = run
    return report


CHECKPOINT_PLANS = {
    "first": {"t0": "row_wise", "t1": "table_wise:1", "t2": "table_row_wise", "t3": "row_wise"},
    "second": {"t0": "table_wise:1", "t1": "row_wise", "t2": "row_wise", "t3": "table_wise:0"},
}


def train_steps(model, first, last, rank=None, world_size=2, batch_size=6, grad_scale=1.0):
    """Training steps first..last - 1 (fixed output gradients) of `model`: an unsharded
    collection on the global batches (rank None) or a sharded one on this rank's share."""
    cfg = configs()
    for step in range(first, last):
        kjt = batch(cfg, batch_size * world_size, seed=100 + step)
        grads = output_grads(cfg, kjt.stride(), seed=200 + step, scale=grad_scale)
        if rank is None:
            out = model(kjt).to_dict()
            sum((out[k] * g).sum() for k, g in grads.items()).backward()
        else:
            rows = slice(rank * batch_size, (rank + 1) * batch_size)
            got = lookup(model, local_batch(kjt, rank, world_size))
            # TorchRec divides the pooled gradients by the world size (as DDP averages the
            # dense ones): each rank's loss is its share of the global one, times W
            sum((got[k] * (g[rows] * world_size)).sum() for k, g in grads.items()).backward()


def compare_shards(sharded, reference) -> dict:
    """{(table, what): bit-identical} over this rank's shards against the unsharded
    reference collection."""
    report = {}
    for name, table in sharded.embedding_bags.items():
        for m, (_, row0, col0) in zip(table.shards, table.places):
            for what, mine, want in shard_state(m, reference.embedding_bags[name], row0, col0):
                report[(name, what)] = report.get((name, what), True) and torch.equal(mine, want)
    return report


def checkpoint_save_case(rank, world_size, path, steps=2):
    """Trains the "first" plan `steps` steps and saves it with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    module = collection("lowp", configs(), 4, seed=5)
    dmp, sharded = shard(module, CHECKPOINT_PLANS["first"], world_size)
    train_steps(sharded, 0, steps, rank, world_size)
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return sorted(dmp.state_dict())


def checkpoint_load_case(rank, world_size, plain_path, dcp_path, plain_steps, dcp_steps,
                         total_steps):
    """Loads (a) the unsharded collection's plain state dict saved after `plain_steps` and
    (b) the sharded checkpoint saved after `dcp_steps` (by another split) into the "second"
    plan, trains each to `total_steps` and compares with the unsharded run of
    `total_steps` steps."""
    import torch.distributed.checkpoint as dcp

    reference = collection("lowp", configs(), 4, seed=5)
    train_steps(reference, 0, total_steps)
    report = {}
    for source, first in (("plain", plain_steps), ("dcp", dcp_steps)):
        module = collection("lowp", configs(), 4, seed=99)  # different values, replaced
        dmp, sharded = shard(module, CHECKPOINT_PLANS["second"], world_size)
        if source == "plain":
            dmp.load_state_dict(torch.load(plain_path, weights_only=True))
        else:
            state = dmp.state_dict()
            dcp.load(state, checkpoint_id=dcp_path)
            dmp.load_state_dict(state)
        train_steps(sharded, first, total_steps, rank, world_size)
        report[source] = compare_shards(sharded, reference)
    return report


def meta_init_case(rank, world_size, plans):
    """Collections built on the meta device, sharded by each of `plans`: each rank draws its
    shards from the tables' seeds. Returns {(plan, when): {(table, what): bit-identical}}
    against the unsharded collection built on the CPU with the same seed, when sharded,
    after a training step and after reset_parameters()."""
    cfg = configs()
    reference = collection("lowp", cfg, 4, seed=5)
    report = {}
    for plan in plans:
        module = collection("lowp", cfg, 4, seed=5, device="meta")
        dmp, sharded = shard(module, PLANS[plan], world_size)
        report[(plan, "initial")] = compare_shards(sharded, reference)
        train_steps(sharded, 0, 1, rank, world_size)
        report[(plan, "trained")] = compare_shards(sharded, reference)
        sharded.reset_parameters()
        report[(plan, "reset")] = compare_shards(sharded, reference)
    return report


def bad_id_case(rank, world_size, linger_s):
    """Rank 1's batch has an id one past its table. Returns (what the lookup raised or
    "returned", seconds it took) per rank; rank 1 then stays alive, in no collective, for
    `linger_s` seconds."""
    import torch.distributed as dist

    cfg = configs()
    module = collection("quantized", cfg, 8)
    dmp, sharded = shard(module, PLANS["mixed"], world_size)
    kjt = local_batch(batch(cfg, 6 * world_size, seed=7, one_hot=True), rank, world_size)
    if rank == 1:
        kjt.values()[-1] = cfg[-1].num_embeddings
    dist.barrier()
    start = time.monotonic()
    try:
        with torch.no_grad():
            lookup(sharded, kjt)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        outcome = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    if rank == 1:
        time.sleep(linger_s)
    return outcome, elapsed


def dying_rank_case(rank, world_size):
    """Both ranks train a step; then rank 1 exits abruptly and rank 0 trains on. Returns
    rank 0's (what it raised, seconds it took)."""
    import torch.distributed as dist

    module = collection("lowp", configs(), 8, seed=5)
    dmp, sharded = shard(module, PLANS["row_wise"], world_size)
    train_steps(sharded, 0, 1, rank, world_size)
    dist.barrier()
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        train_steps(sharded, 1, 2, rank, world_size)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    return outcome, time.monotonic() - start


def planner_case(rank, world_size):
    """TorchRec's planner places a qembed collection on CPU (row-wise, column-wise,
    table-row-wise, table-wise as constrained, and by itself) and plans it for CUDA; the
    planned CPU models look up as the unsharded collection does. Returns {what: value}."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )

    from qembed.torchrec import QEmbedSharder

    cfg = configs()
    sharder = QEmbedSharder()
    constraints = {"t0": ParameterConstraints(sharding_types=["row_wise"]),
                   "t1": ParameterConstraints(sharding_types=["table_wise"]),
                   "t2": ParameterConstraints(sharding_types=["column_wise"], min_partition=16),
                   "t3": ParameterConstraints(sharding_types=["table_row_wise"])}
    report = {}
    kjt = batch(cfg, 6 * world_size, seed=8, one_hot=True)
    rows = slice(rank * 6, (rank + 1) * 6)
    for name, given in (("constrained", constraints), ("free", None)):
        module = collection("lowp", cfg, 8, seed=5)
        with torch.no_grad():
            want = module(kjt).to_dict()
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world_size, local_world_size=world_size,
                              compute_device="cpu"), constraints=given)
        plan = planner.collective_plan(Model(module), [sharder], dist.group.WORLD)
        report[name] = {t: (p.sharding_type, len(p.sharding_spec.shards))
                        for t, p in plan.plan["sparse"].items()}
        dmp = DistributedModelParallel(Model(module), device=torch.device("cpu"), plan=plan,
                                       sharders=[sharder])
        with torch.no_grad():
            got = lookup(dmp.module.sparse, local_batch(kjt, rank, world_size))
        report[name + " equal"] = all(torch.equal(got[k], want[k][rows]) for k in want)
    cuda = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, local_world_size=world_size,
                          compute_device="cuda"), constraints=constraints)
    report["cuda"] = {t: p.sharding_type
                      for t, p in cuda.plan(Model(collection("lowp", cfg, 8, seed=5)),
                                            [sharder]).plan["sparse"].items()}
    return report


def bad_plan_case(rank, world_size):
    """What the sharder refuses, each with its message: a column-wise split into widths that
    are not whole groups of 8, sharded training of tables without the common fused update,
    a data-parallel table."""
    cfg = configs()
    attempts = [
        (collection("lowp", cfg, 8, seed=5), {**PLANS["row_wise"], "t1": "column_wise"}),
        (collection("lowp", cfg, 8, seed=5, step_grad="two_pass"), PLANS["row_wise"]),
        (collection("lowp", cfg, 8, seed=5), {**PLANS["row_wise"], "t2": "data_parallel"}),
    ]
    messages = []
    for module, kinds in attempts:
        try:
            shard(module, kinds, world_size)
            messages.append("sharded")
        except ValueError as e:
            messages.append(str(e))
    return messages


def column_checkpoint_case(rank, world_size, path):
    """Column-wise tables (Adam, fixed steps): trained 2 steps and saved with
    torch.distributed.checkpoint, loaded into the same split placed on the other ranks, and
    (separately) given the unsharded collection's plain state after 2 steps; each trains a
    3rd step. Returns {source: {(table, what): bit-identical}} against 3 unsharded steps."""
    import torch.distributed.checkpoint as dcp

    options = dict(seed=5, optimizer="adam", learn_step=False)
    kinds = {"t0": "column_wise", "t1": "table_wise:1", "t2": "column_wise",
             "t3": "column_wise"}
    swapped = {**kinds, "t0": "column_wise_swapped", "t2": "column_wise_swapped",
               "t1": "table_wise:0"}
    reference = collection("lowp", configs(), 8, **options)
    train_steps(reference, 0, 2)
    plain = {k: v.clone() for k, v in Model(reference).state_dict().items()}
    module = collection("lowp", configs(), 8, **options)
    dmp, sharded = shard(module, kinds, world_size)
    train_steps(sharded, 0, 2, rank, world_size)
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    train_steps(reference, 2, 3)
    report = {}
    for source in ("dcp", "plain"):
        dmp, sharded = shard(collection("lowp", configs(), 8, **{**options, "seed": 99}),
                             swapped, world_size)
        if source == "dcp":
            state = dmp.state_dict()
            dcp.load(state, checkpoint_id=path)
            dmp.load_state_dict(state)
        else:
            dmp.load_state_dict(plain)
        train_steps(sharded, 2, 3, rank, world_size)
        report[source] = compare_shards(sharded, reference)
    return report


def torchrec_divisor_case(rank, world_size):
    """TorchRec 1.8's own sharded collection (fp32, its stock sharder) on the mix that trips
    its mean-pooling divisor: a table-wise sum table beside a row-wise mean one. Returns per
    feature (pooling, max |sharded - unsharded|, max |sharded * (bag length + 1e-6) -
    unsharded|)."""
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        construct_module_sharding_plan,
        row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    cfg = configs()[:2]  # t0: sum (f0, f1); t1: mean (f2)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=cfg)
    sharder = EmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        ebc, {"t0": table_wise(rank=1, compute_kernel="fused"),
              "t1": row_wise(compute_kernel="fused")},
        sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu")
    kjt = batch(cfg, 6 * world_size, seed=3)
    with torch.no_grad():
        want = ebc(kjt).to_dict()
    weights = {c.name: ebc.embedding_bags[c.name].weight.detach().clone() for c in cfg}
    dmp = DistributedModelParallel(Model(ebc), device=torch.device("cpu"),
                                   plan=ShardingPlan({"sparse": plan}), sharders=[sharder])
    state = dmp.state_dict()  # its shards start from their own values: set the tables'
    with torch.no_grad():
        for name, full in weights.items():
            for piece in state[f"sparse.embedding_bags.{name}.weight"].local_shards():
                (r0, c0), (r, c) = piece.metadata.shard_offsets, piece.metadata.shard_sizes
                piece.tensor.copy_(full[r0:r0 + r, c0:c0 + c])
        got = lookup(dmp.module.sparse, local_batch(kjt, rank, world_size))
    rows = slice(rank * 6, (rank + 1) * 6)
    lengths = kjt.lengths().view(len(kjt.keys()), -1)[:, rows].float()
    report = {}
    for i, (key, pooling) in enumerate((("f0", "sum"), ("f1", "sum"), ("f2", "mean"))):
        ref = want[key][rows]
        report[key] = (pooling, float((got[key] - ref).abs().max()),
                       float((got[key] * (lengths[i][:, None] + 1e-6) - ref).abs().max()))
    return report
