"""Command line: ``qembed train`` (the accuracy experiment, the default), ``qembed report``
and ``qembed bench`` (the benchmark scripts of a source checkout)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys

import torch

EXTRA = ("tqdm", "matplotlib")  # the `experiments` extra: progress bars, plots


def _train(args) -> int:
    from . import runner

    cfg = runner.Config(data=args.data, synthetic_rows=args.rows, min_count=args.min_count,
                            model=args.model, methods=args.methods,
                            bits=args.bits, seeds=args.seeds, epochs=args.epochs,
                            patience=args.patience,
                            batch_size=args.batch_size, embedding_dim=args.dim, lr=args.lr,
                            table_optimizer=args.table_optimizer, table_lr=args.table_lr,
                            mpe_lambdas=args.mpe_lambda, mpe_groups=args.mpe_groups,
                            progress=not args.quiet, sharding=args.sharding)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sharding:  # under torchrun: one process of the group
        import torch.distributed as dist

        dist.init_process_group("gloo")
        cfg.progress = cfg.progress and dist.get_rank() == 0
        writer = dist.get_rank() == 0  # every process computes the same results
        try:
            rows = runner.run(cfg)
        finally:
            dist.destroy_process_group()
        if not writer:
            return 0
    else:
        rows = runner.run(cfg)
    summary = runner.summarize(rows)
    print(runner.markdown(summary))
    name = args.name or f"accuracy_{os.path.splitext(os.path.basename(args.data or 'synthetic'))[0]}"
    title = f"{cfg.model.upper()} on {args.data or 'synthetic data'}: test AUC per method"
    for path in runner.write(rows, summary, args.out, name, title):
        print("wrote", path)
    return 0


def _report(args) -> int:
    from . import runner

    rows = runner.read_csv(args.csv)
    summary = runner.summarize(rows)
    print(runner.markdown(summary))
    out_dir, name = os.path.split(os.path.splitext(args.csv)[0])
    origin = (f"summary of {os.path.basename(args.csv)} by `qembed report`; the runs: "
              f"{args.runs or 'see the CSV'}")
    for path in runner.write(rows, summary, out_dir or ".", name, args.title, origin)[1:]:
        print("wrote", path)
    return 0


def _bench(args) -> int:
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = os.path.join(checkout, "benchmarks")
    script = os.path.join(root, f"bench_{args.which}.py")
    if not os.path.exists(script):
        print(f"qembed bench: {script} not found (benchmarks ship with the source checkout)",
              file=sys.stderr)
        return 2
    sys.argv = [script] + args.rest
    sys.path.insert(0, root)
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv=None) -> int:
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"qembed: the experiment needs {' and '.join(missing)}: "
              "pip install 'qembed[experiments]'", file=sys.stderr)
        return 2
    from .models import MODELS
    from .runner import METHODS

    parser = argparse.ArgumentParser(prog="qembed", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="accuracy experiment (default)")
    t.add_argument("--data", default=None,
                   help="path, or frappe / avazu / criteo from the data folder; default synthetic")
    t.add_argument("--rows", type=int, default=200_000, help="rows of the synthetic data")
    t.add_argument("--min-count", type=int, default=1,
                   help="features seen fewer times share one out-of-vocabulary row per field")
    t.add_argument("--model", default="dnn", choices=sorted(MODELS))
    t.add_argument("--methods", nargs="+", default=["fp32", "ptq", "lpt-sr", "alpt"], choices=sorted(METHODS))
    t.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2])
    t.add_argument("--seeds", nargs="+", type=int, default=[0])
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without a better validation AUC (best restored)")
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--dim", type=int, default=16, help="embedding dim")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the dense layers")
    t.add_argument("--table-optimizer", default="adam", choices=["adam", "adagrad", "sgd"],
                   help="optimizer of the low-precision tables (lpt-*, alpt)")
    t.add_argument("--table-lr", type=float, default=None,
                   help="learning rate of the low-precision tables (default: --lr)")
    t.add_argument("--mpe-lambda", nargs="+", type=float, default=[2e-6],
                   help="bit regulariser weights of the mpe method (one run each)")
    t.add_argument("--mpe-groups", type=int, default=128, help="frequency groups of mpe")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--sharding", default=None,
                   choices=["table_wise", "row_wise", "column_wise", "table_row_wise"],
                   help="under torchrun: shard the low-precision tables (one per field) over "
                        "the processes with TorchRec's DMP, the dense layers data-parallel "
                        "(table_bytes is then each process's share)")
    t.add_argument("--out", default="results", help="folder for CSV, markdown and PNG")
    t.add_argument("--name", default=None, help="file name stem of the results")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    r = sub.add_parser("report", help="summary table, claims and plot from a train CSV")
    r.add_argument("csv")
    r.add_argument("--title", default="test AUC per method")
    r.add_argument("--runs", default=None, help="how the runs were produced (for the stamp)")
    r.set_defaults(func=_report)
    b = sub.add_parser("bench", help="run benchmarks/bench_<which>.py of a source checkout")
    b.add_argument("which", choices=["lookup", "train"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(func=_bench)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "report", "bench", "-h", "--help"):
        argv = ["train"] + argv  # train is the default command
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
