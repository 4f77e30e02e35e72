// Expert buffering on the host side: the copy-thread engine, the ExpertBuffer torch class, and the
// trace-driven cache simulator (a CPU op).
#include "buffer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/library.h>
#include <unistd.h>
#include <algorithm>

#include <cerrno>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "common/checks.h"

namespace moe_infer {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Reads bytes [offset, offset + num_bytes) of an open file into `dest` with pread (straight from
// the page cache, or the disk). Returns an empty string, or what went wrong.
std::string read_file_range(int fd, int64_t offset, char* dest, int64_t num_bytes) {
  int64_t done = 0;
  while (done < num_bytes) {
    const ssize_t got = ::pread(fd, dest + done, static_cast<size_t>(num_bytes - done),
                                static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return std::string("read error: ") + std::strerror(errno);
    if (got == 0) {
      return "unexpected end of file at byte " + std::to_string(offset + done) +
             " (the file was truncated after it was opened)";
    }
    done += got;
  }
  return {};
}

// CPU copy engine: `num_threads` std::threads copy slots while the caller computes. Copies into
// one slot never overlap (start() waits for the previous one); the caller waits per slot.
class ThreadPoolCopier final : public SlotCopier {
 public:
  ThreadPoolCopier(int64_t num_slots, int64_t num_threads)
      : issued_(num_slots, 0), done_(num_slots, 0), errors_(num_slots) {
    for (int64_t t = 0; t < num_threads; ++t) threads_.emplace_back([this] { work(); });
  }

  ~ThreadPoolCopier() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    for (std::thread& thread : threads_) thread.join();  // the queue is drained first
  }

  void start(int64_t slot, std::vector<CopyRange> ranges) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (done_[slot] != issued_[slot]) {
      const int64_t t0 = now_ns();
      done_cv_.wait(lock, [&] { return done_[slot] == issued_[slot]; });
      stall_ns_ += now_ns() - t0;
    }
    errors_[slot].clear();  // a new copy supersedes a failed one nobody waited for
    queue_.push_back(Task{slot, ++issued_[slot], std::move(ranges)});
    lock.unlock();
    work_cv_.notify_one();
  }

  bool ready(int64_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed(slot);
    return done_[slot] == issued_[slot];
  }

  void wait(const std::vector<int64_t>& slots) override {
    std::unique_lock<std::mutex> lock(mutex_);
    auto all_done = [&] {
      for (const int64_t s : slots) {
        if (done_[s] != issued_[s]) return false;
      }
      return true;
    };
    if (!all_done()) {
      const int64_t t0 = now_ns();
      done_cv_.wait(lock, all_done);
      stall_ns_ += now_ns() - t0;
    }
    for (const int64_t s : slots) throw_if_failed(s);
  }

  void release(const std::vector<int64_t>& /*slots*/) override {}  // CPU compute is synchronous

  void synchronize() override {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return done_ == issued_; });
  }

  std::pair<int64_t, int64_t> take_times() override {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::pair<int64_t, int64_t> times{copy_ns_, stall_ns_};
    copy_ns_ = 0;
    stall_ns_ = 0;
    return times;
  }

 private:
  struct Task {
    int64_t slot;
    uint64_t ticket;
    std::vector<CopyRange> ranges;
  };

  // Caller holds mutex_. Reports (once) a copy into `slot` that failed.
  void throw_if_failed(int64_t slot) {
    if (errors_[slot].empty()) return;
    const std::string error = std::move(errors_[slot]);
    errors_[slot].clear();
    TORCH_CHECK(false, "ExpertBuffer: copying an expert into slot ", slot, " failed: ", error);
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to copy
      Task task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      std::string error;
      const int64_t t0 = now_ns();
      for (const CopyRange& range : task.ranges) {
        if (range.fd < 0) {
          std::memcpy(range.dest, range.source, static_cast<size_t>(range.num_bytes));
        } else if (error.empty()) {
          error = read_file_range(range.fd, range.file_offset, range.dest, range.num_bytes);
        }
      }
      const int64_t elapsed = now_ns() - t0;
      lock.lock();
      copy_ns_ += elapsed;
      if (!error.empty()) errors_[task.slot] = std::move(error);
      done_[task.slot] = task.ticket;
      done_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Task> queue_;
  std::vector<uint64_t> issued_;     // [slots] tickets of the copies started
  std::vector<uint64_t> done_;       // [slots] ticket of the last copy finished
  std::vector<std::string> errors_;  // [slots] a failed copy not yet reported
  bool stopping_ = false;
  int64_t copy_ns_ = 0;
  int64_t stall_ns_ = 0;
  std::vector<std::thread> threads_;  // last: started once everything above exists
};

