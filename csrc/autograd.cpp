// Autograd for embedding_bag, in C++: a Python autograd kernel would cost every lookup,
// with or without gradients, more than the small-batch lookup itself. The table is uint8
// codes and gets no gradient (training updates it in its own backward, see qembed/nn/lowp.py);
// per_sample_weights do, through embedding_bag_psw_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace qembed {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor embedding_bag_op(const at::Tensor& rows, const at::Tensor& indices,
                            const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                            const std::optional<at::Tensor>& step, int64_t bits, int64_t dim,
                            int64_t fmt, int64_t mode, bool include_last_offset,
                            int64_t padding_idx, at::ScalarType output_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::embedding_bag", "")
                             .typed<decltype(embedding_bag_op)>();
  return op.call(rows, indices, offsets, psw, step, bits, dim, fmt, mode, include_last_offset,
                 padding_idx, output_dtype);
}

at::Tensor psw_backward_op(const at::Tensor& grad, const at::Tensor& rows,
                           const at::Tensor& indices, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& step, int64_t bits, int64_t dim,
                           int64_t fmt, int64_t mode, bool include_last_offset,
                           int64_t padding_idx) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::embedding_bag_psw_backward", "")
                             .typed<decltype(psw_backward_op)>();
  return op.call(grad, rows, indices, offsets, step, bits, dim, fmt, mode, include_last_offset,
                 padding_idx);
}

class EmbeddingBag : public torch::autograd::Function<EmbeddingBag> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rows,
                            const at::Tensor& indices, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& psw,
                            const std::optional<at::Tensor>& step, int64_t bits, int64_t dim,
                            int64_t fmt, int64_t mode, bool include_last_offset,
                            int64_t padding_idx, at::ScalarType output_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (psw.has_value() && psw->requires_grad()) {
      ctx->save_for_backward({rows, indices, offsets, step.value_or(at::Tensor())});
      ctx->saved_data["args"] = std::vector<int64_t>{bits, dim, fmt, mode, include_last_offset,
                                                     padding_idx};
      ctx->saved_data["psw_dtype"] = psw->scalar_type();
    }
    return embedding_bag_op(rows, indices, offsets, psw, step, bits, dim, fmt, mode,
                            include_last_offset, padding_idx, output_dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);  // one per forward argument; only per_sample_weights gets one
    if (ctx->needs_input_grad(3) && grads[0].defined()) {
      const variable_list saved = ctx->get_saved_variables();
      const std::vector<int64_t> a = ctx->saved_data["args"].toIntVector();
      const std::optional<at::Tensor> step =
          saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
      out[3] = psw_backward_op(grads[0], saved[0], saved[1], saved[2], step, a[0], a[1], a[2],
                               a[3], a[4] != 0, a[5])
                   .to(ctx->saved_data["psw_dtype"].toScalarType());
    }
    return out;
  }
};

at::Tensor embedding_bag_autograd(const at::Tensor& rows, const at::Tensor& indices,
                                  const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& psw,
                                  const std::optional<at::Tensor>& step, int64_t bits,
                                  int64_t dim, int64_t fmt, int64_t mode,
                                  bool include_last_offset, int64_t padding_idx,
                                  at::ScalarType output_dtype) {
  return EmbeddingBag::apply(rows, indices, offsets, psw, step, bits, dim, fmt, mode,
                             include_last_offset, padding_idx, output_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, Autograd, m) { m.impl("embedding_bag", &embedding_bag_autograd); }

}  // namespace qembed
