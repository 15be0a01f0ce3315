// Backings: see backings.h.
#include "backings.h"

#include <chrono>
#include <cstdio>

#include "errors.h"
#include "event_log.h"
#include "segments.h"

namespace aqua {

Backings::Backings(Backend& backend, std::mutex& mutex, const Ledger& ledger, Profiler& profiler, int num_devices)
    : backend_(backend),
      mutex_(mutex),
      ledger_(ledger),
      profiler_(profiler),
      num_devices_(num_devices),
      kept_idle_(num_devices),
      kept_idle_bytes_(num_devices, 0) {}

// --- taking and giving back -------------------------------------------------------------

int Backings::acquire(int tier, uint64_t size, bool pool_only, Handle* handle, uint64_t* handle_bytes,
                      int access_device) {
  uint64_t t0 = now_ns();
  int r = acquire_untimed(tier, size, pool_only, handle, handle_bytes, access_device);
  profiler_.add(AQUA_PHASE_ACQUIRE, t0, now_ns());
  return r;
}

int Backings::acquire_untimed(int tier, uint64_t size, bool pool_only, Handle* handle, uint64_t* handle_bytes,
                              int access_device) {
  if (tier == AQUA_TIER_HOST) {
    uint64_t cls = host_pool_.class_for(size);
    note_host_demand(cls);
    if (host_pool_.take(size, handle, handle_bytes)) return 0;
    if (pool_only || !host_class_fits(cls)) return -1;
    uintptr_t va = 0;
    if (int r = create_host_backing(cls, handle, &va)) return r;
    host_mappings_[*handle] = va;
    host_pool_.add_idle(*handle, cls);
    host_pool_.take(size, handle, handle_bytes);
    return 0;
  }
  *handle_bytes = size;
  // Kept: a lender's backings of other GPUs' pieces (a context's own GPU maps its backings
  // at home; keeping those would only add an address range to each).
  if (access_device >= 0 && access_device != tier && device_keep_ > 0)
    return acquire_kept(tier, size, access_device, handle);
  if (reuse_deferred(tier, size, handle)) return 0;
  return create_device(tier, size, handle);
}

// Creates device backing on GPU `tier`; out of memory, it releases what the GPU holds for
// reuse (deferred releases, kept backings) and tries once more.
int Backings::create_device(int tier, uint64_t size, Handle* handle) {
  int r = backend_.create(tier, size, handle);
  if (r != 0 && backend_.is_out_of_memory(r) && (!deferred_.empty() || kept_idle_bytes_[tier] > 0)) {
    release_deferred(tier, 0);
    release_kept(tier);
    r = backend_.create(tier, size, handle);
  }
  return r;
}

// Reserves an address range of its own for `handle` and maps it there (no access granted
// yet). On failure nothing is left reserved or mapped; the handle is the caller's.
int Backings::map_at_own_address(Handle handle, uint64_t size, uintptr_t* va) {
  if (int r = backend_.reserve(size, va)) return r;
  if (int r = backend_.map(*va, size, handle)) {
    retry(backend_, &Backend::free_va, *va, size);
    return r;
  }
  return 0;
}

// A kept backing of `size` bytes on GPU `tier` with access for `access_device` at its own
// mapping: an idle one (granting the access if it lacks it), else a new one, created and
// mapped once. 0 or the driver's code (nothing kept then).
int Backings::acquire_kept(int tier, uint64_t size, int access_device, Handle* handle) {
  Handle h = 0;
  std::vector<Handle>& idle = kept_idle_[tier][size];
  if (!idle.empty()) {
    h = idle.back();
    idle.pop_back();
    kept_idle_bytes_[tier] -= size;
  } else {
    if (int r = create_device(tier, size, &h)) return r;
    uintptr_t va = 0;
    if (int r = map_at_own_address(h, size, &va)) {
      release_retried(h, "undoing a failed kept backing");
      return r;
    }
    kept_mappings_[h] = KeptMapping{tier, va, size, 0};
  }
  KeptMapping& m = kept_mappings_.at(h);
  const uint64_t bit = uint64_t{1} << access_device;
  if (!(m.access_mask & bit)) {
    if (int r = backend_.set_access(m.va, size, access_device)) {
      give_back(tier, h, size);  // mapped at its own address only: idle again (or released)
      return r;
    }
    m.access_mask |= bit;
  }
  *handle = h;
  return 0;
}

bool Backings::host_backing_available(uint64_t size, bool pool_only) {
  if (host_pool_.can_take(size)) return true;
  uint64_t cls = host_pool_.class_for(size);
  if (!pool_only && host_class_fits(cls)) return true;
  note_host_demand(cls);
  return false;
}

// Counts a request for host backing of class `cls` and wakes the background thread, which
// tops the pool up in the classes asked for.
void Backings::note_host_demand(uint64_t cls) {
  host_pool_.note_demand(cls);
  cv_.notify_all();
}

void Backings::give_back(int tier, Handle handle, uint64_t handle_bytes) {
  if (tier == AQUA_TIER_HOST) {
    host_pool_.give_back(handle, handle_bytes);
    return;
  }
  if (kept_mappings_.count(handle)) {
    // Kept idle within device_keep and within what the GPU lends (its lend budget less what
    // other GPUs' pieces use there now): kept memory is lent memory waiting for a borrower.
    if (kept_idle_bytes_[tier] + handle_bytes <= device_keep_ &&
        ledger_.lent_used[tier] + kept_idle_bytes_[tier] + handle_bytes <= ledger_.lend_budget[tier]) {
      kept_idle_[tier][handle_bytes].push_back(handle);
      kept_idle_bytes_[tier] += handle_bytes;
    } else {
      release_kept_handle(handle);
    }
    return;
  }
  deferred_.push_back(DeferredRelease{tier, handle, handle_bytes, now_ns()});
  start_thread();
  cv_.notify_all();
}

bool Backings::host_mapping(Handle handle, uintptr_t* va) const {
  auto it = host_mappings_.find(handle);
  if (it == host_mappings_.end()) return false;
  *va = it->second;
  return true;
}

bool Backings::own_mapping(Handle handle, uintptr_t* va) const {
  if (host_mapping(handle, va)) return true;
  auto it = kept_mappings_.find(handle);
  if (it == kept_mappings_.end()) return false;
  *va = it->second.va;
  return true;
}

// --- kept device backings -----------------------------------------------------------------

void Backings::release_kept_over_budget(int tier) {
  for (auto& [bytes, handles] : kept_idle_[tier]) {
    while (!handles.empty() && ledger_.lent_used[tier] + kept_idle_bytes_[tier] > ledger_.lend_budget[tier]) {
      release_kept_handle(handles.back());
      handles.pop_back();
      kept_idle_bytes_[tier] -= bytes;
    }
  }
}

void Backings::release_kept(int tier) {
  for (int t = 0; t < num_devices_; ++t) {
    if (tier >= 0 && t != tier) continue;
    for (auto& [bytes, handles] : kept_idle_[t]) {
      (void)bytes;
      for (Handle h : handles) release_kept_handle(h);
      handles.clear();
    }
    kept_idle_bytes_[t] = 0;
  }
}

// Unmaps a kept backing from its own address and releases it (it is mapped nowhere else).
void Backings::release_kept_handle(Handle handle) {
  auto it = kept_mappings_.find(handle);
  if (it == kept_mappings_.end()) return;
  const KeptMapping m = it->second;
  kept_mappings_.erase(it);
  if (!retry(backend_, &Backend::unmap, m.va, m.bytes)) {
    std::fprintf(stderr, "[aqua_alloc] unmapping a kept %s backing failed; it is leaked\n", tier_name(m.tier).c_str());
    return;  // still mapped: never released for reuse
  }
  retry(backend_, &Backend::free_va, m.va, m.bytes);
  release_retried(handle, "releasing a kept device backing");
}

// --- deferred device releases -----------------------------------------------------------

// The latest deferred backing of exactly `size` bytes on `tier`, taken off the list.
bool Backings::reuse_deferred(int tier, uint64_t size, Handle* handle) {
  for (auto it = deferred_.rbegin(); it != deferred_.rend(); ++it) {
    if (it->tier == tier && it->bytes == size) {
      *handle = it->handle;
      deferred_.erase(std::next(it).base());
      return true;
    }
  }
  return false;
}

void Backings::release_deferred(int tier, uint64_t older_than_ns) {
  uint64_t now = now_ns();
  auto keep = deferred_.begin();
  for (auto it = deferred_.begin(); it != deferred_.end(); ++it) {
    if ((tier < 0 || it->tier == tier) && now - it->since_ns >= older_than_ns) {
      int r = backend_.release(it->handle);
      for (int i = 1; r != 0 && i < kRestoreAttempts; ++i) r = backend_.release(it->handle);
      if (r != 0)
        std::fprintf(stderr, "[aqua_alloc] releasing %s backing failed (leaked): %s\n", tier_name(it->tier).c_str(),
                     backend_.error_name(r).c_str());
    } else {
      *keep++ = *it;
    }
  }
  deferred_.erase(keep, deferred_.end());
}

// --- host backing -----------------------------------------------------------------------

// Creates pinned host backing and maps it once, for good, at an address of its own with
// access for every device: a move to host copies straight into it, so staging (a map and
// an access grant of host memory, ~0.6 ms per 64 MiB on an H200) leaves the park path.
// Driver calls only: callable without the mutex; the caller records *va in host_mappings_.
int Backings::create_host_backing(uint64_t size, Handle* handle, uintptr_t* va) {
  BindingGuard keep_binding(backend_);  // made with device 0 bound; the caller's binding comes back
  int r = backend_.bind(0);
  if (r == 0) r = backend_.create(AQUA_TIER_HOST, size, handle);
  if (r != 0) return r;
  if ((r = map_at_own_address(*handle, size, va)) != 0) {
    release_retried(*handle, "undoing a failed host backing");
    return r;
  }
  for (int d = 0; d < num_devices_ && r == 0; ++d) r = backend_.set_access(*va, size, d);
  if (r != 0) {
    if (!retry(backend_, &Backend::unmap, *va, size))
      std::fprintf(stderr, "[aqua_alloc] undoing a failed host backing: unmap failed; its address range is leaked\n");
    retry(backend_, &Backend::free_va, *va, size);
    release_retried(*handle, "undoing a failed host backing");
  }
  return r;
}

// Releases a physical handle, retried (undo and teardown paths, which must not leak).
void Backings::release_retried(Handle handle, const char* what) {
  int r = 0;
  for (int i = 0; i < kRestoreAttempts; ++i)
    if ((r = backend_.release(handle)) == 0) return;
  std::fprintf(stderr, "[aqua_alloc] %s: releasing the backing failed (leaked): %s\n", what,
               backend_.error_name(r).c_str());
}

void Backings::release_host_backing(Handle handle, uint64_t size) {
  release_host_mapping(handle, take_host_mapping(handle), size);
}

// Forgets host backing `handle`'s own mapping and returns its address (0: none recorded).
uintptr_t Backings::take_host_mapping(Handle handle) {
  auto it = host_mappings_.find(handle);
  if (it == host_mappings_.end()) return 0;
  uintptr_t va = it->second;
  host_mappings_.erase(it);
  return va;
}

// Unmaps host backing from its own address (va; 0: not mapped) and releases it. Driver
// calls only: callable without the mutex.
void Backings::release_host_mapping(Handle handle, uintptr_t va, uint64_t size) {
  BindingGuard keep_binding(backend_);
  if (va != 0) {
    if (!retry(backend_, &Backend::unmap, va, size))
      std::fprintf(stderr, "[aqua_alloc] unmapping host backing failed (its address range is leaked)\n");
    else
      retry(backend_, &Backend::free_va, va, size);
  }
  release_retried(handle, "giving host backing back");
}

int Backings::reserve_host(uint64_t bytes, bool background, std::unique_lock<std::mutex>& lock) {
  host_reserve_ = std::min(bytes, ledger_.host_budget);  // more could never be made
  host_maintained_ = background;
  // Blocking fill, creating outside the lock so that allocations proceed meanwhile.
  int r = 0;
  while (grow_pool_once(lock, &r)) {
  }
  if (r != 0 && !backend_.is_out_of_memory(r))  // out of memory: the pool holds what the system gave
    return driver_fail(backend_, "creating pinned host backing", r);
  if (background) start_thread();
  return AQUA_OK;
}

void Backings::trim_host(uint64_t keep_bytes) {
  for (auto& [h, bytes] : host_pool_.trim(keep_bytes)) release_host_backing(h, bytes);
}

// Adds one host backing of the class the pool needs most, created with `lock` released
// (bytes being created count against the budget). False when the pool is at its reserve or
// budget, or when creation failed (*error then holds the driver's code).
bool Backings::grow_pool_once(std::unique_lock<std::mutex>& lock, int* error) {
  *error = 0;
  uint64_t cls = host_pool_.next_class_to_create(host_reserve_);
  if (!host_class_fits(cls)) return false;
  host_creating_bytes_ += cls;
  lock.unlock();
  Handle h = 0;
  uintptr_t va = 0;
  int r = create_host_backing(cls, &h, &va);
  lock.lock();
  host_creating_bytes_ -= cls;
  if (r != 0) {
    *error = r;
    return false;
  }
  host_mappings_[h] = va;
  host_pool_.add_idle(h, cls);
  return true;
}

// Releases one idle host backing of a class that nobody has asked for lately
// (HostPool::unwanted_class), with `lock` released for the driver calls. False when there is
// none.
bool Backings::shrink_pool_once(std::unique_lock<std::mutex>& lock) {
  uint64_t cls = host_pool_.unwanted_class();
  Handle h = 0;
  uint64_t bytes = 0;
  if (cls == 0 || !host_pool_.take(cls, &h, &bytes)) return false;
  host_pool_.forget(bytes);
  uintptr_t va = take_host_mapping(h);
  host_releasing_bytes_ += bytes;  // still pinned until released: counted against the budget
  lock.unlock();
  release_host_mapping(h, va, bytes);
  lock.lock();
  host_releasing_bytes_ -= bytes;
  return true;
}

// --- the background thread --------------------------------------------------------------

void Backings::start_thread() {
  if (!thread_.joinable() && !thread_stop_) thread_ = std::thread(&Backings::thread_main, this);
}

void Backings::stop_thread() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    thread_stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Backings::thread_main() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!thread_stop_) {
    if (!deferred_.empty()) {
      release_deferred(-1, kReleaseDelayNs);
      if (!deferred_.empty()) {
        cv_.wait_for(lock, std::chrono::nanoseconds(kReleaseDelayNs));
        continue;
      }
    }
    int r = 0;
    // Release first: an unwanted handle may hold the budget a wanted class needs.
    if (host_maintained_ && (shrink_pool_once(lock) || grow_pool_once(lock, &r))) continue;
    // At the reserve or the budget (wait for a change), or a failure (back off and retry).
    cv_.wait_for(lock, std::chrono::milliseconds(r != 0 ? 200 : 50));
  }
}

}  // namespace aqua
