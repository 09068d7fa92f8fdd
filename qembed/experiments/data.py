"""CTR data: loaders for libFM, Avazu CSV and Criteo TSV files, a synthetic generator, and the
common result type :class:`CTRDataset` (per-field ids, labels, splits, batches).

Every file loader streams its input twice, line by line: the first pass counts each field's
values, the second encodes them. Within a field, values seen at least ``min_count`` times get
ids ``1, 2, ...`` in order of decreasing count (ties by value), so low ids are frequent
features; id ``0`` is the field's out-of-vocabulary (OOV) id, shared by rare values and, when
a file is encoded with another file's ``vocab``, by values that vocabulary lacks. A field of
``k`` kept values thus has ``field_dims[f] = k + 1`` ids. Counting runs over all rows before
any split (the usual preprocessing of the public benchmarks); to build the vocabulary from
training rows only, load the training file alone and pass its ``vocab`` to the others.

Files ending in ``.gz`` are decompressed on the fly.
"""
from __future__ import annotations

import datetime
import functools
import gzip
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

PathLike = str | os.PathLike
Vocab = list[dict[str, int]]

_CHUNK = 1 << 16  # rows parsed per batch of column-wise counting / encoding


@dataclass
class CTRDataset:
    """Labelled rows of categorical features.

    ``x``: int64 [N, F], ``x[:, f]`` in ``[0, field_dims[f])`` (0 is the field's OOV id for
    loaded files); ``y``: float32 [N] in {0, 1}; ``vocab[f]`` maps a raw value of field ``f``
    to its id (None for synthetic data).
    """

    x: torch.Tensor
    y: torch.Tensor
    field_dims: list[int]
    field_names: list[str] | None = None
    vocab: Vocab | None = None

    def __post_init__(self):
        if self.x.dim() != 2 or self.x.dtype != torch.int64:
            raise ValueError(f"x must be an int64 [N, F] tensor, got {self.x.dtype} "
                             f"{tuple(self.x.shape)}")
        if self.y.shape != self.x.shape[:1]:
            raise ValueError(f"y must have shape [{self.x.shape[0]}], got {tuple(self.y.shape)}")
        self.field_dims = [int(d) for d in self.field_dims]
        if len(self.field_dims) != self.x.shape[1]:
            raise ValueError(f"{len(self.field_dims)} field_dims for {self.x.shape[1]} fields")
        if self.field_names is None:
            self.field_names = [f"f{i}" for i in range(self.num_fields)]
        if len(self.field_names) != self.num_fields:
            raise ValueError(f"{len(self.field_names)} field_names for {self.num_fields} fields")
        if len(self) and ((self.x.amin(0) < 0).any()
                          or (self.x.amax(0) >= self.x.new_tensor(self.field_dims)).any()):
            raise ValueError("x holds ids outside [0, field_dims[f])")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_fields(self) -> int:
        return self.x.shape[1]

    @property
    def offsets(self) -> torch.Tensor:
        """Start of each field's ids in one shared table of ``sum(field_dims)`` rows."""
        return torch.tensor([0] + self.field_dims[:-1]).cumsum(0)

    def feature_counts(self) -> torch.Tensor:
        """Occurrences of each row of the shared table (length ``sum(field_dims)``)."""
        rows = self.x + self.offsets.to(self.x.device)
        return torch.bincount(rows.flatten(), minlength=sum(self.field_dims))

    def renumbered(self, counts: torch.Tensor) -> CTRDataset:
        """The same rows with each field's ids renumbered by decreasing ``counts`` (over the
        shared table, as :meth:`feature_counts` gives them; ties keep their order), id 0 (the
        OOV id) kept. Renumber every split by the training split's counts: frequency groups
        are then runs of consecutive ids within each field, which a mixed-precision table
        locates with a few hundred row ranges instead of a map entry per row."""
        counts = counts.reshape(-1).cpu()
        if counts.numel() != sum(self.field_dims):
            raise ValueError(f"counts has {counts.numel()} entries for a table of "
                             f"{sum(self.field_dims)} rows")
        new_ids, start = [], 0
        for dim in self.field_dims:
            order = torch.sort(counts[start + 1:start + dim], descending=True, stable=True).indices
            ids = torch.zeros(dim, dtype=torch.long)
            ids[order + 1] = torch.arange(1, dim)
            new_ids.append(ids)
            start += dim
        x = torch.stack([ids.to(self.x.device)[self.x[:, f]] for f, ids in enumerate(new_ids)], 1) \
            if self.num_fields else self.x
        vocab = None if self.vocab is None else [
            {value: int(ids[i]) for value, i in field.items()}
            for field, ids in zip(self.vocab, new_ids)]
        return CTRDataset(x, self.y, self.field_dims, self.field_names, vocab)

    def subset(self, index: torch.Tensor) -> CTRDataset:
        return CTRDataset(self.x[index], self.y[index], self.field_dims, self.field_names,
                          self.vocab)

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1),
              seed: int = 0) -> tuple[CTRDataset, ...]:
        """Disjoint random parts covering all rows, sized by ``fractions`` (summing to 1);
        the same seed gives the same parts."""
        if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        bounds = [round(len(self) * f) for f in itertools.accumulate(fractions)]
        bounds[-1] = len(self)
        return tuple(self.subset(perm[a:b].to(self.x.device))
                     for a, b in zip([0] + bounds[:-1], bounds))

    def batches(self, batch_size: int, shuffle: bool = False,
                seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches of at most ``batch_size`` rows, in a seeded random order when
        ``shuffle`` (vary the seed per epoch)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = None
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
            order = order.to(self.x.device)
        for start in range(0, len(self), batch_size):
            if order is None:
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                yield self.x[index], self.y[index]

    def to(self, device: torch.device | str) -> CTRDataset:
        return CTRDataset(self.x.to(device), self.y.to(device), self.field_dims,
                          self.field_names, self.vocab)


# --- file loaders ---------------------------------------------------------------------------

Parser = Callable[[str], tuple[float, list[str]]]


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _label(token: str, labels: dict[str, float]) -> float:
    value = labels.get(token)
    if value is None:
        raise ValueError(f"label {token!r} is not one of {sorted(labels)}")
    return value


_BINARY_LABELS = {"0": 0.0, "1": 1.0}
_LIBFM_LABELS = {"1": 1.0, "+1": 1.0, "-1": 0.0, "0": 0.0}


def _rows(paths: Sequence[Path], parse: Parser, num_fields: int, header: bool, desc: str,
          progress: bool, total: int | None = None
          ) -> Iterator[tuple[list[list[str]], list[float]]]:
    """Parsed rows in chunks of ``(tokens per row, labels)``; errors name file and line."""
    with tqdm(total=total, desc=desc, unit=" rows", unit_scale=True, disable=not progress) as bar:
        for path in paths:
            with _open(path) as lines:
                if header:
                    next(lines, None)
                rows, labels = [], []
                for lineno, line in enumerate(lines, 1 + header):
                    try:
                        label, tokens = parse(line)
                        if len(tokens) != num_fields:
                            raise ValueError(f"expected {num_fields} features, got {len(tokens)}")
                    except ValueError as e:
                        raise ValueError(f"{path}:{lineno}: {e}") from None
                    rows.append(tokens)
                    labels.append(label)
                    if len(rows) == _CHUNK:
                        yield rows, labels
                        bar.update(len(rows))
                        rows, labels = [], []
                if rows:
                    yield rows, labels
                    bar.update(len(rows))


def _vocabulary(counts: Counter, min_count: int) -> dict[str, int]:
    kept = sorted((item for item in counts.items() if item[1] >= min_count),
                  key=lambda item: (-item[1], item[0]))
    return {value: i for i, (value, _) in enumerate(kept, 1)}


def _encode(paths: Sequence[Path], parse: Parser, names: list[str], header: bool,
            min_count: int, vocab: Vocab | None, progress: bool, desc: str) -> CTRDataset:
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if vocab is not None and len(vocab) != len(names):
        raise ValueError(f"vocab has {len(vocab)} fields, the data {len(names)}")
    counts = [Counter() for _ in names] if vocab is None else None
    n = 0
    for rows, _ in _rows(paths, parse, len(names), header, f"{desc}: counting", progress):
        n += len(rows)
        if counts is not None:
            for counter, column in zip(counts, zip(*rows)):
                counter.update(column)
    if n == 0:
        raise ValueError(f"qembed: no data rows in {', '.join(map(str, paths))}")
    if vocab is None:
        vocab = [_vocabulary(c, min_count) for c in counts]
    x = np.empty((n, len(names)), dtype=np.int64)
    y = np.empty(n, dtype=np.float32)
    i = 0
    for rows, labels in _rows(paths, parse, len(names), header, f"{desc}: encoding", progress,
                              total=n):
        for f, (ids, column) in enumerate(zip(vocab, zip(*rows))):
            x[i:i + len(rows), f] = np.fromiter(map(ids.get, column, itertools.repeat(0)),
                                                dtype=np.int64, count=len(rows))
        y[i:i + len(rows)] = labels
        i += len(rows)
    return CTRDataset(torch.from_numpy(x), torch.from_numpy(y), [len(v) + 1 for v in vocab],
                      names, vocab)


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("qembed: no data files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"qembed: no such data file: {path}")
    return paths


def load_libfm(paths: PathLike | Sequence[PathLike], min_count: int = 1,
               vocab: Vocab | None = None, progress: bool = True) -> CTRDataset:
    """libFM / libSVM lines ``label idx:1 idx:1 ...`` (label 1 or -1; 0/+1 also accepted)
    with one-hot fields: the ``f``-th ``idx`` of a line is field ``f``'s value, so every line
    must have the same number of features. Several files are read as one data set."""
    paths = _as_paths(paths)
    with _open(paths[0]) as f:
        first = f.readline().split()
    if not first:
        raise ValueError(f"{paths[0]}:1: empty line")
    num_fields = len(first) - 1

    def parse(line: str) -> tuple[float, list[str]]:
        parts = line.split()
        if not parts:
            raise ValueError("empty line")
        tokens = [item[:-2] for item in parts[1:] if item.endswith(":1")]
        if len(tokens) != len(parts) - 1 or not all(tokens):
            bad = next(i for i in parts[1:] if not i.endswith(":1") or i == ":1")
            raise ValueError(f"expected a one-hot feature 'index:1', got {bad!r}")
        return _label(parts[0], _LIBFM_LABELS), tokens

    names = [f"field{i}" for i in range(num_fields)]
    return _encode(paths, parse, names, False, min_count, vocab, progress, paths[0].name)


@functools.lru_cache(maxsize=4096)
def _hour_fields(hour: str) -> tuple[str, str]:
    """``YYMMDDHH`` -> (hour of day, weekday 0 = Monday)."""
    if len(hour) != 8 or not hour.isdigit():
        raise ValueError(f"hour {hour!r} is not YYMMDDHH")
    day = datetime.date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]))
    return hour[6:], str(day.weekday())


