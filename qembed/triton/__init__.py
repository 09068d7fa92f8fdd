"""Triton kernels of ``embedding_bag`` (:mod:`.embedding_bag`) and ``lowp_update``
(:mod:`.lowp_update`): the GPU path without compiled CUDA kernels. Each module holds the op's
kernels and its entry point of the same name; :mod:`.common` what they share.

The entry points take the arguments of their ``torch.ops.qembed`` schemas (csrc/qembed.cpp)
and compute what the CPU kernels compute: the lookup up to float reordering of its sums (mode
``"none"`` exactly), the update bit for bit (codes, steps, optimizer state; the same Philox
stream for stochastic rounding). :mod:`qembed.ops` decides when they run (see its docstring):
on CUDA tensors when the extension has no CUDA kernel for the op, and on any device inside
``qembed.ops.use_triton()``; on CPU tensors that needs ``TRITON_INTERPRET=1`` set before
triton is imported, which is how the tests run them.

Argument checks (:mod:`qembed._checks`) raise the CPU kernels' exceptions. Checking the values
of indices, offsets and ``unique_rows`` needs them on the host: on a CUDA device that costs a
synchronisation, so there (as in the CUDA kernels) out-of-range indices and rows are skipped
and offsets clamped without a word unless ``QEMBED_CUDA_VALIDATE=1``; on CPU tensors they are
always checked.
"""
