"""The accuracy experiment: train a CTR model with each kind of embedding table and compare
test AUC, log loss and table size.

Methods (``METHODS``) build the model's embedding table; each low-precision method runs at
every requested bit width:

* ``fp32``: an fp32 ``nn.Embedding`` (the baseline; trained once per seed).
* ``ptq``: the trained fp32 model with its table quantized afterwards (affine, row-wise).
* ``lpt-dr``, ``lpt-sr``: a table trained in low precision with a fixed step (LPT),
  re-quantized by deterministic (nearest) or stochastic rounding.
* ``alpt``: LPT with learned per-row steps and stochastic rounding (ALPT).
* ``mpe``: mixed-precision embeddings, once per ``mpe_lambdas`` value: search a width per
  frequency group on an fp32 table with the bit regulariser (``epochs``), sample, reset the
  table and retrain it packed at the sampled widths (``epochs``), export. Its ``bits`` is the
  average bits per value; its size counts codes, steps, beta and the row map.

Low-precision tables use Adam with the dense layers' learning rate by default, as the fp32
table does, so the methods differ only in how the table is stored and rounded
(``table_optimizer`` and ``table_lr`` change that for LPT and ALPT).
"""
from __future__ import annotations

import copy
import csv
import datetime
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..mpe import frequency_groups, report
from ..nn import LowPrecisionEmbedding, MixedPrecisionSearchEmbedding, quantize_, retrain_model
from . import data as qdata
from .models import MODELS, evaluate, fit


@dataclass
class Config:
    data: str | None = None  # None: synthetic
    synthetic_rows: int = 200_000
    min_count: int = 1  # rarer features share their field's out-of-vocabulary row
    model: str = "dnn"
    methods: list[str] = field(default_factory=lambda: ["fp32", "ptq", "lpt-sr", "alpt"])
    bits: list[int] = field(default_factory=lambda: [8, 4, 2])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 2
    patience: int | None = None  # stop after this many epochs without a better validation AUC
    batch_size: int = 512
    embedding_dim: int = 16
    lr: float = 1e-3
    # the low-precision tables' optimizer ("adam", "adagrad" row-wise, "sgd") and learning
    # rate (None: lr)
    table_optimizer: str = "adam"
    table_lr: float | None = None
    mpe_lambdas: list[float] = field(default_factory=lambda: [2e-6])
    mpe_groups: int = 128
    progress: bool = True
    # shard the low-precision methods' tables over the processes of torch.distributed's
    # default group (one table per field, .sharded): a sharding type or None
    sharding: str | None = None

    def __post_init__(self):
        if self.sharding and not all(m in ("lpt-dr", "lpt-sr", "alpt") for m in self.methods):
            raise ValueError("sharded runs train low-precision tables: methods lpt-dr, lpt-sr, "
                             f"alpt; got {self.methods}")


def table_bytes(module: nn.Module) -> int:
    """Bytes of a model's embedding table as served: packed rows and steps for quantized
    tables (optimizer state excluded), the weight for fp32."""
    emb = getattr(module, "module", module).embedding  # under DMP: the model it wraps
    if hasattr(emb, "qweight"):
        step = emb.step.numel() * 4 if emb.step is not None else 0
        return emb.qweight.numel() + step
    if hasattr(emb, "nbytes"):  # exported mixed-precision tables: codes, steps, row map
        return int(emb.nbytes)
    return emb.weight.numel() * emb.weight.element_size()


def _build(cfg: Config, splits, seed: int, factory=None) -> nn.Module:
    torch.manual_seed(seed)
    if cfg.sharding:
        from .sharded import FieldCollection

        field_dims, options = splits[0].field_dims, factory.options
        factory = lambda rows, dim: FieldCollection(field_dims, dim, **options)  # noqa: E731
    return MODELS[cfg.model](splits[0].field_dims, cfg.embedding_dim, embedding_factory=factory)


def _train(cfg: Config, splits, seed: int, factory=None) -> tuple[nn.Module, float]:
    model = _build(cfg, splits, seed, factory)
    if cfg.sharding:
        from .sharded import RankShare, shard_model

        model, splits = shard_model(model, cfg.sharding), (RankShare(splits[0]),) + splits[1:]
    return model, _fit(cfg, model, splits, seed)


def _fit(cfg: Config, model: nn.Module, splits, seed: int, regularizer=None) -> float:
    """Adam over the model's parameters (tables that update themselves have none); seconds."""
    train, valid, _ = splits
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    start = time.perf_counter()
    fit(model, train, valid, opt, epochs=cfg.epochs, batch_size=cfg.batch_size,
        patience=cfg.patience, seed=seed, progress=cfg.progress, regularizer=regularizer)
    return time.perf_counter() - start