def load_avazu(path: PathLike, min_count: int = 1, vocab: Vocab | None = None,
               split_hour: bool = True, progress: bool = True) -> CTRDataset:
    """Avazu CSV with a header naming the label column ``click``; every other column but
    ``id`` (a row id) is a categorical field. With ``split_hour`` the ``hour`` column
    (``YYMMDDHH``) becomes two fields, hour of day and weekday, which recur across days
    where the raw value never does (the data spans ten days); otherwise it is kept as is."""
    path, = _as_paths(path)
    with _open(path) as f:
        header = f.readline().rstrip("\r\n").split(",")
    if "click" not in header:
        raise ValueError(f"{path}:1: the header has no 'click' column: {header[:4]}...")
    label_col = header.index("click")
    columns = [i for i, name in enumerate(header) if name not in ("id", "click")]
    names = [header[i] for i in columns]
    hour = names.index("hour") if split_hour and "hour" in names else None
    if hour is not None:
        names[hour:hour + 1] = ["hour_of_day", "weekday"]

    def parse(line: str) -> tuple[float, list[str]]:
        parts = line.rstrip("\r\n").split(",")
        if len(parts) != len(header):
            raise ValueError(f"expected {len(header)} columns, got {len(parts)}")
        tokens = [parts[i] for i in columns]
        if hour is not None:
            tokens[hour:hour + 1] = _hour_fields(tokens[hour])
        return _label(parts[label_col], _BINARY_LABELS), tokens

    return _encode([path], parse, names, True, min_count, vocab, progress, path.name)


