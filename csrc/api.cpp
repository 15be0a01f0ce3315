// Every exported C symbol, as thin wrappers over the Core. See aqua_alloc.h for contracts.
//
// Nothing here throws across the C boundary: each entry point catches what the C++
// standard library may throw (bad_alloc) and turns it into a status and a message.
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "aqua_alloc.h"
#include "core.h"
#include "errors.h"

using aqua::Core;

namespace {

std::mutex g_lifecycle;               // init and shutdown
std::atomic<Core*> g_core{nullptr};
thread_local int t_context = -1;      // the calling thread's context (aqua_set_thread_context)

int no_core() {
  aqua::set_last_error("aqua_alloc is not initialized (call aqua_alloc.enable())");
  return AQUA_ERR_STATE;
}

template <typename F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    aqua::set_last_error("host out of memory inside aqua_alloc");
    return AQUA_ERR_OUT_OF_MEMORY;
  } catch (...) {
    aqua::set_last_error("unexpected C++ exception inside aqua_alloc");
    return AQUA_ERR_STATE;
  }
}

#define WITH_CORE(core)                     \
  Core* core = g_core.load();               \
  if (!core) return no_core();              \
  aqua::BindingGuard binding_guard_(core->backend());

int install(aqua::Backend* backend, aqua::SimControl* sim) {
  uint64_t saved = backend->save_binding();
  g_core.store(new Core(std::unique_ptr<aqua::Backend>(backend), sim));
  backend->restore_binding(saved);
  return AQUA_OK;
}

// Cores that were shut down are kept, never deleted: another thread may still hold the
// pointer it loaded just before the shutdown (it then finds no contexts, not freed memory).
std::vector<Core*> g_retired;

}  // namespace

extern "C" {

int aqua_init_cuda(void) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(g_lifecycle);
    if (g_core.load()) {
      aqua::set_last_error("aqua_alloc is already initialized");
      return static_cast<int>(AQUA_ERR_STATE);
    }
    std::string why;
    aqua::Backend* backend = aqua::make_cuda_backend(&why);
    if (!backend) {
      aqua::set_last_error(why);
      return static_cast<int>(AQUA_ERR_NO_DEVICE);
    }
    return install(backend, nullptr);
  });
}

int aqua_init_sim(int num_devices, const uint64_t* capacities, uint64_t host_capacity, const uint8_t* peer_access,
                  uint64_t granularity) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(g_lifecycle);
    if (g_core.load()) {
      aqua::set_last_error("aqua_alloc is already initialized");
      return static_cast<int>(AQUA_ERR_STATE);
    }
    if (num_devices < 1 || num_devices > 64) {
      aqua::set_last_error("simulated devices: num_devices must be 1..64, got " + std::to_string(num_devices));
      return static_cast<int>(AQUA_ERR_INVALID);
    }
    aqua::SimConfig config;
    config.num_devices = num_devices;
    config.host_capacity = host_capacity;
    config.granularity = granularity ? granularity : (2ull << 20);
    for (int i = 0; i < num_devices; ++i) config.device_capacity[i] = capacities ? capacities[i] : 0;
    for (int i = 0; i < num_devices * num_devices; ++i) config.peer_access[i] = peer_access ? peer_access[i] : 1;
    std::string why;
    aqua::Backend* backend = aqua::make_sim_backend(config, &why);
    if (!backend) {
      aqua::set_last_error("simulated backend: " + why);
      return static_cast<int>(AQUA_ERR_INVALID);
    }
    return install(backend, dynamic_cast<aqua::SimControl*>(backend));
  });
}

int aqua_shutdown(int force) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(g_lifecycle);
    Core* core = g_core.load();
    if (!core) return static_cast<int>(AQUA_OK);
    int r;
    {
      aqua::BindingGuard binding_guard(core->backend());
      r = core->shutdown(force != 0);
      // Kept for late callers, but its event ring and the backend's arenas are dead weight
      // (tens of MiB, file descriptors) in a process that enables and disables repeatedly.
      if (r == AQUA_OK) {
        core->events().release();
        core->backend().release_arenas();
      }
    }
    if (r != AQUA_OK) return r;
    g_core.store(nullptr);
    g_retired.push_back(core);
    return static_cast<int>(AQUA_OK);
  });
}

int aqua_backend(void) {
  Core* core = g_core.load();
  return core ? core->backend().kind() : AQUA_BACKEND_NONE;
}

const char* aqua_last_error(void) { return aqua::last_error().c_str(); }

