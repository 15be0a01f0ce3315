// Profiler: where moves spend their time, as ns and calls per phase (enum aqua_phase,
// aqua_alloc.h), and on request the spans behind the totals (a move's timeline, for
// benchmarks). Not thread-safe: the core's mutex guards it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "aqua_alloc.h"

namespace aqua {

class Profiler {
 public:
  // At most this many spans are kept while recording; later ones are dropped.
  static constexpr size_t kMaxSpans = 1 << 14;

  // One call of `phase` that ran from t0 to t1 (steady_clock ns, now_ns()).
  void add(int phase, uint64_t t0, uint64_t t1) {
    ns_[phase] += t1 - t0;
    calls_[phase]++;
    if (record_spans_ && spans_.size() < kMaxSpans) spans_.push_back({static_cast<uint64_t>(phase), t0, t1});
  }

  // Copies up to n phases' totals: ns and calls.
  void totals(uint64_t* ns, uint64_t* calls, int n) const {
    for (int i = 0; i < n && i < AQUA_PHASE_COUNT; ++i) {
      ns[i] = ns_[i];
      calls[i] = calls_[i];
    }
  }

  void reset() {
    for (int i = 0; i < AQUA_PHASE_COUNT; ++i) ns_[i] = calls_[i] = 0;
  }

  // Starts (clearing what was recorded) or stops recording spans (off by default).
  void record_spans(bool on) {
    record_spans_ = on;
    spans_.clear();
    if (on) spans_.reserve(kMaxSpans);
  }

  // Copies up to max_spans recorded spans as (phase, t0_ns, t1_ns) triples and forgets
  // them; returns how many. Times are steady_clock ns (CLOCK_MONOTONIC, as Python's
  // time.monotonic_ns).
  int take_spans(uint64_t* out, int max_spans) {
    size_t n = std::min(spans_.size(), static_cast<size_t>(std::max(max_spans, 0)));
    for (size_t i = 0; i < n; ++i) {
      out[3 * i] = spans_[i].phase;
      out[3 * i + 1] = spans_[i].t0_ns;
      out[3 * i + 2] = spans_[i].t1_ns;
    }
    spans_.erase(spans_.begin(), spans_.begin() + n);
    return static_cast<int>(n);
  }

 private:
  struct Span {
    uint64_t phase, t0_ns, t1_ns;
  };
  uint64_t ns_[AQUA_PHASE_COUNT] = {};
  uint64_t calls_[AQUA_PHASE_COUNT] = {};
  bool record_spans_ = false;
  std::vector<Span> spans_;
};

}  // namespace aqua
