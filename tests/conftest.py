"""What qembed's tests share: the backends an op runs on, parameter grids, random tables,
bags and training inputs, and comparisons.

Every test starts from torch's global generator seeded by its own node id (the autouse
fixture below), so each test case sees fresh random data that is reproducible run to run.

An op's tests take the backend as a parameter (:func:`backends`, :func:`backend_cases`):
``cpu`` and ``reference`` run everywhere; ``triton-interpreter`` runs the Triton kernels on
CPU tensors in Triton's interpreter, on machines without a CUDA device (and with triton);
``cuda`` and ``triton-cuda`` need a CUDA device and are marked ``gpu`` (the Triton ones also
``triton``), so ``-m gpu`` selects what benchmarks/gpu_run.sh runs on a GPU machine.

The ``cpu`` backend runs once per CPU kernel variant (csrc/cpu/dispatch.h: scalar, avx2,
avx512; ids ``cpu_<variant>``), those this CPU cannot run skipped; the run's header and
summary say which ran. ``BACKENDS["cpu"]``, the oracle some tests compare with, runs the
variant chosen when qembed loaded.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from qembed import formats, ops, reference  # noqa: E402

BITS = list(range(1, 9))
FORMATS = ["affine", "symmetric", "symmetric_table"]
DIMS = [8, 16, 64, 128, 136]
MODES = ["sum", "mean", "none"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]

# One thread per test process: pytest-xdist already fills the cores, and two OpenMP threads
# per worker on a busy 2-core machine make small ops 100x slower. The multi-threaded paths of
# the kernels are exercised by test_quantize.py::test_results_independent_of_thread_count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# --- CPU kernel variants --------------------------------------------------------------------

CPU_CAPABILITIES = ["scalar", "avx2", "avx512"]


def supported_cpu_capabilities() -> list[str]:
    """The CPU kernel variants this build has and this CPU runs (scalar alone without the
    extension, where every op runs the reference)."""
    return ops._C.supported_cpu_capabilities() if ops.HAS_EXTENSION else ["scalar"]


@contextlib.contextmanager
def forced_cpu_capability(name: str):
    """The CPU kernels of one instruction set, then again the one chosen when qembed loaded."""
    if not ops.HAS_EXTENSION:
        yield
        return
    chosen = ops.cpu_capability()
    ops._C._set_cpu_capability(name)
    try:
        yield
    finally:
        ops._C._set_cpu_capability(chosen)


def cpu_devices() -> list:
    """pytest parameters of the device "cpu", once per CPU kernel variant (the test runs under
    it), for tests that take a device rather than a backend."""
    supported = supported_cpu_capabilities()
    return [pytest.param("cpu", id=f"cpu_{c}", marks=[
        pytest.mark.cpu_variant(c),
        pytest.mark.skipif(c not in supported, reason=f"this CPU (or build) cannot run the {c} "
                           "kernels")]) for c in CPU_CAPABILITIES]


@pytest.fixture(autouse=True)
def _cpu_variant(request):
    marker = request.node.get_closest_marker("cpu_variant")
    if marker is None:
        yield
        return
    with forced_cpu_capability(marker.args[0]):
        yield


@pytest.fixture(params=CPU_CAPABILITIES, ids=[f"cpu_{c}" for c in CPU_CAPABILITIES])
def cpu_capability(request):
    """Runs a test that calls the CPU kernels directly (no backend parameter) under one CPU
    kernel variant, skipped where the CPU lacks it."""
    name = request.param
    if name not in supported_cpu_capabilities():
        pytest.skip(f"this CPU (or build) cannot run the {name} kernels")
    with forced_cpu_capability(name):
        yield name


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_variant(name): runs the test under that CPU kernel "
                            "variant (cpu_devices)")


def pytest_report_header(config):
    supported = supported_cpu_capabilities()
    missing = [c for c in CPU_CAPABILITIES if c not in supported]
    return (f"qembed CPU kernels: {ops.cpu_capability() or 'not built (reference)'} chosen; "
            f"tests run {', '.join(supported)}"
            + (f"; {', '.join(missing)} skipped (not supported here)" if missing else ""))


def pytest_terminal_summary(terminalreporter):
    """How many tests ran (passed or failed) and were skipped under each CPU variant."""
    ran = {c: 0 for c in CPU_CAPABILITIES}
    skipped = dict(ran)
    for key, counts in (("passed", ran), ("failed", ran), ("skipped", skipped)):
        for report in terminalreporter.stats.get(key, []):
            m = re.search(r"\bcpu_(scalar|avx2|avx512)\b", getattr(report, "nodeid", ""))
            if m and (key != "passed" or report.when == "call"):
                counts[m.group(1)] += 1
    if any(ran.values()) or any(skipped.values()):
        terminalreporter.write_line(
            "qembed CPU kernel variants: " + ", ".join(
                f"{c} {ran[c]} run" + (f", {skipped[c]} skipped" if skipped[c] else "")
                for c in CPU_CAPABILITIES))


# --- backends -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """Where a test runs an op: the tensors' device and the route :mod:`qembed.ops` takes."""

    name: str
    device: str
    route: str | None = None  # None: by device; "reference" or "triton": forced
    cpu_capability: str | None = None  # the CPU kernel variant forced; None: the one chosen

    @property
    def triton(self) -> bool:
        return self.route == "triton"

    @property
    def interpreted(self) -> bool:
        """Triton's interpreter: exact but slow, so its tests take small shapes."""
        return self.triton and self.device == "cpu"

    def context(self):
        if self.route == "reference":
            return ops.use_reference()
        if self.route == "triton":
            return ops.use_triton()
        if self.cpu_capability is not None:
            return forced_cpu_capability(self.cpu_capability)
        return contextlib.nullcontext()

    def to(self, x):
        """x on this backend's device: a tensor, or a list or tuple of them (None passes)."""
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        if isinstance(x, (list, tuple)):
            return [self.to(t) for t in x]
        return x

    def run(self, fn, *args, **kwargs):
        """fn with its tensor arguments moved to the device, on this backend's route."""
        args = [self.to(a) for a in args]
        kwargs = {k: self.to(v) for k, v in kwargs.items()}
        with self.context():
            return fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


