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

// Undo a failed move: committed steps are mapped at home with their new backing and get
// their old backing back; every staging mapping (a kept one too) is dropped. Every new
// backing is returned.
// Old backings were never modified, so the bytes are as before the move. A committed piece
// whose new backing cannot be unmapped (after retries) keeps it instead: its bytes are the
// same, and memory that may still be mapped is never given back for reuse.
void Mover::unwind(std::vector<MoveStep>& steps) {
  for (MoveStep& s : steps) {
    Context& ctx = *s.ctx;
    Piece& p = s.segment->pieces[s.index];
    uintptr_t home = s.segment->va + p.offset;
    // The copies are drained: drop the old backing's second mapping (it stays the backing).
    // If it cannot be dropped, the old backing must never be given back while mapped there.
    // A mapping kept since the piece's resume stays, as before the move, while the old
    // backing stays the piece's backing.
    bool old_backing_pinned = false;
    bool keep_source = s.source_shadowed && s.had_kept;
    if (s.source_shadowed && !keep_source) {
      if (retry(backend_, &Backend::unmap, s.source, p.size)) {
        s.source_shadowed = false;
      } else {
        old_backing_pinned = true;
        std::fprintf(stderr, "[aqua_alloc] unmapping a move's source mapping of context '%s' failed: "
                     "its staging range stays mapped (later moves of the piece fail and roll back)\n",
                     ctx.tag.c_str());
      }
    }
    if (s.committed) {
      bool unmapped = retry(backend_, &Backend::unmap, home, p.size);
      bool mapped = false;
      bool access = unmapped && remap_retried(home, p.size, p.handle, ctx.device, &mapped);
      if (!access) {
        if (mapped) retry(backend_, &Backend::unmap, home, p.size);
        bool kept = !unmapped;  // the new backing is still mapped at home
        if (unmapped) {
          bool remapped = false;
          kept = remap_retried(home, p.size, s.handle, ctx.device, &remapped);
        }
        if (kept) {
          // Keep the piece on its new backing: the move of this piece stands.
          std::fprintf(stderr, "[aqua_alloc] rollback of context '%s' at 0x%lx could not restore the old "
                       "backing; the piece stays on %s (bytes intact)\n", ctx.tag.c_str(),
                       static_cast<unsigned long>(home), tier_name(s.dst).c_str());
          if (keep_source) old_backing_pinned = !retry(backend_, &Backend::unmap, s.source, p.size);  // the old backing leaves
          ledger_.remove(p.tier, ctx.device, p.size, true);
          ledger_.charge(s.dst, p.size, true);
          if (!old_backing_pinned) backings_.give_back(p.tier, p.handle, p.handle_bytes);  // else leaked, still mapped
          p.tier = s.dst;
          p.handle = s.handle;
          p.handle_bytes = s.handle_bytes;
          p.shadow_mapped = s.staged;  // a kept staging mapping stays with its backing
        } else {
          // Neither backing could be mapped back: keep both (leaked, never reused).
          std::fprintf(stderr, "[aqua_alloc] rollback of context '%s' failed at 0x%lx: the range is unmapped; "
                       "its backings are kept and never reused\n", ctx.tag.c_str(), static_cast<unsigned long>(home));
          ledger_.remove(s.dst, ctx.device, p.size, false);
          p.shadow_mapped = keep_source;
        }
        if (s.copied) idle_events_[ctx.device].push_back(s.copied);
        continue;
      }
    }
    if (s.staged && !retry(backend_, &Backend::unmap, s.target, p.size)) {
      // Still mapped at the shadow (staged, or a kept staging mapping of a committed piece):
      // keep the backing out of reuse (leaked, counted below).
      std::fprintf(stderr, "[aqua_alloc] unstaging a move of context '%s' failed: a backing is leaked\n",
                   ctx.tag.c_str());
      ledger_.remove(s.dst, ctx.device, p.size, false);
      if (s.copied) idle_events_[ctx.device].push_back(s.copied);
      continue;
    }
    if (keep_source) {  // the old backing is the piece's backing again, and so is its kept mapping
      p.shadow_mapped = true;
      s.source_shadowed = false;
    } else if (s.had_kept) {  // ... which the move had dropped: map it again
      uintptr_t shadow = s.segment->shadow + p.offset;
      bool mapped = false;
      p.shadow_mapped = remap_retried(shadow, p.size, p.handle, ctx.device, &mapped);
      if (!p.shadow_mapped && mapped && !retry(backend_, &Backend::unmap, shadow, p.size))
        std::fprintf(stderr, "[aqua_alloc] restoring a staging mapping of context '%s' failed halfway: it stays "
                     "mapped without access (later moves of the piece fail and roll back)\n", ctx.tag.c_str());
    }
    ledger_.remove(s.dst, ctx.device, p.size, false);
    backings_.give_back(s.dst, s.handle, s.handle_bytes);
    if (s.copied) idle_events_[ctx.device].push_back(s.copied);
  }
}