int aqua_device_count(int* out) {
  WITH_CORE(core);
  *out = core->num_devices();
  return AQUA_OK;
}

int aqua_can_access_peer(int device, int peer, int* out) {
  WITH_CORE(core);
  *out = core->backend().can_access_peer(device, peer) ? 1 : 0;
  return AQUA_OK;
}

int aqua_mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  WITH_CORE(core);
  size_t f = 0, t = 0;
  if (int r = core->backend().mem_info(device, &f, &t)) {
    aqua::set_last_error("mem_info(" + std::to_string(device) + ") failed: " + core->backend().error_name(r));
    return AQUA_ERR_DRIVER;
  }
  *free_bytes = f;
  *total_bytes = t;
  return AQUA_OK;
}

int aqua_set_local_budget(int device, uint64_t bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->set_local_budget(device, bytes); });
}
int aqua_set_lend_budget(int device, uint64_t bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->set_lend_budget(device, bytes); });
}
int aqua_set_host_budget(uint64_t bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->set_host_budget(bytes); });
}
int aqua_set_peer_rank(int device, int peer, int rank) {
  WITH_CORE(core);
  return guarded([&] { return core->set_peer_rank(device, peer, rank); });
}
int aqua_set_chunk_bytes(uint64_t bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->set_chunk_bytes(bytes); });
}
int aqua_host_pool_reserve(uint64_t bytes, int background) {
  WITH_CORE(core);
  return guarded([&] { return core->host_pool_reserve(bytes, background != 0); });
}
int aqua_host_pool_trim(uint64_t keep_bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->host_pool_trim(keep_bytes); });
}
int aqua_set_device_keep(uint64_t bytes) {
  WITH_CORE(core);
  return guarded([&] { return core->set_device_keep(bytes); });
}

int aqua_context_create(int device, const char* tag, int* out_id) {
  WITH_CORE(core);
  return guarded([&] { return core->context_create(device, tag, out_id); });
}
int aqua_context_release(int id) {
  WITH_CORE(core);
  return guarded([&] { return core->context_release(id); });
}
int aqua_set_thread_context(int id, int* prev) {
  if (prev) *prev = t_context;
  t_context = id;
  return AQUA_OK;
}
int aqua_park(int id, uint64_t stream) {
  WITH_CORE(core);
  return guarded([&] { return core->park(id, stream); });
}
int aqua_resume(int id, uint64_t stream, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  WITH_CORE(core);
  return guarded([&] { return core->resume(id, stream, bytes_moved, bytes_elsewhere); });
}
int aqua_evict(int id, int tier, uint64_t stream, uint64_t* bytes_moved) {
  WITH_CORE(core);
  return guarded([&] { return core->evict(id, tier, stream, bytes_moved); });
}
int aqua_resume_async(int id, uint64_t stream, uint32_t* ticket) {
  WITH_CORE(core);
  return guarded([&] { return core->resume_async(id, stream, ticket); });
}
int aqua_resume_wait_on_stream(uint32_t ticket, uint64_t stream) {
  WITH_CORE(core);
  return guarded([&] { return core->resume_wait_on_stream(ticket, stream); });
}
int aqua_resume_result(uint32_t ticket, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  WITH_CORE(core);
  return guarded([&] { return core->resume_result(ticket, bytes_moved, bytes_elsewhere); });
}
int aqua_reclaim(int device, uint64_t* bytes_moved, uint64_t* bytes_pending) {
  WITH_CORE(core);
  return guarded([&] { return core->reclaim(device, bytes_moved, bytes_pending); });
}
int aqua_context_where(int id, uint64_t* out, int len) {
  WITH_CORE(core);
  return guarded([&] { return core->where(id, out, len); });
}
int aqua_context_where_nowait(int id, uint64_t* out, int len) {
  WITH_CORE(core);
  return guarded([&] { return core->where(id, out, len, /*wait=*/false); });
}
int aqua_pointer_context(uint64_t ptr, int* out_id) {
  WITH_CORE(core);
  return guarded([&] { return core->pointer_context(ptr, out_id); });
}
int aqua_range_where(uint64_t ptr, uint64_t len, uint64_t* out, int n) {
  WITH_CORE(core);
  return guarded([&] { return core->range_where(ptr, len, out, n); });
}
int aqua_context_count(int* out) {
  WITH_CORE(core);
  return core->counts(out, nullptr);
}
int aqua_segment_count(int* out) {
  WITH_CORE(core);
  return core->counts(nullptr, out);
}

