// The Python extension module moe_infer._C. Importing it runs the static op registrations of
// every backend compiled into it; it also reports how it was built.
#include <torch/extension.h>

#include "common/activation.h"
#include "common/checks.h"
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
#ifdef MOE_INFER_WITH_CUDA
  m.def(
      "raise_device_error",
      [](int64_t device, bool synchronize) {
        moe_infer::raise_device_error(static_cast<c10::DeviceIndex>(device), synchronize);
      },
      "Raises (and clears) the error a validating kernel recorded on this CUDA device, if any");
#endif
  // Each op's composite implementation (what the dispatcher runs on a device without a kernel),
  // callable directly so the tests can compare every kernel with it.
  auto composite = m.def_submodule("composite", "the ops' composite ATen implementations");
#define MOE_INFER_BIND_COMPOSITE(op) composite.def(#op, &moe_infer::composite::op##_op);
  MOE_INFER_COMPOSITE_OPS(MOE_INFER_BIND_COMPOSITE)
#undef MOE_INFER_BIND_COMPOSITE

  // Each op's argument checks alone (csrc/common/checks.cpp: shapes, dtypes, devices, option
  // values; nothing that reads data), taking the op's arguments, so the fake implementations raise
  // the very same errors.
  auto checks = m.def_submodule("checks", "the ops' argument checks, without the computation");
#define MOE_INFER_BIND_CHECKS(op) \
  checks.def(#op, [](MOE_INFER_PARAMS(op)) { moe_infer::check_##op(MOE_INFER_ARGS(op)); });
  MOE_INFER_CHECKED_OPS(MOE_INFER_BIND_CHECKS)
#undef MOE_INFER_BIND_CHECKS
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