std::vector<int64_t> active_experts(const at::Tensor& tokens_per_expert) {
  const at::Tensor counts = tokens_per_expert.to(at::kLong).contiguous();
  const int64_t* ptr = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> active;
  for (int64_t e = 0; e < counts.numel(); ++e) {
    if (ptr[e] > 0) active.push_back(e);
  }
  return active;
}

}  // namespace

std::unique_ptr<SlotCopier> make_thread_pool_copier(int64_t num_slots, int64_t num_threads) {
  return std::make_unique<ThreadPoolCopier>(num_slots, num_threads);
}

// ---- ExpertBuffer ---------------------------------------------------------------------------

ExpertBuffer::ExpertBuffer(int64_t num_experts, int64_t num_slots, std::string policy,
                           std::vector<at::Tensor> pools, int64_t copy_threads)
    : cache_(num_experts, num_slots,
             check_expert_buffer(num_experts, num_slots, policy, pools, copy_threads)),
      pools_(std::move(pools)),
      segments_(num_experts, std::vector<std::vector<Segment>>(pools_.size())),
      pending_(num_slots, 0),
      in_round_(num_experts, 0),
      last_fill_(num_slots, -1),
      batch_slots_(num_slots, 0),
      predicted_(num_experts, 0),
      tokens_(num_experts, 0),
      batches_active_(num_experts, 0) {
  for (const at::Tensor& pool : pools_) {
    row_bytes_.push_back(static_cast<int64_t>(pool.nbytes()) / num_slots);
    expert_bytes_ += row_bytes_.back();
  }
  if (pools_[0].device().is_cuda()) {
#ifdef MOE_INFER_WITH_CUDA
    copier_ = make_cuda_stream_copier(num_slots, pools_[0].device().index());
#else
    TORCH_CHECK_VALUE(false, "ExpertBuffer: pools are on ", pools_[0].device(),
                      " but moe_infer was built without CUDA");
#endif
  } else {
    copier_ = make_thread_pool_copier(num_slots, copy_threads);
  }
}

ExpertBuffer::~ExpertBuffer() = default;

void ExpertBuffer::add_segment(int64_t expert, int64_t pool, at::Tensor source,
                               int64_t source_offset, int64_t dest_offset, int64_t num_bytes,
                               const std::string& file, int64_t file_offset) {
  TORCH_CHECK(!finalized_, "ExpertBuffer.add_segment: the buffer is finalized");
  check_buffer_segment(num_experts(), pools_, expert, pool, source, source_offset, dest_offset,
                       num_bytes);
  int fd = -1;
  if (!file.empty()) {
    fd = files_.open(file);
    struct stat info {};
    TORCH_CHECK(::fstat(fd, &info) == 0, "ExpertBuffer.add_segment: cannot stat '", file,
                "': ", std::strerror(errno));
    TORCH_CHECK(file_offset >= 0 && file_offset + num_bytes <= static_cast<int64_t>(info.st_size),
                "ExpertBuffer.add_segment: bytes [", file_offset, ", ", file_offset + num_bytes,
                ") of '", file, "' fall outside its ", static_cast<int64_t>(info.st_size),
                " bytes (truncated?)");
  }
  segments_[expert][pool].push_back(
      Segment{std::move(source), source_offset, dest_offset, num_bytes, fd, file_offset});
}

