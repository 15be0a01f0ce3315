// SimBackend: devices and host made of ordinary host memory, for tests with no GPU.
//
// It keeps the semantics that matter to the core, with real pointers:
// - a tier is one sparse memfd of the tier's capacity (an "arena"); a handle is a region
//   of it, found first-fit in units of the granularity; release punches the hole so the
//   memory really goes back;
// - reserve is an inaccessible anonymous mapping; map puts the handle's region of the memfd
//   at the address (MAP_FIXED, shared, still inaccessible); set_access makes it read/write;
//   unmap turns the range back into an inaccessible reservation. Bytes written through an
//   address therefore survive a remap to another handle only if they were copied, as on
//   the GPU, and a read of an unmapped range faults instead of returning stale data;
// - streams run synchronously: copy_async is memcpy, events complete at once;
// - map over a mapped range, unmap of a range that is not one whole mapping, and set_access
//   on an unmapped range are errors, as in CUDA;
// - failure injection: fail the nth call of an op, or each call with a probability.
// Thread-safe: one mutex guards the arenas and mappings.
#include <sys/mman.h>
#include <unistd.h>
#include <fcntl.h>
#include <linux/falloc.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"

namespace aqua {
namespace {

enum SimError {
  SIM_OK = 0,
  SIM_ERR_INVALID = 1,
  SIM_ERR_OUT_OF_MEMORY = 2,
  SIM_ERR_INJECTED = 3,
  SIM_ERR_SYSTEM = 4,
  SIM_ERR_NOT_MAPPED = 5,
  SIM_ERR_ALREADY_MAPPED = 6,
  SIM_ERR_NO_PEER_ACCESS = 7,
};

// First-fit allocator of [0, capacity) in units of `unit` bytes.
class Arena {
 public:
  Arena(uint64_t capacity, uint64_t unit) : capacity_(capacity), unit_(unit) {
    if (capacity_ > 0) free_[0] = capacity_;
  }
  bool alloc(uint64_t size, uint64_t* offset) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      *offset = it->first;
      uint64_t rest = it->second - size;
      uint64_t next = it->first + size;
      free_.erase(it);
      if (rest > 0) free_[next] = rest;
      used_ += size;
      return true;
    }
    return false;
  }
  void free(uint64_t offset, uint64_t size) {
    used_ -= size;
    auto next = free_.lower_bound(offset);
    if (next != free_.end() && offset + size == next->first) {
      size += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == offset) {
        prev->second += size;
        return;
      }
    }
    free_[offset] = size;
  }
  uint64_t used() const { return used_; }
  uint64_t capacity() const { return capacity_; }

 private:
  uint64_t capacity_;
  uint64_t unit_;
  uint64_t used_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> length
};

struct SimHandle {
  int tier;
  int fd;
  uint64_t offset;
  uint64_t size;
  int num_mappings = 0;
  bool released = false;
};

struct Mapping {
  uint64_t size;
  Handle handle;
  bool accessible;
};

class SimBackend final : public Backend, public SimControl {
 public:
  explicit SimBackend(const SimConfig& config) : config_(config) {}

  ~SimBackend() override {
    for (int fd : fds_)
      if (fd >= 0) close(fd);
  }

  void release_arenas() override {  // the memfds; a handle made later fails to map (EBADF)
    std::lock_guard<std::mutex> lock(mutex_);
    for (int& fd : fds_) {
      if (fd >= 0) close(fd);
      fd = -1;
    }
  }

  bool init(std::string* why) {
    if (config_.num_devices < 0 || config_.num_devices > 64) {
      *why = "num_devices must be in 0..64";
      return false;
    }
    if (config_.granularity == 0 || config_.granularity % static_cast<uint64_t>(getpagesize()) != 0) {
      *why = "granularity must be a positive multiple of the page size";
      return false;
    }
    for (int t = 0; t <= config_.num_devices; ++t) {
      bool host = t == config_.num_devices;
      uint64_t capacity = host ? config_.host_capacity : config_.device_capacity[t];
      std::string name = host ? "aqua-sim-host" : "aqua-sim-gpu" + std::to_string(t);
      int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
      if (fd < 0 || (capacity > 0 && ftruncate(fd, static_cast<off_t>(capacity)) != 0)) {
        *why = "memfd for " + name + ": " + std::strerror(errno);
        if (fd >= 0) close(fd);
        return false;
      }
      fds_.push_back(fd);
      arenas_.emplace_back(capacity, config_.granularity);
    }
    return true;
  }

