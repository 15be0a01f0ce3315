// Core: contexts, segments and where their bytes live.
//
// A segment is what the PyTorch caching allocator asked aqua_malloc for: a home VA range
// (the pointer torch keeps, never changed) plus a shadow VA range of the same size used as
// the copy target while a move is staged. The segment is cut into pieces of at most
// chunk_bytes; each piece is mapped by one physical handle on one tier (the context's
// device, a peer device, or pinned host memory). Moving a piece: map the new handle at the
// shadow, copy home -> shadow on the mover stream, then unmap the old handle at home and map
// the new one there. Pointers never change; bytes follow the copy.
//
// Invariants kept under mutex_:
// - every piece of a live segment is mapped at home with access for the context's device;
// - in the ledger, own_used[d] + lent_used[d] == bytes of pieces on device d, host_used ==
//   bytes on host;
// - own_used[d] <= local_budget[d] and lent_used[d] <= lend_budget[d] after any move or
//   allocation made by the core (budgets lowered later are enforced on the next placement);
// - a move is all or nothing: when it fails, every piece is mapped as before with its bytes.
//
// Core owns that state (contexts, segments, the logical clock) and the parts that work on
// it, each in its own file: Placement decides which piece goes where (placement.h), Mover
// carries the moves out (mover.h), Backings supplies physical memory and runs the thread
// that readies it (backings.h), Ledger counts bytes against the budgets (ledger.h), and
// Profiler times the moves (profiler.h). Core checks each request, takes the mutex, and
// composes the parts; it runs asynchronous resumes on a worker thread of its own.
// Thread-safe: one mutex; moves run under it (allocator callbacks wait for a move).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
#include "backings.h"
#include "errors.h"
#include "event_log.h"
#include "ledger.h"
#include "mover.h"
#include "placement.h"
#include "profiler.h"
#include "segments.h"

namespace aqua {

class Core {
 public:
  Core(std::unique_ptr<Backend> backend, SimControl* sim);
  ~Core();

  Backend& backend() { return *backend_; }
  SimControl* sim() { return sim_; }
  EventLog& events() { return events_; }
  int num_devices() const { return num_devices_; }

  int set_local_budget(int device, uint64_t bytes);
  int set_lend_budget(int device, uint64_t bytes);
  int set_host_budget(uint64_t bytes);
  int set_peer_rank(int device, int peer, int rank);
  int set_chunk_bytes(uint64_t bytes);
  int host_pool_reserve(uint64_t bytes, bool background);
  int host_pool_trim(uint64_t keep_bytes);
  int set_device_keep(uint64_t bytes);

  int context_create(int device, const char* tag, int* out_id);
  int context_release(int id);
  int park(int id, uint64_t stream);
  int resume(int id, uint64_t stream, uint64_t* bytes_moved, uint64_t* bytes_elsewhere);
  // Asynchronous resume: marks the context running and starts its move on a worker thread;
  // *ticket names it. resume_wait_on_stream makes work queued later on `stream` wait (on
  // the GPU) until it is done; resume_result waits on the host and gives its outcome.
  int resume_async(int id, uint64_t stream, uint32_t* ticket);
  int resume_wait_on_stream(uint32_t ticket, uint64_t stream);
  int resume_result(uint32_t ticket, uint64_t* bytes_moved, uint64_t* bytes_elsewhere);
  int evict(int id, int tier, uint64_t stream, uint64_t* bytes_moved);
  // wait=false: AQUA_ERR_BUSY at once (no error message) if another thread holds the core.
  int where(int id, uint64_t* out, int len, bool wait = true);
  // Moves pieces of parked contexts off lender `device` until it holds no more of other
  // devices' contexts than its lend budget. *pending: bytes still over (running contexts'
  // pieces, which move at their next park or resume; or no room anywhere).
  int reclaim(int device, uint64_t* moved, uint64_t* pending);
  int pointer_context(uint64_t ptr, int* out_id);
  int range_where(uint64_t ptr, uint64_t len, uint64_t* out, int n);
  int counts(int* contexts, int* segments);
  int tier_stats(int tier, aqua_tier_stats* out);

  // Allocator callbacks: never throw; failures are logged and recorded as events.
  void* malloc(size_t size, int device, int thread_context);
  void free(void* ptr);

  // Unmaps and frees everything (force) or refuses while segments are live.
  int shutdown(bool force);
  // Release every deferred device backing now.
  void flush_releases();

  // Where moves spend their time: ns and calls per phase (aqua_alloc.h, AQUA_PHASE_*).
  int profile_get(uint64_t* ns, uint64_t* calls, int n);
  void profile_reset();
  // The spans behind the totals, one per timed phase call, when recording (off by default;
  // at most Profiler::kMaxSpans kept, later ones dropped): a move's timeline, for benchmarks.
  void profile_record_spans(bool on);
  int profile_spans(uint64_t* out, int max_spans);

 private:
  Context* find_context(int id);
  const Segment* segment_holding(uint64_t ptr) const;  // the segment whose range holds ptr, or null
  Context* default_context(int device);
  int record_park(Context& ctx, uint64_t stream);
  void record(int kind, int context, int src, int dst, uint64_t bytes, uint64_t dur_ns, uint64_t addr,
              int status);

  void async_thread_main();
  void wait_async_resume_of(int id);
  void stop_async_thread();

  // Members are built in this order: each part is given references to those above it.
  std::unique_ptr<Backend> backend_;
  SimControl* sim_;
  int num_devices_ = 0;
  uint64_t granularity_ = 0;  // bytes: sizes and addresses are multiples
  uint64_t chunk_bytes_ = 0;  // bytes: the largest piece a segment is cut into

  std::mutex mutex_;  // guards the state below (the asynchronous resumes' queue has its own)
  ContextMap contexts_;
  std::map<int, int> default_contexts_;  // device -> context id
  int next_context_id_ = 1;
  uint64_t clock_ = 0;  // logical clock: Context::last_run, Piece::away_since
  SegmentMap segments_;

  EventLog events_;        // thread-safe by itself
  Ledger ledger_;          // bytes per tier against the budgets
  Profiler profiler_;      // where moves spend their time
  Backings backings_;      // physical memory, and the thread that readies it
  Mover mover_;            // moves pieces between tiers, all or nothing
  Placement placement_;    // which piece goes where

  // Asynchronous resumes: one worker runs them in ticket order, so the flag word (the last
  // ticket done) only grows and a GPU-side wait for ticket t is "flag >= t".
  struct AsyncResume {
    uint32_t ticket;
    int context;
  };
  struct AsyncOutcome {
    int status;
    uint64_t moved, elsewhere;
    std::string error;
  };
  std::mutex async_mutex_;  // guards the members below; never held while taking mutex_
  std::condition_variable async_cv_;
  std::vector<AsyncResume> async_queue_;
  std::map<uint32_t, AsyncOutcome> async_done_;  // until resume_result takes it
  uint32_t async_next_ticket_ = 0;
  uint32_t async_last_done_ = 0;
  bool async_stop_ = false;
  std::thread async_thread_;
  uint32_t* flag_host_ = nullptr;  // made on the first asynchronous resume (mutex_ held)
  uintptr_t flag_device_ = 0;
};

}  // namespace aqua
