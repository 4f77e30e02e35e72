// Expert buffering (the paper's Technique 2): every expert's weights live off the compute device
// (host memory or a memory-mapped file) and each MoE layer keeps a fixed pool of expert slots on
// the device. This header has the torch-free cache core shared by the live buffer and the
// trace-driven simulator, the copy-engine interface (CPU copy threads, CUDA side stream), and the
// ExpertBuffer torch class that Python's moe_infer.buffer.ExpertBuffer owns.
//
// The cache model (one per layer). A batch's active experts (those with >= 1 token) are accessed
// in increasing id order, as the paper's per-expert processing does. An access is a hit when the
// expert is resident; otherwise it is a miss: the expert takes the lowest free slot or evicts the
// policy's victim. Hits, misses and evictions are counted on this access sequence, so the live
// buffer, the simulator and an independent model of each policy agree exactly.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/options.h"
#include "common/signatures.h"

namespace moe_infer {

// ---- torch-free core ------------------------------------------------------------------------

struct CacheCounters {
  int64_t batches = 0;
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;        // an occupant removed to make room (by a miss or a prefetch)
  int64_t prefetches = 0;       // loads started by prefetch
  int64_t prefetch_hits = 0;    // first use of a prefetched expert (counted in hits too)
  int64_t prefetch_unused = 0;  // prefetched experts evicted before any use
  int64_t warm_loads = 0;       // loads by warm start
};

// The bookkeeping of one layer's expert cache: which expert is in which slot, the eviction
// policy, and the counters. No tensors, no copies: the caller moves the weights.
class ExpertCache {
 public:
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

  // One access of a batch walk: `expert` is (hit) or will be (miss) in `slot`; a miss evicts
  // `evicted` (-1 when the slot was free).
  struct Step {
    int64_t expert = -1;
    int64_t slot = -1;
    int64_t evicted = -1;
    bool hit = false;
  };

  ExpertCache(int64_t num_experts, int64_t num_slots, EvictionPolicy policy)
      : policy_(policy),
        slot_of_(num_experts, -1),
        use_count_(num_experts, 0),
        next_use_(num_experts, kNever),
        active_(num_experts, 0),
        expert_in_(num_slots, -1),
        load_time_(num_slots, 0),
        last_use_(num_slots, 0),
        prefetched_(num_slots, 0) {}

  int64_t num_experts() const { return static_cast<int64_t>(slot_of_.size()); }
  int64_t num_slots() const { return static_cast<int64_t>(expert_in_.size()); }
  EvictionPolicy policy() const { return policy_; }
  int64_t slot_of(int64_t expert) const { return slot_of_[expert]; }
  int64_t expert_in(int64_t slot) const { return expert_in_[slot]; }
  const CacheCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = CacheCounters{}; }

  // Belady's MIN: the access position where `expert` is next needed (kNever if never). The
  // simulator keeps these current; other policies ignore them.
  void set_next_use(int64_t expert, int64_t position) { next_use_[expert] = position; }
  // LFU's frequency of `expert` (warm start seeds it from a saved profile).
  void set_use_count(int64_t expert, int64_t count) { use_count_[expert] = count; }

  // Starts a batch whose active experts are `active[0..count)`, in increasing id order.
  void begin_batch(const int64_t* active, int64_t count) {
    for (const int64_t e : batch_) active_[e] = 0;
    batch_.assign(active, active + count);
    for (const int64_t e : batch_) active_[e] = 1;
    cursor_ = 0;
    ++counters_.batches;
  }

  bool batch_done() const { return cursor_ >= batch_.size(); }

  // The next access of the batch, without changing any state.
  Step peek() const {
    Step step;
    step.expert = batch_[cursor_];
    step.slot = slot_of_[step.expert];
    step.hit = step.slot >= 0;
    if (!step.hit) {
      step.slot = free_slot();
      if (step.slot < 0) {
        // The paper's policy looks at experts inactive in this batch first, then at all.
        step.slot = victim_slot(policy_ == EvictionPolicy::kPaper ? &active_ : nullptr);
        if (step.slot < 0) step.slot = victim_slot(nullptr);
      }
      step.evicted = expert_in_[step.slot];
    }
    return step;
  }