int ExpertBuffer::OpenFiles::open(const std::string& path) {
  for (const auto& [name, fd] : fds) {
    if (name == path) return fd;
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "ExpertBuffer.add_segment: cannot open '", path,
              "': ", std::strerror(errno));
  fds.emplace_back(path, fd);
  return fd;
}

ExpertBuffer::OpenFiles::~OpenFiles() {
  for (const auto& entry : fds) ::close(entry.second);
}

template <typename F>
auto ExpertBuffer::guarded(F&& call) -> decltype(call()) {
  try {
    return call();
  } catch (...) {
    copier_->synchronize();
    cache_.clear();
    std::fill(pending_.begin(), pending_.end(), 0);
    throw;
  }
}

void ExpertBuffer::finalize() {
  if (finalized_) return;
  for (int64_t e = 0; e < num_experts(); ++e) {
    for (size_t p = 0; p < pools_.size(); ++p) {
      std::vector<Segment>& parts = segments_[e][p];
      std::sort(parts.begin(), parts.end(),
                [](const Segment& a, const Segment& b) { return a.dest_offset < b.dest_offset; });
      int64_t covered = 0;
      for (const Segment& part : parts) {
        TORCH_CHECK(part.dest_offset == covered, "ExpertBuffer.finalize: expert ", e, " pool ", p,
                    ": segments leave a gap or overlap at byte ", covered, " of the ",
                    row_bytes_[p], "-byte slot");
        covered += part.num_bytes;
      }
      TORCH_CHECK(covered == row_bytes_[p], "ExpertBuffer.finalize: expert ", e, " pool ", p,
                  " has ", covered, " of ", row_bytes_[p],
                  " bytes described; every slot must be filled by its segments");
    }
  }
  if (pools_[0].device().is_cuda()) {
    // From pageable memory cudaMemcpyAsync is synchronous: the host would block on each copy
    // and none would overlap compute. (A file-backed store is warned about where it is opened.)
    int64_t pageable = 0, total = 0;
    for (const auto& pools : segments_) {
      for (const auto& parts : pools) {
        for (const Segment& part : parts) {
          total += part.fd < 0;
          pageable += part.fd < 0 && !part.source.is_pinned();
        }
      }
    }
    if (pageable > 0) {
      TORCH_WARN("ExpertBuffer: ", pageable, " of ", total,
                 " expert weight segments are in pageable (not pinned) host memory, so their "
                 "copies to ",
                 pools_[0].device(),
                 " are synchronous and cannot overlap compute; keep the experts in pinned memory "
                 "(ExpertStore.from_tensors(..., pin_memory=True))");
    }
  }
  finalized_ = true;
}

void ExpertBuffer::check_idle(const char* method) const {
  TORCH_CHECK(finalized_, "ExpertBuffer.", method, ": call finalize() after add_segment()");
  TORCH_CHECK(!in_batch_ && !round_open_, "ExpertBuffer.", method,
              ": a batch is in progress (call next_round/end_round until next_round returns "
              "last=True)");
}

void ExpertBuffer::start_load(int64_t expert, int64_t slot) {
  std::vector<CopyRange> ranges;
  for (size_t p = 0; p < pools_.size(); ++p) {
    char* slot_base = static_cast<char*>(pools_[p].data_ptr()) + slot * row_bytes_[p];
    for (const Segment& part : segments_[expert][p]) {
      ranges.push_back(
          CopyRange{static_cast<const char*>(part.source.const_data_ptr()) + part.source_offset,
                    slot_base + part.dest_offset, part.num_bytes, part.fd, part.file_offset});
    }
  }
  copier_->start(slot, std::move(ranges));
  pending_[slot] = 1;
  bytes_copied_ += expert_bytes_;
}

