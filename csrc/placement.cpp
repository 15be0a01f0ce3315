// Placement: see placement.h.
#include "placement.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <sstream>

#include "errors.h"

namespace aqua {

Placement::Placement(Backend& backend, Ledger& ledger, Backings& backings, Mover& mover, EventLog& events,
                     ContextMap& contexts, SegmentMap& segments, uint64_t& clock, int num_devices)
    : backend_(backend),
      ledger_(ledger),
      backings_(backings),
      mover_(mover),
      events_(events),
      contexts_(contexts),
      segments_(segments),
      clock_(clock),
      num_devices_(num_devices),
      peer_rank_(num_devices, std::vector<int>(num_devices, -1)) {}

// --- room and order ----------------------------------------------------------------------

// Whether `tier` has budget room for `size` more bytes of a context of `home` (and, on
// host, a backing to be had).
bool Placement::room_on(int tier, int home, uint64_t size, bool pool_only) {
  if (tier == AQUA_TIER_HOST) {
    if (ledger_.host_used + size > ledger_.host_budget) return false;
    // New allocations may create host backing, and so may the evictions that make room for
    // them (HostBacking); other moves do not (creating it costs about ten times the copy it
    // would serve: host_pool.h). A miss tells the pool which class to make next.
    return backings_.host_backing_available(size, pool_only);
  }
  if (tier == home) return ledger_.own_used[tier] + size <= ledger_.local_budget[tier];
  return peer_rank_[home][tier] >= 0 && ledger_.lent_used[tier] + size <= ledger_.lend_budget[tier];
}

// Where a context of `home` spills, best first: peers by rank then most lendable bytes
// left, then host.
std::vector<int> Placement::spill_order(int home) const {
  std::vector<int> peers;
  for (int p = 0; p < num_devices_; ++p)
    if (p != home && peer_rank_[home][p] >= 0) peers.push_back(p);
  std::sort(peers.begin(), peers.end(), [&](int a, int b) {
    if (peer_rank_[home][a] != peer_rank_[home][b]) return peer_rank_[home][a] < peer_rank_[home][b];
    uint64_t left_a = ledger_.lend_budget[a] > ledger_.lent_used[a] ? ledger_.lend_budget[a] - ledger_.lent_used[a] : 0;
    uint64_t left_b = ledger_.lend_budget[b] > ledger_.lent_used[b] ? ledger_.lend_budget[b] - ledger_.lent_used[b] : 0;
    return left_a > left_b;
  });
  peers.push_back(AQUA_TIER_HOST);
  return peers;
}

// Plans `step`'s piece (of a context of `home`) onto the first tier of `order`, other than
// the one it is on, with room for it and a backing to be had (host backing created only
// with HostBacking::kMayCreate): acquires the backing, reserves the room, sets step.dst.
// False when no tier had both; *driver_error, if given, then keeps the last driver failure
// other than out of memory.
bool Placement::take_backing(const std::vector<int>& order, int home, MoveStep& step, int* driver_error,
                             HostBacking host) {
  const Piece& p = step.segment->pieces[step.index];
  const bool pool_only = host == HostBacking::kPoolOnly;
  for (int t : order) {
    if (t == p.tier || !room_on(t, home, p.size, pool_only)) continue;
    if (int r = backings_.acquire(t, p.size, pool_only, &step.handle, &step.handle_bytes, home)) {
      if (driver_error && r > 0 && !backend_.is_out_of_memory(r)) *driver_error = r;
      continue;
    }
    step.dst = t;
    ledger_.reserve(t, home, p.size);
    return true;
  }
  return false;
}

// Gives back what was planned for steps [from, end) and drops them.
void Placement::drop_planned(std::vector<MoveStep>& steps, size_t from) {
  for (size_t k = from; k < steps.size(); ++k) {
    MoveStep& s = steps[k];
    ledger_.remove(s.dst, s.ctx->device, s.segment->pieces[s.index].size, false);
    backings_.give_back(s.dst, s.handle, s.handle_bytes);
  }
  steps.resize(from);
}

std::string Placement::usage_line() const {
  std::ostringstream out;
  for (int d = 0; d < num_devices_; ++d)
    out << tier_name(d) << ": own " << bytes_text(ledger_.own_used[d]) << " of budget "
        << bytes_text(ledger_.local_budget[d]) << ", lent " << bytes_text(ledger_.lent_used[d]) << " of "
        << bytes_text(ledger_.lend_budget[d]) << "; ";
  out << "host: " << bytes_text(ledger_.host_used) << " in use, pool " << bytes_text(backings_.host_pool().idle_bytes())
      << " idle of " << bytes_text(backings_.host_pool().total_bytes()) << " created, budget "
      << bytes_text(ledger_.host_budget);
  return out.str();
}

// --- new pieces ----------------------------------------------------------------------------

int Placement::place_new_piece(Context& ctx, uintptr_t va, Piece* piece) {
  int home = ctx.device;
  std::vector<int> order{home};
  for (int t : spill_order(home)) order.push_back(t);
  int last_error_code = 0;
  for (int tier : order) {
    if (tier == home) make_local_room(home, piece->size, ctx.id);
    if (!room_on(tier, home, piece->size, false)) continue;
    int r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    if (r != 0 && tier == home && backend_.is_out_of_memory(r) && ledger_.lent_used[home] > 0) {
      // The owner needs memory it lent: lower its lend budget by what it needs and move
      // parked borrowers off (an elastic lender gets its memory back first).
      ledger_.lend_budget[home] = std::min(ledger_.lend_budget[home], ledger_.lent_used[home]);
      ledger_.lend_budget[home] -= std::min(ledger_.lend_budget[home], piece->size);
      events_.add(now_ns(), AQUA_EV_BUDGET, -1, AQUA_TIER_NONE, home, ledger_.lend_budget[home], 0, 1, 0);
      reclaim(home);
      backend_.bind(home);
      r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    }
    if (r != 0 && tier == home && backend_.is_out_of_memory(r)) {
      // The budget had room but the device did not (other users of the GPU): evict the
      // least recently run parked context's local pieces, then try once more.
      if (Context* victim = lru_parked_victim(home, ctx.id)) evict_pieces_of(*victim, piece->size);
      backend_.bind(home);
      r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    }
    if (r != 0) {
      if (r > 0) last_error_code = r;
      continue;
    }
    int m = backend_.map(va + piece->offset, piece->size, piece->handle);
    bool mapped = m == 0;
    if (mapped) m = backend_.set_access(va + piece->offset, piece->size, home);
    if (m != 0) {
      // The backing may serve anyone else only once it is mapped nowhere; if the unmap
      // fails it is leaked (and said so), never reused while mapped.
      if (mapped && !retry(backend_, &Backend::unmap, va + piece->offset, piece->size))
        std::fprintf(stderr, "[aqua_alloc] unmapping a failed new piece failed; its backing is leaked\n");
      else
        backings_.give_back(tier, piece->handle, piece->handle_bytes);
      return driver_fail(backend_, "mapping a new segment", m);
    }
    piece->tier = tier;
    piece->away_since = tier == home ? 0 : ++clock_;
    ledger_.add(tier, home, piece->size, false);
    return AQUA_OK;
  }
  std::string why = last_error_code ? "; last driver error " + backend_.error_name(last_error_code) : "";
  return fail(AQUA_ERR_OUT_OF_MEMORY, "no tier has room for " + bytes_text(piece->size) + why);
}

// --- evictions ----------------------------------------------------------------------------

// The parked context of `device` (other than `exclude_context`) run least recently that
// still has pieces on the device, or nullptr.
Context* Placement::lru_parked_victim(int device, int exclude_context) {
  Context* victim = nullptr;
  for (auto& [id, ctx] : contexts_) {
    (void)id;
    if (ctx->id == exclude_context || ctx->device != device || !ctx->parked) continue;
    bool has_local = false;
    for (uintptr_t va : ctx->segments)
      for (const Piece& p : segments_.at(va)->pieces) has_local |= p.tier == device;
    if (has_local && (!victim || ctx->last_run < victim->last_run)) victim = ctx.get();
  }
  return victim;
}

// Frees local room for `need` bytes of a running context's new memory by evicting pieces of
// parked contexts of `device`, least recently run first. Returns whether the budget now has
// the room.
bool Placement::make_local_room(int device, uint64_t need, int exclude_context) {
  while (ledger_.own_used[device] + need > ledger_.local_budget[device]) {
    Context* victim = lru_parked_victim(device, exclude_context);
    if (!victim) return false;
    uint64_t deficit = ledger_.own_used[device] + need - ledger_.local_budget[device];
    if (evict_pieces_of(*victim, std::max(deficit, kEvictBatchBytes)) == 0) return false;
  }
  return true;
}

// Plans moving local pieces of `victim` to the best spill tiers until `need` bytes leave
// its device: the steps' backings are acquired and reserved, nothing moves yet. Appends to
// `steps`; returns the bytes planned.
uint64_t Placement::plan_eviction(Context& victim, uint64_t need, std::vector<MoveStep>& steps, HostBacking host) {
  uint64_t planned = 0;
  std::vector<int> order = spill_order(victim.device);
  for (uintptr_t va : victim.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size() && planned < need; ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier != victim.device) continue;
      MoveStep step{seg, i, p.tier};
      step.ctx = &victim;
      if (!take_backing(order, victim.device, step, nullptr, host)) return planned;
      steps.push_back(step);
      planned += p.size;
    }
    if (planned >= need) break;
  }
  return planned;
}

