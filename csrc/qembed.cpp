// The one list of qembed's operator schemas. Kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// Importing qembed._C loads this library, which registers the operators.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(qembed, m) {
  // codes: uint8 [N, D] with values < 2^bits  ->  uint8 [N, D*bits/8]
  m.def("pack(Tensor codes, int bits) -> Tensor");
  // packed: uint8 [N, >= dim*bits/8]  ->  uint8 [N, dim]
  m.def("unpack(Tensor packed, int bits, int dim) -> Tensor");
  // weight: fp32 [N, D] -> packed rows uint8 [N, row_bytes] (layout.h). `step` ([N] or [1])
  // is required by the symmetric formats. Stochastic rounding draws the uniform for
  // element d of row i from (seed, counter, i, d).
  m.def(
      "quantize(Tensor weight, int bits, int fmt, Tensor? step, bool stochastic, int seed, "
      "int counter) -> Tensor");
  // packed rows -> fp32 [N, dim]
  m.def("dequantize(Tensor rows, int bits, int dim, int fmt, Tensor? step) -> Tensor");
  // Fused gather-dequantize-pool. mode: 0 sum, 1 mean, 2 none (one output row per index).
  m.def(
      "embedding_bag(Tensor rows, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor? step, int bits, int dim, int fmt, int mode, bool include_last_offset, "
      "int padding_idx, ScalarType output_dtype) -> Tensor");
}
