"""The portable build against the native build on this CPU: pooled lookups, a mixed-width
lookup and low-precision training steps, each build in a worker process of its own, the two
timed in turns.

  python benchmarks/bench_portable.py            # 4M-row tables (training: 1M rows)
  python benchmarks/bench_portable.py --quick    # small smoke run

The portable build is the default one: every CPU kernel compiled for scalar, AVX2 and
AVX-512, the best chosen at load (csrc/README.md). The native build (QEMBED_NATIVE=1) compiles
everything with -march=native, as builds did before the variants; it runs only on CPUs like
this one. The script compiles both from the checkout into build/bench_portable/ (ninja keeps
the objects, so a rerun compiles only what changed), then starts one worker per build. The
workers set up the same tables and index batches (same seeds). In every repeat each case runs
on both builds, first one then the other, the order alternating from repeat to repeat, so
that a change in the machine's load reaches both alike. Reported: the median time per call of
each, the ratio portable / native of the medians, and the range of that ratio over repeats
(from each repeat's medians). Writes results/portable_vs_native.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDS = ("native", "portable")


# ---- the worker: one build's qembed, driven over stdin/stdout -------------------------------

def make_cases(a):
    """name -> (fn, list of argument tuples) for every case, built the same in each worker."""
    import torch

    import qembed
    from qembed import ops

    gen = torch.Generator().manual_seed(0)
    bags, length, n = a.bags, a.bag_len, a.bags * a.bag_len
    offsets = torch.arange(0, n, length)

    def batches(rows, count=4):
        return [torch.randint(0, rows, (n,), generator=gen) for _ in range(count)]

    cases = {}
    for dim in a.dims:
        weight = torch.randn(a.rows, dim, generator=gen)
        for bits in a.bits:
            table = qembed.QuantizedEmbeddingBag(a.rows, dim, mode="sum", _weight=weight,
                                                 bits=bits, format="affine")
            cases[f"lookup int{bits} D={dim}"] = (
                lambda idx, t=table: t(idx, offsets), [(i,) for i in batches(a.rows)])
        del weight
    # Mixed widths: a row map (int32) with every row at 2, 4 or 8 bits.
    dim = a.dims[0]
    widths = [2, 4, 8]
    row_bits = torch.tensor(widths)[torch.randint(0, 3, (a.rows,), generator=gen)]
    location = torch.empty(a.rows, dtype=torch.int32)
    segments, start = [], 0
    for b in widths:
        members = (row_bits == b).nonzero().flatten()
        location[members] = torch.arange(start, start + members.numel(), dtype=torch.int32)
        start += members.numel()
        segments.append(torch.randint(0, 256, (members.numel(), dim * b // 8), dtype=torch.uint8,
                                      generator=gen))
    steps, beta = torch.rand(3, generator=gen) + 0.1, torch.randn(dim, generator=gen)
    cases[f"mixed-width lookup (2/4/8 bits) D={dim}"] = (
        lambda idx: ops.mpe_embedding_bag(segments, widths, steps, beta, location, idx, offsets),
        [(i,) for i in batches(a.rows)])
    for dim in a.dims:
        grads = [torch.randn(bags, dim, generator=gen) * 1e-2 for _ in range(2)]
        for bits in a.bits:
            emb = qembed.LowPrecisionEmbeddingBag(a.train_rows, dim, mode="sum", bits=bits,
                                                  optimizer="adagrad")

            def step(idx, grad, e=emb):
                e(idx, offsets).backward(grad)
            cases[f"training step int{bits} D={dim}"] = (
                step, [(i, grads[k % 2]) for k, i in enumerate(batches(a.train_rows))])
    return cases


def worker(a) -> None:
    """Reads {"case": name, "calls": k} lines, answers with the k calls' times in seconds."""
    sys.path.insert(0, a.worker)
    import torch

    from qembed import _extension, ops

    torch.set_num_threads(a.threads)
    cases = make_cases(a)
    out = sys.stdout
    out.write(json.dumps({"capability": ops.cpu_capability(), "cases": list(cases),
                          "qembed": os.path.dirname(ops.__file__),
                          "native": bool((_extension.build_info() or {}).get("native"))}) + "\n")
    out.flush()
    turn = 0
    for line in sys.stdin:
        msg = json.loads(line)
        fn, inputs = cases[msg["case"]]
        times = []
        training = msg["case"].startswith("training")
        with contextlib.nullcontext() if training else torch.no_grad():
            for _ in range(msg["calls"]):
                args = inputs[turn % len(inputs)]
                turn += 1
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
        out.write(json.dumps(times) + "\n")
        out.flush()


# ---- the parent: build, start the workers, alternate ----------------------------------------

