// The expert activations' element math, torch-free and shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "common/options.h"

#if defined(__CUDACC__)
#define MOE_INFER_HOST_DEVICE __host__ __device__
#else
#define MOE_INFER_HOST_DEVICE
#endif

namespace moe_infer {

struct ActivationParams {
  Activation activation = Activation::kSilu;
  float swiglu_alpha = 1.702f;  // GPT-OSS only
  float swiglu_limit = 7.0f;    // GPT-OSS only
};

MOE_INFER_HOST_DEVICE inline float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// Where output column i of a row reads its inputs: `gate` (or the only input) and `up` (gated
// activations). silu_glu: gate = column i, up = column ffn_size + i; GPT-OSS interleaves them.
MOE_INFER_HOST_DEVICE inline int64_t gate_column(Activation activation, int64_t i) {
  return activation == Activation::kGptOssSwiglu ? 2 * i : i;
}
MOE_INFER_HOST_DEVICE inline int64_t up_column(Activation activation, int64_t i, int64_t ffn_size) {
  return activation == Activation::kGptOssSwiglu ? 2 * i + 1 : ffn_size + i;
}

// One output value from its inputs (`up` is ignored by the ungated activations).
MOE_INFER_HOST_DEVICE inline float activate_value(const ActivationParams& params, float gate,
                                                  float up) {
  constexpr float kSqrtHalf = 0.70710678118654752f;
  constexpr float kSqrtTwoOverPi = 0.79788456080286536f;
  switch (params.activation) {
    case Activation::kRelu:
      return gate > 0.0f ? gate : 0.0f;
    case Activation::kGelu:
      return 0.5f * gate * (1.0f + erff(gate * kSqrtHalf));
    case Activation::kGeluTanh:
      return 0.5f * gate * (1.0f + tanhf(kSqrtTwoOverPi * (gate + 0.044715f * gate * gate * gate)));
    case Activation::kSilu:
      return gate * sigmoid_f(gate);
    case Activation::kSiluGlu:
      return gate * sigmoid_f(gate) * up;
    case Activation::kGptOssSwiglu: {
      const float g = fminf(gate, params.swiglu_limit);
      const float u = fminf(fmaxf(up, -params.swiglu_limit), params.swiglu_limit);
      return (u + 1.0f) * g * sigmoid_f(params.swiglu_alpha * g);
    }
  }
  return 0.0f;
}

}  // namespace moe_infer