void ExpertBuffer::begin_batch(const at::Tensor& tokens_per_expert) {
  check_idle("begin_batch");
  TORCH_CHECK_VALUE(tokens_per_expert.dim() == 1 && tokens_per_expert.size(0) == num_experts(),
                    "ExpertBuffer.begin_batch: tokens_per_expert must have shape [num_experts (",
                    num_experts(), ")], got ", tokens_per_expert.sizes());
  TORCH_CHECK_VALUE(tokens_per_expert.device().is_cpu(),
                    "ExpertBuffer.begin_batch: tokens_per_expert must be a CPU tensor");
  const at::Tensor counts = tokens_per_expert.to(at::kLong).contiguous();
  const int64_t* count_ptr = counts.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts(); ++e) {
    TORCH_CHECK_VALUE(count_ptr[e] >= 0, "ExpertBuffer.begin_batch: tokens_per_expert[", e, "] (",
                      count_ptr[e], ") must be >= 0");
    tokens_[e] += count_ptr[e];
  }
  const std::vector<int64_t> active = active_experts(counts);
  for (const int64_t e : active) ++batches_active_[e];
  if (has_prediction_) {
    for (int64_t e = 0; e < num_experts(); ++e) {
      const bool is_active = count_ptr[e] > 0;
      predicted_tp_ += predicted_[e] && is_active;
      predicted_fp_ += predicted_[e] && !is_active;
      predicted_fn_ += !predicted_[e] && is_active;
    }
    ++predictions_;
    has_prediction_ = false;
  }
  cache_.begin_batch(active.data(), static_cast<int64_t>(active.size()));
  std::fill(in_round_.begin(), in_round_.end(), 0);
  // Walk a copy of the cache through the batch: where each slot is refilled for the last time
  // tells which experts keep their slots to the end (the deferrable ones).
  std::fill(last_fill_.begin(), last_fill_.end(), -1);
  ExpertCache walk = cache_;
  for (int64_t position = 0; !walk.batch_done(); ++position) {
    const ExpertCache::Step step = walk.peek();
    if (!step.hit) last_fill_[step.slot] = position;
    walk.commit(step);
  }
  walk_position_ = 0;
  in_batch_ = true;
}

std::tuple<at::Tensor, at::Tensor, int64_t, int64_t, bool> ExpertBuffer::next_round() {
  TORCH_CHECK(in_batch_, "ExpertBuffer.next_round: call begin_batch() first");
  TORCH_CHECK(!round_open_, "ExpertBuffer.next_round: call end_round() after each round");
  for (const int64_t e : round_ready_) in_round_[e] = 0;
  for (const int64_t e : round_loading_) in_round_[e] = 0;
  round_ready_.clear();
  round_loading_.clear();
  round_deferrable_.clear();
  while (!cache_.batch_done()) {
    const ExpertCache::Step step = cache_.peek();
    // The walk would evict an expert this round still has to compute with: end the round here.
    if (!step.hit && step.evicted >= 0 && in_round_[step.evicted]) break;
    cache_.commit(step);
    if (!step.hit) start_load(step.expert, step.slot);
    in_round_[step.expert] = 1;
    batch_slots_[step.slot] = 1;
    if (pending_[step.slot] && guarded([&] { return copier_->ready(step.slot); })) {
      pending_[step.slot] = 0;
    }
    (pending_[step.slot] ? round_loading_ : round_ready_).push_back(step.expert);
    if (!pending_[step.slot] && last_fill_[step.slot] <= walk_position_) {
      round_deferrable_.push_back(step.expert);
    }
    ++walk_position_;
  }
  ++rounds_;
  round_open_ = true;
  round_waited_ = round_loading_.empty();
  const bool last = cache_.batch_done();
  if (last) in_batch_ = false;
  return {make_table(round_ready_), make_table(round_loading_),
          static_cast<int64_t>(round_ready_.size()), static_cast<int64_t>(round_loading_.size()),
          last};
}

void ExpertBuffer::wait_round() {
  TORCH_CHECK(round_open_, "ExpertBuffer.wait_round: no round is open");
  const std::vector<int64_t> slots = slots_of(round_loading_);
  guarded([&] { copier_->wait(slots); });
  for (const int64_t s : slots) pending_[s] = 0;
  round_waited_ = true;
}