BACKENDS = {b.name: b for b in (Backend("cpu", "cpu"), Backend("reference", "cpu", "reference"),
                                Backend("cuda", "cuda"),
                                Backend("triton-interpreter", "cpu", "triton"),
                                Backend("triton-cuda", "cuda", "triton"))}
_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_NEEDS_TRITON = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton")
_MARKS = {
    "cpu": [], "reference": [],
    "cuda": [pytest.mark.gpu, _NEEDS_CUDA],
    "triton-interpreter": [
        pytest.mark.triton, _NEEDS_TRITON,
        pytest.mark.skipif(not _INTERPRETER, reason="Triton's interpreter runs where no CUDA "
                           "device is (TRITON_INTERPRET=1)"),
        # the interpreter computes with numpy, which warns about the NaN and inf fed in
        pytest.mark.filterwarnings("ignore::RuntimeWarning")],
    "triton-cuda": [pytest.mark.gpu, pytest.mark.triton, _NEEDS_CUDA, _NEEDS_TRITON,
                    pytest.mark.skipif(_INTERPRETER, reason="runs compiled Triton kernels")],
}
# embedding_bag and lowp_update have Triton kernels too; the other ops compiled ones only.
TRITON_OP_BACKENDS = ["cpu", "triton-interpreter", "cuda", "triton-cuda"]
COMPILED_BACKENDS = ["cpu", "cuda"]


def _expand(name: str) -> list:
    """(backend, id, marks) of a backend name: ``cpu`` once per CPU kernel variant."""
    if name != "cpu":
        return [(BACKENDS[name], name, _MARKS[name])]
    supported = supported_cpu_capabilities()
    return [(Backend("cpu", "cpu", cpu_capability=c), f"cpu_{c}",
             [pytest.mark.skipif(c not in supported,
                                 reason=f"this CPU (or build) cannot run the {c} kernels")])
            for c in CPU_CAPABILITIES]


def backends(*names: str) -> list:
    """pytest parameters of the named backends, with their marks."""
    return [pytest.param(b, marks=marks, id=i) for n in names for b, i, marks in _expand(n)]


def _param_id(value) -> str:
    if isinstance(value, torch.dtype):
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int32: "int32", torch.int64: "int64"}.get(value, str(value))
    if isinstance(value, (list, tuple)):
        return "-".join(_param_id(v) for v in value)
    return str(value)