// Moves local pieces of `victim` to the best spill tiers until `need` bytes left its device,
// to make room for a running context's new memory (host backing may be created for them:
// HostBacking). Returns the bytes moved (0 when nothing could move).
uint64_t Placement::evict_pieces_of(Context& victim, uint64_t need) {
  std::vector<MoveStep> steps;
  plan_eviction(victim, need, steps, HostBacking::kMayCreate);
  if (steps.empty()) return 0;
  uint64_t moved = 0;
  if (mover_.execute(victim, steps, &moved) != AQUA_OK) {
    std::fprintf(stderr, "[aqua_alloc] evicting context '%s' failed: %s\n", victim.tag.c_str(),
                 last_error().c_str());
    return 0;
  }
  return moved;
}

// *steps is empty on entry; on an error it is left empty, every backing given back.
int Placement::plan_evict(Context& ctx, int tier, std::vector<MoveStep>* steps) {
  std::vector<int> order = tier == AQUA_TIER_AUTO ? spill_order(ctx.device) : std::vector<int>{tier};
  int driver_error = 0;
  for (uintptr_t va : ctx.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (tier == AQUA_TIER_AUTO ? p.tier != ctx.device : p.tier == tier) continue;
      MoveStep step{seg, i, p.tier};
      step.ctx = &ctx;
      if (!take_backing(order, ctx.device, step, &driver_error)) {
        drop_planned(*steps, 0);
        if (driver_error)
          return driver_fail(backend_, ("evict '" + ctx.tag + "': creating backing").c_str(), driver_error);
        std::string target = tier == AQUA_TIER_AUTO ? "any spill tier" : tier_name(tier);
        return fail(AQUA_ERR_OUT_OF_MEMORY, "evict '" + ctx.tag + "': " + target + " has no room for " +
                                                bytes_text(p.size) + ". Tiers: " + usage_line());
      }
      steps->push_back(step);
    }
  }
  return AQUA_OK;
}