void ExpertBuffer::end_round() {
  TORCH_CHECK(round_open_, "ExpertBuffer.end_round: no round is open");
  TORCH_CHECK(round_waited_,
              "ExpertBuffer.end_round: the round loaded experts; call wait_round() before "
              "computing with them");
  std::vector<int64_t> slots = slots_of(round_ready_);
  const std::vector<int64_t> loaded = slots_of(round_loading_);
  slots.insert(slots.end(), loaded.begin(), loaded.end());
  copier_->release(slots);
  round_open_ = false;
  if (!in_batch_) release_batch_slots();
}

void ExpertBuffer::release_batch_slots() {
  // Deferred experts were computed in later rounds than their own: once the batch is over, every
  // slot it computed with must be released before a later copy may refill it.
  std::vector<int64_t> slots;
  for (int64_t s = 0; s < num_slots(); ++s) {
    if (batch_slots_[s]) slots.push_back(s);
  }
  copier_->release(slots);
  std::fill(batch_slots_.begin(), batch_slots_.end(), 0);
}

std::tuple<c10::List<int64_t>, c10::List<int64_t>, c10::List<int64_t>> ExpertBuffer::round_experts()
    const {
  return {c10::List<int64_t>(round_ready_), c10::List<int64_t>(round_loading_),
          c10::List<int64_t>(round_deferrable_)};
}

bool ExpertBuffer::copies_done() {
  TORCH_CHECK(round_open_, "ExpertBuffer.copies_done: no round is open");
  for (const int64_t e : round_loading_) {
    if (!guarded([&] { return copier_->ready(cache_.slot_of(e)); })) return false;
  }
  return true;
}

void ExpertBuffer::cancel_batch() {
  // Whatever compute was issued in this batch must finish before its slots are refilled.
  if (in_batch_ || round_open_) release_batch_slots();
  round_open_ = false;
  in_batch_ = false;
}

int64_t ExpertBuffer::prefetch(std::vector<int64_t> experts, bool is_prediction) {
  check_idle("prefetch");
  std::vector<char> wanted(num_experts(), 0);
  for (const int64_t e : experts) {
    TORCH_CHECK_VALUE(e >= 0 && e < num_experts(), "ExpertBuffer.prefetch: expert id ", e,
                      " is out of range [0, ", num_experts(), ")");
    wanted[e] = 1;
  }
  if (is_prediction) {
    predicted_ = wanted;
    has_prediction_ = true;
  }
  int64_t started = 0;
  for (const int64_t e : experts) {
    if (cache_.slot_of(e) >= 0) continue;
    const ExpertCache::Step step = cache_.plan_prefetch(e, wanted);
    if (step.slot < 0) break;  // every slot holds a requested expert
    cache_.commit_prefetch(step);
    start_load(e, step.slot);
    ++started;
  }
  return started;
}

void ExpertBuffer::warm_start(std::vector<int64_t> experts, const at::Tensor& use_counts) {
  check_idle("warm_start");
  TORCH_CHECK_VALUE(use_counts.dim() == 1 && use_counts.size(0) == num_experts(),
                    "ExpertBuffer.warm_start: use_counts must have shape [num_experts (",
                    num_experts(), ")], got ", use_counts.sizes());
  clear();
  const at::Tensor counts = use_counts.to(at::kLong).contiguous();
  for (int64_t e = 0; e < num_experts(); ++e) {
    cache_.set_use_count(e, counts.const_data_ptr<int64_t>()[e]);
  }
  std::vector<int64_t> loaded;
  for (const int64_t e : experts) {
    TORCH_CHECK_VALUE(e >= 0 && e < num_experts(), "ExpertBuffer.warm_start: expert id ", e,
                      " is out of range [0, ", num_experts(), ")");
    if (cache_.slot_of(e) >= 0) continue;
    const int64_t slot = cache_.warm_load(e);
    if (slot < 0) break;
    start_load(e, slot);
    loaded.push_back(slot);
  }
  copier_->synchronize();
  guarded([&] { copier_->wait(loaded); });
  for (const int64_t s : loaded) pending_[s] = 0;
}