def _mpe(cfg: Config, splits, seed: int) -> list[tuple[str, float, nn.Module, float]]:
    """Search, sample, retrain for every lambda: (label, average bits, model, seconds)."""
    groups = frequency_groups(splits[0].feature_counts(), num_groups=cfg.mpe_groups)
    out = []
    for lam in cfg.mpe_lambdas:
        search = _build(cfg, splits, seed, lambda rows, dim: MixedPrecisionSearchEmbedding(
            rows, dim, groups=groups, reg_lambda=lam))
        seconds = _fit(cfg, search, splits, seed, search.embedding.bit_loss)
        model = retrain_model(search, optimizer="adam", lr=cfg.lr)
        seconds += _fit(cfg, model, splits, seed)
        model.embedding = model.embedding.export()
        rep = report(model.embedding)
        if cfg.progress:
            print(f"mpe lambda {lam:g}: group bits {rep.group_bits}; average {rep.average_bits:.3f} "
                  f"bits; x{rep.compression:.1f} with the row locations, x{rep.code_compression:.1f} "
                  "without", flush=True)
        out.append((f"mpe(lambda={lam:g})", round(rep.average_bits, 3), model, seconds))
    return out


def _row(cfg, method, bits, seed, model, seconds, test) -> dict:
    fp32_bytes = sum(test.field_dims) * cfg.embedding_dim * 4
    nbytes = table_bytes(model)
    return {"method": method, "bits": bits, "seed": seed, **evaluate(model, test),
            "table_bytes": nbytes, "compression": fp32_bytes / nbytes, "train_s": seconds}