// --- resume ---------------------------------------------------------------------------------

int Placement::bring_home(Context& ctx, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  *bytes_moved = 0;
  *bytes_elsewhere = 0;
  const std::vector<PieceRef> away = pieces_away(ctx);
  if (away.empty()) return AQUA_OK;
  int status = AQUA_OK;
  // Rounds: the pieces a round brings home from host give their pinned backing back to the
  // pool, where the next round's evictions find it. So a context comes home whole through
  // a pool smaller than itself (on the H200 the pool is made ahead at 1 GiB, an 8B context
  // of 32k tokens is 4 GiB), one copy of each piece either way, a few rounds of fixed cost.
  for (int round = 0; round < kMaxResumeRounds && bytes_away(ctx) > 0; ++round) {
    uint64_t moved = 0;
    int r = resume_round(ctx, away, &moved);
    *bytes_moved += moved;
    if (r != AQUA_OK) {
      if (round == 0) status = r;  // rolled back: the context is where it was
      else  // the rounds before stand: a partial resume, the rest usable in place
        std::fprintf(stderr, "[aqua_alloc] resume of '%s': bringing the rest home failed (%s); it stays in place\n",
                     ctx.tag.c_str(), last_error().c_str());
      break;
    }
    if (moved == 0) break;  // no room could be made, or no backing had
    if (round + 1 == kMaxResumeRounds && bytes_away(ctx) > 0)
      std::fprintf(stderr, "[aqua_alloc] resume of '%s': %d rounds brought it partly home; the rest stays in place "
                   "until its next resume\n", ctx.tag.c_str(), kMaxResumeRounds);
  }
  if (status == AQUA_OK) note_lender_moves(ctx, "resume");
  *bytes_elsewhere = bytes_away(ctx);
  return status;
}

