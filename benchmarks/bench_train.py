"""Time one training step (forward + backward + optimizer update) of an embedding table.

Compares qembed's LowPrecisionEmbeddingBag (int8 and int4, row-wise Adagrad, ALPT one-pass
step learning, stochastic rounding; the update fused into backward) with an fp32
nn.EmbeddingBag(sparse=True) stepped by torch.optim.SparseAdam and torch.optim.Adagrad, and
with fbgemm_gpu's SplitTableBatchedEmbeddingBagsCodegen on CPU (exact row-wise Adagrad, fused
into backward) when it imports. Reports the median step time over repeats (batches rotate),
its ratio to fp32 + SparseAdam measured in the same run, and the bytes of table plus
optimizer state. For the qembed tables it also times the step's parts on their own, in the
same turns: the forward lookup, the backward (distinct rows and their summed gradients,
``embedding_bag_backward``) and the update (``lowp_update``), and gives the step as a
multiple of the forward lookup. Writes markdown, CSV and a PNG to benchmarks/results/.

    python benchmarks/bench_train.py            # 1M and 4M rows, D = 64 and 128 (shapes
                                                # over --max-gb of fp32 state are skipped)
    python benchmarks/bench_train.py --quick    # small smoke run
    python benchmarks/bench_train.py --rows 2000000 --dims 128 --dists uniform \
        --bags 106496 --length 1 --name bench_train_one_hot   # CTR-like: one id a bag
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import random
import statistics
import sys
import time

import torch

import qembed

try:
    from common import fp32_train_method
except ImportError:  # run as a module from the repository root
    from benchmarks.common import fp32_train_method

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
INT8, INT4 = "qembed int8 (rw-Adagrad, ALPT)", "qembed int4 (rw-Adagrad, ALPT)"
FBGEMM, SPARSE_ADAM = "fbgemm fp32 (rw-Adagrad)", "fp32 + SparseAdam"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_batches(rows: int, bags: int, length: int, dist: str, count: int, gen):
    n = bags * length
    if dist == "zipf":
        # p(rank k) ~ k^-1.05 over the table, hot ranks scattered over row ids.
        probs = torch.arange(1, rows + 1, dtype=torch.float64).pow(-1.05)
        scatter = torch.randperm(rows, generator=gen)
    offsets = torch.arange(0, n, length)
    out = []
    for _ in range(count):
        if dist == "zipf":
            idx = scatter[torch.multinomial(probs, n, replacement=True, generator=gen)]
        else:
            idx = torch.randint(0, rows, (n,), generator=gen)
        out.append((idx, offsets))
    return out


def qembed_method(rows, dim, bits):
    emb = qembed.LowPrecisionEmbeddingBag(rows, dim, mode="sum", bits=bits, optimizer="adagrad")

    def step(idx, off, grad):
        emb(idx, off).backward(grad)

    def forward(idx, off, grad):
        with torch.no_grad():
            emb(idx, off)

    def backward(idx, off, grad):
        return qembed.ops.embedding_bag_backward(grad, idx, off, None, "sum")

    def update(sparse_grad):
        emb.update_rows(*sparse_grad)
    return step, lambda: emb.nbytes, (forward, backward, update)


def fbgemm_method(rows, dim):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, eps=1e-8)

    def step(idx, off, grad):
        emb(idx, torch.cat([off, off.new_tensor([idx.numel()])])).backward(grad)

    def nbytes():
        w = emb.split_embedding_weights()[0]
        return w.numel() * w.element_size() + sum(
            s.numel() * s.element_size() for s in emb.split_optimizer_states()[0])
    return step, nbytes, None


def methods(rows, dim):
    yield SPARSE_ADAM, lambda: (*fp32_train_method(rows, dim, "sparse_adam"), None)
    yield "fp32 + Adagrad", lambda: (*fp32_train_method(rows, dim, "adagrad"), None)
    yield INT8, lambda: qembed_method(rows, dim, 8)
    yield INT4, lambda: qembed_method(rows, dim, 4)
    try:
        import fbgemm_gpu  # noqa: F401
        yield FBGEMM, lambda: fbgemm_method(rows, dim)
    except Exception as e:  # noqa: BLE001 - any import failure means: skip it
        print(f"skipping fbgemm_gpu: {e}", file=sys.stderr)


PARTS = ("forward", "backward", "update")


def time_steps(built, batches, grads, warmup, repeats):
    """Median seconds per step of each method and, for methods that time their parts, per
    part (forward lookup; backward; update given that backward's output). Methods take turns
    within each repeat, in an order shuffled from repeat to repeat, so load from other
    processes on a shared machine falls on all of them alike. Each timed step follows an
    untimed one of the same method: the fp32 methods free a gigabyte of dense gradient each
    step, and the next method's first step after them paid for it (its fresh memory faulting
    in page by page), 1.3-2x its time."""
    names = list(built)
    times = {name: {"step": []} for name in names}
    for name in names:
        if built[name][2] is not None:
            times[name].update({part: [] for part in PARTS})
    for i in range(warmup + repeats):
        idx, off = batches[i % len(batches)]
        grad = grads[i % len(grads)]
        order = list(names)
        random.Random(i).shuffle(order)
        for name in order:
            step, _, parts = built[name]
            step(idx, off, grad)
            t0 = time.perf_counter()
            step(idx, off, grad)
            t1 = time.perf_counter()
            if i >= warmup:
                times[name]["step"].append(t1 - t0)
            if parts is None:
                continue
            forward, backward, update = parts
            t0 = time.perf_counter()
            forward(idx, off, grad)
            t1 = time.perf_counter()
            sparse_grad = backward(idx, off, grad)
            t2 = time.perf_counter()
            update(sparse_grad)
            t3 = time.perf_counter()
            if i >= warmup:
                for part, t in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                    times[name][part].append(t)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1000000,4000000")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--dists", default="uniform,zipf")
    p.add_argument("--bags", type=int, default=2048)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip shapes whose fp32 baselines together need more memory")
    p.add_argument("--quick", action="store_true", help="100k rows, D=64, uniform, 3 repeats")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--name", default="bench_train", help="the results' file name, no suffix")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.dims, a.dists, a.repeats, a.warmup = "100000", "64", "uniform", 3, 1
    gen = torch.Generator().manual_seed(0)
    results = []
    for rows in map(int, a.rows.split(",")):
        for dim in map(int, a.dims.split(",")):
            data = {d: make_batches(rows, a.bags, a.length, d, 4, gen) for d in a.dists.split(",")}
            grads = [torch.randn(a.bags, dim, generator=gen) * 1e-2 for _ in range(4)]
            if rows * dim * 4 * 6 > a.max_gb * 2**30:  # the three fp32 tables and states
                print(f"skipping {rows} x {dim}: fp32 baselines need more than --max-gb",
                      file=sys.stderr)
                continue
            built = {name: build() for name, build in methods(rows, dim)}
            for dist, batches in data.items():
                for name, t in time_steps(built, batches, grads, a.warmup, a.repeats).items():
                    r = dict(rows=rows, dim=dim, dist=dist, method=name, ms=t["step"] * 1e3,
                             bytes=built[name][1]())
                    line = f"{rows:>8} {dim:>4} {dist:>7} {name:<32} {t['step'] * 1e3:9.1f} ms"
                    if "forward" in t:
                        r.update({f"{part}_ms": t[part] * 1e3 for part in PARTS})
                        r["step_vs_forward"] = t["step"] / t["forward"]
                        line += ("  (forward {forward_ms:.2f}, backward {backward_ms:.2f}, "
                                 "update {update_ms:.2f} ms; step {step_vs_forward:.1f}x "
                                 "forward)").format(**r)
                    results.append(r)
                    print(line, flush=True)
            del built
    if not results:
        sys.exit("bench_train: every shape was skipped (raise --max-gb)")
    for r in results:
        base = next(x for x in results if x["rows"] == r["rows"] and x["dim"] == r["dim"]
                    and x["dist"] == r["dist"] and x["method"] == SPARSE_ADAM)
        r["speedup_vs_fp32_sparseadam"] = base["ms"] / r["ms"]
        r["bytes_vs_fp32_sparseadam"] = r["bytes"] / base["bytes"]
    write(results, a)


def targets_table(results) -> str:
    """Per shape, the ratios the training step is held to: each qembed step over its forward
    lookup (<= 5x), FBGEMM's and fp32 + SparseAdam's step over int8's (>= 3x, >= 5x), int4's
    step over int8's (<= 1x)."""
    lines = ["| rows | D | indices | int8 step / forward | int4 step / forward | "
             "fbgemm / int8 | fp32+SparseAdam / int8 | int4 / int8 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for shape in dict.fromkeys((r["rows"], r["dim"], r["dist"]) for r in results):
        got = {r["method"]: r for r in results if (r["rows"], r["dim"], r["dist"]) == shape}

        def ratio(num, den):
            return f"{got[num]['ms'] / got[den]['ms']:.2f}x" if num in got and den in got else ""
        forward = [f"{got[m]['step_vs_forward']:.1f}x" if m in got else "" for m in (INT8, INT4)]
        lines.append(f"| {shape[0]:,} | {shape[1]} | {shape[2]} | {forward[0]} | {forward[1]} | "
                     f"{ratio(FBGEMM, INT8)} | {ratio(SPARSE_ADAM, INT8)} | {ratio(INT4, INT8)} |")
    return "\n".join(lines)


def write(results, a):
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, torch threads "
              f"{torch.get_num_threads()}); torch {torch.__version__}; {stamp}\n"
              f"Command: `python {' '.join(sys.argv)}`\n"
              f"Batch: {a.bags} bags x {a.length} indices, mode sum; median of {a.repeats} steps "
              f"(forward + backward + update). For qembed the parts are also timed alone in "
              f"the same turns: forward lookup, backward (distinct rows and their gradients), "
              f"update; step / forward is the step time over the forward lookup's.\n")
    lines = ["| rows | D | indices | method | step ms | forward ms | backward ms | update ms | "
             "step / forward | speed-up vs fp32+SparseAdam | table+state MiB | "
             "memory vs fp32+SparseAdam |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        parts = " | ".join(f"{r[f'{part}_ms']:.2f}" if f"{part}_ms" in r else ""
                           for part in PARTS)
        ratio = f"{r['step_vs_forward']:.1f}x" if "step_vs_forward" in r else ""
        lines.append(f"| {r['rows']:,} | {r['dim']} | {r['dist']} | {r['method']} | "
                     f"{r['ms']:.1f} | {parts} | {ratio} | "
                     f"{r['speedup_vs_fp32_sparseadam']:.2f}x | "
                     f"{r['bytes'] / 2**20:.0f} | {r['bytes_vs_fp32_sparseadam']:.3f} |")
    table = "\n".join(lines) + "\n\n" + targets_table(results)
    print("\n" + header + "\n" + table)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, a.name + ("_quick" if a.quick else ""))
    with open(base + ".md", "w") as f:
        f.write("# Training step: qembed low-precision tables vs fp32\n\n" + header + "\n" + table + "\n")
    with open(base + ".csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in results for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(results)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    configs = sorted({(r["rows"], r["dim"], r["dist"]) for r in results})
    names = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [next((r["speedup_vs_fp32_sparseadam"] for r in results if r["method"] == name
                    and (r["rows"], r["dim"], r["dist"]) == c), 0) for c in configs]
        ax.bar([j + i * width for j in range(len(configs))], ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
    ax.set_xticklabels([f"{r // 1000}k x {d}\n{s}" for r, d, s in configs], fontsize=8)
    ax.set_ylabel("speed-up vs fp32 + SparseAdam")
    ax.axhline(1, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(f"Training step, {cpu_model()}, torch {torch.__version__}", fontsize=8)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=120)


if __name__ == "__main__":
    main()
