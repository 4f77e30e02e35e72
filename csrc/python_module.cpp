// The Python extension module moe_infer._C. Importing it runs the static op registrations of
// every backend compiled into it; it also reports how it was built.
#include <torch/extension.h>

#include "common/composite.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_infer C++/CUDA ops; use them through torch.ops.moe_infer or moe_infer.ops";
#ifdef MOE_INFER_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("set_kernels_enabled", &moe_infer::set_kernels_enabled,
        "Run the hand-written kernels (True, default) or the composite ATen fallback (False)");
  m.def("kernels_enabled", &moe_infer::kernels_enabled);
}
