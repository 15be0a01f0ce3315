// EventLog: a bounded ring of aqua_event records, drained by Python for traces.
//
// When full, the oldest events are kept and new ones are dropped and counted, so a trace
// says how much it is missing. Thread-safe; record() never allocates after construction.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

#include "aqua_alloc.h"

namespace aqua {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

class EventLog {
 public:
  explicit EventLog(size_t capacity = 1 << 16) { set_capacity(capacity); }

  void set_capacity(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    ring_.assign(capacity, aqua_event{});
    head_ = 0;
    size_ = 0;
  }

  void record(const aqua_event& event) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (size_ == ring_.size()) {
      dropped_++;
      return;
    }
    ring_[(head_ + size_) % ring_.size()] = event;
    size_++;
  }

  // One event, its fields as aqua_event's (aqua_alloc.h).
  void add(uint64_t t_ns, int kind, int context, int src_tier, int dst_tier, uint64_t bytes, uint64_t dur_ns,
           uint64_t addr, int status) {
    aqua_event e{};
    e.t_ns = t_ns;
    e.kind = kind;
    e.context = context;
    e.src_tier = src_tier;
    e.dst_tier = dst_tier;
    e.bytes = bytes;
    e.dur_ns = dur_ns;
    e.addr = addr;
    e.status = status;
    record(e);
  }

  // Frees the ring (a retired core's log is never read again): later records are dropped
  // and counted, drains return nothing.
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<aqua_event>().swap(ring_);
    head_ = 0;
    size_ = 0;
  }

  // Copies up to max events out, oldest first, and removes them. Returns the count.
  int drain(aqua_event* out, int max) {
    std::lock_guard<std::mutex> lock(mutex_);
    int n = 0;
    while (n < max && size_ > 0) {
      out[n++] = ring_[head_];
      head_ = (head_ + 1) % ring_.size();
      size_--;
    }
    return n;
  }

  uint64_t dropped() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return dropped_;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<aqua_event> ring_;
  size_t head_ = 0;
  size_t size_ = 0;
  uint64_t dropped_ = 0;
};

}  // namespace aqua