  // --- Backend -------------------------------------------------------------------------
  int kind() const override { return AQUA_BACKEND_SIM; }
  int device_count() const override { return config_.num_devices; }
  size_t granularity() const override { return config_.granularity; }
  bool can_access_peer(int device, int peer) const override {
    if (device < 0 || peer < 0 || device >= config_.num_devices || peer >= config_.num_devices) return false;
    if (device == peer) return true;
    return config_.peer_access[device * config_.num_devices + peer] != 0;
  }
  std::string error_name(int code) const override {
    switch (code) {
      case SIM_OK: return "SIM_OK";
      case SIM_ERR_INVALID: return "SIM_ERR_INVALID";
      case SIM_ERR_OUT_OF_MEMORY: return "SIM_ERR_OUT_OF_MEMORY";
      case SIM_ERR_INJECTED: return "SIM_ERR_INJECTED (injected failure)";
      case SIM_ERR_SYSTEM: return "SIM_ERR_SYSTEM";
      case SIM_ERR_NOT_MAPPED: return "SIM_ERR_NOT_MAPPED";
      case SIM_ERR_ALREADY_MAPPED: return "SIM_ERR_ALREADY_MAPPED";
      case SIM_ERR_NO_PEER_ACCESS: return "SIM_ERR_NO_PEER_ACCESS";
    }
    return "SIM_ERR_" + std::to_string(code);
  }
  bool is_out_of_memory(int code) const override { return code == SIM_ERR_OUT_OF_MEMORY; }

  int bind(int device) override {
    return device >= 0 && device < config_.num_devices ? SIM_OK : SIM_ERR_INVALID;
  }

  int device_sync(int device) override {
    return device >= 0 && device < config_.num_devices ? SIM_OK : SIM_ERR_INVALID;  // streams are synchronous
  }

  int mem_info(int device, size_t* free_bytes, size_t* total_bytes) override {
    std::lock_guard<std::mutex> lock(mutex_);
    int t = arena_index(device);
    if (t < 0) return SIM_ERR_INVALID;
    *total_bytes = arenas_[t].capacity();
    *free_bytes = arenas_[t].capacity() - arenas_[t].used();
    return SIM_OK;
  }