uint64_t Placement::bytes_away(const Context& ctx) const {
  uint64_t bytes = 0;
  for (uintptr_t va : ctx.segments)
    for (const Piece& p : segments_.at(va)->pieces)
      if (p.tier != ctx.device) bytes += p.size;
  return bytes;
}

// One round of a resume: plans evicting parked contexts as far as the pool's backings go
// (plan_exchange) and bringing home as much of `ctx` as the room then allows, and runs both
// as one move, interleaved (one piece out, one in) so that both directions of the link
// work at once. Nothing is evicted when nothing can come home. *moved: `ctx`'s bytes
// brought home (0 when nothing moved).
int Placement::resume_round(Context& ctx, const std::vector<PieceRef>& away, uint64_t* moved) {
  *moved = 0;
  std::vector<MoveStep> evictions;
  uint64_t leaving = plan_exchange(ctx, bytes_away(ctx), evictions);
  std::vector<MoveStep> incoming;
  plan_homecoming(ctx, away, leaving, incoming);
  if (incoming.empty()) {
    drop_planned(evictions, 0);
    return AQUA_OK;
  }
  std::vector<MoveStep> steps;
  for (size_t k = 0; k < std::max(evictions.size(), incoming.size()); ++k) {
    if (k < evictions.size()) steps.push_back(evictions[k]);
    if (k < incoming.size()) steps.push_back(incoming[k]);
  }
  return mover_.execute(ctx, steps, moved);
}

// The pieces of `ctx` off its device, least recently spilled first: the order they come
// home in.
std::vector<Placement::PieceRef> Placement::pieces_away(const Context& ctx) const {
  std::vector<PieceRef> away;
  for (uintptr_t va : ctx.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i)
      if (seg->pieces[i].tier != ctx.device) away.emplace_back(seg, i);
  }
  std::stable_sort(away.begin(), away.end(), [](const PieceRef& a, const PieceRef& b) {
    return a.first->pieces[a.second].away_since < b.first->pieces[b.second].away_since;
  });
  return away;
}

// A context switch under a full budget: plans evicting parked contexts of `ctx`'s device,
// least recently run first, in the same move as `ctx` comes home (`need` bytes), so that
// both directions of the link work at once. Appends to `steps`; returns the bytes planned
// to leave (the budget room the homecoming may count on).
uint64_t Placement::plan_exchange(const Context& ctx, uint64_t need, std::vector<MoveStep>& steps) {
  const int device = ctx.device;
  uint64_t leaving = 0;
  if (ledger_.own_used[device] + need <= ledger_.local_budget[device]) return leaving;
  uint64_t deficit = ledger_.own_used[device] + need - ledger_.local_budget[device];
  std::vector<Context*> victims;
  for (auto& [id, c] : contexts_) {
    (void)id;
    if (c->id != ctx.id && c->device == device && c->parked) victims.push_back(c.get());
  }
  std::sort(victims.begin(), victims.end(), [](Context* a, Context* b) { return a->last_run < b->last_run; });
  for (Context* v : victims) {
    if (leaving >= deficit) break;
    leaving += plan_eviction(*v, deficit - leaving, steps, HostBacking::kPoolOnly);
  }
  return leaving;
}

