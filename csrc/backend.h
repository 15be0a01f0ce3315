// Backend: the driver operations the core needs, behind one interface.
//
// Two implementations: CudaBackend (the CUDA driver, loaded at run time) and SimBackend
// (simulated devices made of host memory, with failure injection). The core never
// branches on which one it runs over. Every operation returns 0 on success or the
// backend's error code; error_name() turns a code into text for messages.
//
// Addresses are integers (CUdeviceptr in CUDA, a host virtual address in the simulation).
// Handles, streams and events are opaque 64-bit values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "aqua_alloc.h"

namespace aqua {

using Handle = uint64_t;
using Stream = uint64_t;
using Event = uint64_t;

class Backend {
 public:
  virtual ~Backend() = default;

  virtual int kind() const = 0;  // enum aqua_backend_kind
  virtual int device_count() const = 0;
  virtual size_t granularity() const = 0;  // bytes; sizes and addresses are multiples
  virtual bool can_access_peer(int device, int peer) const = 0;
  virtual std::string error_name(int code) const = 0;
  virtual bool is_out_of_memory(int code) const = 0;

  // Make `device` current on the calling thread for the calls that follow.
  virtual int bind(int device) = 0;
  // The calling thread's current binding, and putting it back (entry points restore the
  // caller's current device: PyTorch reads it).
  virtual uint64_t save_binding() { return 0; }
  virtual void restore_binding(uint64_t) {}
  // Wait for all work on `device` (what cudaFree does before freeing).
  virtual int device_sync(int device) = 0;
  // The core was shut down and is kept only for callers that loaded it just before (see
  // api.cpp): give back what only new work would use. Later calls may fail; none may crash.
  virtual void release_arenas() {}
  virtual int mem_info(int device, size_t* free_bytes, size_t* total_bytes) = 0;

  virtual int reserve(size_t size, uintptr_t* va) = 0;
  virtual int free_va(uintptr_t va, size_t size) = 0;
  // Physical memory on a tier (device ordinal or AQUA_TIER_HOST).
  virtual int create(int tier, size_t size, Handle* handle) = 0;
  virtual int release(Handle handle) = 0;
  // Map the first `size` bytes of `handle` at va (size <= the handle's size).
  virtual int map(uintptr_t va, size_t size, Handle handle) = 0;
  virtual int unmap(uintptr_t va, size_t size) = 0;
  // Grant `device` read/write access to a mapped range.
  virtual int set_access(uintptr_t va, size_t size, int device) = 0;

  virtual int stream_create(int device, Stream* stream) = 0;
  virtual int copy_async(uintptr_t dst, uintptr_t src, size_t size, Stream stream) = 0;
  virtual int event_create(Event* event) = 0;
  virtual int event_destroy(Event event) = 0;
  virtual int event_record(Event event, Stream stream) = 0;
  virtual int event_sync(Event event) = 0;
  virtual int stream_wait_event(Stream stream, Event event) = 0;

  // A 32-bit word of pinned host memory that kernels' streams can wait on: *host is its
  // address for the CPU, *device_addr for stream_wait_value. Made once per core.
  virtual int flag_create(uint32_t** host, uintptr_t* device_addr) = 0;
  // Work queued on `stream` after this waits until the word at device_addr, minus `value`,
  // is >= 0 as signed 32-bit (so tickets may wrap around). The CPU writes the word.
  virtual int stream_wait_value(Stream stream, uintptr_t device_addr, uint32_t value) = 0;
};

// Puts back the calling thread's binding when it goes out of scope: the core binds devices
// as it needs, PyTorch reads the current device from that state (entry points), and a move
// records its events in its own device's context (host backing is made with device 0 bound).
class BindingGuard {
 public:
  explicit BindingGuard(Backend& backend) : backend_(backend), saved_(backend.save_binding()) {}
  ~BindingGuard() { backend_.restore_binding(saved_); }
  BindingGuard(const BindingGuard&) = delete;
  BindingGuard& operator=(const BindingGuard&) = delete;

 private:
  Backend& backend_;
  uint64_t saved_;
};

// Undo and teardown paths call each driver operation up to this many times before giving
// up: they must not leak, and a leak is all that is left when they fail.
constexpr int kRestoreAttempts = 4;

// Calls (backend.*op)(va, size) up to kRestoreAttempts times; true once it succeeds.
inline bool retry(Backend& backend, int (Backend::*op)(uintptr_t, size_t), uintptr_t va, size_t size) {
  for (int i = 0; i < kRestoreAttempts; ++i)
    if ((backend.*op)(va, size) == 0) return true;
  return false;
}

// The real driver. Returns nullptr and sets *why when libcuda or a device is missing.
Backend* make_cuda_backend(std::string* why);

struct SimConfig {
  int num_devices = 0;
  uint64_t device_capacity[64] = {};
  uint64_t host_capacity = 0;
  uint8_t peer_access[64 * 64] = {};
  uint64_t granularity = 2ull << 20;
};
Backend* make_sim_backend(const SimConfig& config, std::string* why);

// Simulated backend only: failure injection and usage (no-ops elsewhere).
class SimControl {
 public:
  virtual ~SimControl() = default;
  virtual void fail_nth(int op, uint64_t nth, uint64_t count) = 0;
  virtual void fail_random(double p, uint64_t seed, uint32_t op_mask) = 0;
  virtual void fail_clear() = 0;
  virtual uint64_t op_count(int op) const = 0;
  virtual uint64_t failures() const = 0;
  virtual int usage(int tier, uint64_t* physical_bytes, uint64_t* num_mappings) const = 0;
};

}  // namespace aqua
