// HostPool: pinned host backing created ahead of need and recycled.
//
// Creating pinned host memory costs about 250 ms per GiB, over ten times the 20 ms a move
// takes to copy that GiB at 51 GiB/s (cuMemCreate of HOST_NUMA handles on an H200, driver
// 580.159.04: 230-275 ms per GiB in 64 MiB handles, 258-264 ms in 2 MiB handles, timed with
// the Driver and Vmm helpers of benchmarks/probe_park_copy.py in a one-off probe whose log
// was not kept; bench_move's logs show enable() taking 9 s for 3 GiB made ahead), so moves
// take idle handles from the pool and give them back. One move may create it: an eviction
// that makes room for a running context's new memory when the pool has none idle
// (placement.h, HostBacking). Handles come in power-of-two size classes from the
// granularity up to the chunk size, and the core cuts segments into pieces of exactly those
// sizes: a piece takes a handle of its own size. (Mapping the first S bytes of a larger
// handle is allowed by cuda.h's text but returned CUDA_ERROR_NOT_SUPPORTED for pinned host
// handles on an H200, driver 580.) A background thread keeps the idle bytes at the reserve
// level set by aqua_host_pool_reserve.
//
// The reserve is split among the classes by demand: the bytes of host backing asked for per
// class (taken or missed), over about the last kDemandWindowBytes; idle handles of classes
// nobody asks for are released. A fixed split does not fit: on the H200 (bench_serve
// mooncake, 8B) every KV piece was 16 or 2 MiB, the fixed split kept three 16 MiB handles
// and 768 MiB in 64 MiB handles that no piece could use, and once the few had gone no
// resume could evict anyone to bring its context home. Before any demand, the split is
// fixed: a few handles per smaller class, the rest in the largest.
//
// Not thread-safe by itself: Backings calls it under the core's mutex, and hands it host
// backing made with that mutex released through add_idle().
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

#include "backend.h"

namespace aqua {

class HostPool {
 public:
  static constexpr uint64_t kSmallClassHandles = 16;  // idle handles kept per smaller class before any demand
  // Demand is tallied over about this many bytes asked for (note_demand): a few context
  // switches of 1 GiB contexts.
  static constexpr uint64_t kDemandWindowBytes = 4ull << 30;

  // Size classes: granularity * 2^k up to chunk_bytes (a multiple of the granularity).
  void configure(uint64_t granularity, uint64_t chunk_bytes) {
    classes_.clear();
    demand_.clear();
    demand_total_ = 0;
    for (uint64_t c = granularity; c < chunk_bytes; c *= 2) classes_.push_back(c);
    classes_.push_back(chunk_bytes);
  }

  const std::vector<uint64_t>& classes() const { return classes_; }

  // The class of a piece of `size` bytes (its own size), or 0 if it is not a class.
  uint64_t class_for(uint64_t size) const {
    for (uint64_t c : classes_)
      if (c == size) return c;
    return 0;
  }

  // An idle handle of exactly `size` bytes; false if none is idle.
  bool take(uint64_t size, Handle* handle, uint64_t* handle_bytes) {
    auto it = idle_.find(size);
    if (it == idle_.end() || it->second.empty()) return false;
    *handle = it->second.back();
    it->second.pop_back();
    *handle_bytes = size;
    idle_bytes_ -= size;
    return true;
  }

  bool can_take(uint64_t size) const {
    auto it = idle_.find(size);
    return it != idle_.end() && !it->second.empty();
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

  // Notes that host backing of class `cls` was asked for (whether or not an idle handle
  // was there). The tally halves once it passes kDemandWindowBytes, so that the split
  // follows the recent mix.
  void note_demand(uint64_t cls) {
    if (cls == 0) return;
    demand_[cls] += cls;
    demand_total_ += cls;
    if (demand_total_ <= kDemandWindowBytes) return;
    demand_total_ = 0;
    for (auto& [c, bytes] : demand_) demand_total_ += (bytes /= 2);
  }

  // The class to create next so that the idle pool approaches `reserve` bytes; 0 when it
  // is there.
  // - Before any demand: each smaller class, smallest first, up to a few handles (the tail
  //   piece of a segment, PyTorch's 2 MiB small-pool segments), then the largest class,
  //   until the idle bytes make the reserve.
  // - After: the reserve is split among the classes asked for, in proportion to demand,
  //   each share rounded up to whole handles; the class furthest below its share comes
  //   next, until the idle handles that count towards their shares make the reserve.
  uint64_t next_class_to_create(uint64_t reserve) const {
    if (classes_.empty()) return 0;
    if (demand_total_ == 0) {
      if (idle_bytes_ >= reserve) return 0;
      uint64_t small_share = classes_.size() > 1 ? reserve / 4 / (classes_.size() - 1) : 0;
      for (size_t i = 0; i + 1 < classes_.size(); ++i) {
        uint64_t c = classes_[i];
        if (idle_of(c) < std::min<uint64_t>(small_share, kSmallClassHandles * c)) return c;
      }
      return classes_.back();
    }
    uint64_t counted = 0, best = 0, best_gap = 0;
    for (uint64_t c : classes_) {
      auto it = demand_.find(c);
      if (it == demand_.end() || it->second == 0) continue;
      // reserve <= the host budget (Backings::reserve_host), so the product fits a double exactly enough.
      uint64_t share = static_cast<uint64_t>(static_cast<double>(reserve) * it->second / demand_total_);
      uint64_t target = (share + c - 1) / c * c, have = idle_of(c);
      counted += std::min(have, target);
      if (have < target && target - have > best_gap) best = c, best_gap = target - have;
    }
    return counted >= reserve ? 0 : best;
  }

  // A class holding an idle handle that no recent demand asked for (its handles hold pinned
  // memory that only budget and reserve room for other classes would use); 0 when there is
  // none, and always before any demand. Classes that are asked for keep every idle handle:
  // what a burst made is what the next one needs, and making it again costs ten copies.
  uint64_t unwanted_class() const {
    if (demand_total_ == 0) return 0;
    for (auto& [c, handles] : idle_) {
      auto it = demand_.find(c);
      if (!handles.empty() && (it == demand_.end() || it->second == 0)) return c;
    }
    return 0;
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
  uint64_t idle_of(uint64_t cls) const {
    auto it = idle_.find(cls);
    return it == idle_.end() ? 0 : it->second.size() * cls;
  }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  std::vector<uint64_t> classes_;
  std::map<uint64_t, std::vector<Handle>> idle_;  // class bytes -> idle handles
  uint64_t idle_bytes_ = 0;
  uint64_t total_bytes_ = 0;  // created and not released: idle + in use
  std::map<uint64_t, uint64_t> demand_;  // class bytes -> bytes asked for (note_demand), decayed
  uint64_t demand_total_ = 0;            // the sum of demand_
};

}  // namespace aqua