@functools.lru_cache(maxsize=1 << 20)
def criteo_bucket(value: str) -> str:
    """Criteo integer feature -> its bucket: ``floor(log(v)^2)`` for ``v > 2``, else ``v``;
    an empty (missing) value stays empty and so gets its own id."""
    if not value:
        return value
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"integer feature {value!r} is not an integer") from None
    return str(int(math.log(v) ** 2)) if v > 2 else str(v)


CRITEO_FIELDS = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def load_criteo(path: PathLike, min_count: int = 1, vocab: Vocab | None = None,
                progress: bool = True) -> CTRDataset:
    """Criteo TSV without header: label, 13 integer columns (bucketised by
    :func:`criteo_bucket`), 26 hashed categorical columns; empty values are missing."""
    path, = _as_paths(path)
    num_columns = 1 + len(CRITEO_FIELDS)

    def parse(line: str) -> tuple[float, list[str]]:
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != num_columns:
            raise ValueError(f"expected {num_columns} tab-separated columns, got {len(parts)}")
        return (_label(parts[0], _BINARY_LABELS),
                [criteo_bucket(v) for v in parts[1:14]] + parts[14:])

    return _encode([path], parse, CRITEO_FIELDS, False, min_count, vocab, progress, path.name)


# --- synthetic data ---------------------------------------------------------------------------

