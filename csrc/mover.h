// Mover: moves pieces between tiers, all or nothing. The mechanism under placement's
// decisions: it is told which piece goes where (MoveStep, with the new backing already
// acquired and its room reserved in the ledger) and never chooses.
//
// A move maps each new backing where its copy can write, issues the copies on one mover
// stream per direction of the link, remaps each piece's home range to its new backing,
// and settles the ledger and the old backings once every piece has committed. Any failure
// unwinds it: every piece is mapped at home as before, with its bytes (the old backings are
// never written), and the new backings are given back.
//
// Not thread-safe: the core's mutex is held around every call, the device of the move's
// context bound.
#pragma once

#include <cstdint>
#include <vector>

#include "backend.h"
#include "backings.h"
#include "event_log.h"
#include "ledger.h"
#include "profiler.h"
#include "segments.h"

namespace aqua {

// One piece's move from its current tier to `dst`: planned by placement (segment, index,
// src, dst, ctx, handle, handle_bytes), the rest filled in by the move as it goes.
struct MoveStep {
  Segment* segment;
  size_t index;          // into segment->pieces
  int src = 0;
  int dst = 0;
  Context* ctx = nullptr;  // the piece's context (Mover::execute fills in its own when null)
  Handle handle = 0;     // the new backing
  uint64_t handle_bytes = 0;
  bool staged = false;   // new backing mapped at the shadow
  uintptr_t target = 0;  // where the copy writes: the shadow, or the host backing's own mapping
  bool prestaged = false;  // host backing mapped once when created: no staging map
  uintptr_t source = 0;  // where the copy reads: home, or a second mapping of the old backing
  bool source_shadowed = false;  // old backing also mapped at the shadow (copy reads there)
  bool had_kept = false;  // the old backing was mapped at the shadow when the move began (Piece::shadow_mapped)
  bool early = false;      // committed before its copy completes (the copy does not read home)
  bool committed = false;  // new backing mapped at home (an unwind maps the old one back)
  Event copied = 0;      // recorded after the copy
};

class Mover {
 public:
  // `segments` and `clock` are the core's: the mover reads a context's segments (to find
  // its last pieces) and stamps Piece::away_since from the clock.
  Mover(Backend& backend, Ledger& ledger, Backings& backings, Profiler& profiler, EventLog& events,
        const SegmentMap& segments, uint64_t& clock, int num_devices);

  // Moves every step's piece: begin, open_streams, choose_read_through, drop_kept_mappings,
  // issue_copies (stage, issue_copy), remap_homes, finish_early, settle (mover.cpp). The
  // steps may belong to several contexts of one device; `ctx` is the one the move is for.
  // AQUA_OK, or an error with every piece as it was. *bytes_moved: bytes of `ctx`'s own
  // pieces moved.
  int execute(Context& ctx, std::vector<MoveStep>& steps, uint64_t* bytes_moved);

  // Events of `device` (events belong to the context current when made; the caller has
  // bound `device`): a recycled one, else a new one.
  int take_event(int device, Event* event);
  void recycle_event(int device, Event event) { idle_events_[device].push_back(event); }
  void destroy_idle_events();

 private:
  // Pieces at the end of a park to host whose copy reads a second mapping of the old
  // backing, so that their home remaps overlap the copies still in flight (execute).
  static constexpr size_t kShadowedTail = 2;
  // Whether (segment, piece) is one of the last kShadowedTail pieces of `ctx` (the ones
  // its next park reads through the shadow): their resume keeps its staging mapping.
  bool in_shadowed_tail(const Context& ctx, const Segment* seg, size_t index) const;

  // The steps of execute(), in order (mover.cpp says what each does and leaves on
  // failure). Those that return int give AQUA_OK or abort_move's status: the move is
  // then unwound.
  struct Move;
  void begin(Move& move);
  int open_streams(Move& move);
  void choose_read_through(Move& move);
  int drop_kept_mappings(Move& move);
  int issue_copies(Move& move);
  int stage(Move& move, size_t k);
  int issue_copy(Move& move, size_t k);
  int remap_homes(Move& move);
  int remap_home(Move& move, size_t k, bool* kernels_done);
  int finish_early(Move& move);
  uint64_t settle(Move& move);

  // Failure: drain, unwind by the steps' flags, report.
  int abort_move(Move& move, const char* what, int code);
  void unwind(std::vector<MoveStep>& steps);
  void unwind_step(MoveStep& s);
  bool drop_source_mapping(MoveStep& s, bool keep_source);
  bool restore_home(MoveStep& s, bool* new_at_home);
  void keep_moved_piece(MoveStep& s, bool keep_source, bool old_backing_pinned);
  void abandon_piece(MoveStep& s, bool keep_source);
  void restore_kept_mapping(MoveStep& s, bool keep_source);

  bool remap_retried(uintptr_t va, size_t size, Handle handle, int device, bool* mapped);
  int mover_stream(int device, bool inbound, Stream* stream);

  Backend& backend_;
  Ledger& ledger_;
  Backings& backings_;
  Profiler& profiler_;
  EventLog& events_;
  const SegmentMap& segments_;
  uint64_t& clock_;
  std::vector<Stream> streams_;                  // per device: mover stream out of it, 0 until made
  std::vector<Stream> in_streams_;               // per device: mover stream into it, 0 until made
  std::vector<std::vector<Event>> idle_events_;  // per device
};

}  // namespace aqua
