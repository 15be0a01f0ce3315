// Backings: the physical memory behind pieces, and the background thread that readies it.
//
// Host backing comes from the host pool (host_pool.h): each handle is mapped once, for good,
// at an address of its own with access for every device (host_mapping), so that a move to
// host copies straight into it and maps nothing first. Device backing is created on demand;
// one given back is released kReleaseDelayNs later unless a move of the same size to the
// same device takes it first (a context switch: park one context, resume another).
//
// The background thread releases those deferred backings and keeps the host pool at its
// reserve, in the split of size classes that demand asks for (host_pool.h): it creates
// host backing, and releases idle handles of classes beyond their share, with the owner's
// mutex released. Not thread-safe by
// itself: every method runs under the owner's mutex (the `mutex` given at construction),
// which the thread takes too; stop_thread() is called without it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "backend.h"
#include "host_pool.h"
#include "ledger.h"
#include "profiler.h"

namespace aqua {

class Backings {
 public:
  // Device backings given back wait this long (ns) before they are released.
  static constexpr uint64_t kReleaseDelayNs = 5'000'000;

  Backings(Backend& backend, std::mutex& mutex, const Ledger& ledger, Profiler& profiler, int num_devices);

  // Host pool size classes (host_pool.h): granularity * 2^k up to chunk_bytes.
  void configure(uint64_t granularity, uint64_t chunk_bytes) { host_pool_.configure(granularity, chunk_bytes); }
  const HostPool& host_pool() const { return host_pool_; }

  // A backing of `size` bytes on `tier` (*handle_bytes: its physical size): host from the
  // pool, or created within the host budget unless `pool_only` (moves do not wait for
  // pinned memory to be made, except the evictions of placement.h's HostBacking); a device
  // backing given back is reused before one is created. 0, -1 (no host backing to be had)
  // or the driver's code. Timed as AQUA_PHASE_ACQUIRE. The device binding is kept.
  // `access_device` >= 0: a move's backing, which copies of that device write or read; with
  // a device keep set (set_device_keep), a device tier's backing is then kept mapped at an
  // address of its own, like host backing, and reused.
  int acquire(int tier, uint64_t size, bool pool_only, Handle* handle, uint64_t* handle_bytes,
              int access_device = -1);
  // Whether host backing of `cls` bytes (a pool size class; 0: none fits) may be created:
  // the pool, what is being created for it or released from it outside the lock, and `cls`
  // within the budget.
  bool host_class_fits(uint64_t cls) const {
    return cls != 0 && host_pool_.total_bytes() + host_creating_bytes_ + host_releasing_bytes_ + cls <=
                           ledger_.host_budget;
  }
  // Whether a host backing of `size` bytes can be had now: idle in the pool, or (unless
  // `pool_only`) created within the budget. A miss counts as demand for its class and wakes
  // the background thread, which makes that class next (host_pool.h).
  bool host_backing_available(uint64_t size, bool pool_only);
  // Takes back a backing mapped nowhere: host into the pool, device for a deferred release.
  void give_back(int tier, Handle handle, uint64_t handle_bytes);
  // The address where host backing `handle` is mapped for good; false for any other handle.
  bool host_mapping(Handle handle, uintptr_t* va) const;
  // The address of `handle`'s own mapping (host backing, or a kept device backing), where a
  // copy may read or write it without mapping anything; false when it has none.
  bool own_mapping(Handle handle, uintptr_t* va) const;

  // Device keep: idle bytes of move backings each lending GPU keeps mapped at their own
  // address for the next move that parks another GPU's context there (0, the default: a
  // backing given back is released kReleaseDelayNs later unless a move of its size takes it
  // first); within the GPU's lend budget less what other GPUs' pieces use there. A kept
  // backing costs no create, no staging map and no access grant when a move takes it again:
  // the per-call costs that weigh most at NVLink speed (issue: parks to a peer at 0.54 to
  // 0.61 of the raw copy). Kept idle bytes are GPU memory the ledger does not count: a GPU
  // short of memory releases them first.
  void set_device_keep(uint64_t bytes) { device_keep_ = bytes; }
  // Releases the idle kept backings of `tier` (-1: every GPU).
  void release_kept(int tier);
  // Releases idle kept backings of GPU `tier` until, with what other GPUs' pieces use there,
  // they fit its lend budget (after the budget was lowered, or a reclaim).
  void release_kept_over_budget(int tier);

  // Fills the host pool to `bytes` now (creating with `lock`, on the owner's mutex, released)
  // and, if `background`, keeps it there from the thread. Running out of memory is not an
  // error: the pool holds what the system gave.
  int reserve_host(uint64_t bytes, bool background, std::unique_lock<std::mutex>& lock);
  // Releases idle host backing beyond keep_bytes.
  void trim_host(uint64_t keep_bytes);
  // Releases deferred device backings given back at least older_than_ns ago; tier -1: all tiers.
  void release_deferred(int tier, uint64_t older_than_ns);
  // Stops and joins the background thread (the owner's mutex not held); it never restarts.
  void stop_thread();

 private:
  int acquire_untimed(int tier, uint64_t size, bool pool_only, Handle* handle, uint64_t* handle_bytes,
                      int access_device);
  int acquire_kept(int tier, uint64_t size, int access_device, Handle* handle);
  int create_device(int tier, uint64_t size, Handle* handle);
  int map_at_own_address(Handle handle, uint64_t size, uintptr_t* va);
  void note_host_demand(uint64_t cls);
  uintptr_t take_host_mapping(Handle handle);
  void release_kept_handle(Handle handle);
  bool reuse_deferred(int tier, uint64_t size, Handle* handle);
  int create_host_backing(uint64_t size, Handle* handle, uintptr_t* va);
  void release_host_backing(Handle handle, uint64_t size);
  void release_host_mapping(Handle handle, uintptr_t va, uint64_t size);
  void release_retried(Handle handle, const char* what);
  bool grow_pool_once(std::unique_lock<std::mutex>& lock, int* error);
  bool shrink_pool_once(std::unique_lock<std::mutex>& lock);
  void start_thread();
  void thread_main();

  Backend& backend_;
  std::mutex& mutex_;  // the owner's: guards everything here
  const Ledger& ledger_;
  Profiler& profiler_;
  int num_devices_;

  HostPool host_pool_;
  std::map<Handle, uintptr_t> host_mappings_;  // host backing -> its own mapping (create_host_backing)

  struct DeferredRelease {
    int tier;
    Handle handle;
    uint64_t bytes;
    uint64_t since_ns;  // when it was given back (now_ns())
  };
  std::vector<DeferredRelease> deferred_;

  struct KeptMapping {
    int tier;
    uintptr_t va;           // its own mapping
    uint64_t bytes;
    uint64_t access_mask;   // bit d: access granted to device d at va
  };
  std::map<Handle, KeptMapping> kept_mappings_;                      // every kept backing, idle or in use
  std::vector<std::map<uint64_t, std::vector<Handle>>> kept_idle_;  // per GPU: bytes -> idle kept backings
  std::vector<uint64_t> kept_idle_bytes_;                           // per GPU
  uint64_t device_keep_ = 0;

  uint64_t host_reserve_ = 0;          // bytes of idle host backing to keep ready
  bool host_maintained_ = false;       // the thread grows and shrinks the pool towards the reserve
  uint64_t host_creating_bytes_ = 0;   // host backing being created outside the lock
  uint64_t host_releasing_bytes_ = 0;  // host backing being released outside the lock
  bool thread_stop_ = false;
  std::condition_variable cv_;        // wakes the thread: a backing given back or taken
  std::thread thread_;
};

}  // namespace aqua