// Plans bringing the pieces of `away` home, in order, while the budget plus `extra_room`
// (bytes planned to leave) has room; a piece whose backing cannot be had stays away, as
// does one already home. Appends to `out`.
void Placement::plan_homecoming(Context& ctx, const std::vector<PieceRef>& away, uint64_t extra_room,
                                std::vector<MoveStep>& out) {
  const int device = ctx.device;
  for (auto [seg, i] : away) {
    const Piece& p = seg->pieces[i];
    if (p.tier == device || ledger_.own_used[device] + p.size > ledger_.local_budget[device] + extra_room) continue;
    MoveStep step{seg, i, p.tier, device};
    step.ctx = &ctx;
    if (backings_.acquire(device, p.size, true, &step.handle, &step.handle_bytes, device) != 0) continue;
    ledger_.reserve(device, device, p.size);
    out.push_back(step);
  }
}

// --- lending and reclaim ------------------------------------------------------------------

// Moves pieces of `ctx` off lenders that hold more than their lend budget (`only_tier`: that
// lender only; -1: any) to other lenders with room, else host, until each is within budget
// or this context has nothing more there. The context's park event is recorded: the
// copies wait for its last kernels. All or nothing.
int Placement::move_off_lenders(Context& ctx, int only_tier, uint64_t* moved) {
  *moved = 0;
  std::vector<uint64_t> excess(num_devices_, 0);
  bool any = false;
  for (int t = 0; t < num_devices_; ++t) {
    if (t == ctx.device || (only_tier >= 0 && t != only_tier)) continue;
    excess[t] = ledger_.lent_excess(t);
    any |= excess[t] > 0;
  }
  if (!any) return AQUA_OK;
  std::vector<int> order;
  for (int t : spill_order(ctx.device))
    if (t == AQUA_TIER_HOST || excess[t] == 0) order.push_back(t);
  std::vector<MoveStep> steps;
  for (uintptr_t va : ctx.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier < 0 || p.tier == ctx.device || excess[p.tier] == 0) continue;
      MoveStep step{seg, i, p.tier};
      step.ctx = &ctx;
      // No room anywhere: this piece stays, the reclaim stays pending.
      if (!take_backing(order, ctx.device, step, nullptr)) continue;
      excess[p.tier] -= std::min(excess[p.tier], p.size);
      steps.push_back(step);
    }
  }
  if (steps.empty()) return AQUA_OK;
  return mover_.execute(ctx, steps, moved);
}

uint64_t Placement::reclaim(int device) {
  uint64_t total = 0;
  std::set<int> tried;
  while (ledger_.lent_excess(device) > 0) {
    Context* victim = nullptr;
    for (auto& [id, ctx] : contexts_) {
      if (ctx->device == device || !ctx->parked || tried.count(id)) continue;
      bool holds = false;
      for (uintptr_t va : ctx->segments)
        for (const Piece& p : segments_.at(va)->pieces) holds |= p.tier == device;
      if (holds && (!victim || ctx->last_run < victim->last_run)) victim = ctx.get();
    }
    if (!victim) break;
    tried.insert(victim->id);
    if (backend_.bind(victim->device) != 0) continue;
    uint64_t moved = 0;
    if (move_off_lenders(*victim, device, &moved) != AQUA_OK)
      std::fprintf(stderr, "[aqua_alloc] reclaim of %s: moving context '%s' failed: %s\n", tier_name(device).c_str(),
                   victim->tag.c_str(), last_error().c_str());
    total += moved;
  }
  return total;
}

void Placement::note_lender_moves(Context& ctx, const char* when) {
  uint64_t moved = 0;
  if (move_off_lenders(ctx, -1, &moved) != AQUA_OK)
    std::fprintf(stderr, "[aqua_alloc] %s of '%s': moving it off a reclaiming lender failed: %s\n", when,
                 ctx.tag.c_str(), last_error().c_str());
}

}  // namespace aqua
