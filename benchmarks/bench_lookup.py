"""Pooled lookup on CPU: fp32 nn.EmbeddingBag vs qembed at 8/4/2 bits vs torch.ops.quantized
(FBGEMM's kernels) and fbgemm-gpu-cpu's int-N tables where installed.

  python benchmarks/bench_lookup.py            # R = 4M rows, D in {64, 128}
  python benchmarks/bench_lookup.py --quick    # small smoke run

Prints a table and writes results/lookup_cpu.{md,csv,png}. Times are medians over repeats
that time every method in turn (so that the shared machine's changing load reaches all of
them alike), rotating through several index batches; every ratio is against fp32 (and
time_vs_torch_ao against torch.ops.quantized at the same width) in the same run.
Effective GB/s counts the bytes a lookup must read: each row in full (its 64-byte cache
lines are not counted separately), the indices and the output.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import qembed
from qembed.formats import row_bytes

try:
    from common import RESULTS, interleaved_median_times, make_indices, stamp, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import RESULTS, interleaved_median_times, make_indices, stamp, write_results

AO_OPS = {8: "embedding_bag_byte", 4: "embedding_bag_4bit", 2: "embedding_bag_2bit"}


def ao_candidates(weight: torch.Tensor, bits_list):
    out = {}
    for bits in bits_list:
        prepack = getattr(torch.ops.quantized, AO_OPS[bits] + "_prepack")
        lookup = getattr(torch.ops.quantized, AO_OPS[bits] + "_rowwise_offsets")
        packed = prepack(weight)
        out[f"torch.ao int{bits}"] = (
            lambda idx, off, p=packed, f=lookup: f(p, idx, off, mode=0),
            packed.numel() * packed.element_size(), packed.shape[1])
    return out


def fbgemm_candidates(weight: torch.Tensor, bits_list):
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception:  # not installed, or built for another torch
        return {}
    types = {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}
    out = {}
    rows, dim = weight.shape
    for bits in bits_list:
        emb = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[("t", rows, dim, types[bits], EmbeddingLocation.HOST)],
            device="cpu")
        emb.fill_random_weights()
        nbytes = sum(t.numel() * t.element_size() for t in emb.split_embedding_weights()[0]
                     if t is not None)
        out[f"fbgemm int{bits}"] = (
            lambda idx, off, e=emb: e(idx.int(), torch.cat([off, off.new_tensor([idx.numel()])]).int()),
            nbytes, nbytes // rows)
    return out


def run(num_rows: int, dims, bags: int, bag_len: int, repeats: int, batches: int, bits_list):
    gen = torch.Generator().manual_seed(0)
    results = []
    for dim in dims:
        weight = torch.randn(num_rows, dim, generator=gen)
        cands = {"fp32 nn.EmbeddingBag": (
            lambda idx, off, w=weight: F.embedding_bag(idx, w, off, mode="sum"),
            weight.numel() * 4, dim * 4)}
        for bits in bits_list:
            table = qembed.QuantizedEmbeddingBag(num_rows, dim, mode="sum", _weight=weight,
                                                 bits=bits, format="affine")
            cands[f"qembed int{bits}"] = (lambda idx, off, t=table: t(idx, off), table.nbytes,
                                          row_bytes(dim, bits, "affine"))
        cands.update(ao_candidates(weight, bits_list))
        cands.update(fbgemm_candidates(weight, bits_list))
        del weight
        for dist in ("uniform", "zipf"):
            inputs = []
            for _ in range(batches):
                idx = make_indices(dist, bags * bag_len, num_rows, gen)
                inputs.append((idx, torch.arange(0, bags * bag_len, bag_len)))
            with torch.no_grad():
                times = interleaved_median_times({k: v[0] for k, v in cands.items()}, inputs,
                                                 repeats)
            base = times["fp32 nn.EmbeddingBag"]
            for name, (fn, nbytes, row_b) in cands.items():
                t = times[name]
                n = bags * bag_len
                moved = n * row_b + n * 8 + bags * dim * 4
                bits = name.rsplit("int", 1)[-1]
                ao = times.get(f"torch.ao int{bits}")
                results.append({
                    "D": dim, "indices": dist, "method": name,
                    "time_ms": t * 1e3, "Mlookups/s": n / t / 1e6, "GB/s": moved / t / 1e9,
                    "speedup_vs_fp32": base / t,
                    "time_vs_torch_ao": t / ao if ao and name.startswith("qembed") else "",
                    "table_MB": nbytes / 2**20})
                print(f"D={dim:4d} {dist:8s} {name:22s} {t*1e3:8.3f} ms  x{base/t:5.2f}",
                      flush=True)
        del cands
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["D"], r["indices"]) for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ys = [next((r["speedup_vs_fp32"] for r in results if (r["D"], r["indices"]) == c
                    and r["method"] == m), 0) for c in configs]
        ax.bar([i + j * width for i in range(len(configs))], ys, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"D={d}, {dist}" for d, dist in configs])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("speed-up over fp32 nn.EmbeddingBag")
    ax.set_title("Pooled lookup on CPU (higher is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    fig.text(0.01, 0.01, stamp(), fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bags", type=int, default=2048)
    p.add_argument("--bag-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", type=int, default=5, help="index batches rotated through")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quick", action="store_true", help="small table, few repeats")
    p.add_argument("--name", default="lookup_cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.rows, a.repeats, a.batches, a.name = 100_000, 5, 2, a.name + "_quick"
    results = run(a.rows, a.dims, a.bags, a.bag_len, a.repeats, a.batches, a.bits)
    notes = (f"R = {a.rows:,} rows, {a.bags} bags x {a.bag_len} indices, mode sum, "
             f"median of {a.repeats} interleaved runs over {a.batches} index batches.")
    print(write_results(a.name, results, "Pooled lookup on CPU", notes))
    plot(results, os.path.join(RESULTS, f"{a.name}.png"))


if __name__ == "__main__":
    main()