  // Performs the access that peek() returned.
  void commit(const Step& step) {
    ++cursor_;
    ++use_count_[step.expert];
    if (step.hit) {
      ++counters_.hits;
      if (prefetched_[step.slot]) {
        ++counters_.prefetch_hits;
        prefetched_[step.slot] = 0;
      }
    } else {
      ++counters_.misses;
      place(step.expert, step.slot);
    }
    last_use_[step.slot] = ++clock_;
  }

  // Where a prefetch of `expert` (not resident) would go: a free slot, or the policy's victim
  // among residents not in `wanted` (the experts of the same request). slot -1: no room.
  Step plan_prefetch(int64_t expert, const std::vector<char>& wanted) const {
    Step step;
    step.expert = expert;
    step.slot = free_slot();
    if (step.slot < 0) step.slot = victim_slot(&wanted);
    if (step.slot >= 0) step.evicted = expert_in_[step.slot];
    return step;
  }

  void commit_prefetch(const Step& step) {
    ++counters_.prefetches;
    place(step.expert, step.slot);
    prefetched_[step.slot] = 1;
  }

  // Puts `expert` into the lowest free slot (warm start). Returns the slot, or -1 if full.
  int64_t warm_load(int64_t expert) {
    if (slot_of_[expert] >= 0) return slot_of_[expert];
    const int64_t slot = free_slot();
    if (slot < 0) return -1;
    ++counters_.warm_loads;
    place(expert, slot);
    return slot;
  }

  // Empties every slot; counters and frequencies are kept.
  void clear() {
    std::fill(slot_of_.begin(), slot_of_.end(), -1);
    std::fill(expert_in_.begin(), expert_in_.end(), -1);
    std::fill(prefetched_.begin(), prefetched_.end(), 0);
  }

 private:
  int64_t free_slot() const {
    for (int64_t s = 0; s < num_slots(); ++s) {
      if (expert_in_[s] < 0) return s;
    }
    return -1;
  }

  // True if the occupant of slot `a` should be evicted before the occupant of slot `b`.
  bool evicts_before(int64_t a, int64_t b) const {
    switch (policy_) {
      case EvictionPolicy::kPaper:  // LIFO: the last loaded goes first
        return load_time_[a] > load_time_[b];
      case EvictionPolicy::kFifo:
        return load_time_[a] < load_time_[b];
      case EvictionPolicy::kLru:
        return last_use_[a] < last_use_[b];
      case EvictionPolicy::kLfu: {
        const int64_t count_a = use_count_[expert_in_[a]];
        const int64_t count_b = use_count_[expert_in_[b]];
        return count_a != count_b ? count_a < count_b : last_use_[a] < last_use_[b];
      }
      case EvictionPolicy::kBelady:  // ties go to the lower slot
        return next_use_[expert_in_[a]] > next_use_[expert_in_[b]];
    }
    return false;
  }

  // The victim among occupied slots whose expert is not flagged in `excluded` (all occupied
  // slots when null); -1 if there is none.
  int64_t victim_slot(const std::vector<char>* excluded) const {
    int64_t best = -1;
    for (int64_t s = 0; s < num_slots(); ++s) {
      const int64_t e = expert_in_[s];
      if (e < 0 || (excluded != nullptr && (*excluded)[e])) continue;
      if (best < 0 || evicts_before(s, best)) best = s;
    }
    return best;
  }

  void place(int64_t expert, int64_t slot) {
    const int64_t occupant = expert_in_[slot];
    if (occupant >= 0) {
      ++counters_.evictions;
      if (prefetched_[slot]) ++counters_.prefetch_unused;
      slot_of_[occupant] = -1;
    }
    prefetched_[slot] = 0;
    expert_in_[slot] = expert;
    slot_of_[expert] = slot;
    load_time_[slot] = ++clock_;
    last_use_[slot] = clock_;
  }