def build(kind: str, build_dir: str, jobs: int) -> str:
    """Compiles the checkout's extension as `kind` and puts the qembed package beside it;
    returns the folder to put on sys.path."""
    lib, temp = os.path.join(build_dir, kind, "lib"), os.path.join(build_dir, kind, "temp")
    env = dict(os.environ, QEMBED_NATIVE="1" if kind == "native" else "0", QEMBED_CUDA="0",
               MAX_JOBS=str(jobs))
    print(f"building the {kind} extension into {lib}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--build-lib", lib,
                    "--build-temp", temp], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    shutil.copytree(os.path.join(ROOT, "qembed"), os.path.join(lib, "qembed"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.json"))
    return lib


class Worker:
    def __init__(self, path: str, a):
        args = [sys.executable, os.path.abspath(__file__), "--worker", path,
                "--threads", str(a.threads), "--rows", str(a.rows), "--train-rows",
                str(a.train_rows), "--bags", str(a.bags), "--bag-len", str(a.bag_len),
                "--dims", *map(str, a.dims), "--bits", *map(str, a.bits)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd="/")
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, case: str, calls: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"case": case, "calls": calls}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def measure(workers: dict, repeats: int, calls: int) -> list[dict]:
    cases = workers["portable"].info["cases"]
    times = {(c, k): [] for c in cases for k in BUILDS}
    turn_ratios = {c: [] for c in cases}
    for case in cases:  # warm-up: page in the tables, let the allocators settle
        for w in workers.values():
            w.run(case, calls)
    for r in range(repeats):
        order = BUILDS if r % 2 == 0 else BUILDS[::-1]
        for case in cases:
            turn = {k: workers[k].run(case, calls) for k in order}
            for k in BUILDS:
                times[(case, k)] += turn[k]
            turn_ratios[case].append(statistics.median(turn["portable"]) /
                                     statistics.median(turn["native"]))
        print(f"repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        native = statistics.median(times[(case, "native")])
        portable = statistics.median(times[(case, "portable")])
        rows.append({"case": case, "native_ms": native * 1e3, "portable_ms": portable * 1e3,
                     "portable_vs_native": portable / native,
                     "range_over_repeats": f"{min(turn_ratios[case]):.3f}-"
                                           f"{max(turn_ratios[case]):.3f}"})
        print(f"{case:42s} native {native * 1e3:9.3f} ms  portable {portable * 1e3:9.3f} ms  "
              f"x{portable / native:.3f}", flush=True)
    return rows


def plot(rows, path, stamp_text):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [r["case"] for r in rows][::-1]
    ax.barh(names, [r["portable_vs_native"] for r in rows][::-1], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1.05, color="tab:red", lw=0.8, ls="--", label="5% slower")
    ax.set_xlabel("portable time / native time (lower is better)")
    ax.set_xlim(0.8, 1.2)
    ax.legend(fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    fig.text(0.01, 0.01, stamp_text, fontsize=5)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000, help="rows of the lookup tables")
    p.add_argument("--train-rows", type=int, default=1_000_000, help="rows of the trained tables")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--bags", type=int, default=2048)
    p.add_argument("--bag-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--calls", type=int, default=5, help="timed calls per case and turn")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    p.add_argument("--jobs", type=int, default=2, help="compile jobs")
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build", "bench_portable"))
    for kind in BUILDS:
        p.add_argument(f"--{kind}", metavar="PATH", help=f"a folder whose qembed (library built) "
                       f"is the {kind} build, instead of building one (e.g. . for the checkout)")
    p.add_argument("--quick", action="store_true", help="small tables, D = 64, few repeats")
    p.add_argument("--name", default="portable_vs_native")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.quick:
        a.rows, a.train_rows, a.dims, a.repeats, a.calls = 100_000, 100_000, [64], 3, 3
        a.name += "_quick"
    paths = {k: os.path.abspath(getattr(a, k)) if getattr(a, k) else build(k, a.build_dir, a.jobs)
             for k in BUILDS}
    workers = {k: Worker(paths[k], a) for k in BUILDS}
    try:
        for k, w in workers.items():
            print(f"{k}: qembed from {w.info['qembed']}, CPU kernels {w.info['capability']}",
                  file=sys.stderr)
            if w.info["native"] != (k == "native"):
                sys.exit(f"bench_portable: {w.info['qembed']} is not a {k} build")
        rows = measure(workers, a.repeats, a.calls)
    finally:
        for w in workers.values():
            w.close()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from common import RESULTS, stamp, write_results

    torch.set_num_threads(a.threads)  # the stamp names the workers' thread count

    notes = (f"Portable build: CPU kernels {workers['portable'].info['capability']} (chosen at "
             f"load); native build: -march=native throughout. Lookups: {a.rows:,} rows, "
             f"{a.bags} bags x {a.bag_len} uniform indices, mode sum (affine rows; mixed-width: "
             f"row map, a third of the rows at each width). Training steps: "
             f"LowPrecisionEmbeddingBag, {a.train_rows:,} rows, row-wise Adagrad, forward + "
             f"backward + fused update. {a.threads} thread(s) per worker; median of "
             f"{a.repeats} repeats x {a.calls} calls per build, the builds alternating.")
    print(write_results(a.name, rows, "Portable build vs native build (CPU)", notes))
    plot(rows, os.path.join(RESULTS, f"{a.name}.png"), stamp())
    return 0


if __name__ == "__main__":
    sys.exit(main())
