// The Python extension module moe_infer._C. Importing it runs the static op registrations of
// every backend compiled into it; it also reports how it was built.
#include <torch/extension.h>

#include "common/activation.h"
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
  m.def(
      "activations",
      [] {
        std::vector<std::tuple<std::string, bool, std::string, bool>> table;
        for (const moe_infer::Activation activation : moe_infer::kAllActivations) {
          table.emplace_back(moe_infer::activation_name(activation),
                             moe_infer::is_gated(activation),
                             moe_infer::activation_name(moe_infer::unary_of(activation)),
                             moe_infer::uses_swiglu_params(activation));
        }
        return table;
      },
      "The expert activation table (csrc/common/activation.h): (name, gated, unary, "
      "swiglu_params) per activation");
}
