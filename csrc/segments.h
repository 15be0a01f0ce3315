// Contexts, segments and pieces: the data the core keeps (core.h says what they are and
// which invariants hold over them), and how tiers and sizes are named in messages.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "backend.h"

namespace aqua {

constexpr uint64_t kMiB = 1ull << 20;

struct Piece {
  uint64_t offset = 0;        // bytes from the segment's base
  uint64_t size = 0;          // bytes mapped
  int tier = 0;               // device ordinal or AQUA_TIER_HOST
  Handle handle = 0;
  uint64_t handle_bytes = 0;  // physical bytes of the handle (>= size for host pool classes)
  uint64_t away_since = 0;    // logical clock when it left (or was placed off) its home device
  // The backing is also mapped (with access) at the segment's shadow: a resume's staging
  // mapping kept for one of the context's last pieces, so that the next park reads through
  // it without mapping anything before its copies (Mover::execute).
  bool shadow_mapped = false;
};

struct Segment {
  uintptr_t va = 0;      // home address: what torch holds
  uintptr_t shadow = 0;  // staging address range, same size
  uint64_t size = 0;
  int context = -1;
  std::vector<Piece> pieces;
};

struct Context {
  int id = -1;
  int device = 0;
  std::string tag;
  bool parked = false;
  bool released = false;
  uint64_t last_run = 0;      // logical clock of the last park or resume (LRU order)
  Event park_event = 0;       // recorded at park; every move of the context waits for it
  uint32_t async_ticket = 0;  // its last asynchronous resume (0: none)
  bool park_recorded = false;
  std::set<uintptr_t> segments;
};

using SegmentMap = std::map<uintptr_t, std::unique_ptr<Segment>>;  // home va -> segment
using ContextMap = std::map<int, std::unique_ptr<Context>>;        // context id -> context

inline std::string tier_name(int tier) { return tier == AQUA_TIER_HOST ? "host" : "gpu" + std::to_string(tier); }

inline std::string bytes_text(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / kMiB);
  return buf;
}

}  // namespace aqua
