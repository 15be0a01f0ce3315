// Mover: see mover.h.
#include "mover.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include "errors.h"

namespace aqua {

Mover::Mover(Backend& backend, Ledger& ledger, Backings& backings, Profiler& profiler, EventLog& events,
             const SegmentMap& segments, uint64_t& clock, int num_devices)
    : backend_(backend),
      ledger_(ledger),
      backings_(backings),
      profiler_(profiler),
      events_(events),
      segments_(segments),
      clock_(clock),
      streams_(num_devices, 0),
      in_streams_(num_devices, 0),
      idle_events_(num_devices) {}

// --- the move, step by step -------------------------------------------------------------
//
// execute() moves every step's piece to its new backing (already acquired and accounted on
// the destination). The steps may belong to several contexts of one device (a resume that
// evicts parked contexts to make room): `ctx` is the context the move is for, and the
// default owner of steps that name none. In order:
//   begin            who is involved, MOVE_START events;
//   open_streams     one mover stream per direction, after every involved context's kernels;
//   choose_read_through, drop_kept_mappings
//                    which pieces of a park read a second mapping of their old backing;
//                    kept staging mappings that this move does not read through are dropped;
//   stage, issue_copy (issue_copies orders them)
//                    map where each copy writes (and reads), issue the copy and its event;
//   remap_homes      per piece in commit order: wait for what its remap must follow, then
//                    unmap the old backing at home and map the new one (committed);
//   finish_early     wait for the copies of pieces committed before their copy completed,
//                    and drop their second and staging mappings;
//   settle           every piece committed: give the old backings back, settle the ledger,
//                    MOVE_END events.
// Each step records on its MoveStep what it has mapped or committed (staged,
// source_shadowed, had_kept, copied, committed). A step that fails calls abort_move, which
// waits for every copy issued, then unwinds by those flags: every piece is mapped at home
// as before with its bytes, every new backing is given back.
//
// Three orderings come from measured driver costs (benchmarks/probe_park_copy.py, H200):
// - While a copy out of the device runs, a set-access of device memory waits about 1 ms
//   (0.03 ms otherwise; copies into the device do not slow it). So a move with copies out
//   makes every staging and second mapping first, then issues the copies.
// - A park into pre-mapped host backings reads its last pieces through a second mapping of
//   the old backings (at the shadow): their home remaps (the host set-access, about 0.6 ms
//   per 64 MiB, is the costly call) need not wait for their copies, so they are committed
//   first, once the context's kernels are done, while the copies are in flight. A resume
//   keeps its staging mappings of the context's last pieces (Piece::shadow_mapped), so the
//   park after it maps nothing before its copies (two mappings cost about 0.06 ms there).
// - A resume (no copies out) reads each piece that comes home from pre-mapped host backing
//   at the backing's own mapping, so its home remap (the host unmap, about 0.17 ms per
//   64 MiB, is the costly call) need not wait for the copy either: the last piece's remap
//   no longer follows the last copy.
// - Then pieces leaving the device commit in order, and pieces coming home last: by then
//   the copies out are done and their set-access calls are cheap.
// Old backings are released only when every piece has committed (and every copy is done):
// until then an unwind can map them back, and their bytes were never touched.

// One move in flight: its steps and what execute() has worked out about them.
struct Mover::Move {
  Move(Context& for_ctx, std::vector<MoveStep>& move_steps) : ctx(for_ctx), steps(move_steps) {}