  int reserve(size_t size, uintptr_t* va) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_RESERVE)) return e;
    if (size == 0 || size % config_.granularity) return SIM_ERR_INVALID;
    void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return SIM_ERR_SYSTEM;
    *va = reinterpret_cast<uintptr_t>(p);
    reservations_[*va] = size;
    return SIM_OK;
  }

  int free_va(uintptr_t va, size_t size) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_FREE_VA)) return e;
    auto it = reservations_.find(va);
    if (it == reservations_.end() || it->second != size) return SIM_ERR_INVALID;
    // CUDA refuses to free a reservation that still has mappings.
    auto m = mappings_.lower_bound(va);
    if (m != mappings_.end() && m->first < va + size) return SIM_ERR_INVALID;
    munmap(reinterpret_cast<void*>(va), size);
    reservations_.erase(it);
    return SIM_OK;
  }

  int create(int tier, size_t size, Handle* handle) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_CREATE)) return e;
    int t = arena_index(tier);
    if (t < 0 || size == 0 || size % config_.granularity) return SIM_ERR_INVALID;
    if (fds_[t] < 0) return SIM_ERR_SYSTEM;  // arenas given back at shutdown
    uint64_t offset = 0;
    if (!arenas_[t].alloc(size, &offset)) return SIM_ERR_OUT_OF_MEMORY;
    auto* h = new SimHandle{tier, fds_[t], offset, size};
    *handle = reinterpret_cast<Handle>(h);
    handles_[*handle] = h;
    return SIM_OK;
  }

  int release(Handle handle) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_RELEASE)) return e;
    auto it = handles_.find(handle);
    if (it == handles_.end() || it->second->released) return SIM_ERR_INVALID;
    SimHandle* h = it->second;
    h->released = true;
    maybe_free(h);
    return SIM_OK;
  }

  int map(uintptr_t va, size_t size, Handle handle) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_MAP)) return e;
    auto it = handles_.find(handle);
    if (it == handles_.end() || it->second->released) return SIM_ERR_INVALID;
    SimHandle* h = it->second;
    if (size == 0 || size > h->size || size % config_.granularity) return SIM_ERR_INVALID;
    if (!inside_reservation(va, size)) return SIM_ERR_INVALID;
    auto next = mappings_.lower_bound(va);
    if (next != mappings_.end() && next->first < va + size) return SIM_ERR_ALREADY_MAPPED;
    if (next != mappings_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second.size > va) return SIM_ERR_ALREADY_MAPPED;
    }
    void* p = mmap(reinterpret_cast<void*>(va), size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->fd,
                   static_cast<off_t>(h->offset));
    if (p == MAP_FAILED) return SIM_ERR_SYSTEM;
    mappings_[va] = Mapping{size, handle, false};
    h->num_mappings++;
    return SIM_OK;
  }

  int unmap(uintptr_t va, size_t size) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_UNMAP)) return e;
    auto it = mappings_.find(va);
    if (it == mappings_.end() || it->second.size != size) return SIM_ERR_NOT_MAPPED;
    void* p = mmap(reinterpret_cast<void*>(va), size, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return SIM_ERR_SYSTEM;
    SimHandle* h = handles_.at(it->second.handle);
    mappings_.erase(it);
    h->num_mappings--;
    maybe_free(h);
    return SIM_OK;
  }

  int set_access(uintptr_t va, size_t size, int device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (int e = inject(AQUA_OP_SET_ACCESS)) return e;
    if (device < 0 || device >= config_.num_devices) return SIM_ERR_INVALID;
    // Every byte of [va, va+size) must be mapped, and the memory reachable from `device`.
    uintptr_t cursor = va;
    auto it = mappings_.upper_bound(va);
    if (it != mappings_.begin()) --it;
    std::vector<Mapping*> covered;
    while (cursor < va + size) {
      if (it == mappings_.end() || it->first > cursor || it->first + it->second.size <= cursor)
        return SIM_ERR_NOT_MAPPED;
      SimHandle* h = handles_.at(it->second.handle);
      if (h->tier != AQUA_TIER_HOST && !can_access_peer(device, h->tier)) return SIM_ERR_NO_PEER_ACCESS;
      covered.push_back(&it->second);
      cursor = it->first + it->second.size;
      ++it;
    }
    if (mprotect(reinterpret_cast<void*>(va), size, PROT_READ | PROT_WRITE) != 0) return SIM_ERR_SYSTEM;
    for (Mapping* m : covered) m->accessible = true;
    return SIM_OK;
  }

  int stream_create(int device, Stream* stream) override {
    if (device < 0 || device >= config_.num_devices) return SIM_ERR_INVALID;
    *stream = static_cast<Stream>(device + 1);
    return SIM_OK;
  }

  int copy_async(uintptr_t dst, uintptr_t src, size_t size, Stream) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (int e = inject(AQUA_OP_COPY)) return e;
      if (!accessible(src, size) || !accessible(dst, size)) return SIM_ERR_NOT_MAPPED;
    }
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), size);
    return SIM_OK;
  }

  int event_create(Event* event) override {
    *event = next_event_++;
    return SIM_OK;
  }
  int event_destroy(Event) override { return SIM_OK; }
  int event_record(Event, Stream) override { return SIM_OK; }
  int event_sync(Event) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return inject(AQUA_OP_SYNC);
  }
  int stream_wait_event(Stream, Event) override { return SIM_OK; }

  // Streams are synchronous here: what follows a wait on the calling thread is the work
  // "queued after" it, so the wait blocks the caller until the word reaches the value.
  int flag_create(uint32_t** host, uintptr_t* device_addr) override {
    flag_ = std::make_unique<uint32_t>(0);
    *host = flag_.get();
    *device_addr = reinterpret_cast<uintptr_t>(flag_.get());
    return SIM_OK;
  }
  int stream_wait_value(Stream, uintptr_t device_addr, uint32_t value) override {
    auto* word = reinterpret_cast<uint32_t*>(device_addr);
    while (static_cast<int32_t>(__atomic_load_n(word, __ATOMIC_ACQUIRE) - value) < 0)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    return SIM_OK;
  }

  // --- SimControl ----------------------------------------------------------------------
  void fail_nth(int op, uint64_t nth, uint64_t count) override {
    std::lock_guard<std::mutex> lock(mutex_);
    fail_at_[op] = op_counts_[op] + nth;
    fail_left_[op] = count;
  }
  void fail_random(double p, uint64_t seed, uint32_t op_mask) override {
    std::lock_guard<std::mutex> lock(mutex_);
    random_p_ = p;
    random_mask_ = op_mask;
    rng_.seed(seed);
  }
  void fail_clear() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int op = 0; op < AQUA_OP_COUNT; ++op) fail_left_[op] = 0;
    random_p_ = 0;
  }
  uint64_t op_count(int op) const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return op >= 0 && op < AQUA_OP_COUNT ? op_counts_[op] : 0;
  }
  uint64_t failures() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return num_failures_;
  }
  int usage(int tier, uint64_t* physical_bytes, uint64_t* num_mappings) const override {
    std::lock_guard<std::mutex> lock(mutex_);
    int t = arena_index(tier);
    if (t < 0) return SIM_ERR_INVALID;
    *physical_bytes = arenas_[t].used();
    uint64_t n = 0;
    for (auto& [va, m] : mappings_) {
      (void)va;
      if (handles_.at(m.handle)->tier == tier) n++;
    }
    *num_mappings = n;
    return SIM_OK;
  }

 private:
  std::unique_ptr<uint32_t> flag_;  // see flag_create
  int arena_index(int tier) const {
    if (tier == AQUA_TIER_HOST) return config_.num_devices;
    if (tier >= 0 && tier < config_.num_devices) return tier;
    return -1;
  }

  // Called with mutex_ held. Counts the call, and fails it if injection says so.
  int inject(int op) {
    uint64_t index = op_counts_[op]++;
    if (fail_left_[op] > 0 && index >= fail_at_[op]) {
      fail_left_[op]--;
      num_failures_++;
      return SIM_ERR_INJECTED;
    }
    if (random_p_ > 0 && (random_mask_ >> op) & 1u) {
      if (std::uniform_real_distribution<double>(0, 1)(rng_) < random_p_) {
        num_failures_++;
        return SIM_ERR_INJECTED;
      }
    }
    return SIM_OK;
  }

  void maybe_free(SimHandle* h) {
    if (!h->released || h->num_mappings > 0) return;
    int t = arena_index(h->tier);
    arenas_[t].free(h->offset, h->size);
    fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(h->offset),
              static_cast<off_t>(h->size));
    handles_.erase(reinterpret_cast<Handle>(h));
    delete h;
  }

  bool inside_reservation(uintptr_t va, size_t size) const {
    auto it = reservations_.upper_bound(va);
    if (it == reservations_.begin()) return false;
    --it;
    return va >= it->first && va + size <= it->first + it->second;
  }

  bool accessible(uintptr_t va, size_t size) const {
    uintptr_t cursor = va;
    auto it = mappings_.upper_bound(va);
    if (it != mappings_.begin()) --it;
    while (cursor < va + size) {
      if (it == mappings_.end() || it->first > cursor || it->first + it->second.size <= cursor ||
          !it->second.accessible)
        return false;
      cursor = it->first + it->second.size;
      ++it;
    }
    return true;
  }

  SimConfig config_;
  mutable std::mutex mutex_;
  std::vector<int> fds_;
  std::vector<Arena> arenas_;
  std::map<Handle, SimHandle*> handles_;
  std::map<uintptr_t, uint64_t> reservations_;  // va -> size
  std::map<uintptr_t, Mapping> mappings_;       // va -> mapping
  uint64_t op_counts_[AQUA_OP_COUNT] = {};
  uint64_t fail_at_[AQUA_OP_COUNT] = {};
  uint64_t fail_left_[AQUA_OP_COUNT] = {};
  double random_p_ = 0;
  uint32_t random_mask_ = 0;
  std::mt19937_64 rng_;
  uint64_t num_failures_ = 0;
  Event next_event_ = 1;
};

}  // namespace

Backend* make_sim_backend(const SimConfig& config, std::string* why) {
  auto* sim = new SimBackend(config);
  if (!sim->init(why)) {
    delete sim;
    return nullptr;
  }
  return sim;
}

}  // namespace aqua
