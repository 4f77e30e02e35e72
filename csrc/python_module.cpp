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
  // Each op's composite implementation (what the dispatcher runs on a device without a kernel),
  // callable directly so the tests can compare every kernel with it.
  auto composite = m.def_submodule("composite", "the ops' composite ATen implementations");
  namespace c = moe_infer::composite;
  composite.def("topk_gating", &c::topk_gating_op);
  composite.def("dispatch_plan", &c::dispatch_plan_op);
  composite.def("permute", &c::permute_op);
  composite.def("unpermute_combine", &c::unpermute_combine_op);
  composite.def("grouped_mlp", &c::grouped_mlp_op);
  composite.def("grouped_mlp_combine", &c::grouped_mlp_combine_op);
  composite.def("static_gating", &c::static_gating_op);
  composite.def("static_routing_tensors", &c::static_routing_tensors_op);
  composite.def("static_dispatch", &c::static_dispatch_op);
  composite.def("static_combine", &c::static_combine_op);
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
