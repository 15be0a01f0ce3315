// Ledger: the bytes each tier holds for contexts, against its budgets, and the counters
// behind aqua_tier_stats.
//
// A device's bytes are split by whose they are: its own contexts' pieces (own_used, kept
// within local_budget) and other devices' contexts' pieces (lent_used, kept within
// lend_budget). A planned move reserves room on its destination at once but charges the
// destination's totals and peak only when it commits, so a rolled-back move leaves the
// counters as they were. Not thread-safe: the core's mutex guards it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "aqua_alloc.h"

namespace aqua {

struct TierCounters {
  uint64_t current = 0, peak = 0, total = 0;  // bytes
  uint64_t moves_in = 0, moves_out = 0;       // moves that brought bytes in / took bytes out
  uint64_t bytes_in = 0, bytes_out = 0;       // bytes those moves carried
};

class Ledger {
 public:
  explicit Ledger(int num_devices)
      : local_budget(num_devices, 0),
        lend_budget(num_devices, 0),
        own_used(num_devices, 0),
        lent_used(num_devices, 0),
        counters(num_devices + 1),
        num_devices_(num_devices) {}

  // Where a tier's counters are: devices by ordinal, then host.
  int index(int tier) const { return tier == AQUA_TIER_HOST ? num_devices_ : tier; }
  bool valid(int tier) const { return tier == AQUA_TIER_HOST || (tier >= 0 && tier < num_devices_); }

  // Bytes of a context of `home` that arrived on `tier` outside a move (a new piece), or
  // were moved in.
  void add(int tier, int home, uint64_t size, bool moved_in) {
    reserve(tier, home, size);
    charge(tier, size, moved_in);
  }

  // Holds budget room on `tier` for a planned move; its totals and peak are charged only
  // when the move commits, so a rolled-back move leaves them as they were.
  void reserve(int tier, int home, uint64_t size) {
    if (tier == AQUA_TIER_HOST) host_used += size;
    else if (tier == home) own_used[tier] += size;
    else lent_used[tier] += size;
    counters[index(tier)].current += size;
  }

  // Counts bytes that arrived on `tier` (already reserved there): total, peak, bytes in.
  void charge(int tier, uint64_t size, bool moved_in) {
    TierCounters& c = counters[index(tier)];
    c.peak = std::max(c.peak, c.current);
    c.total += size;
    if (moved_in) c.bytes_in += size;
  }

  // Bytes of a context of `home` that left `tier` (freed, moved out, or a reservation given up).
  void remove(int tier, int home, uint64_t size, bool moved_out) {
    if (tier == AQUA_TIER_HOST) host_used -= size;
    else if (tier == home) own_used[tier] -= size;
    else lent_used[tier] -= size;
    TierCounters& c = counters[index(tier)];
    c.current -= size;
    if (moved_out) c.bytes_out += size;
  }

  // Bytes by which lender `tier` holds more of other devices' contexts than its lend budget.
  uint64_t lent_excess(int tier) const {
    return lent_used[tier] > lend_budget[tier] ? lent_used[tier] - lend_budget[tier] : 0;
  }

  // Per device, by ordinal; bytes.
  std::vector<uint64_t> local_budget;  // most bytes of the device's own contexts on it
  std::vector<uint64_t> lend_budget;   // most bytes of other devices' contexts on it
  std::vector<uint64_t> own_used;      // bytes of its own contexts' pieces on it
  std::vector<uint64_t> lent_used;     // bytes of other devices' contexts' pieces on it
  uint64_t host_budget = 0;            // most bytes of pieces on host
  uint64_t host_used = 0;              // bytes of pieces on host
  std::vector<TierCounters> counters;  // per tier, by index()

 private:
  int num_devices_;
};

}  // namespace aqua
