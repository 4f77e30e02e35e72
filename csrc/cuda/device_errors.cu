// The host side of sync-free validation: one host-mapped DeviceError record per device, read with
// a plain load (no sync) at the start of every validating op, and worded like the CPU's errors.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <mutex>

#include "common/checks.h"
#include "common/cuda_utils.h"
#include "common/device_errors.h"
#include "kernels/common.cuh"

namespace moe_infer {

namespace {

constexpr int kMaxDevices = 64;
std::array<std::atomic<kernels::DeviceError*>, kMaxDevices> g_records{};
std::mutex g_allocate;

}  // namespace

kernels::DeviceError* device_error_record(c10::DeviceIndex device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "moe_infer: CUDA device index ", device,
              " out of range");
  kernels::DeviceError* record = g_records[device].load(std::memory_order_acquire);
  if (record != nullptr) return record;
  // Allocating is not allowed while a stream is captured; a graph captured before any eager
  // call simply runs unvalidated.
  if (stream_is_capturing()) return nullptr;
  const std::lock_guard<std::mutex> lock(g_allocate);
  record = g_records[device].load(std::memory_order_acquire);
  if (record != nullptr) return record;
  const c10::cuda::CUDAGuard guard(device);
  void* host = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(kernels::DeviceError), cudaHostAllocMapped));
  std::memset(host, 0, sizeof(kernels::DeviceError));
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
  // With unified addressing (every 64-bit platform CUDA 13 runs on) the two pointers agree.
  TORCH_INTERNAL_ASSERT(mapped == host, "moe_infer: host-mapped memory needs unified addressing");
  record = static_cast<kernels::DeviceError*>(host);  // never freed: kernels may still write it
  g_records[device].store(record, std::memory_order_release);
  return record;
}

void raise_device_error(c10::DeviceIndex device, bool synchronize) {
  if (device < 0 || device >= kMaxDevices) return;
  kernels::DeviceError* record = g_records[device].load(std::memory_order_acquire);
  if (record == nullptr) return;
  if (synchronize) {
    const c10::cuda::CUDAGuard guard(device);
    c10::cuda::device_synchronize();
  }
  volatile kernels::DeviceError* error = record;
  const int32_t check = error->check;
  if (check == kernels::kNoDeviceError) return;
  // The record's other fields were written before `check` (a system fence between): once all
  // work is done they are complete.
  if (!synchronize) {
    const c10::cuda::CUDAGuard guard(device);
    c10::cuda::device_synchronize();
  }
  const int64_t index = error->index;
  const int64_t value = error->value;
  const int64_t limit = error->limit;
  const int32_t extra = error->extra;
  error->check = kernels::kNoDeviceError;
  switch (check) {
    case kernels::kNonfiniteLogits:
      fail_nonfinite_logits(index);
    case kernels::kNonfiniteBias:
      fail_nonfinite_bias(index);
    case kernels::kExpertIdOutOfRange:
      fail_expert_id(index, value, PlanSizes{0, extra, 0, limit});
    case kernels::kExpertOffsets:
      // The per-expert path's words (common/composite.cpp: host_expert_offsets).
      TORCH_CHECK(index != 0, "grouped_mlp: expert_offsets[0] (", value, ") must be 0");
      TORCH_CHECK(index >= 0, "grouped_mlp: expert_offsets[-1] (", value,
                  ") exceeds the number of rows in hidden (", limit, ")");
      TORCH_CHECK(false, "grouped_mlp: expert_offsets must be non-decreasing, but expert_offsets[",
                  index, "] (", value, ") < expert_offsets[", index - 1, "] (", extra, ")");
    default:
      TORCH_CHECK(false, "moe_infer: unknown error record ", check,
                  " on cuda:", static_cast<int>(device));
  }
}

}  // namespace moe_infer
