// The expert activations: the one table of their names, whether they are gated and what they
// compute, and their element math, torch-free and shared by the CPU and CUDA kernels, the
// composite and the argument checks. Python reads the table from moe_infer._C.activations().
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_INFER_HOST_DEVICE __host__ __device__
#else
#define MOE_INFER_HOST_DEVICE
#endif

namespace moe_infer {

// X(enumerator, name, gated, unary, swiglu_params)
//   gated: fc1 has 2 * ffn_size outputs, gate (first half) and up (second half); the output is
//          unary(gate) * up. GPT-OSS's swiGLU interleaves gate/up columns and clamps them.
//   unary: the element function applied to the gate (or to the only input).
//   swiglu_params: reads swiglu_alpha / swiglu_limit.
#define MOE_INFER_ACTIVATIONS(X)                           \
  X(kRelu, "relu", false, kRelu, false)                    \
  X(kGelu, "gelu", false, kGelu, false)                    \
  X(kGeluTanh, "gelu_tanh", false, kGeluTanh, false)       \
  X(kSilu, "silu", false, kSilu, false)                    \
  X(kSiluGlu, "silu_glu", true, kSilu, false)              \
  X(kGeluGlu, "gelu_glu", true, kGelu, false)              \
  X(kGeluTanhGlu, "gelu_tanh_glu", true, kGeluTanh, false) \
  X(kReluGlu, "relu_glu", true, kRelu, false)              \
  X(kGptOssSwiglu, "gpt_oss_swiglu", true, kGptOssSwiglu, true)

// The expert FFN's activation (grouped_mlp's `activation`).
enum class Activation : int8_t {
#define MOE_INFER_ACTIVATION_ENUM(e, name, gated, unary, swiglu) e,
  MOE_INFER_ACTIVATIONS(MOE_INFER_ACTIVATION_ENUM)
#undef MOE_INFER_ACTIVATION_ENUM
};

// One row of the table.
struct ActivationInfo {
  const char* name;
  bool gated;        // the first projection has 2 * ffn_size outputs
  Activation unary;  // the element function (the one on the gate for gated activations)
  bool uses_swiglu_params;
};

MOE_INFER_HOST_DEVICE constexpr ActivationInfo activation_info(Activation activation) {
  switch (activation) {
#define MOE_INFER_ACTIVATION_INFO(e, name, gated, unary, swiglu) \
  case Activation::e:                                            \
    return {name, gated, Activation::unary, swiglu};
    MOE_INFER_ACTIVATIONS(MOE_INFER_ACTIVATION_INFO)
#undef MOE_INFER_ACTIVATION_INFO
  }
  return {"", false, activation, false};
}

MOE_INFER_HOST_DEVICE constexpr bool is_gated(Activation activation) {
  return activation_info(activation).gated;
}
MOE_INFER_HOST_DEVICE constexpr Activation unary_of(Activation activation) {
  return activation_info(activation).unary;
}
constexpr const char* activation_name(Activation activation) {
  return activation_info(activation).name;
}
constexpr bool uses_swiglu_params(Activation activation) {
  return activation_info(activation).uses_swiglu_params;
}

// Every activation, in table order.
constexpr Activation kAllActivations[] = {
#define MOE_INFER_ACTIVATION_LIST(e, name, gated, unary, swiglu) Activation::e,
    MOE_INFER_ACTIVATIONS(MOE_INFER_ACTIVATION_LIST)
#undef MOE_INFER_ACTIVATION_LIST
};

struct ActivationParams {
  Activation activation = Activation::kSilu;
  float swiglu_alpha = 1.702f;  // GPT-OSS only
  float swiglu_limit = 7.0f;    // GPT-OSS only
};

MOE_INFER_HOST_DEVICE inline float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// Where output column i of a row reads its inputs: `gate` (or the only input) and `up` (gated
// activations). Gated: gate = column i, up = column ffn_size + i; GPT-OSS interleaves them.
MOE_INFER_HOST_DEVICE inline int64_t gate_column(Activation activation, int64_t i) {
  return activation == Activation::kGptOssSwiglu ? 2 * i : i;
}
MOE_INFER_HOST_DEVICE inline int64_t up_column(Activation activation, int64_t i, int64_t ffn_size) {
  return activation == Activation::kGptOssSwiglu ? 2 * i + 1 : ffn_size + i;
}

// An element function (`unary_of` an activation) on one value.
MOE_INFER_HOST_DEVICE inline float unary_value(Activation unary, float x) {
  constexpr float kSqrtHalf = 0.70710678118654752f;
  constexpr float kSqrtTwoOverPi = 0.79788456080286536f;
  switch (unary) {
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
    case Activation::kGelu:
      return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + tanhf(kSqrtTwoOverPi * (x + 0.044715f * x * x * x)));
    case Activation::kSilu:
      return x * sigmoid_f(x);
    default:
      return x;
  }
}

// One output value from its inputs (`up` is ignored by the ungated activations).
MOE_INFER_HOST_DEVICE inline float activate_value(const ActivationParams& params, float gate,
                                                  float up) {
  if (params.activation == Activation::kGptOssSwiglu) {
    const float g = fminf(gate, params.swiglu_limit);
    const float u = fminf(fmaxf(up, -params.swiglu_limit), params.swiglu_limit);
    return (u + 1.0f) * g * sigmoid_f(params.swiglu_alpha * g);
  }
  const float value = unary_value(unary_of(params.activation), gate);
  return is_gated(params.activation) ? value * up : value;
}

}  // namespace moe_infer