int aqua_tier_stats_get(int tier, aqua_tier_stats* out) {
  WITH_CORE(core);
  return guarded([&] { return core->tier_stats(tier, out); });
}
int aqua_events_set_capacity(uint64_t capacity) {
  WITH_CORE(core);
  if (capacity == 0 || capacity > (1ull << 26)) {
    aqua::set_last_error("event buffer capacity must be 1..67108864 events, got " + std::to_string(capacity));
    return AQUA_ERR_INVALID;
  }
  return guarded([&] {
    core->events().set_capacity(capacity);
    return static_cast<int>(AQUA_OK);
  });
}
int aqua_events_drain(aqua_event* out, int max_events) {
  Core* core = g_core.load();
  if (!core || max_events <= 0) return 0;
  return core->events().drain(out, max_events);
}
uint64_t aqua_events_dropped(void) {
  Core* core = g_core.load();
  return core ? core->events().dropped() : 0;
}

int aqua_profile_get(uint64_t* ns, uint64_t* calls, int n) {
  WITH_CORE(core);
  return core->profile_get(ns, calls, n);
}
int aqua_flush_releases(void) {
  WITH_CORE(core);
  return guarded([&] {
    core->flush_releases();
    return static_cast<int>(AQUA_OK);
  });
}
int aqua_profile_reset(void) {
  WITH_CORE(core);
  core->profile_reset();
  return AQUA_OK;
}
int aqua_profile_record_spans(int on) {
  WITH_CORE(core);
  return guarded([&] {
    core->profile_record_spans(on != 0);
    return static_cast<int>(AQUA_OK);
  });
}
int aqua_profile_spans(uint64_t* out, int max_spans, int* count) {
  WITH_CORE(core);
  if (!out || !count || max_spans < 0) {
    aqua::set_last_error("aqua_profile_spans: null out or count, or negative max_spans");
    return AQUA_ERR_INVALID;
  }
  *count = core->profile_spans(out, max_spans);
  return AQUA_OK;
}

void* aqua_malloc(size_t size, int device, void* /*stream*/) {
  Core* core = g_core.load();
  if (!core) return nullptr;
  try {
    aqua::BindingGuard binding_guard(core->backend());
    return core->malloc(size, device, t_context);
  } catch (...) {
    return nullptr;  // torch raises its out-of-memory error
  }
}

void aqua_free(void* ptr, size_t /*size*/, int /*device*/, void* /*stream*/) {
  Core* core = g_core.load();
  if (!core || !ptr) return;
  try {
    aqua::BindingGuard binding_guard(core->backend());
    core->free(ptr);
  } catch (...) {
    // The free path never throws.
  }
}

#define WITH_SIM(sim)                                                          \
  Core* core_ = g_core.load();                                                 \
  aqua::SimControl* sim = core_ ? core_->sim() : nullptr;                      \
  if (!sim) {                                                                  \
    aqua::set_last_error("failure injection needs the simulated backend");     \
    return AQUA_ERR_STATE;                                                     \
  }

int aqua_sim_fail_nth(int op, uint64_t nth, uint64_t count) {
  WITH_SIM(sim);
  if (op < 0 || op >= AQUA_OP_COUNT) {
    aqua::set_last_error("unknown op " + std::to_string(op));
    return AQUA_ERR_INVALID;
  }
  sim->fail_nth(op, nth, count);
  return AQUA_OK;
}
int aqua_sim_fail_random(double p, uint64_t seed, uint32_t op_mask) {
  WITH_SIM(sim);
  if (!(p >= 0 && p <= 1)) {
    aqua::set_last_error("failure probability must be in [0, 1]");
    return AQUA_ERR_INVALID;
  }
  sim->fail_random(p, seed, op_mask);
  return AQUA_OK;
}
int aqua_sim_fail_clear(void) {
  WITH_SIM(sim);
  sim->fail_clear();
  return AQUA_OK;
}
uint64_t aqua_sim_op_count(int op) {
  Core* core = g_core.load();
  return core && core->sim() ? core->sim()->op_count(op) : 0;
}
uint64_t aqua_sim_failures(void) {
  Core* core = g_core.load();
  return core && core->sim() ? core->sim()->failures() : 0;
}
int aqua_sim_usage(int tier, uint64_t* physical_bytes, uint64_t* num_mappings) {
  WITH_SIM(sim);
  if (sim->usage(tier, physical_bytes, num_mappings)) {
    aqua::set_last_error("unknown tier " + std::to_string(tier));
    return AQUA_ERR_INVALID;
  }
  return AQUA_OK;
}

}  // extern "C"