def backend_cases(names, thin=(), **axes):
    """``("backend,<axes>", params)`` for ``pytest.mark.parametrize``: each backend of
    ``names`` with the product of ``axes`` (name -> values). A Triton backend compiles a kernel
    (or, interpreted, runs slowly) per specialisation, so it takes the product of the axes not
    in ``thin`` with one value of each axis in ``thin``, taken in turn from case to case; the
    compiled kernels take every combination."""
    keys = list(axes)
    full = [k for k in keys if k not in thin]
    params = []
    for backend, name, marks in (e for n in names for e in _expand(n)):
        for i, combo in enumerate(itertools.product(*(axes[k] for k in full))):
            if backend.triton:
                rest = [tuple(axes[k][i % len(axes[k])] for k in thin)]
            else:
                rest = itertools.product(*(axes[k] for k in thin))
            for tail in rest:
                values = {**dict(zip(full, combo)), **dict(zip(thin, tail))}
                row = [values[k] for k in keys]
                params.append(pytest.param(backend, *row, marks=marks,
                                           id="-".join([name] + [_param_id(v) for v in row])))
    return "backend," + ",".join(keys), params


# --- comparisons ----------------------------------------------------------------------------

def assert_close(actual, expected, dtype=torch.float32):
    """fp32: float reordering only; fp16/bf16: one rounding of the fp32 result (1 ulp). Either
    side may be on any device."""
    assert actual.dtype == dtype
    actual, expected = actual.cpu(), expected.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.float(), expected.to(dtype).float(), rtol=eps, atol=1e-4)


def same(a, b):
    """Bit-exact equality (NaN equal to NaN, either side on any device), None equal to None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return torch.equal(a, b)


@dataclass
class Table:
    """A packed table with what a lookup needs besides the rows."""

    rows: torch.Tensor
    bits: int
    dim: int
    fmt: str
    step: torch.Tensor | None = None  # only for "symmetric_table"

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize(self.rows, self.bits, self.dim, self.fmt, self.step)

    def lookup(self, indices, offsets, impl=ops, **kwargs) -> torch.Tensor:
        """``impl.embedding_bag`` (ops or reference) over this table."""
        return impl.embedding_bag(self.rows, indices, offsets, self.bits, self.dim, self.fmt,
                                  self.step, **kwargs)


def _f32_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.uint8)


def random_table(num_rows: int, dim: int, bits: int, fmt: str) -> Table:
    """Random bytes as codes (and padding), random positive steps/scales and biases, chosen
    so that values stay of order 1 at every bit width."""
    rows = torch.randint(0, 256, (num_rows, formats.row_bytes(dim, bits, fmt)), dtype=torch.uint8)
    po, levels = formats.param_offset(dim, bits), float(1 << bits)
    spread = torch.rand(num_rows, 1) + 0.5
    step = None
    if fmt == "affine":
        rows[:, po:] = _f32_bytes(torch.cat([spread / (levels - 1), torch.randn(num_rows, 1)], 1))
    elif fmt == "symmetric":
        rows[:, po:] = _f32_bytes(spread * 2 / levels)
    else:
        step = (torch.rand(1) + 0.5) * 2 / levels
    return Table(rows, bits, dim, fmt, step)


def random_steps(weight: torch.Tensor, bits: int, per_row: bool = True) -> torch.Tensor:
    """Symmetric steps that cover most of each row (some values clip), jittered at random."""
    peak = weight.abs().amax(1) if per_row else weight.abs().amax().reshape(1)
    jitter = 0.7 + 0.6 * torch.rand(peak.shape)
    return (peak * jitter / max(formats.qmax(bits), 1)).clamp(min=1e-3).to(torch.float32)


def random_bags(num_rows: int, num_bags: int, max_len: int = 5,
                index_dtype: torch.dtype = torch.int64, offset_dtype: torch.dtype | None = None,
                include_last_offset: bool = False, padding_idx: int | None = None):
    """indices, offsets of ``num_bags`` bags of 0..max_len random rows (so some bags are
    empty); about a quarter of the entries hit ``padding_idx`` when one is given."""
    lengths = torch.randint(0, max_len + 1, (num_bags,))
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.cat([starts, lengths.sum().reshape(1)]) if include_last_offset else starts
    indices = torch.randint(0, num_rows, (int(lengths.sum()),))
    if padding_idx is not None:
        indices[torch.rand(indices.shape) < 0.25] = padding_idx
    return indices.to(index_dtype), offsets.to(offset_dtype or index_dtype)


def random_psw(n: int) -> torch.Tensor:
    return torch.randn(n)


def bag_lengths(offsets: torch.Tensor, num_indices: int, include_last_offset: bool = False):
    """Length of each bag, as nn.EmbeddingBag reads ``offsets``."""
    if include_last_offset:
        return offsets[1:] - offsets[:-1]
    return torch.cat([offsets[1:], offsets.new_tensor([num_indices])]) - offsets


def pool_per_bag(per_index: torch.Tensor, offsets: torch.Tensor, mean: bool = False,
                 include_last_offset: bool = False) -> torch.Tensor:
    """Sum (or mean) over each bag of a per-index quantity, e.g. an error bound."""
    lengths = bag_lengths(offsets, per_index.numel(), include_last_offset)
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    out = torch.zeros(lengths.numel()).index_add_(0, bag, per_index[: bag.numel()])
    return out / lengths.clamp(min=1) if mean else out


# --- training ops ---------------------------------------------------------------------------

STATE_WIDTH = {"sgd": lambda d: 0, "adagrad": lambda d: 1, "adam": lambda d: 2 * d,
               "none": lambda d: 0}


def make_table(rows, dim, bits, fmt, gen):
    """A symmetric table with random steps and codes spread over the whole range, and its
    step ([1] for symmetric_table, else None)."""
    steps = torch.rand(rows if fmt == "symmetric" else 1, generator=gen) * 0.05 + 0.01
    w = torch.randn(rows, dim, generator=gen) * steps.view(-1, 1) * (formats.qmax(bits) + 1) * 0.6
    table = ops.quantize(w, bits, fmt, steps)
    return table, (steps.clone() if fmt == "symmetric_table" else None)


def make_batch(rows, bags, gen, dtype=torch.int64):
    """indices, offsets of `bags` bags of 0..8 random rows."""
    lengths = torch.randint(0, 9, (bags,), generator=gen)
    indices = torch.randint(0, rows, (int(lengths.sum()),), generator=gen, dtype=dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).to(dtype)
    return indices, offsets


def run_update(impl, table, step, state, step_state, uniq, grad, **kw):
    """impl (a lowp_update) on copies of the tensors it updates: (table, step, state,
    step_state, skipped count)."""
    t, s, st, sst = table.clone(), None if step is None else step.clone(), state.clone(), \
        step_state.clone()
    skipped = impl(t, s, st, sst, uniq, grad, **kw)
    return t, s, st, sst, int(skipped)


# --- mixed-precision embeddings -------------------------------------------------------------

MPE_BITS = [0, 1, 2, 3, 4, 5, 6]
LAYOUTS = ["map16", "map32", "ranges"]


def search_inputs(rows=60, dim=16, groups=5, bits=MPE_BITS):
    """An MPE search's fp32 table, row groups, logits, alpha and beta."""
    weight = torch.randn(rows, dim) * 0.1
    alpha = (torch.rand(len(bits)) * 0.04 + 0.01)  # some values clip at every width
    beta = torch.randn(dim) * 0.02
    logits = torch.randn(groups, len(bits))
    row_group = torch.randint(0, groups, (rows,))
    return weight, row_group, logits, alpha, beta


