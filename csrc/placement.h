// Placement: which piece goes where. The policy over the ledger's budgets; the mover
// carries its decisions out and never makes any.
//
// - A new piece goes to its context's device while the local budget has room, made by
//   evicting parked contexts of the device (least recently run first); else to the spill
//   tiers in order: peers by rank, then host (spill_order).
// - A resume brings the context's pieces home, least recently spilled first, as far as the
//   budget has room; parked contexts evicted to make that room leave in the same move, in
//   rounds as far as the pinned pool's backings go (resume_round).
// - A lender whose lend budget falls below what it holds gets its borrowed pieces back:
//   those of parked borrowers at once (reclaim), those of running ones at their next park
//   or resume (note_lender_moves).
// Each decision is a plan: MoveSteps whose new backings are acquired and whose room is
// reserved in the ledger, handed to Mover::execute (or given back with drop_planned).
//
// Not thread-safe: the core's mutex is held around every call, the device of the context
// concerned bound.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "backings.h"
#include "event_log.h"
#include "ledger.h"
#include "mover.h"
#include "segments.h"

namespace aqua {

class Placement {
 public:
  // `contexts`, `segments` and `clock` are the core's; every device starts with peer rank
  // -1 (never) for every peer.
  Placement(Backend& backend, Ledger& ledger, Backings& backings, Mover& mover, EventLog& events,
            ContextMap& contexts, SegmentMap& segments, uint64_t& clock, int num_devices);

  // Preference of peer tiers for contexts of `home`: lower rank first; < 0: never.
  int peer_rank(int home, int peer) const { return peer_rank_[home][peer]; }
  void set_peer_rank(int home, int peer, int rank) { peer_rank_[home][peer] = rank; }

  // Backs one new piece of `ctx` at va (see above) and maps it with access for its device.
  int place_new_piece(Context& ctx, uintptr_t va, Piece* piece);
  // Brings the pieces of running `ctx` home as far as room allows (its park event recorded
  // if it was running). *bytes_elsewhere: bytes still on other tiers after it.
  int bring_home(Context& ctx, uint64_t* bytes_moved, uint64_t* bytes_elsewhere);
  // Plans moving `ctx`'s pieces to `tier` (AQUA_TIER_AUTO: its spill tiers in order; pieces
  // already there stay). AQUA_OK with *steps, or an error with nothing planned.
  int plan_evict(Context& ctx, int tier, std::vector<MoveStep>* steps);
  // Moves pieces of parked contexts off lender `device`, least recently run first, until
  // it is within its lend budget. Returns the bytes moved.
  uint64_t reclaim(int device);
  // At a park or a resume: `ctx`'s pieces on lenders over budget move on now (a reclaim
  // waits for running contexts to reach one of these points). The park event is recorded.
  // A failure is logged, not returned: the reclaim stays pending.
  void note_lender_moves(Context& ctx, const char* when);

  // Every tier's budget and use, for out-of-memory messages.
  std::string usage_line() const;

 private:
  using PieceRef = std::pair<Segment*, size_t>;  // a segment and the index of one of its pieces

  // Whether a move's host backing may be created when the pinned pool has none idle.
  // Evictions that make room for a running context's new memory may (kMayCreate). That adds
  // no creation to the allocation path, it changes whose bytes get it: with the pool empty,
  // the new piece itself would otherwise be placed on host backing created for it. The
  // running context reads its bytes at every step and the parked victim none until its
  // resume, so the backing is better spent on the victim, for one copy more (creating costs
  // about ten copies: host_pool.h). Without it, a burst of prefills that outran the pool's
  // top-up spilled newcomers' KV to host for their whole life (bench_serve mooncake, 8B,
  // H200: steps 20% slower). Resumes, prefetches, explicit evictions and lender reclaims use
  // the pool only (kPoolOnly): they run on a switch's path, or on the worker under the lock.
  enum class HostBacking { kPoolOnly, kMayCreate };

  bool room_on(int tier, int home, uint64_t size, bool pool_only);
  std::vector<int> spill_order(int home) const;
  bool take_backing(const std::vector<int>& order, int home, MoveStep& step, int* driver_error,
                    HostBacking host = HostBacking::kPoolOnly);
  void drop_planned(std::vector<MoveStep>& steps, size_t from);

  // make_local_room evicts at least this much of a victim at once (bytes): each move has a
  // fixed cost of about a millisecond (the victim's last kernels, remaps, access grants), so
  // room made one 16 MiB segment at a time during a long prefill moved at a few GB/s (H200
  // trace of bench_serve mooncake); moves of 256 MiB and more reach 0.9 of the copy rate
  // (bench_move). The victim is the least recently run parked context: what leaves early is
  // what its resume brings back anyway.
  static constexpr uint64_t kEvictBatchBytes = 256ull << 20;

  Context* lru_parked_victim(int device, int exclude_context);
  bool make_local_room(int device, uint64_t need, int exclude_context);
  uint64_t plan_eviction(Context& victim, uint64_t need, std::vector<MoveStep>& steps, HostBacking host);
  uint64_t evict_pieces_of(Context& victim, uint64_t need);

  // A resume runs at most this many rounds (resume_round): each brings at least one piece
  // home, so this only bounds a context of very many pieces through a very small pool.
  static constexpr int kMaxResumeRounds = 64;

  std::vector<PieceRef> pieces_away(const Context& ctx) const;
  uint64_t bytes_away(const Context& ctx) const;
  int resume_round(Context& ctx, const std::vector<PieceRef>& away, uint64_t* moved);
  uint64_t plan_exchange(const Context& ctx, uint64_t need, std::vector<MoveStep>& steps);
  void plan_homecoming(Context& ctx, const std::vector<PieceRef>& away, uint64_t extra_room,
                       std::vector<MoveStep>& out);

  int move_off_lenders(Context& ctx, int only_tier, uint64_t* moved);

  Backend& backend_;
  Ledger& ledger_;
  Backings& backings_;
  Mover& mover_;
  EventLog& events_;
  ContextMap& contexts_;
  SegmentMap& segments_;
  uint64_t& clock_;
  int num_devices_;
  std::vector<std::vector<int>> peer_rank_;  // [home][peer], < 0: never
};

}  // namespace aqua
