"""The CPU kernels' instruction-set variants (csrc/cpu/dispatch.h): the best one chosen at
load, QEMBED_CPU_CAPABILITY forcing another, bit-identical results across the variants,
AVX2/AVX-512 code only inside them; and the import's message where the library was built
against another torch release."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    CPU_CAPABILITIES,
    mixed_table,
    random_bags,
    random_table,
    search_inputs,
    supported_cpu_capabilities,
)

from qembed import _extension, formats, ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="needs the compiled extension")


def python(code: str, cwd: str = REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **env))


def each_variant(fn) -> dict:
    """fn()'s result under every variant this CPU runs."""
    chosen = ops.cpu_capability()
    out = {}
    try:
        for name in supported_cpu_capabilities():
            ops._C._set_cpu_capability(name)
            out[name] = fn()
    finally:
        ops._C._set_cpu_capability(chosen)
    return out


def assert_all_equal(results: dict):
    first, *rest = results
    for name in rest:
        a, b = results[first], results[name]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y), f"{name} differs from {first}"


def test_best_variant_chosen_at_load():
    supported = supported_cpu_capabilities()
    assert supported == [c for c in CPU_CAPABILITIES if c in supported] and "scalar" in supported
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "avx2" in supported or "avx512" not in supported  # avx512 implies avx2
    got = python("import qembed; print(qembed.ops.cpu_capability())", QEMBED_CPU_CAPABILITY="")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == supported[-1]


@pytest.mark.parametrize("name", CPU_CAPABILITIES)
def test_environment_forces_a_variant(name):
    got = python("import qembed; print(qembed.ops.cpu_capability())", QEMBED_CPU_CAPABILITY=name)
    if name in supported_cpu_capabilities():
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == name
    else:  # the import fails, saying what the variant needs and what this CPU runs
        assert got.returncode != 0
        assert f"ValueError: QEMBED_CPU_CAPABILITY: {name} " in got.stderr
        assert "scalar" in got.stderr.splitlines()[-1]


def test_unknown_variant_fails_the_import():
    got = python("import qembed", QEMBED_CPU_CAPABILITY="avx1024")
    assert got.returncode != 0
    assert ("ValueError: QEMBED_CPU_CAPABILITY: 'avx1024' is not a CPU capability (scalar, "
            "avx2 or avx512)") in got.stderr
    with pytest.raises(ValueError, match="'sse9' is not a CPU capability"):
        ops._C._set_cpu_capability("sse9")
    assert ops.cpu_capability() == supported_cpu_capabilities()[-1]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("dim", [16, 136, 264])
def test_lookups_bit_identical_across_variants(bits, dim):
    """Every variant sums each column in the same order with the same roundings (one fused
    multiply-add per value), so results agree bit for bit, in every output dtype."""
    for fmt in ("affine", "symmetric", "symmetric_table"):
        t = random_table(60, dim, bits, fmt)
        indices, offsets = random_bags(60, 25, max_len=40, padding_idx=7)
        psw = torch.randn(indices.numel())
        for mode, w in (("sum", psw), ("mean", None), ("none", psw)):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                assert_all_equal(each_variant(lambda: t.lookup(
                    indices, offsets, per_sample_weights=w, mode=mode, padding_idx=7,
                    output_dtype=dtype)))


@pytest.mark.parametrize("layout", ["map16", "map32", "ranges"])
def test_mixed_lookup_bit_identical_across_variants(layout):
    segments, seg_bits, steps, beta, location, _ = mixed_table(300, 200, [0, 1, 2, 5, 8], layout)
    indices, offsets = random_bags(300, 40, max_len=30)
    for mode in ("sum", "mean", "none"):
        assert_all_equal(each_variant(lambda: ops.mpe_embedding_bag(
            segments, seg_bits, steps, beta, location, indices, offsets, None, mode)))


