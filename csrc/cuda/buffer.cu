// CUDA copy engine of the expert buffer: host -> slot copies with cudaMemcpyAsync on a side
// stream (from pinned host memory they overlap compute), one event per slot that the compute
// stream waits on, and one event per slot recorded after the compute that read it, so a later
// copy never overwrites weights a queued kernel still needs. The side stream first waits for
// the work queued on the compute stream when the copier is made (the pools' zero-fill), so a
// first copy cannot be overwritten by it.
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <deque>
#include <utility>
#include <vector>

#include "buffer.h"

namespace moe_infer {

namespace {

// A pair of timing events around work on one stream.
struct TimedSpan {
  c10::cuda::CUDAEvent start{cudaEventDefault};
  c10::cuda::CUDAEvent end{cudaEventDefault};
};

class CudaStreamCopier final : public SlotCopier {
 public:
  CudaStreamCopier(int64_t num_slots, c10::DeviceIndex device)
      : device_(device),
        copy_stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)),
        ready_(num_slots),
        used_(num_slots) {
    c10::cuda::CUDAGuard guard(device_);
    c10::cuda::CUDAEvent pools_made;
    pools_made.record(c10::cuda::getCurrentCUDAStream(device_));
    pools_made.block(copy_stream_);
  }

  ~CudaStreamCopier() override {
    // The host sources and the pools must outlive every queued copy.
    try {
      copy_stream_.synchronize();
    } catch (...) {
    }
  }

  void start(int64_t slot, std::vector<CopyRange> ranges) override {
    c10::cuda::CUDAGuard guard(device_);
    collect(/*wait=*/false);
    used_[slot].block(copy_stream_);  // no-op until a compute has read this slot
    copy_spans_.emplace_back();
    copy_spans_.back().start.record(copy_stream_);
    for (const CopyRange& range : ranges) {
      C10_CUDA_CHECK(cudaMemcpyAsync(range.dest, range.source, static_cast<size_t>(range.num_bytes),
                                     cudaMemcpyHostToDevice, copy_stream_.stream()));
    }
    copy_spans_.back().end.record(copy_stream_);
    ready_[slot].record(copy_stream_);
  }

  bool ready(int64_t slot) override { return ready_[slot].query(); }

  void wait(const std::vector<int64_t>& slots) override {
    c10::cuda::CUDAGuard guard(device_);
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_);
    stall_spans_.emplace_back();
    stall_spans_.back().start.record(compute);
    for (const int64_t s : slots) ready_[s].block(compute);
    stall_spans_.back().end.record(compute);
  }

  void release(const std::vector<int64_t>& slots) override {
    c10::cuda::CUDAGuard guard(device_);
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_);
    for (const int64_t s : slots) used_[s].record(compute);
  }

  void synchronize() override {
    c10::cuda::CUDAGuard guard(device_);
    copy_stream_.synchronize();
  }

  std::pair<int64_t, int64_t> take_times() override {
    collect(/*wait=*/true);
    const std::pair<int64_t, int64_t> times{copy_ns_, stall_ns_};
    copy_ns_ = 0;
    stall_ns_ = 0;
    return times;
  }

 private:
  // Adds the finished spans to the totals (all of them, waiting, when `wait`), so the lists stay
  // short however long the buffer runs.
  void collect(bool wait) {
    auto drain = [wait](std::deque<TimedSpan>& spans, int64_t& total_ns) {
      while (!spans.empty()) {
        TimedSpan& span = spans.front();
        if (wait) {
          span.end.synchronize();
        } else if (!span.end.query()) {
          break;
        }
        total_ns += static_cast<int64_t>(span.start.elapsed_time(span.end) * 1e6);
        spans.pop_front();
      }
    };
    drain(copy_spans_, copy_ns_);
    drain(stall_spans_, stall_ns_);
  }

  c10::DeviceIndex device_;
  c10::cuda::CUDAStream copy_stream_;
  std::vector<c10::cuda::CUDAEvent> ready_;  // [slots] recorded on the copy stream
  std::vector<c10::cuda::CUDAEvent> used_;   // [slots] recorded on the compute stream
  std::deque<TimedSpan> copy_spans_;
  std::deque<TimedSpan> stall_spans_;
  int64_t copy_ns_ = 0;
  int64_t stall_ns_ = 0;
};

}  // namespace

std::unique_ptr<SlotCopier> make_cuda_stream_copier(int64_t num_slots, int8_t device_index) {
  return std::make_unique<CudaStreamCopier>(num_slots, static_cast<c10::DeviceIndex>(device_index));
}

}  // namespace moe_infer