void ExpertBuffer::clear() {
  check_idle("clear");
  copier_->synchronize();
  cache_.clear();
  std::fill(pending_.begin(), pending_.end(), 0);
}

void ExpertBuffer::synchronize() { copier_->synchronize(); }

c10::Dict<std::string, int64_t> ExpertBuffer::stats() {
  const auto [copy_ns, stall_ns] = copier_->take_times();
  copy_ns_ += copy_ns;
  stall_ns_ += stall_ns;
  const CacheCounters& c = cache_.counters();
  c10::Dict<std::string, int64_t> out;
  out.insert("batches", c.batches);
  out.insert("rounds", rounds_);
  out.insert("hits", c.hits);
  out.insert("misses", c.misses);
  out.insert("evictions", c.evictions);
  out.insert("loads", c.misses + c.prefetches + c.warm_loads);
  out.insert("prefetches", c.prefetches);
  out.insert("prefetch_hits", c.prefetch_hits);
  out.insert("prefetch_unused", c.prefetch_unused);
  out.insert("warm_loads", c.warm_loads);
  out.insert("bytes_copied", bytes_copied_);
  out.insert("copy_ns", copy_ns_);
  out.insert("stall_ns", stall_ns_);
  out.insert("predictions", predictions_);
  out.insert("predicted_tp", predicted_tp_);
  out.insert("predicted_fp", predicted_fp_);
  out.insert("predicted_fn", predicted_fn_);
  return out;
}

void ExpertBuffer::reset_stats() {
  (void)copier_->take_times();
  cache_.reset_counters();
  rounds_ = bytes_copied_ = copy_ns_ = stall_ns_ = 0;
  predictions_ = predicted_tp_ = predicted_fp_ = predicted_fn_ = 0;
}

at::Tensor ExpertBuffer::slot_table() const {
  at::Tensor table = at::empty({num_experts()}, at::TensorOptions().dtype(at::kInt));
  int32_t* ptr = table.data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts(); ++e) ptr[e] = static_cast<int32_t>(cache_.slot_of(e));
  return table;
}

at::Tensor ExpertBuffer::activation_counts() const {
  at::Tensor counts = at::empty({2, num_experts()}, at::TensorOptions().dtype(at::kLong));
  std::copy(tokens_.begin(), tokens_.end(), counts[0].data_ptr<int64_t>());
  std::copy(batches_active_.begin(), batches_active_.end(), counts[1].data_ptr<int64_t>());
  return counts;
}

std::vector<int64_t> ExpertBuffer::slots_of(const std::vector<int64_t>& experts) const {
  std::vector<int64_t> slots;
  slots.reserve(experts.size());
  for (const int64_t e : experts) slots.push_back(cache_.slot_of(e));
  return slots;
}

at::Tensor ExpertBuffer::make_table(const std::vector<int64_t>& experts) const {
  const at::Device device = pools_[0].device();
  auto options = at::TensorOptions().dtype(at::kInt);
  if (device.is_cuda()) options = options.pinned_memory(true);
  at::Tensor table = at::empty({num_experts() + 1}, options);
  int32_t* ptr = table.data_ptr<int32_t>();
  std::fill(ptr, ptr + num_experts() + 1, -1);
  for (const int64_t e : experts) ptr[e] = static_cast<int32_t>(cache_.slot_of(e));
  return device.is_cuda() ? table.to(device, /*non_blocking=*/true) : table;
}

// ---- simulator ------------------------------------------------------------------------------