  EvictionPolicy policy_;
  std::vector<int64_t> slot_of_;    // [E] slot or -1
  std::vector<int64_t> use_count_;  // [E] accesses (batches active), LFU
  std::vector<int64_t> next_use_;   // [E] Belady
  std::vector<char> active_;        // [E] active in the current batch
  std::vector<int64_t> expert_in_;  // [slots] expert or -1
  std::vector<int64_t> load_time_;  // [slots]
  std::vector<int64_t> last_use_;   // [slots]
  std::vector<char> prefetched_;    // [slots] loaded by prefetch and not used yet
  std::vector<int64_t> batch_;      // the current batch's active experts, increasing
  size_t cursor_ = 0;
  int64_t clock_ = 0;
  CacheCounters counters_;
};

// ---- copy engines ---------------------------------------------------------------------------

// One contiguous host -> slot copy. When `fd` >= 0 the source bytes are also bytes
// [file_offset, file_offset + num_bytes) of that open file (`source` is a mapping of it): the CPU
// copier reads them with pread, which takes no page faults and maps nothing into the process.
struct CopyRange {
  const char* source;
  char* dest;
  int64_t num_bytes;
  int fd = -1;
  int64_t file_offset = 0;
};

// Moves expert weights into slots asynchronously and orders the compute after them.
class SlotCopier {
 public:
  virtual ~SlotCopier() = default;
  // Starts filling `slot`; returns at once (it first waits for an earlier copy into that slot).
  virtual void start(int64_t slot, std::vector<CopyRange> ranges) = 0;
  // Whether every copy into `slot` has finished (never blocks). Throws if one failed.
  virtual bool ready(int64_t slot) = 0;
  // Makes the compute wait for the copies into `slots` (CPU: blocks; CUDA: the current stream
  // waits on their events). Throws if one failed (a file read error).
  virtual void wait(const std::vector<int64_t>& slots) = 0;
  // The compute that reads `slots` has been issued: later copies into them must follow it.
  virtual void release(const std::vector<int64_t>& slots) = 0;
  // Blocks until every copy started so far has finished.
  virtual void synchronize() = 0;
  // (copy time, stall time) in nanoseconds accumulated since the last call.
  virtual std::pair<int64_t, int64_t> take_times() = 0;
};

std::unique_ptr<SlotCopier> make_thread_pool_copier(int64_t num_slots, int64_t num_threads);
#ifdef MOE_INFER_WITH_CUDA
std::unique_ptr<SlotCopier> make_cuda_stream_copier(int64_t num_slots, int8_t device_index);
#endif

// ---- the live buffer (a torch class: torch.classes.moe_infer.ExpertBuffer) -------------------

// One layer's slot pool and cache. The pools are P tensors [num_slots, ...] on the compute
// device (fc1 weight, fc2 weight, biases); add_segment tells where each expert's bytes of each
// pool live on the host. A batch runs as:
//   begin_batch(tokens_per_expert) ; then until `last`:
//     (ready_table, loading_table, num_ready, num_loading, last) = next_round()
//     compute the ready experts ; wait_round() ; compute the loading experts ; end_round()
// A ready expert that round_experts() lists as deferrable keeps its slot for the rest of the
// batch, so its compute may move to any later round (e.g. to hide a later round's copy); every
// slot the batch used is released when its last round ends.
// Tables are int32 [E + 1] on the pool device: slot of each expert of the round, -1 for the
// others and at index E (so an unrouted id -1 maps to -1). A round holds every remaining active
// expert unless the pool is too small, in which case it ends just before the walk would evict an
// expert of the same round (python/moe_infer/buffer/runtime.py combines the rounds exactly).
class ExpertBuffer : public torch::CustomClassHolder {
 public:
  ExpertBuffer(int64_t num_experts, int64_t num_slots, std::string policy,
               std::vector<at::Tensor> pools, int64_t copy_threads);
  ~ExpertBuffer() override;

  // Bytes [source_offset, +num_bytes) of `source` fill bytes [dest_offset, ...) of `expert`'s
  // slot in pools[pool]. A non-empty `file` names the file those bytes are read from on the CPU,
  // at `file_offset` (`source` maps it).
  void add_segment(int64_t expert, int64_t pool, at::Tensor source, int64_t source_offset,
                   int64_t dest_offset, int64_t num_bytes, const std::string& file,
                   int64_t file_offset);
  void finalize();

