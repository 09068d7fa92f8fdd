"""Pooled lookup on a CUDA device: qembed at 8/4/2 bits vs nn.EmbeddingBag over fp32, fp16
and bf16 tables, and vs torch.ops.quantized's CUDA byte/4-bit kernels where they exist.

  python benchmarks/bench_lookup_gpu.py --out DIR            # R = 10M rows, D 64/128/256
  python benchmarks/bench_lookup_gpu.py --out DIR --quick    # small smoke run

Times are medians of CUDA-event timings after a warm-up, rotating through index batches
whose indices and rows together exceed L2. Effective bandwidth counts the 32-byte sectors
each lookup's row spans (a row read again is counted again, so Zipf's L2 hits can push it
past DRAM speed), the indices, the offsets and the output; it is also given as a fraction
of a device-to-device copy measured in the same run. Writes lookup_gpu.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

try:
    from common import make_indices, require_cuda_kernel, stamp, write_results
except ImportError:  # run as a module from the repository root
    from benchmarks.common import make_indices, require_cuda_kernel, stamp, write_results

AO_OPS = {8: "embedding_bag_byte_rowwise_offsets", 4: "embedding_bag_4bit_rowwise_offsets"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for lookup_gpu.{md,csv,png}")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--bags", type=int, default=65_536)
    p.add_argument("--bag-len", type=int, default=32)
    p.add_argument("--dists", nargs="+", default=["uniform", "zipf"])
    p.add_argument("--batches", type=int, default=4, help="index batches rotated through")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="100k rows, D 64, 4096 bags")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dims, args.bags, args.repeats = 100_000, [64], 4096, 10
    return args


def cuda_time(fn, inputs: list, repeats: int, warmup: int = 5) -> float:
    """Median seconds of fn(*inputs[i]) by CUDA events, rotating through the inputs."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), [()], 20)


def sector_bytes(indices: torch.Tensor, stride: int) -> int:
    """Bytes of the 32-byte sectors the rows of `indices` span, rows `stride` bytes apart."""
    first = indices * stride // 32
    last = (indices * stride + stride - 1) // 32
    return int((last - first + 1).sum()) * 32


def ao_lookup(bits: int, weight: torch.Tensor):
    """torch.ops.quantized's CUDA lookup over `weight`, or None where it does not exist."""
    try:
        from qembed import QuantizedEmbeddingBag

        op = getattr(torch.ops.quantized, AO_OPS[bits])
        module = QuantizedEmbeddingBag(weight.shape[0], weight.shape[1], bits=bits,
                                       format="affine", device="cuda")
        module.load_float_weight(weight)
        packed = module.to_torch_ao()
        del module
        lookup = lambda idx, off: op(packed, idx, off, False, 0, False, None, None, False)  # noqa: E731
        lookup(*_tiny_batch(weight.shape[0]))
        return lookup, packed.shape[1]
    except (KeyError, AttributeError, NotImplementedError, RuntimeError) as e:
        print(f"  torch.ops.quantized {bits}-bit on CUDA: not available ({type(e).__name__})")
        return None


def _tiny_batch(num_rows: int):
    return (torch.randint(0, num_rows, (8,), device="cuda"),
            torch.tensor([0, 4], device="cuda"))


def run(args) -> list[dict]:
    import qembed
    from qembed.formats import row_bytes

    gen = torch.Generator().manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    n = args.bags * args.bag_len
    offsets = torch.arange(0, n, args.bag_len, device="cuda")
    results = []
    for dim in args.dims:
        weight = torch.randn(args.rows, dim, device="cuda")
        for dist in args.dists:
            batches = [(make_indices(dist, n, args.rows, gen).cuda(), offsets)
                       for _ in range(args.batches)]
            out_bytes = lambda elem: args.bags * dim * elem  # noqa: E731
            io_bytes = n * 8 + offsets.numel() * 8

            def record(name, fn, stride, out_elem, baseline=None):
                t = cuda_time(fn, batches, args.repeats)
                moved = statistics.mean(sector_bytes(i, stride) for i, _ in batches)
                bw = (moved + io_bytes + out_bytes(out_elem)) / t
                row = dict(dim=dim, dist=dist, table=name, row_bytes=stride,
                           ms=t * 1e3, mlookups_s=n / t / 1e6, gb_s=bw / 1e9,
                           of_copy=bw / copy_bw, speedup_fp32=None)
                results.append(row)
                return row

            fp32 = record("fp32", lambda i, o: F.embedding_bag(i, weight, o, mode="sum"),
                          4 * dim, 4)
            for dtype, name in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
                w = weight.to(dtype)
                record(name, lambda i, o, w=w: F.embedding_bag(i, w, o, mode="sum"), 2 * dim, 2)
                del w
            for bits in args.bits:
                rows = qembed.ops.quantize(weight, bits, "affine")
                record(f"qembed int{bits}",
                       lambda i, o, r=rows, b=bits: qembed.ops.embedding_bag(r, i, o, b, dim),
                       row_bytes(dim, bits, "affine"), 4)
                del rows
                if bits in AO_OPS:
                    ao = ao_lookup(bits, weight)
                    if ao is not None:
                        record(f"torch.ao int{bits}", ao[0], ao[1], 4)
                    del ao
            for row in results:
                if row["dim"] == dim and row["dist"] == dist:
                    row["speedup_fp32"] = fp32["ms"] / row["ms"]
                    print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                           f"{k}={v}" for k, v in row.items()))
        torch.cuda.empty_cache()
    return results


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    configs = sorted({(r["dim"], r["dist"]) for r in results})
    tables = list(dict.fromkeys(r["table"] for r in results))
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(configs)), 4.5))
    width = 0.8 / len(tables)
    for k, table in enumerate(tables):
        ys = [next((r["speedup_fp32"] for r in results if (r["dim"], r["dist"]) == c
                    and r["table"] == table), 0) for c in configs]
        ax.bar([i + k * width for i in range(len(configs))], ys, width, label=table)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"D={d}\n{dist}" for d, dist in configs])
    ax.set_ylabel("speed-up over fp32 nn.EmbeddingBag")
    ax.set_title(f"Pooled lookup, {torch.cuda.get_device_name()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda_kernel("bench_lookup_gpu", "embedding_bag")
    print(stamp())
    results = run(args)
    notes = (f"R = {args.rows:,} rows, {args.bags:,} bags x {args.bag_len}, mode sum, int64 "
             f"indices, fp32 output (fp16/bf16 for those tables); qembed in the affine format. "
             f"gb_s: bytes of 32-byte sectors spanned by each looked-up row + indices + offsets "
             f"+ output, over the median time; of_copy: that over a device-to-device copy.")
    print(write_results("lookup_gpu", results, "Pooled lookup on GPU", notes, out_dir=args.out))
    plot(results, os.path.join(args.out, "lookup_gpu.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
