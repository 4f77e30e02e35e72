// The Python extension module moe_infer._C. Importing it runs the static op registrations of
// every backend compiled into it; it also reports how it was built.
#include <torch/extension.h>

#include "common/composite.h"
#ifdef MOE_INFER_WITH_CUDA
#include "common/device_errors.h"
#endif

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
#ifdef MOE_INFER_WITH_CUDA
  m.def(
      "raise_device_error",
      [](int64_t device, bool synchronize) {
        moe_infer::raise_device_error(static_cast<c10::DeviceIndex>(device), synchronize);
      },
      "Raises (and clears) the error a validating kernel recorded on this CUDA device, if any");
#endif
}