def mixed_table(rows, dim, widths, layout="map32"):
    """Random segments (padded rows for some widths), steps, beta and the rows' locations:
    a row map with rows at random positions, or row ranges (random runs of one width, each
    run at a random place in its width's segment). Also returns the positions (int64 [R],
    -1 pruned) that the locations describe."""
    if layout == "ranges":
        cuts = torch.randperm(rows - 1)[: max(rows // 6, 1)].add(1).sort().values.tolist()
        runs = list(zip([0] + cuts, cuts + [rows]))
        run_bits = torch.tensor(widths)[torch.randint(0, len(widths), (len(runs),))].tolist()
    else:
        row_bits = torch.tensor(widths)[torch.randint(0, len(widths), (rows,))]
        perm = torch.randperm(rows)
    segments, steps, positions, start = [], [], torch.full((rows,), -1), 0
    seg_bits = sorted(set(widths) - {0})
    ranges = []
    for b in seg_bits:
        if layout == "ranges":
            mine = [runs[i] for i in torch.randperm(len(runs)).tolist() if run_bits[i] == b]
            for first, next_ in mine:
                positions[first:next_] = torch.arange(start, start + next_ - first)
                ranges.append((first, start))
                start += next_ - first
            n = sum(next_ - first for first, next_ in mine)
        else:
            members = perm[row_bits[perm] == b]
            positions[members] = torch.arange(start, start + members.numel())
            start += members.numel()
            n = members.numel()
        width = formats.code_bytes(dim, b) + int(torch.randint(0, 3, ()))
        segments.append(torch.randint(0, 256, (n, width), dtype=torch.uint8))
        steps.append(float(torch.rand(())) + 0.1)
    if layout == "ranges":
        ranges += [(first, -1) for (first, _), b in zip(runs, run_bits) if b == 0]
        location = torch.tensor(sorted(ranges) + [(rows, -1)], dtype=torch.int32)
    else:
        location = positions.to(torch.int16 if layout == "map16" else torch.int32)
    return segments, seg_bits, torch.tensor(steps), torch.randn(dim), location, positions


# --- many tables in one call (embedding_bags) -----------------------------------------------

class KeyedBatch:
    """Random tables and a key-major batch over them (TorchRec's KeyedJaggedTensor layout):
    feature f reads table ``tables_of[f]``; by default its block of the output follows the
    previous feature's."""

    def __init__(self, specs, tables_of, batch, max_len=4, poolings=None, weighted=False,
                 index_dtype=torch.int64, offset_dtype=None):
        """specs: (rows, dim, bits, format) per table."""
        self.tables = [random_table(rows, dim, bits, fmt) for rows, dim, bits, fmt in specs]
        self.tables_of = list(tables_of)
        self.poolings = poolings or ["sum"] * len(tables_of)
        self.sample(batch, max_len, weighted, index_dtype, offset_dtype)
        dims = [self.tables[t].dim for t in tables_of]
        self.columns = [sum(dims[:f]) for f in range(len(dims))]

    def sample(self, batch, max_len=4, weighted=False, index_dtype=torch.int64,
               offset_dtype=None):
        """A new batch of ``batch`` bags per feature, 0..max_len ids each."""
        self.batch = batch
        lengths = torch.randint(0, max_len + 1, (len(self.tables_of), batch))
        values = [torch.randint(0, self.tables[t].rows.shape[0], (int(lengths[f].sum()),))
                  for f, t in enumerate(self.tables_of)]
        self.values = torch.cat(values).to(index_dtype)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                                  lengths.reshape(-1).cumsum(0)]).to(offset_dtype or index_dtype)
        self.weights = torch.randn(self.values.numel()) if weighted else None
        return self

    @property
    def width(self) -> int:
        return sum(self.tables[t].dim for t in self.tables_of)

    def table_args(self):
        """tables, steps (empty where the format has none), bits, dims, formats."""
        return ([t.rows for t in self.tables],
                [t.step if t.step is not None else torch.empty(0) for t in self.tables],
                [t.bits for t in self.tables], [t.dim for t in self.tables],
                [t.fmt for t in self.tables])

    def lookup_args(self):
        """embedding_bags' arguments but the output dtype."""
        return (*self.table_args(), self.tables_of, self.columns, self.poolings, self.values,
                self.offsets, self.weights)

    def feature(self, f):
        """(values, offsets with the end, weights) of feature f alone."""
        off = self.offsets.long()[f * self.batch: (f + 1) * self.batch + 1]
        start, end = int(off[0]), int(off[-1])
        w = None if self.weights is None else self.weights[start:end]
        return self.values[start:end], (off - start).to(self.offsets.dtype), w