at::Tensor simulate_expert_cache_cpu(MOE_INFER_PARAMS(simulate_expert_cache)) {
  const SimulationSizes sizes = check_simulate_expert_cache(MOE_INFER_ARGS(simulate_expert_cache));
  const at::Tensor ids = accesses.to(at::kLong).contiguous();
  const at::Tensor offsets = batch_offsets.contiguous();
  const int64_t* id_ptr = ids.const_data_ptr<int64_t>();
  const int64_t* offset_ptr = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(
      offset_ptr[0] == 0 && offset_ptr[sizes.num_batches] == sizes.num_accesses,
      "simulate_expert_cache: batch_offsets must start at 0 and end at the number of ",
      "accesses (", sizes.num_accesses, "), got ", offset_ptr[0], " and ",
      offset_ptr[sizes.num_batches]);
  // Every offset first, then the accesses: an offset past the end read nothing before its check.
  for (int64_t b = 0; b < sizes.num_batches; ++b) {
    TORCH_CHECK_VALUE(
        offset_ptr[b] <= offset_ptr[b + 1],
        "simulate_expert_cache: batch_offsets must be non-decreasing, but batch_offsets[", b + 1,
        "] (", offset_ptr[b + 1], ") < batch_offsets[", b, "] (", offset_ptr[b], ")");
  }
  for (int64_t b = 0; b < sizes.num_batches; ++b) {
    for (int64_t i = offset_ptr[b]; i < offset_ptr[b + 1]; ++i) {
      TORCH_CHECK_VALUE(id_ptr[i] >= 0 && id_ptr[i] < num_experts,
                        "simulate_expert_cache: accesses[", i, "] = ", id_ptr[i],
                        " is out of range [0, ", num_experts, ")");
      TORCH_CHECK_VALUE(i == offset_ptr[b] || id_ptr[i] > id_ptr[i - 1],
                        "simulate_expert_cache: the experts of batch ", b,
                        " must be distinct and increasing (its active experts in id order), but "
                        "accesses[",
                        i, "] = ", id_ptr[i], " follows ", id_ptr[i - 1]);
    }
  }
  // Belady needs, for each access, the position of the same expert's next access.
  std::vector<int64_t> next_position(sizes.num_accesses, ExpertCache::kNever);
  std::vector<int64_t> first_position(num_experts, ExpertCache::kNever);
  for (int64_t i = sizes.num_accesses - 1; i >= 0; --i) {
    next_position[i] = first_position[id_ptr[i]];
    first_position[id_ptr[i]] = i;
  }

  const int64_t num_policies = static_cast<int64_t>(sizes.policies.size());
  const int64_t num_sizes = static_cast<int64_t>(cache_sizes.size());
  at::Tensor result = at::zeros({num_policies, num_sizes, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.data_ptr<int64_t>();
  const std::vector<int64_t> cache_size_list(cache_sizes.begin(), cache_sizes.end());
  at::parallel_for(0, num_policies * num_sizes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const EvictionPolicy policy = sizes.policies[job / num_sizes];
      // A cache of more slots than experts never evicts: it is the cache of num_experts slots.
      const int64_t num_slots = std::min(cache_size_list[job % num_sizes], num_experts);
      ExpertCache cache(num_experts, num_slots, policy);
      for (int64_t e = 0; e < num_experts; ++e) cache.set_next_use(e, first_position[e]);
      for (int64_t b = 0; b < sizes.num_batches; ++b) {
        const int64_t first = offset_ptr[b];
        cache.begin_batch(id_ptr + first, offset_ptr[b + 1] - first);
        for (int64_t i = first; !cache.batch_done(); ++i) {
          const ExpertCache::Step step = cache.peek();
          cache.commit(step);
          cache.set_next_use(step.expert, next_position[i]);
        }
      }
      const CacheCounters& counters = cache.counters();
      out[job * 3 + 0] = counters.hits;
      out[job * 3 + 1] = counters.misses;
      out[job * 3 + 2] = counters.evictions;
    }
  });
  return result;
}

// Planned on the host whatever the device: one implementation for every device.
TORCH_LIBRARY_IMPL(moe_infer, CompositeExplicitAutograd, m) {
  m.impl("simulate_expert_cache", &simulate_expert_cache_cpu);
}

}  // namespace moe_infer