  void begin_batch(const at::Tensor& tokens_per_expert);
  std::tuple<at::Tensor, at::Tensor, int64_t, int64_t, bool> next_round();
  void wait_round();
  void end_round();
  void cancel_batch();
  // The open round's experts: (ready, loading, deferrable), in walk (increasing id) order;
  // deferrable: the ready experts whose slots no later round of the batch refills.
  std::tuple<c10::List<int64_t>, c10::List<int64_t>, c10::List<int64_t>> round_experts() const;
  // Whether the open round's copies have finished (never blocks).
  bool copies_done();

  int64_t prefetch(std::vector<int64_t> experts, bool is_prediction);
  void warm_start(std::vector<int64_t> experts, const at::Tensor& use_counts);
  void clear();
  void synchronize();

  c10::Dict<std::string, int64_t> stats();
  void reset_stats();
  at::Tensor slot_table() const;
  at::Tensor activation_counts() const;
  int64_t expert_bytes() const { return expert_bytes_; }
  int64_t num_slots() const { return cache_.num_slots(); }
  int64_t num_experts() const { return cache_.num_experts(); }

 private:
  struct Segment {
    at::Tensor source;  // keeps the host memory (or file mapping) alive
    int64_t source_offset;
    int64_t dest_offset;
    int64_t num_bytes;
    int fd;  // -1: host memory
    int64_t file_offset;
  };
  // The store's files, opened once and closed after the copier has drained.
  struct OpenFiles {
    std::vector<std::pair<std::string, int>> fds;
    ~OpenFiles();
    int open(const std::string& path);
  };

  void start_load(int64_t expert, int64_t slot);
  at::Tensor make_table(const std::vector<int64_t>& experts) const;
  std::vector<int64_t> slots_of(const std::vector<int64_t>& experts) const;
  void check_idle(const char* method) const;
  void release_batch_slots();
  // Runs a copier call that may report a failed copy; on failure the pool is emptied (its
  // contents are no longer known) before the error propagates.
  template <typename F>
  auto guarded(F&& call) -> decltype(call());

  ExpertCache cache_;
  std::vector<at::Tensor> pools_;
  std::vector<int64_t> row_bytes_;                           // [P] bytes of one slot
  std::vector<std::vector<std::vector<Segment>>> segments_;  // [E][P]
  int64_t expert_bytes_ = 0;
  bool finalized_ = false;

  bool in_batch_ = false;
  bool round_open_ = false;
  bool round_waited_ = false;
  std::vector<char> pending_;   // [slots] a copy started that the compute has not waited for
  std::vector<char> in_round_;  // [E]
  std::vector<int64_t> round_ready_;
  std::vector<int64_t> round_loading_;
  std::vector<int64_t> round_deferrable_;
  std::vector<int64_t> last_fill_;  // [slots] walk position of the batch's last load into it
  std::vector<char> batch_slots_;   // [slots] computed with in this batch
  int64_t walk_position_ = 0;
  int64_t rounds_ = 0;

  std::vector<char> predicted_;  // [E] the last prediction, compared with the next batch
  bool has_prediction_ = false;
  int64_t predictions_ = 0, predicted_tp_ = 0, predicted_fp_ = 0, predicted_fn_ = 0;

  std::vector<int64_t> tokens_;          // [E] tokens routed to each expert
  std::vector<int64_t> batches_active_;  // [E] batches in which each expert was active
  int64_t bytes_copied_ = 0;
  int64_t copy_ns_ = 0;
  int64_t stall_ns_ = 0;

  OpenFiles files_;
  std::unique_ptr<SlotCopier> copier_;  // declared last: destroyed (drained) first
};

// ---- ATen op (CPU; parameters: common/signatures.h) -----------------------------------------

at::Tensor simulate_expert_cache_cpu(MOE_INFER_PARAMS(simulate_expert_cache));

}  // namespace moe_infer