// Moves every step's piece to its new backing (already acquired and accounted on the
// destination). The steps may belong to several contexts of one device (a resume that
// evicts parked contexts to make room): `ctx` is the context the move is for, and the
// default owner of steps that name none. Each piece is staged (new backing mapped at the
// shadow) and its copy issued, after the park events of every context involved: copies into
// the device on one mover stream, copies out of it on another, so that an eviction and a
// resume use both directions of the link at once. Then pieces are committed (unmap old at
// home, map new) as their copies complete, so remaps overlap copies in flight.
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
// until then an unwind can map them back, and their bytes were never touched. *bytes_moved:
// bytes of `ctx`'s own pieces moved.
int Mover::execute(Context& ctx, std::vector<MoveStep>& steps, uint64_t* bytes_moved) {
  uint64_t start = now_ns();
  uint64_t total = 0;
  std::map<int, Context*> involved;  // context id -> context
  for (MoveStep& s : steps) {
    if (!s.ctx) s.ctx = &ctx;
    involved[s.ctx->id] = s.ctx;
    total += s.segment->pieces[s.index].size;
  }
  int src_tier = steps.front().src, dst_tier = steps.front().dst;
  for (auto& [id, c] : involved) {
    uint64_t bytes = 0;
    for (MoveStep& s : steps)
      if (s.ctx == c) bytes += s.segment->pieces[s.index].size;
    const MoveStep& first = *std::find_if(steps.begin(), steps.end(), [c = c](const MoveStep& s) { return s.ctx == c; });
    events_.add(start, AQUA_EV_MOVE_START, id, first.src, first.dst, bytes, 0, first.segment->va, 0);
  }
  // Waits for every copy issued so far (before an unwind touches backings they may use).
  auto drain_issued = [&]() {
    for (const MoveStep& s : steps)
      if (s.copied) backend_.event_sync(s.copied);
  };
  // Unwinds the move after a failure; every copy issued must be drained first.
  auto failed = [&](const char* what, int code) {
    unwind(steps);
    for (auto& [id, c] : involved) {
      (void)c;
      events_.add(start, AQUA_EV_MOVE_FAILED, id, src_tier, dst_tier, total, now_ns() - start, 0, code);
    }
    std::string who = "'" + ctx.tag + "'";
    if (involved.size() > 1) who += " (with evictions of " + std::to_string(involved.size() - 1) + " parked contexts)";
    return fail(AQUA_ERR_DRIVER, "moving context " + who + " (" + bytes_text(total) + ", " + tier_name(src_tier) +
                                     " -> " + tier_name(dst_tier) + "): " + what + " failed: " +
                                     backend_.error_name(code) + "; rolled back, bytes intact");
  };
  auto drained_and_failed = [&](const char* what, int code) {
    drain_issued();
    return failed(what, code);
  };
  auto into_device = [](const MoveStep& s) { return s.dst == s.ctx->device; };

  // One stream per direction; each waits for the last kernels of every context involved
  // (recorded at park), so no copy reads a range a kernel may still write.
  Stream streams[2] = {0, 0};  // [0]: out of the device (and between other tiers), [1]: into it
  for (const MoveStep& s : steps) {
    int dir = into_device(s) ? 1 : 0;
    if (streams[dir]) continue;
    if (int r = mover_stream(ctx.device, dir == 1, &streams[dir])) return failed("creating a mover stream", r);
    for (auto& [id, c] : involved) {
      (void)id;
      if (!c->park_recorded) continue;
      if (int r = backend_.stream_wait_event(streams[dir], c->park_event))
        return failed("waiting for the park event", r);
    }
  }
  bool copies_out = std::any_of(steps.begin(), steps.end(), [&](const MoveStep& s) { return !into_device(s); });
  // Pieces of a park to host read through a second mapping (see above): up to kShadowedTail
  // of the pieces that leave their home device for pre-mapped host backings, first those
  // still mapped at the shadow since their resume (nothing to map), then the last ones.
  std::vector<bool> read_through_shadow(steps.size(), false);
  auto piece_of = [](const MoveStep& s) -> Piece& { return s.segment->pieces[s.index]; };
  auto may_read_through = [&](const MoveStep& s) {
    uintptr_t va = 0;
    return s.dst == AQUA_TIER_HOST && piece_of(s).tier == s.ctx->device && backings_.host_mapping(s.handle, &va);
  };
  size_t chosen = 0;
  for (bool kept_only : {true, false})
    for (size_t k = steps.size(); k-- > 0 && chosen < kShadowedTail;)
      if (!read_through_shadow[k] && may_read_through(steps[k]) && (piece_of(steps[k]).shadow_mapped || !kept_only)) {
        read_through_shadow[k] = true;
        ++chosen;
      }
  // A kept shadow mapping that this move does not read through is dropped before anything
  // else: the shadow may be needed for staging, and the backing may leave.
  for (size_t k = 0; k < steps.size(); ++k) {
    Piece& p = piece_of(steps[k]);
    if (!p.shadow_mapped || read_through_shadow[k]) continue;
    if (int r = backend_.unmap(steps[k].segment->shadow + p.offset, p.size))
      return failed("dropping a kept staging mapping", r);
    p.shadow_mapped = false;
    steps[k].had_kept = true;  // an unwind maps it again
  }
  // Maps where step k's copy writes (and reads, for a second mapping). AQUA_OK or failed().
  auto prepare = [&](size_t k) -> int {
    MoveStep& s = steps[k];
    Piece& p = s.segment->pieces[s.index];
    uint64_t t0 = now_ns();
    if (s.dst == AQUA_TIER_HOST && backings_.host_mapping(s.handle, &s.target)) {
      s.prestaged = true;
    } else {
      s.target = s.segment->shadow + p.offset;
      if (int r = backend_.map(s.target, p.size, s.handle)) return drained_and_failed("staging map", r);
      s.staged = true;
      if (int r = backend_.set_access(s.target, p.size, s.ctx->device))
        return drained_and_failed("staging set-access", r);
    }
    s.source = s.segment->va + p.offset;
    if (!copies_out && into_device(s) && p.tier == AQUA_TIER_HOST && s.ctx->park_recorded) {
      // A resume from a pre-mapped host backing reads it at its own mapping, so that home
      // can be remapped while the copy is in flight (see above).
      if (backings_.host_mapping(p.handle, &s.source)) s.early = true;
    }
    if (read_through_shadow[k]) {
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
        if (int r = backend_.map(s.source, p.size, p.handle)) return drained_and_failed("source map", r);
        s.source_shadowed = true;
        if (int r = backend_.set_access(s.source, p.size, s.ctx->device))
          return drained_and_failed("source set-access", r);
      }
    }
    profiler_.add(AQUA_PHASE_STAGE, t0, now_ns());
    return AQUA_OK;
  };
  // Issues step k's copy on its direction's stream, with an event after it. AQUA_OK or failed().
  auto issue = [&](size_t k) -> int {
    MoveStep& s = steps[k];
    Stream stream = streams[into_device(s) ? 1 : 0];
    uint64_t t0 = now_ns();
    // The event first: a copy is issued only with an event that the drains can wait on.
    if (int r = take_event(s.ctx->device, &s.copied)) return drained_and_failed("copy", r);
    if (int r = backend_.copy_async(s.target, s.source, s.segment->pieces[s.index].size, stream))
      return drained_and_failed("copy", r);
    if (int r = backend_.event_record(s.copied, stream)) {
      // Issued but not waitable: wait for the whole device before anything is unwound.
      if (backend_.device_sync(s.ctx->device) != 0)
        std::fprintf(stderr, "[aqua_alloc] a move's copy could not be waited for after a failed event record\n");
      return drained_and_failed("copy", r);
    }
    profiler_.add(AQUA_PHASE_ISSUE, t0, now_ns());
    return AQUA_OK;
  };
  if (copies_out) {
    for (size_t k = 0; k < steps.size(); ++k)
      if (int st = prepare(k)) return st;
    for (bool through_shadow : {false, true})  // the copies read through the shadow go last
      for (size_t k = 0; k < steps.size(); ++k)
        if (read_through_shadow[k] == through_shadow)
          if (int st = issue(k)) return st;
  } else {
    for (size_t k = 0; k < steps.size(); ++k) {  // the first copy starts after one staging
      if (int st = prepare(k)) return st;
      if (int st = issue(k)) return st;
    }
  }
  // Commit order (see above): pieces whose copies do not read home, then pieces leaving,
  // then pieces coming home.
  std::vector<size_t> order;
  order.reserve(steps.size());
  for (size_t k = 0; k < steps.size(); ++k)
    if (steps[k].early) order.push_back(k);
  for (bool home : {false, true})
    for (size_t k = 0; k < steps.size(); ++k)
      if (!steps[k].early && into_device(steps[k]) == home) order.push_back(k);
  // A piece whose copy does not read home is remapped at home without waiting for its copy,
  // but only once the kernels that may still use the context are done (its park event):
  // a remap must not pull the range from under them. Their copies are waited for, and the
  // second and staging mappings dropped, after the loop. A failure drains every copy before
  // unwinding (a committed piece's new backing may still be written; waiting again for a
  // copy that is done costs nothing).
  // A piece coming home that is one of its context's last ones keeps its staging mapping:
  // its next park reads through it without mapping anything first.
  std::vector<bool> keep_staging(steps.size(), false);
  for (size_t k = 0; k < steps.size(); ++k)
    keep_staging[k] = steps[k].staged && into_device(steps[k]) &&
                      in_shadowed_tail(*steps[k].ctx, steps[k].segment, steps[k].index);
  bool kernels_done = false;
  for (size_t k : order) {
    MoveStep& s = steps[k];
    Piece& p = s.segment->pieces[s.index];
    uintptr_t home = s.segment->va + p.offset;
    uint64_t t0 = now_ns();
    if (s.early && !kernels_done) {
      for (auto& [id, c] : involved) {
        (void)id;
        if (!c->park_recorded) continue;
        if (int r = backend_.event_sync(c->park_event)) return drained_and_failed("waiting for the park event", r);
      }
      kernels_done = true;
    } else if (!s.early) {
      if (int r = backend_.event_sync(s.copied)) return drained_and_failed("waiting for the copy", r);
    }
    uint64_t t1 = now_ns();
    profiler_.add(AQUA_PHASE_WAIT, t0, t1);
    if (s.staged && !keep_staging[k] && !s.early) {
      if (int r = backend_.unmap(s.target, p.size)) return drained_and_failed("unstaging unmap", r);
      s.staged = false;
    }
    if (int r = backend_.unmap(home, p.size)) return drained_and_failed("unmap", r);
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
      return drained_and_failed("map at home", r);
    }
    s.committed = true;
    profiler_.add(AQUA_PHASE_REMAP, t1, now_ns());
  }
  for (size_t k = 0; k < steps.size(); ++k) {
    MoveStep& s = steps[k];
    if (!s.early) continue;
    const Piece& p = s.segment->pieces[s.index];
    uint64_t t0 = now_ns();
    if (int r = backend_.event_sync(s.copied)) return drained_and_failed("waiting for the copy", r);
    uint64_t t1 = now_ns();
    profiler_.add(AQUA_PHASE_WAIT, t0, t1);
    if (s.source_shadowed) {
      if (int r = backend_.unmap(s.source, p.size)) return drained_and_failed("source unmap", r);
      s.source_shadowed = false;
    }
    if (s.staged && !keep_staging[k]) {
      if (int r = backend_.unmap(s.target, p.size)) return drained_and_failed("unstaging unmap", r);
      s.staged = false;
    }
    profiler_.add(AQUA_PHASE_REMAP, t1, now_ns());
  }
  // Commit: every piece now maps its new backing at home. Release the old backings and
  // settle the accounts.
  uint64_t t_release = now_ns();
  std::set<int> tiers_out, tiers_in;  // a move counts once per tier it touches
  std::map<std::tuple<int, int, int>, uint64_t> bytes_by_move;  // (context, src, dst) -> bytes
  uint64_t own_bytes = 0;
  for (MoveStep& s : steps) {
    Piece& p = s.segment->pieces[s.index];
    Context& c = *s.ctx;
    ledger_.remove(p.tier, c.device, p.size, true);
    tiers_out.insert(ledger_.index(p.tier));
    tiers_in.insert(ledger_.index(s.dst));
    ledger_.charge(s.dst, p.size, true);
    bytes_by_move[{c.id, p.tier, s.dst}] += p.size;
    if (&c == &ctx) own_bytes += p.size;
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
  *bytes_moved = own_bytes;
  uint64_t dur = now_ns() - start;
  for (auto& [key, nbytes] : bytes_by_move) {
    auto [id, src, dst] = key;
    events_.add(start, AQUA_EV_MOVE_END, id, src, dst, nbytes, dur, steps.front().segment->va, 0);
  }
  return AQUA_OK;
}

}  // namespace aqua
