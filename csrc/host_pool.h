// HostPool: pinned host backing created ahead of need and recycled.
//
// Creating pinned host memory costs about 200 ms per GiB (DESIGN.md), so it never happens
// on a move's path: moves take idle handles from the pool and give them back. Handles come
// in power-of-two size classes from the granularity up to the chunk size; a piece of S
// bytes takes the smallest idle class >= S (cuMemMap may map the first S bytes of a larger
// handle), so a few classes serve every piece. An optional background thread keeps the
// idle bytes at the reserve level set by aqua_host_pool_reserve.
//
// Not thread-safe by itself: the core calls it under its own mutex, except create_ahead(),
// which runs unlocked and hands finished handles over through add_idle().
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "backend.h"

namespace aqua {

class HostPool {
 public:
  // Size classes: granularity * 2^k up to chunk_bytes (a multiple of the granularity).
  void configure(uint64_t granularity, uint64_t chunk_bytes) {
    classes_.clear();
    for (uint64_t c = granularity; c < chunk_bytes; c *= 2) classes_.push_back(c);
    classes_.push_back(chunk_bytes);
  }

  const std::vector<uint64_t>& classes() const { return classes_; }

  // Smallest class that holds `size` bytes, or 0 if none does.
  uint64_t class_for(uint64_t size) const {
    for (uint64_t c : classes_)
      if (c >= size) return c;
    return 0;
  }

  // An idle handle of the smallest class >= size; false if none is idle.
  bool take(uint64_t size, Handle* handle, uint64_t* handle_bytes) {
    for (auto it = idle_.lower_bound(size); it != idle_.end(); ++it) {
      if (it->second.empty()) continue;
      *handle = it->second.back();
      it->second.pop_back();
      *handle_bytes = it->first;
      idle_bytes_ -= it->first;
      return true;
    }
    return false;
  }

  bool can_take(uint64_t size) const {
    for (auto it = idle_.lower_bound(size); it != idle_.end(); ++it)
      if (!it->second.empty()) return true;
    return false;
  }

  void give_back(Handle handle, uint64_t handle_bytes) {
    idle_[handle_bytes].push_back(handle);
    idle_bytes_ += handle_bytes;
  }

  // A handle newly created (counted in total_bytes).
  void add_idle(Handle handle, uint64_t handle_bytes) {
    total_bytes_ += handle_bytes;
    give_back(handle, handle_bytes);
  }

  // Forget a handle that is being released (after take()).
  void forget(uint64_t handle_bytes) { total_bytes_ -= handle_bytes; }

  // The class to create next so that the idle pool approaches `reserve` bytes with about
  // three quarters in the largest class and the rest spread over the smaller ones; 0 when
  // the pool is at its reserve.
  uint64_t next_class_to_create(uint64_t reserve) const {
    if (idle_bytes_ >= reserve || classes_.empty()) return 0;
    uint64_t largest = classes_.back();
    uint64_t small_share = reserve / 4 / classes_.size();
    for (size_t i = 0; i + 1 < classes_.size(); ++i) {
      uint64_t c = classes_[i];
      auto it = idle_.find(c);
      uint64_t have = it == idle_.end() ? 0 : it->second.size() * c;
      if (have < small_share || have == 0) return c;
    }
    return largest;
  }

  // Idle handles beyond keep_bytes, removed from the pool (the caller releases them).
  std::vector<std::pair<Handle, uint64_t>> trim(uint64_t keep_bytes) {
    std::vector<std::pair<Handle, uint64_t>> out;
    for (auto it = idle_.rbegin(); it != idle_.rend() && idle_bytes_ > keep_bytes; ++it) {
      while (!it->second.empty() && idle_bytes_ > keep_bytes) {
        out.emplace_back(it->second.back(), it->first);
        it->second.pop_back();
        idle_bytes_ -= it->first;
        total_bytes_ -= it->first;
      }
    }
    return out;
  }

  uint64_t idle_bytes() const { return idle_bytes_; }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  std::vector<uint64_t> classes_;
  std::map<uint64_t, std::vector<Handle>> idle_;  // class bytes -> idle handles
  uint64_t idle_bytes_ = 0;
  uint64_t total_bytes_ = 0;  // created and not released: idle + in use
};

}  // namespace aqua