def run(cfg: Config) -> list[dict]:
    """Every method x bit width x seed; one result row each."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    synthetic = cfg.data in (None, "synthetic")
    dataset = qdata.load(cfg.data, **({"num_samples": cfg.synthetic_rows} if synthetic
                                       else {"progress": cfg.progress,
                                             "min_count": cfg.min_count}))
    rows = []
    for seed in cfg.seeds:
        splits = dataset.split(seed=seed)
        # ids by training frequency within each field, as a vocabulary built from the
        # training data numbers them (mixed-precision tables then need no row map)
        counts = splits[0].feature_counts()
        splits = tuple(s.renumbered(counts) for s in splits)
        baseline = None
        for method in cfg.methods:
            spec = METHODS[method]
            if spec.custom is not None:
                for label, bits, model, seconds in spec.custom(cfg, splits, seed):
                    rows.append(_row(cfg, label, bits, seed, model, seconds, splits[2]))
                    _print(cfg, rows[-1])
                continue
            for bits in ([32] if spec.full_precision else cfg.bits):
                if spec.from_baseline:
                    if baseline is None:
                        baseline = _train(cfg, splits, seed)
                    model, seconds = spec.build_from(copy.deepcopy(baseline[0]), bits), baseline[1]
                else:
                    model, seconds = _train(cfg, splits, seed, spec.factory(cfg, bits, seed))
                    if method == "fp32":
                        baseline = (model, seconds)
                rows.append(_row(cfg, method, bits, seed, model, seconds, splits[2]))
                _print(cfg, rows[-1])
    return rows


def _print(cfg: Config, r: dict) -> None:
    if cfg.progress:
        print(f"{r['method']:>8s} {r['bits']:>5g} bits seed {r['seed']}: AUC {r['auc']:.4f} "
              f"logloss {r['logloss']:.4f} x{r['compression']:.1f}", flush=True)


@dataclass
class Method:
    """How a method makes its table: a factory for a model trained from scratch, or a
    conversion of the trained fp32 baseline."""
    factory: Callable[[Config, int, int], Callable | None] | None = None
    build_from: Callable[[nn.Module, int], nn.Module] | None = None
    full_precision: bool = False
    # trains its own variants: (cfg, splits, seed) -> [(label, bits, model, seconds)]
    custom: Callable | None = None

    @property
    def from_baseline(self) -> bool:
        return self.build_from is not None


def _low_precision(learn_step: bool, rounding: str):
    def factory(cfg: Config, bits: int, seed: int):
        options = dict(bits=bits, optimizer=cfg.table_optimizer,
                       lr=cfg.lr if cfg.table_lr is None else cfg.table_lr,
                       learn_step=learn_step, rounding=rounding, seed=seed)
        make = lambda rows, dim: LowPrecisionEmbedding(rows, dim, **options)  # noqa: E731
        make.options = options  # a sharded run's per-field tables take the same
        return make
    return factory


METHODS: dict[str, Method] = {
    "fp32": Method(factory=lambda cfg, bits, seed: None, full_precision=True),
    "ptq": Method(build_from=lambda model, bits: quantize_(model, bits=bits)),
    "lpt-dr": Method(factory=_low_precision(False, "nearest")),
    "lpt-sr": Method(factory=_low_precision(False, "stochastic")),
    "alpt": Method(factory=_low_precision(True, "stochastic")),
    "mpe": Method(custom=_mpe),
}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and standard deviation over seeds) per method and bit width."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # mpe's bits are the searched average: one group per method, not per value
        key = (r["method"], r["bits"] if isinstance(r["bits"], int) else None)
        groups.setdefault(key, []).append(r)
    fp32 = {r["seed"]: r["auc"] for r in rows if r["method"] == "fp32"}
    out = []
    for (method, bits), rs in groups.items():
        aucs = [r["auc"] for r in rs]
        paired = [r["auc"] - fp32[r["seed"]] for r in rs if r["seed"] in fp32]
        if bits is None:
            bits = round(statistics.mean(r["bits"] for r in rs), 2)
        out.append({"method": method, "bits": bits, "seeds": len(rs),
                    "auc": statistics.mean(aucs),
                    "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                    # the same split and seed as fp32: removes the split-to-split spread
                    "auc_vs_fp32": statistics.mean(paired) if paired else float("nan"),
                    "logloss": statistics.mean(r["logloss"] for r in rs),
                    "table_MB": statistics.mean(r["table_bytes"] for r in rs) / 2**20,
                    "compression": statistics.mean(r["compression"] for r in rs),
                    "train_s": statistics.mean(r["train_s"] for r in rs)})
    return out


def claims(summary: list[dict]) -> list[dict]:
    """The published claims that the methods present can test, each with what was measured
    and whether it holds here."""
    auc = {(r["method"], r["bits"]): r["auc_vs_fp32"] for r in summary}
    checks = [("8-bit ALPT within 0.001 AUC of fp32", ("alpt", 8), None, -0.001)]
    for b in (4, 2):
        checks += [(f"{b}-bit: LPT with stochastic rounding beats deterministic rounding",
                    ("lpt-sr", b), ("lpt-dr", b), 0.0),
                   (f"{b}-bit: ALPT (learned step) beats LPT-SR (fixed step)",
                    ("alpt", b), ("lpt-sr", b), 0.0)]
    out = []
    for text, a, b, margin in checks:
        if a not in auc or (b is not None and b not in auc):
            continue
        diff = auc[a] - (auc[b] if b is not None else 0.0)
        out.append({"claim": text, "AUC difference (mean over seeds)": f"{diff:+.4f}",
                    "holds here": "yes" if diff > margin else "no"})
    return out


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) and k.startswith(("auc", "logloss"))
                 else f"{v:.3g}" if isinstance(v, float) else str(v) for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stamp() -> str:
    return (f"torch {torch.__version__}; date {datetime.date.today().isoformat()}; "
            f"command: `{' '.join(shlex.quote(a) for a in ['qembed'] + sys.argv[1:])}`")


def write(rows: list[dict], summary: list[dict], out_dir: str, name: str, title: str,
          origin: str | None = None) -> list[str]:
    """results CSV (every run), markdown summary (with the claims it can check) and a PNG
    plot of AUC against bits. ``origin`` replaces the command line in the stamp."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}{ext}") for ext in (".csv", ".md", ".png")]
    if origin is None:
        with open(paths[0], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    found = claims(summary)
    with open(paths[1], "w") as f:
        f.write(f"# {title}\n\n{origin or stamp()}\n\n{markdown(summary)}\n")
        if found:
            f.write("\n## Published claims\n\n" + markdown(found) + "\n")
    plot(summary, paths[2], title, origin)
    return paths


def read_csv(path: str) -> list[dict]:
    """Rows written by :func:`write`, with their numbers parsed."""
    def number(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    with open(path) as f:
        return [{k: number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot(summary: list[dict], path: str, title: str, origin: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r["method"] for r in summary):
        rs = sorted((r for r in summary if r["method"] == method), key=lambda r: r["bits"])
        if rs[0]["bits"] == 32:
            ax.axhline(rs[0]["auc"], color="black", ls="--", lw=1, label=f"{method}")
            continue
        ax.errorbar([r["bits"] for r in rs], [r["auc"] for r in rs],
                    yerr=[r["auc_std"] for r in rs], marker="o", capsize=3, label=method)
    ax.set_xlabel("bits per value")
    ax.set_ylabel("test AUC")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, origin or stamp(), fontsize=5)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