@pytest.mark.parametrize("dim", [72, 20])
@pytest.mark.parametrize("fmt", ["symmetric", "symmetric_table"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_update_bit_identical_across_variants(optimizer, fmt, dim):
    """The training step, stochastic rounding and learnt steps included, gives the same codes,
    steps and optimizer state under every variant (at a dim that is not a multiple of 8 too)."""
    rows, bits = 200, 5
    table = torch.randint(0, 256, (rows, formats.row_bytes(dim, bits, fmt)), dtype=torch.uint8)
    if fmt == "symmetric":
        table[:, -4:] = (torch.rand(rows, 1) * 0.1 + 0.01).view(torch.uint8)
    step = torch.tensor([0.05]) if fmt == "symmetric_table" else None
    uniq = torch.randperm(rows)[:120].sort().values
    grad = torch.randn(120, dim)
    state = torch.rand(rows, {"sgd": 0, "adagrad": 1, "adam": 2 * dim}[optimizer])
    step_state = torch.rand(rows if fmt == "symmetric" else 1, 2)

    def update():
        t, s, st, sst = table.clone(), None if step is None else step.clone(), state.clone(), \
            step_state.clone()
        ops.lowp_update(t, s, st, sst, uniq, grad, bits=bits, dim=dim, fmt=fmt,
                        optimizer=optimizer, lr=0.05, eps=1e-6, weight_decay=0.01,
                        betas=(0.8, 0.99), iteration=3, learn_step=True, step_optimizer="adam",
                        step_lr=1e-3, stochastic=True, seed=11, counter=5)
        return (t, st, sst) + (() if s is None else (s,))
    results = each_variant(update)
    assert_all_equal(results)
    assert not torch.equal(results["scalar"][0], table)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_codecs_and_gradients_bit_identical_across_variants(bits):
    """quantize (stochastic rounding), dequantize, the lookup's backward and its gradient with
    respect to per-sample weights."""
    dim = 40
    w = torch.randn(300, dim)
    steps = w.abs().amax(1) / formats.qmax(bits) + 1e-3
    for fmt, step in (("affine", None), ("symmetric", steps), ("symmetric_table", steps[:1])):
        rows = each_variant(lambda: ops.quantize(w, bits, fmt, step, True, 3, 7))
        assert_all_equal(rows)
        table_step = step if fmt == "symmetric_table" else None
        assert_all_equal(each_variant(lambda: ops.dequantize(rows["scalar"], bits, dim, fmt,
                                                             table_step)))
    t = random_table(300, dim, bits, "affine")
    indices, offsets = random_bags(300, 50, max_len=30, padding_idx=3)
    grad_out = torch.randn(50, dim)
    for mode in ("sum", "mean"):
        assert_all_equal(each_variant(lambda: ops.embedding_bag_backward(
            grad_out, indices, offsets, mode=mode, padding_idx=3)))
    assert_all_equal(each_variant(lambda: ops.embedding_bag_psw_backward(
        grad_out, t.rows, indices, offsets, bits, dim, "affine", padding_idx=3)))


def test_mpe_search_bit_identical_across_variants():
    weight, row_group, logits, alpha, beta = search_inputs(rows=200, dim=40)
    probs = torch.softmax(logits, 1)
    bits = [0, 1, 2, 3, 4, 5, 6]
    indices, offsets = random_bags(200, 30, max_len=20)
    for mode in ("sum", "mean", "none"):
        assert_all_equal(each_variant(lambda: ops.mpe_search_forward(
            weight, indices, None if mode == "none" else offsets, row_group, probs, alpha, beta,
            bits, mode)))
    unique = torch.arange(0, 200, 3)
    grad_rows = torch.randn(unique.numel(), 40)
    assert_all_equal(each_variant(lambda: ops.mpe_search_backward(
        weight, unique, grad_rows, row_group, probs, alpha, beta, bits, 999)))


def test_isa_code_stays_in_its_variants():
    """scripts/check_isa_code.py on the library in use: AVX2/AVX-512 instructions only in
    qembed::avx2 and qembed::avx512 functions."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    if (_extension.build_info() or {}).get("native"):
        pytest.skip("a native build (QEMBED_NATIVE=1) compiles everything for this CPU")
    got = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "check_isa_code.py"),
                          ops._C.__file__], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-3000:]


def test_mismatch_names_both_releases_and_the_rebuild():
    info = {"torch": "2.12.1+cpu", "cuda_kernels": False}
    message = _extension.mismatch(info, "2.13.0+cpu", None)
    assert "built against torch 2.12.1+cpu" in message
    assert "torch 2.13.0+cpu is installed" in message
    assert "pip install --no-build-isolation" in message
    assert _extension.mismatch(info, "2.12.1+cu130", "13.0") is None  # same release
    assert _extension.mismatch(None, "2.13.0", None) is None  # nothing recorded
    cuda = _extension.mismatch({"torch": "2.14.1+cu130", "cuda_kernels": True}, "2.14.1+cpu", None)
    assert "has no CUDA" in cuda


def test_import_fails_clearly_when_built_against_another_torch(tmp_path):
    """A copy of the package whose library records another torch release: importing it fails
    with an ImportError naming both releases, before the library is loaded."""
    package = os.path.dirname(os.path.abspath(ops.__file__))
    copy = tmp_path / "qembed"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    os.symlink(ops._C.__file__, copy / os.path.basename(ops._C.__file__))
    info = dict(_extension.build_info() or {}, torch="1.13.1+cpu")
    (copy / "_build_info.json").write_text(json.dumps(info))
    got = python("import qembed", cwd=str(tmp_path))
    assert got.returncode != 0
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qembed's compiled kernels (qembed._C) were built "
                           "against torch 1.13.1+cpu")
    assert f"but torch {torch.__version__} is installed" in last and "rebuild" in last
    (copy / "_build_info.json").write_text(json.dumps(dict(info, torch=str(torch.__version__))))
    assert python("import qembed", cwd=str(tmp_path)).returncode == 0
