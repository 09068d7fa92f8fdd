// The one list of qembed's operator schemas. Kernels register per device in cpu/ and cuda/.
// The Python module qembed._C also says which CPU kernel variant runs (cpu/dispatch.h).
#include <Python.h>
#include <torch/library.h>
#include <string>
#include "cpu/dispatch.h"
#include "cpu/result_cache.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(qembed::cpu::capability_name(qembed::cpu::capability()));
}

PyObject* supported_cpu_capabilities(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  for (auto c : {qembed::cpu::Capability::kScalar, qembed::cpu::Capability::kAvx2,
                 qembed::cpu::Capability::kAvx512})
    if (qembed::cpu::supported(c)) {
      PyObject* name = PyUnicode_FromString(qembed::cpu::capability_name(c));
      PyList_Append(names, name);
      Py_DECREF(name);
    }
  return names;
}

// For tests: run the kernels in another variant from now on.
PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string error = qembed::cpu::set_capability(name);
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cached_result_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(qembed::cached_result_bytes());
}

PyObject* empty_result_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(qembed::empty_result_cache());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set the CPU kernels run in: scalar, avx2 or avx512."},
    {"supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS,
     "The CPU kernel variants this build has and this CPU runs, lowest first."},
    {"_set_cpu_capability", set_cpu_capability, METH_O,
     "Run the CPU kernels in the given variant (tests)."},
    {"cached_result_bytes", cached_result_bytes, METH_NOARGS,
     "Bytes of freed CPU op results held for reuse."},
    {"empty_result_cache", empty_result_cache, METH_NOARGS,
     "Return the held memory of freed CPU op results to the system; the bytes released."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing qembed._C loads this library, which registers the operators, and chooses the CPU
// kernels' variant: an unknown or unsupported QEMBED_CPU_CAPABILITY fails the import.
extern "C" PyObject* PyInit__C(void) {
  const std::string error = qembed::cpu::choose_capability();
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  try {
    qembed::result_allocator();  // reads QEMBED_RESULT_CACHE_MB: a bad value fails the import
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(qembed, m) {
  // codes: uint8 [N, D] with values < 2^bits  ->  uint8 [N, code_bytes(D, bits)] (layout.h)
  m.def("pack(Tensor codes, int bits) -> Tensor");
  // packed: uint8 [N, >= code_bytes(dim, bits)]  ->  uint8 [N, dim]
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
  // Gradient of embedding_bag with respect to the rows it read, one row per distinct index:
  // (unique_rows int64 [U] ascending, grad_rows fp32 [U, D]); padding_idx rows left out.
  m.def(
      "embedding_bag_backward(Tensor grad_out, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int mode, bool include_last_offset, int padding_idx) "
      "-> (Tensor, Tensor)");
  // Gradient of embedding_bag with respect to per_sample_weights: fp32 [num indices].
  m.def(
      "embedding_bag_psw_backward(Tensor grad_out, Tensor rows, Tensor indices, "
      "Tensor offsets, Tensor? step, int bits, int dim, int fmt, int mode, "
      "bool include_last_offset, int padding_idx) -> Tensor");
  // Fused low-precision training step, in place, for the distinct rows `unique_rows`
  // (strictly increasing) of a symmetric table. optimizer: 0 sgd, 1 row-wise adagrad
  // (state [R, 1]), 2 adam (state [R, 2D] = [m | v]), 3 none. learn_step: ALPT's LSQ step
  // update with step_optimizer 0 sgd or 1 adam (step_state [R or 1, 2]). `weights`
  // replaces the dequantized rows as the starting point; `weights_out` receives the
  // updated fp32 rows (NaN for skipped rows). iteration (from 1) drives Adam's bias
  // correction; (seed, counter, row, element) keys stochastic rounding, row and element
  // counted from row_offset and column_offset (a multiple of 8): a shard of a larger table
  // (rows or columns of it) rounds as the whole table would. Returns the number of rows
  // skipped for a non-finite gradient.
  m.def(
      "lowp_update(Tensor(a!) rows, Tensor(b!)? step, Tensor(c!) state, Tensor(d!) step_state, "
      "Tensor unique_rows, Tensor grad_rows, Tensor? weights, Tensor(e!)? weights_out, "
      "int bits, int dim, int fmt, int optimizer, float lr, float eps, float weight_decay, "
      "float beta1, float beta2, int iteration, bool learn_step, int step_optimizer, "
      "float step_lr, bool stochastic, int seed, int counter, int row_offset=0, "
      "int column_offset=0) -> Tensor");
  // Mixed-precision embeddings (MPE). Search on an fp32 table `weight` [R, D]: row r
  // belongs to group row_group[r] (int64 [R]), whose probabilities over the candidate widths
  // `bits` are probs [G, m]; alpha [m] (one step per width), beta [D] (shared offset).
  // Looks up sum_b probs[g(r), b] * Q_b(w_r) (LSQ+, Q_0 = 0), pooled; mode 0 sum, 1 mean,
  // 2 none.
  m.def(
      "mpe_search_forward(Tensor weight, Tensor indices, Tensor offsets, Tensor row_group, "
      "Tensor probs, Tensor alpha, Tensor beta, int[] bits, int mode, bool include_last_offset) "
      "-> Tensor");
  // The search's gradients from the per-distinct-row gradients grad_rows [U, D] (as
  // embedding_bag_backward returns them) of the rows unique_rows: (grad of those weight rows
  // [U, D] (straight-through), grad_alpha [m], grad_beta [D], grad_probs [G, m]). `numel`,
  // the number of values looked up, sets LSQ's gradient scale 1/sqrt(Qp * numel).
  m.def(
      "mpe_search_backward(Tensor weight, Tensor unique_rows, Tensor grad_rows, "
      "Tensor row_group, Tensor probs, Tensor alpha, Tensor beta, int[] bits, int numel) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Lookup over a mixed-width table: segments[s] uint8 [n_s, >= D*bits[s]/8] of offset-binary
  // codes with step steps[s]; location gives each row's position in the concatenated
  // segments or -1 (0-bit row: reads as zeros), as a row map int16/int32 [R] or as row
  // ranges int32 [K + 1, 2] (checks.h). A stored row reads steps[s] * q + beta [D].
  m.def(
      "mpe_embedding_bag(Tensor[] segments, int[] bits, Tensor steps, Tensor beta, "
      "Tensor location, Tensor indices, Tensor offsets, Tensor? per_sample_weights, int mode, "
      "bool include_last_offset, ScalarType output_dtype) -> Tensor");
  // Every feature of a batch in one lookup, in TorchRec's KeyedJaggedTensor layout. Table t
  // is tables[t], packed rows uint8 [R_t, row_bytes(dims[t], bits[t], formats[t])], with
  // steps[t] fp32 [1] for the per-table-step format (an empty tensor otherwise). Feature f
  // reads table feature_tables[f] (features may share one) and pools by poolings[f] (0 sum,
  // 1 mean). values int32/int64 [N]; offsets [F * B + 1], key-major: bag b of feature f is
  // positions [offsets[f * B + b], offsets[f * B + b + 1]), offsets[F * B] = N. Output
  // [B, sum of the features' dims]: feature f's pooled rows at columns
  // [feature_columns[f], + its table's dim), written in place (no per-feature tensors).
  // Tables come as a list, not as one flat buffer: each stays its module's own buffer
  // (state_dict, .to(), per-table interchange and sharding take it as it is), and a table
  // is added, moved or converted without copying the others. The list costs the CUDA
  // kernel one small copy of table pointers per call.
  m.def(
      "embedding_bags(Tensor[] tables, Tensor[] steps, int[] bits, int[] dims, int[] formats, "
      "int[] feature_tables, int[] feature_columns, int[] poolings, Tensor values, "
      "Tensor offsets, Tensor? per_sample_weights, ScalarType output_dtype) -> Tensor");
  // Gradient of embedding_bags with respect to the rows it read, per table:
  // (unique_rows[t] int64 [U_t] ascending, grad_rows[t] fp32 [U_t, dims[t]]). The features
  // of a table are summed together, repeats of a row in the order of values.
  m.def(
      "embedding_bags_backward(Tensor grad_out, int[] dims, int[] feature_tables, "
      "int[] feature_columns, int[] poolings, Tensor values, Tensor offsets, "
      "Tensor? per_sample_weights) -> (Tensor[], Tensor[])");
  // Gradient of embedding_bags with respect to per_sample_weights (sum pooling): fp32 [N].
  m.def(
      "embedding_bags_psw_backward(Tensor grad_out, Tensor[] tables, Tensor[] steps, "
      "int[] bits, int[] dims, int[] formats, int[] feature_tables, int[] feature_columns, "
      "Tensor values, Tensor offsets) -> Tensor");
  // lowp_update for every table of a batch in one call: table t's distinct rows
  // unique_rows[t] with gradient grad_rows[t], each at its own width, with its own state
  // (states[t], step_states[t], steps[t] as lowp_update takes them; steps[t] empty unless
  // formats[t] is the per-table step). counters[t] keys table t's stochastic rounding with
  // seeds[t] (row = the row within table t, plus row_offsets[t]; element plus
  // column_offsets[t]; both 0 when not given) and is its Adam iteration (from 1): a table
  // gets the bits lowp_update gives it with those arguments. Returns int64 [T]: the rows
  // skipped per table for a non-finite gradient.
  m.def(
      "embedding_bags_update(Tensor(a!)[] tables, Tensor(b!)[] steps, Tensor(c!)[] states, "
      "Tensor(d!)[] step_states, Tensor[] unique_rows, Tensor[] grad_rows, int[] bits, "
      "int[] dims, int[] formats, int optimizer, float lr, float eps, float weight_decay, "
      "float beta1, float beta2, bool learn_step, int step_optimizer, float step_lr, "
      "bool stochastic, int[] seeds, int[] counters, int[]? row_offsets=None, "
      "int[]? column_offsets=None) -> Tensor");
  // embedding_bags_backward and embedding_bags_update in one call, the row gradients never
  // stored: the lookup's arguments and grad_out as the backward takes them, then the tables,
  // their state and the update's options as the update takes them (dims[t] for both). Every
  // table gets the bits the two ops give it; returns the update's int64 [T].
  m.def(
      "embedding_bags_backward_update(Tensor grad_out, int[] feature_tables, "
      "int[] feature_columns, int[] poolings, Tensor values, Tensor offsets, "
      "Tensor? per_sample_weights, Tensor(a!)[] tables, Tensor(b!)[] steps, "
      "Tensor(c!)[] states, Tensor(d!)[] step_states, int[] bits, int[] dims, int[] formats, "
      "int optimizer, float lr, float eps, float weight_decay, float beta1, float beta2, "
      "bool learn_step, int step_optimizer, float step_lr, bool stochastic, int[] seeds, "
      "int[] counters, int[]? row_offsets=None, int[]? column_offsets=None) -> Tensor");
  // A memory hint, values unchanged: back the CPU tensor t (contiguous, not yet written)
  // with transparent huge pages where the system allows it (cpu/huge_pages.h).
  m.def("advise_huge_pages(Tensor t) -> ()");
}