def mixed_specs(bits_list, dims=(8, 20, 64, 3, 24), fmts=FORMATS):
    """(rows, dim, bits, format) of tables of the given widths, dims and formats in turn."""
    return [(int(torch.randint(1, 300, ())), dims[i % len(dims)], b, fmts[i % len(fmts)])
            for i, b in enumerate(bits_list)]


def training_state(t: Table, optimizer: str, step_optimizer: str | None) -> dict:
    """A symmetric table with random optimizer state, as a dict of embedding_bags_update's
    per-table arguments."""
    rows = t.rows.shape[0]
    step_state = torch.rand(rows if t.fmt == "symmetric" else 1,
                            2 if step_optimizer == "adam" else 0)
    return dict(rows=t.rows, step=t.step if t.step is not None else torch.empty(0),
                state=torch.rand(rows, STATE_WIDTH[optimizer](t.dim)), step_state=step_state,
                bits=t.bits, dim=t.dim, fmt=t.fmt)


def trainable_tables(specs):
    """Symmetric tables with random steps and optimizer state (training_state); specs:
    (rows, dim, bits, format, optimizer, step optimizer or None)."""
    return [training_state(random_table(rows, dim, bits, fmt), optimizer, step_optimizer)
            for rows, dim, bits, fmt, optimizer, step_optimizer in specs]
