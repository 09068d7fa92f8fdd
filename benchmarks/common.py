"""Shared pieces of the benchmark scripts: timing, index streams, result files."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:  # the model name, with family and model numbers: "AMD EPYC" names Zen 3 and Zen 4 alike
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                          if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            model += f" (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def stamp() -> str:
    """Where, when and how a result was produced."""
    return (f"device: {device_name()}; torch {torch.__version__}; "
            f"date: {datetime.date.today().isoformat()}; "
            f"command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")


def zipf_indices(n: int, num_rows: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Indices whose frequency falls as rank^-alpha; hot ids are scattered over the table."""
    ranks = torch.arange(1, num_rows + 1, dtype=torch.float64)
    probs = ranks.pow(-alpha)
    draws = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
    perm = torch.randperm(num_rows, generator=generator)
    return perm[draws]


def make_indices(dist: str, n: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    if dist == "uniform":
        return torch.randint(0, num_rows, (n,), generator=generator)
    if dist == "zipf":
        return zipf_indices(n, num_rows, 1.05, generator)
    raise ValueError(f"unknown index distribution {dist!r}")


def fp32_train_method(rows: int, dim: int, optimizer: str, device: str = "cpu"):
    """The fp32 baseline of the training-step benchmarks: nn.EmbeddingBag(sparse=True) with
    torch.optim.SparseAdam ("sparse_adam") or Adagrad; (step(idx, off, grad), nbytes())."""
    emb = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
    opt = (torch.optim.SparseAdam(emb.parameters(), lr=1e-3) if optimizer == "sparse_adam"
           else torch.optim.Adagrad(emb.parameters(), lr=0.01))

    def step(idx, off, grad):
        emb(idx, off).backward(grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def nbytes():
        state = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        return emb.weight.numel() * 4 + state
    return step, nbytes


def require_cuda_kernel(script: str, op: str) -> None:
    """Exits with a message unless a CUDA device is visible and qembed._C has a CUDA kernel for
    qembed::<op> (the GPU benchmarks time the compiled kernels)."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device visible to torch")
    import qembed

    if not (qembed.ops.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"qembed::{op}", "CUDA")):
        sys.exit(f"{script}: qembed._C has no CUDA kernel for {op}; build with "
                 "QEMBED_CUDA=1 python setup.py build_ext --inplace")


def interleaved_median_times(fns: dict, inputs: list, repeats: int, clock=time.perf_counter,
                             warmup: int = 2) -> dict:
    """Median seconds of each fn(*inputs[i]), timing the candidates in turn within every
    repeat, so that a change in the machine's load reaches all of them alike. The turn's
    order rotates from repeat to repeat: in a fixed order each candidate always ran after the
    same one, and one that followed a small-footprint candidate found its hot rows still in
    L3 while one that followed fp32 (32 MB of rows per call) found them evicted. With one
    thread, clock=time.thread_time counts only the time the lookup itself ran."""
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(warmup + repeats):
        args = inputs[i % len(inputs)]
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            fns[name](*args)
            if i >= warmup:
                times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def write_results(name: str, rows: list[dict], title: str, notes: str = "",
                  out_dir: str = RESULTS) -> str:
    """Writes <out_dir>/<name>.md and .csv (out_dir: results/ by default); returns the
    markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{stamp()}\n\n{notes}\n\n{table}\n")
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
