// advise_huge_pages: lets a freshly allocated CPU table (a module's buffer) use
// transparent huge pages; huge_pages.h says why.
#include <torch/library.h>
#include "huge_pages.h"

namespace qembed {
namespace {

void advise_huge_pages_cpu(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "qembed.advise_huge_pages: the tensor must be contiguous");
  advise_huge_pages(t.data_ptr(), t.nbytes());
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("advise_huge_pages", &advise_huge_pages_cpu); }

}  // namespace qembed