  Context& ctx;  // the context the move is for
  std::vector<MoveStep>& steps;
  uint64_t start_ns = 0;             // when the move began (now_ns()), for its events
  uint64_t total = 0;                // bytes of every step's piece
  std::map<int, Context*> involved;  // context id -> context, for every context with a step
  Stream streams[2] = {0, 0};        // [0]: out of the device (and between other tiers), [1]: into it
  bool copies_out = false;           // some step does not come into the device
  std::vector<bool> read_through_shadow;  // per step: its copy reads a second mapping at the shadow
  std::vector<bool> keep_staging;         // per step: its staging mapping stays after the move
};

namespace {

Piece& piece_of(const MoveStep& s) { return s.segment->pieces[s.index]; }
bool into_device(const MoveStep& s) { return s.dst == s.ctx->device; }

}  // namespace

int Mover::execute(Context& ctx, std::vector<MoveStep>& steps, uint64_t* bytes_moved) {
  Move move{ctx, steps};
  begin(move);
  if (int st = open_streams(move)) return st;
  choose_read_through(move);
  if (int st = drop_kept_mappings(move)) return st;
  if (int st = issue_copies(move)) return st;
  if (int st = remap_homes(move)) return st;
  if (int st = finish_early(move)) return st;
  *bytes_moved = settle(move);
  return AQUA_OK;
}

// Gives each step its context (the move's when it names none), sums the bytes, and records
// a MOVE_START event per context involved. No driver calls; nothing to undo.
void Mover::begin(Move& move) {
  move.start_ns = now_ns();
  for (MoveStep& s : move.steps) {
    if (!s.ctx) s.ctx = &move.ctx;
    move.involved[s.ctx->id] = s.ctx;
    move.total += piece_of(s).size;
  }
  for (auto& [id, c] : move.involved) {
    uint64_t bytes = 0;
    for (const MoveStep& s : move.steps)
      if (s.ctx == c) bytes += piece_of(s).size;
    const MoveStep& first =
        *std::find_if(move.steps.begin(), move.steps.end(), [c = c](const MoveStep& s) { return s.ctx == c; });
    events_.add(move.start_ns, AQUA_EV_MOVE_START, id, first.src, first.dst, bytes, 0, first.segment->va, 0);
  }
}

// One stream per direction the steps take; each waits for the last kernels of every
// context involved (recorded at park), so no copy reads a range a kernel may still write.
// On failure nothing is mapped yet: the move is aborted (its backings given back).
int Mover::open_streams(Move& move) {
  for (const MoveStep& s : move.steps) {
    int dir = into_device(s) ? 1 : 0;
    if (move.streams[dir]) continue;
    if (int r = mover_stream(move.ctx.device, dir == 1, &move.streams[dir]))
      return abort_move(move, "creating a mover stream", r);
    for (auto& [id, c] : move.involved) {
      (void)id;
      if (!c->park_recorded) continue;
      if (int r = backend_.stream_wait_event(move.streams[dir], c->park_event))
        return abort_move(move, "waiting for the park event", r);
    }
  }
  return AQUA_OK;
}

// Pieces of a park to host read through a second mapping of their old backing at the
// shadow (see above): up to kShadowedTail of the pieces that leave their home device for
// pre-mapped host backings, first those still mapped at the shadow since their resume
// (nothing to map), then the last ones. No driver calls.
void Mover::choose_read_through(Move& move) {
  std::vector<MoveStep>& steps = move.steps;
  move.copies_out = std::any_of(steps.begin(), steps.end(), [](const MoveStep& s) { return !into_device(s); });
  move.read_through_shadow.assign(steps.size(), false);
  auto may_read_through = [&](const MoveStep& s) {
    uintptr_t va = 0;
    return s.dst == AQUA_TIER_HOST && piece_of(s).tier == s.ctx->device && backings_.host_mapping(s.handle, &va);
  };
  size_t chosen = 0;
  for (bool kept_only : {true, false})
    for (size_t k = steps.size(); k-- > 0 && chosen < kShadowedTail;)
      if (!move.read_through_shadow[k] && may_read_through(steps[k]) &&
          (piece_of(steps[k]).shadow_mapped || !kept_only)) {
        move.read_through_shadow[k] = true;
        ++chosen;
      }
}

// A kept shadow mapping that this move does not read through is dropped before anything
// else: the shadow may be needed for staging, and the backing may leave. A dropped one is
// marked had_kept, so that an unwind maps it again; on failure the move is aborted.
int Mover::drop_kept_mappings(Move& move) {
  for (size_t k = 0; k < move.steps.size(); ++k) {
    MoveStep& s = move.steps[k];
    Piece& p = piece_of(s);
    if (!p.shadow_mapped || move.read_through_shadow[k]) continue;
    if (int r = backend_.unmap(s.segment->shadow + p.offset, p.size))
      return abort_move(move, "dropping a kept staging mapping", r);
    p.shadow_mapped = false;
    s.had_kept = true;  // an unwind maps it again
  }
  return AQUA_OK;
}

// Stages and issues every copy. A move with copies out of the device makes every mapping
// before its first copy (set-access is slow while such a copy runs) and issues the copies
// that read through the shadow last; a move that only comes in starts each copy after its
// own staging, so the first copy starts after one. On failure the move is aborted.
int Mover::issue_copies(Move& move) {
  const size_t n = move.steps.size();
  if (move.copies_out) {
    for (size_t k = 0; k < n; ++k)
      if (int st = stage(move, k)) return st;
    for (bool through_shadow : {false, true})  // the copies read through the shadow go last
      for (size_t k = 0; k < n; ++k)
        if (move.read_through_shadow[k] == through_shadow)
          if (int st = issue_copy(move, k)) return st;
  } else {
    for (size_t k = 0; k < n; ++k) {
      if (int st = stage(move, k)) return st;
      if (int st = issue_copy(move, k)) return st;
    }
  }
  return AQUA_OK;
}

// Maps where step k's copy writes: the host backing's own mapping (prestaged), or the new
// backing at the shadow (staged). Chooses where it reads: home; a pre-mapped host backing's
// own mapping for a resume (early); or a second mapping of the old backing at the shadow
// for a park's last pieces (early, source_shadowed). Each mapping is flagged on the step as
// it is made; on failure the move is aborted and unwinds what the flags say.
int Mover::stage(Move& move, size_t k) {
  MoveStep& s = move.steps[k];
  Piece& p = piece_of(s);
  uint64_t t0 = now_ns();
  if (backings_.own_mapping(s.handle, &s.target)) {  // host backing, or a kept device backing
    s.prestaged = true;
  } else {
    s.target = s.segment->shadow + p.offset;
    if (int r = backend_.map(s.target, p.size, s.handle)) return abort_move(move, "staging map", r);
    s.staged = true;
    if (int r = backend_.set_access(s.target, p.size, s.ctx->device))
      return abort_move(move, "staging set-access", r);
  }
  s.source = s.segment->va + p.offset;
  if (!move.copies_out && into_device(s) && s.ctx->park_recorded) {
    // A resume from a backing mapped at its own address (host, or a kept peer backing)
    // reads it there, so that home can be remapped while the copy is in flight (see above).
    if (backings_.own_mapping(p.handle, &s.source)) s.early = true;
  }
  if (move.read_through_shadow[k]) {
    s.early = true;
    // A park into a host backing mapped at its own address: the shadow is free, so the copy
    // reads a second mapping of the old backing there, and the home range can be remapped
    // to the host backing while the copy is in flight. Not for every piece: each second
    // mapping costs host time, and the host set-access calls slow the copies they overlap
    // (to 0.93 of the link), so only the remaps that would follow the last copy are moved.
    s.source = s.segment->shadow + p.offset;
    if (p.shadow_mapped) {  // kept since its resume: the step owns (and later drops) it
      p.shadow_mapped = false;
      s.source_shadowed = true;
      s.had_kept = true;
    } else {
      if (int r = backend_.map(s.source, p.size, p.handle)) return abort_move(move, "source map", r);
      s.source_shadowed = true;
      if (int r = backend_.set_access(s.source, p.size, s.ctx->device))
        return abort_move(move, "source set-access", r);
    }
  }
  profiler_.add(AQUA_PHASE_STAGE, t0, now_ns());
  return AQUA_OK;
}

// Issues step k's copy on its direction's stream, with an event after it (s.copied). The
// event is taken first: a copy is issued only with an event that abort_move can wait on.
// On failure the move is aborted; a copy issued whose event could not be recorded is
// waited for by a sync of the whole device first.
int Mover::issue_copy(Move& move, size_t k) {
  MoveStep& s = move.steps[k];
  Stream stream = move.streams[into_device(s) ? 1 : 0];
  uint64_t t0 = now_ns();
  if (int r = take_event(s.ctx->device, &s.copied)) return abort_move(move, "copy", r);
  if (int r = backend_.copy_async(s.target, s.source, piece_of(s).size, stream)) return abort_move(move, "copy", r);
  if (int r = backend_.event_record(s.copied, stream)) {
    // Issued but not waitable: wait for the whole device before anything is unwound.
    if (backend_.device_sync(s.ctx->device) != 0)
      std::fprintf(stderr, "[aqua_alloc] a move's copy could not be waited for after a failed event record\n");
    return abort_move(move, "copy", r);
  }
  profiler_.add(AQUA_PHASE_ISSUE, t0, now_ns());
  return AQUA_OK;
}

// Commits every piece (see above for the order): pieces whose copies do not read home,
// then pieces leaving, then pieces coming home. A piece coming home that is one of its
// context's last ones keeps its staging mapping: its next park reads through it without
// mapping anything first. On failure the move is aborted: the committed pieces get their
// old backings back.
int Mover::remap_homes(Move& move) {
  std::vector<MoveStep>& steps = move.steps;
  std::vector<size_t> order;
  order.reserve(steps.size());
  for (size_t k = 0; k < steps.size(); ++k)
    if (steps[k].early) order.push_back(k);
  for (bool home : {false, true})
    for (size_t k = 0; k < steps.size(); ++k)
      if (!steps[k].early && into_device(steps[k]) == home) order.push_back(k);
  move.keep_staging.assign(steps.size(), false);
  for (size_t k = 0; k < steps.size(); ++k)
    move.keep_staging[k] = steps[k].staged && into_device(steps[k]) &&
                           in_shadowed_tail(*steps[k].ctx, steps[k].segment, steps[k].index);
  bool kernels_done = false;
  for (size_t k : order)
    if (int st = remap_home(move, k, &kernels_done)) return st;
  return AQUA_OK;
}

// Waits for what step k's remap must follow: its copy; or, for a piece whose copy does not
// read home (early), only the kernels that may still use its context (the park events of
// every context involved, once per move: *kernels_done): a remap must not pull the range
// from under them, and the copy is waited for in finish_early. Then drops its staging
// mapping (unless kept or early), unmaps the old backing at home and maps the new one with
// access: the step is committed. If the new one cannot be mapped, the old one is put back
// at home and the move is aborted (which unwinds the pieces committed before).
int Mover::remap_home(Move& move, size_t k, bool* kernels_done) {
  MoveStep& s = move.steps[k];
  Piece& p = piece_of(s);
  uintptr_t home = s.segment->va + p.offset;
  uint64_t t0 = now_ns();
  if (s.early && !*kernels_done) {
    for (auto& [id, c] : move.involved) {
      (void)id;
      if (!c->park_recorded) continue;
      if (int r = backend_.event_sync(c->park_event)) return abort_move(move, "waiting for the park event", r);
    }
    *kernels_done = true;
  } else if (!s.early) {
    if (int r = backend_.event_sync(s.copied)) return abort_move(move, "waiting for the copy", r);
  }
  uint64_t t1 = now_ns();
  profiler_.add(AQUA_PHASE_WAIT, t0, t1);
  if (s.staged && !move.keep_staging[k] && !s.early) {
    if (int r = backend_.unmap(s.target, p.size)) return abort_move(move, "unstaging unmap", r);
    s.staged = false;
  }
  if (int r = backend_.unmap(home, p.size)) return abort_move(move, "unmap", r);
  int r = backend_.map(home, p.size, s.handle);
  if (r == 0) {
    r = backend_.set_access(home, p.size, s.ctx->device);
    if (r != 0) retry(backend_, &Backend::unmap, home, p.size);
  }
  if (r != 0) {
    // Put the old backing back at home; then unwind the committed steps.
    bool mapped = false;
    if (!remap_retried(home, p.size, p.handle, s.ctx->device, &mapped))
      std::fprintf(stderr, "[aqua_alloc] restoring 0x%lx after a failed map failed\n", static_cast<unsigned long>(home));
    return abort_move(move, "map at home", r);
  }
  s.committed = true;
  profiler_.add(AQUA_PHASE_REMAP, t1, now_ns());
  return AQUA_OK;
}

// For each piece committed before its copy completed (early): waits for the copy, then
// drops the old backing's second mapping and the staging mapping (unless kept). On failure
// the move is aborted; every piece is committed by now, so the unwind maps each old
// backing back at home.
int Mover::finish_early(Move& move) {
  for (size_t k = 0; k < move.steps.size(); ++k) {
    MoveStep& s = move.steps[k];
    if (!s.early) continue;
    const Piece& p = piece_of(s);
    uint64_t t0 = now_ns();
    if (int r = backend_.event_sync(s.copied)) return abort_move(move, "waiting for the copy", r);
    uint64_t t1 = now_ns();
    profiler_.add(AQUA_PHASE_WAIT, t0, t1);
    if (s.source_shadowed) {
      if (int r = backend_.unmap(s.source, p.size)) return abort_move(move, "source unmap", r);
      s.source_shadowed = false;
    }
    if (s.staged && !move.keep_staging[k]) {
      if (int r = backend_.unmap(s.target, p.size)) return abort_move(move, "unstaging unmap", r);
      s.staged = false;
    }
    profiler_.add(AQUA_PHASE_REMAP, t1, now_ns());
  }
  return AQUA_OK;
}

// Every piece now maps its new backing at home and every copy is done: gives the old
// backings back, moves the pieces' bytes in the ledger from source to destination, stamps
// away_since, recycles the copy events and records a MOVE_END event per (context, source,
// destination). Cannot fail. Returns the bytes of the move's own context's pieces.
uint64_t Mover::settle(Move& move) {
  uint64_t t_release = now_ns();
  std::set<int> tiers_out, tiers_in;  // a move counts once per tier it touches
  std::map<std::tuple<int, int, int>, uint64_t> bytes_by_move;  // (context, src, dst) -> bytes
  uint64_t own_bytes = 0;
  for (MoveStep& s : move.steps) {
    Piece& p = piece_of(s);
    Context& c = *s.ctx;
    ledger_.remove(p.tier, c.device, p.size, true);
    tiers_out.insert(ledger_.index(p.tier));
    tiers_in.insert(ledger_.index(s.dst));
    ledger_.charge(s.dst, p.size, true);
    bytes_by_move[{c.id, p.tier, s.dst}] += p.size;
    if (&c == &move.ctx) own_bytes += p.size;
    backings_.give_back(p.tier, p.handle, p.handle_bytes);
    if (s.dst == c.device) p.away_since = 0;
    else if (p.tier == c.device) p.away_since = ++clock_;
    p.tier = s.dst;
    p.handle = s.handle;
    p.handle_bytes = s.handle_bytes;
    p.shadow_mapped = s.staged;  // a kept staging mapping (keep_staging)
    idle_events_[c.device].push_back(s.copied);
  }
  for (int t : tiers_out) ledger_.counters[t].moves_out++;
  for (int t : tiers_in) ledger_.counters[t].moves_in++;
  profiler_.add(AQUA_PHASE_RELEASE, t_release, now_ns());
  uint64_t dur = now_ns() - move.start_ns;
  for (auto& [key, nbytes] : bytes_by_move) {
    auto [id, src, dst] = key;
    events_.add(move.start_ns, AQUA_EV_MOVE_END, id, src, dst, nbytes, dur, move.steps.front().segment->va, 0);
  }
  return own_bytes;
}

// --- when a step fails ------------------------------------------------------------------

// Aborts the move after `what` failed with the driver's `code`: waits for every copy issued
// so far (an unwind must not touch a backing a copy may still use; waiting again for a copy
// that is done costs nothing), unwinds, records MOVE_FAILED per context involved, and
// returns AQUA_ERR_DRIVER with a message.
int Mover::abort_move(Move& move, const char* what, int code) {
  for (const MoveStep& s : move.steps)
    if (s.copied) backend_.event_sync(s.copied);
  unwind(move.steps);
  int src_tier = move.steps.front().src, dst_tier = move.steps.front().dst;
  for (auto& [id, c] : move.involved) {
    (void)c;
    events_.add(move.start_ns, AQUA_EV_MOVE_FAILED, id, src_tier, dst_tier, move.total, now_ns() - move.start_ns, 0,
                code);
  }
  std::string who = "'" + move.ctx.tag + "'";
  if (move.involved.size() > 1)
    who += " (with evictions of " + std::to_string(move.involved.size() - 1) + " parked contexts)";
  return fail(AQUA_ERR_DRIVER, "moving context " + who + " (" + bytes_text(move.total) + ", " + tier_name(src_tier) +
                                   " -> " + tier_name(dst_tier) + "): " + what + " failed: " +
                                   backend_.error_name(code) + "; rolled back, bytes intact");
}

// Undoes a failed move, step by step, by what each step's flags say was done: committed
// steps are mapped at home with their new backing and get their old backing back; every
// staging mapping (a kept one too) is dropped; every new backing is given back. Old
// backings were never modified, so the bytes are as before the move. A committed piece
// whose new backing cannot be unmapped (after retries) keeps it instead: its bytes are the
// same, and memory that may still be mapped is never given back for reuse. The copies are
// drained (abort_move).
void Mover::unwind(std::vector<MoveStep>& steps) {
  for (MoveStep& s : steps) unwind_step(s);
}

void Mover::unwind_step(MoveStep& s) {
  Piece& p = piece_of(s);
  // A mapping kept since the piece's resume stays, as before the move, while the old
  // backing stays the piece's backing.
  bool keep_source = s.source_shadowed && s.had_kept;
  bool old_backing_pinned = !drop_source_mapping(s, keep_source);
  bool new_at_home = false;
  if (s.committed && !restore_home(s, &new_at_home)) {
    if (new_at_home) keep_moved_piece(s, keep_source, old_backing_pinned);
    else abandon_piece(s, keep_source);
    if (s.copied) idle_events_[s.ctx->device].push_back(s.copied);
    return;
  }
  if (s.staged && !retry(backend_, &Backend::unmap, s.target, p.size)) {
    // Still mapped at the shadow (staged, or a kept staging mapping of a committed piece):
    // keep the backing out of reuse (leaked, counted below).
    std::fprintf(stderr, "[aqua_alloc] unstaging a move of context '%s' failed: a backing is leaked\n",
                 s.ctx->tag.c_str());
    ledger_.remove(s.dst, s.ctx->device, p.size, false);
    if (s.copied) idle_events_[s.ctx->device].push_back(s.copied);
    return;
  }
  restore_kept_mapping(s, keep_source);
  ledger_.remove(s.dst, s.ctx->device, p.size, false);
  backings_.give_back(s.dst, s.handle, s.handle_bytes);
  if (s.copied) idle_events_[s.ctx->device].push_back(s.copied);
}

// Drops the old backing's second mapping at the shadow (source_shadowed), unless it is a
// mapping kept since the piece's resume (keep_source). False when it stays mapped there
// (after retries): the old backing must then never be given back.
bool Mover::drop_source_mapping(MoveStep& s, bool keep_source) {
  if (!s.source_shadowed || keep_source) return true;
  if (retry(backend_, &Backend::unmap, s.source, piece_of(s).size)) {
    s.source_shadowed = false;
    return true;
  }
  std::fprintf(stderr, "[aqua_alloc] unmapping a move's source mapping of context '%s' failed: "
               "its staging range stays mapped (later moves of the piece fail and roll back)\n",
               s.ctx->tag.c_str());
  return false;
}

// A committed step: maps the old backing at home again in place of the new one. False when
// it could not; *new_at_home then says whether the new backing is mapped at home (still, or
// again).
bool Mover::restore_home(MoveStep& s, bool* new_at_home) {
  const Piece& p = piece_of(s);
  uintptr_t home = s.segment->va + p.offset;
  bool unmapped = retry(backend_, &Backend::unmap, home, p.size);
  bool mapped = false;
  if (unmapped && remap_retried(home, p.size, p.handle, s.ctx->device, &mapped)) return true;
  if (mapped) retry(backend_, &Backend::unmap, home, p.size);
  *new_at_home = !unmapped;
  if (unmapped) {
    bool remapped = false;
    *new_at_home = remap_retried(home, p.size, s.handle, s.ctx->device, &remapped);
  }
  return false;
}

// The old backing could not be mapped back at home but the new one is there: the move of
// this piece stands (its copy completed before the commit: bytes intact). Its old backing
// is given back unless still mapped somewhere (old_backing_pinned: leaked).
void Mover::keep_moved_piece(MoveStep& s, bool keep_source, bool old_backing_pinned) {
  Context& ctx = *s.ctx;
  Piece& p = piece_of(s);
  std::fprintf(stderr, "[aqua_alloc] rollback of context '%s' at 0x%lx could not restore the old "
               "backing; the piece stays on %s (bytes intact)\n", ctx.tag.c_str(),
               static_cast<unsigned long>(s.segment->va + p.offset), tier_name(s.dst).c_str());
  if (keep_source) old_backing_pinned = !retry(backend_, &Backend::unmap, s.source, p.size);  // the old backing leaves
  ledger_.remove(p.tier, ctx.device, p.size, true);
  ledger_.charge(s.dst, p.size, true);
  if (!old_backing_pinned) backings_.give_back(p.tier, p.handle, p.handle_bytes);  // else leaked, still mapped
  p.tier = s.dst;
  p.handle = s.handle;
  p.handle_bytes = s.handle_bytes;
  p.shadow_mapped = s.staged;  // a kept staging mapping stays with its backing
}

// Neither backing could be mapped back at home: both are kept out of reuse (leaked) and the
// range stays unmapped.
void Mover::abandon_piece(MoveStep& s, bool keep_source) {
  Piece& p = piece_of(s);
  std::fprintf(stderr, "[aqua_alloc] rollback of context '%s' failed at 0x%lx: the range is unmapped; "
               "its backings are kept and never reused\n", s.ctx->tag.c_str(),
               static_cast<unsigned long>(s.segment->va + p.offset));
  ledger_.remove(s.dst, s.ctx->device, p.size, false);
  p.shadow_mapped = keep_source;
}

// The piece's old backing is its backing again; so is the shadow mapping it had before the
// move (Piece::shadow_mapped): kept through the move (keep_source), or dropped by it
// (had_kept) and mapped again here.
void Mover::restore_kept_mapping(MoveStep& s, bool keep_source) {
  Piece& p = piece_of(s);
  if (keep_source) {
    p.shadow_mapped = true;
    s.source_shadowed = false;
  } else if (s.had_kept) {
    uintptr_t shadow = s.segment->shadow + p.offset;
    bool mapped = false;
    p.shadow_mapped = remap_retried(shadow, p.size, p.handle, s.ctx->device, &mapped);
    if (!p.shadow_mapped && mapped && !retry(backend_, &Backend::unmap, shadow, p.size))
      std::fprintf(stderr, "[aqua_alloc] restoring a staging mapping of context '%s' failed halfway: it stays "
                   "mapped without access (later moves of the piece fail and roll back)\n", s.ctx->tag.c_str());
  }
}

// --- streams, events, retried remaps ----------------------------------------------------

void Mover::destroy_idle_events() {
  for (std::vector<Event>& idle : idle_events_) {
    for (Event e : idle) backend_.event_destroy(e);
    idle.clear();
  }
}

int Mover::take_event(int device, Event* event) {
  std::vector<Event>& idle = idle_events_[device];
  if (!idle.empty()) {
    *event = idle.back();
    idle.pop_back();
    return 0;
  }
  return backend_.event_create(event);
}

// The stream that copies out of `device` (inbound false) or into it (inbound true).
int Mover::mover_stream(int device, bool inbound, Stream* stream) {
  Stream& s = inbound ? in_streams_[device] : streams_[device];
  if (!s) {
    if (int r = backend_.stream_create(device, &s)) return r;
  }
  *stream = s;
  return 0;
}

// Maps `handle` at va with access for `device`, each call retried (restore paths).
// *mapped says whether the map itself took (then the caller owns an unmap on failure).
bool Mover::remap_retried(uintptr_t va, size_t size, Handle handle, int device, bool* mapped) {
  *mapped = false;
  for (int i = 0; i < kRestoreAttempts && !*mapped; ++i) *mapped = backend_.map(va, size, handle) == 0;
  bool access = false;
  for (int i = 0; *mapped && i < kRestoreAttempts && !access; ++i)
    access = backend_.set_access(va, size, device) == 0;
  return access;
}

bool Mover::in_shadowed_tail(const Context& ctx, const Segment* seg, size_t index) const {
  size_t seen = 0;
  for (auto va = ctx.segments.rbegin(); va != ctx.segments.rend() && seen < kShadowedTail; ++va) {
    const Segment* s = segments_.at(*va).get();
    for (size_t i = s->pieces.size(); i-- > 0 && seen < kShadowedTail; ++seen)
      if (s == seg && i == index) return true;
  }
  return false;
}

}  // namespace aqua