def synthetic(num_samples: int = 200_000,
              field_dims: Sequence[int] = (2000, 1000, 500, 200, 100, 50, 20, 10),
              latent_dim: int = 4, zipf_exponent: float = 1.1, signal: float = 2.0,
              positive_rate: float = 0.25, seed: int = 0) -> CTRDataset:
    """Synthetic CTR rows, the same for the same arguments. The defaults (200k rows, a table
    of 3,880 rows) train a DNN for an epoch in seconds on one CPU core.

    Field ``f``'s values follow a Zipf law (the k-th most frequent has probability
    proportional to ``k^-zipf_exponent``; which ids are frequent is random). A hidden
    factorization machine with random weights and ``latent_dim``-dimensional factors gives
    each row a logit, scaled to standard deviation ``signal`` and shifted so the mean click
    probability is ``positive_rate``; labels are Bernoulli draws of those probabilities.
    """
    if num_samples <= 0 or not field_dims or min(field_dims) <= 0:
        raise ValueError("synthetic: num_samples and every field dim must be positive")
    if not 0 < positive_rate < 1:
        raise ValueError(f"synthetic: positive_rate must be in (0, 1), got {positive_rate}")
    g = torch.Generator().manual_seed(seed)
    columns = []
    for dim in field_dims:
        weights = torch.arange(1, dim + 1, dtype=torch.float64).pow(-zipf_exponent)
        ranks = torch.multinomial(weights, num_samples, replacement=True, generator=g)
        columns.append(torch.randperm(dim, generator=g)[ranks])
    x = torch.stack(columns, 1)
    rows = x + torch.tensor([0] + list(field_dims[:-1])).cumsum(0)
    first_order = torch.randn(sum(field_dims), generator=g)
    factors = torch.randn(sum(field_dims), latent_dim, generator=g)
    v = factors[rows]
    pairwise = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
    logit = first_order[rows].sum(1) + pairwise
    logit = (logit - logit.mean()) / logit.std() * signal
    # bisection for the bias that gives the requested mean click probability
    low, high = -30.0, 30.0
    for _ in range(60):
        bias = (low + high) / 2
        if torch.sigmoid(logit + bias).mean() < positive_rate:
            low = bias
        else:
            high = bias
    y = torch.bernoulli(torch.sigmoid(logit + bias), generator=g).float()
    return CTRDataset(x, y, list(field_dims))


# --- finding and picking data ----------------------------------------------------------------

def data_dir() -> Path | None:
    """The shared data folder: ``$QEMBED_DATA`` if set, else ``shared/data`` beside the
    repository (``<clone>/../shared/data``) or beside the working directory; None where
    absent."""
    if os.environ.get("QEMBED_DATA"):
        candidates = [Path(os.environ["QEMBED_DATA"])]
    else:
        candidates = [Path(__file__).resolve().parents[2].parent / "shared" / "data",
                      Path.cwd().resolve().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


LOADERS = {".libfm": load_libfm, ".libsvm": load_libfm, ".csv": load_avazu,
           ".txt": load_criteo, ".tsv": load_criteo}
NAMED = {"frappe": "frappe*.libfm", "avazu": "avazu*.csv", "criteo": "criteo*"}


def _format_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def load(source: PathLike | Sequence[PathLike] | None = None, **kwargs) -> CTRDataset:
    """Load data by name or path; keyword arguments go to the loader.

    ``None`` or ``"synthetic"``: :func:`synthetic`. ``"frappe"``, ``"avazu"``,
    ``"criteo"``: the matching files in :func:`data_dir` (Frappe's files are read as one set).
    A path (or list of libFM paths) picks the loader by extension (``.gz`` aside): ``.libfm``
    and ``.libsvm`` libFM, ``.csv`` Avazu, ``.txt`` and ``.tsv`` Criteo.
    """
    if source is None or source == "synthetic":
        return synthetic(**kwargs)
    if isinstance(source, str) and source in NAMED:
        root = data_dir()
        files = sorted(root.glob(NAMED[source])) if root is not None else []
        if not files:
            raise FileNotFoundError(f"qembed: no {source} files ({NAMED[source]}) in the data "
                                    f"folder {root} (set QEMBED_DATA)")
        source = files
    paths = _as_paths(source)
    suffix = _format_suffix(paths[0])
    loader = LOADERS.get(suffix)
    if loader is None:
        raise ValueError(f"qembed: unknown data format {suffix!r} of {paths[0]}; "
                         f"known: {sorted(LOADERS)} or a name in {sorted(NAMED)}")
    if any(_format_suffix(p) != suffix for p in paths):
        raise ValueError(f"qembed: files of different formats: {[str(p) for p in paths]}")
    if loader is load_libfm:
        return loader(paths, **kwargs)
    if len(paths) > 1:
        raise ValueError(f"qembed: {loader.__name__} reads one file, got {len(paths)}")
    return loader(paths[0], **kwargs)
