// Core: see core.h for the model and its invariants.
#include "core.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <tuple>

namespace aqua {

thread_local std::string t_last_error;  // aqua_last_error(): the calling thread's last message

const std::string& last_error() { return t_last_error; }
void set_last_error(const std::string& message) { t_last_error = message; }

namespace {

uint64_t round_up(uint64_t x, uint64_t unit) { return (x + unit - 1) / unit * unit; }
}  // namespace

// One piece's move from its current tier to `dst`.
struct Core::Step {
  Segment* segment;
  size_t index;          // into segment->pieces
  int src = 0;
  int dst = 0;
  Context* ctx = nullptr;  // the piece's context (execute_move fills in its own when null)
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

Core::Core(std::unique_ptr<Backend> backend, SimControl* sim)
    : backend_(std::move(backend)),
      sim_(sim),
      num_devices_(backend_->device_count()),
      granularity_(backend_->granularity()),
      ledger_(num_devices_),
      backings_(*backend_, mutex_, ledger_, profiler_, num_devices_) {
  chunk_bytes_ = round_up(64 * kMiB, granularity_);
  backings_.configure(granularity_, chunk_bytes_);
  peer_rank_.assign(num_devices_, std::vector<int>(num_devices_, -1));
  streams_.assign(num_devices_, 0);
  in_streams_.assign(num_devices_, 0);
  idle_events_.assign(num_devices_, {});
  for (int d = 0; d < num_devices_; ++d) {
    size_t free_bytes = 0, total = 0;
    if (backend_->mem_info(d, &free_bytes, &total) == 0) ledger_.local_budget[d] = total;
    for (int p = 0; p < num_devices_; ++p)
      if (p != d && backend_->can_access_peer(d, p)) peer_rank_[d][p] = 0;
  }
}

Core::~Core() {
  stop_async_thread();
  backings_.stop_thread();
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.release_deferred(-1, 0);
}

// --- errors and events -----------------------------------------------------------------

void Core::record(int kind, int context, int src, int dst, uint64_t bytes, uint64_t dur_ns, uint64_t addr,
                  int status) {
  events_.add(now_ns(), kind, context, src, dst, bytes, dur_ns, addr, status);
}

std::string Core::usage_line() const {
  std::ostringstream out;
  for (int d = 0; d < num_devices_; ++d)
    out << tier_name(d) << ": own " << bytes_text(ledger_.own_used[d]) << " of budget " << bytes_text(ledger_.local_budget[d])
        << ", lent " << bytes_text(ledger_.lent_used[d]) << " of " << bytes_text(ledger_.lend_budget[d]) << "; ";
  out << "host: " << bytes_text(ledger_.host_used) << " in use, pool " << bytes_text(backings_.host_pool().idle_bytes())
      << " idle of " << bytes_text(backings_.host_pool().total_bytes()) << " created, budget " << bytes_text(ledger_.host_budget);
  return out.str();
}

// --- settings ----------------------------------------------------------------------------

int Core::set_local_budget(int device, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device < 0 || device >= num_devices_)
    return fail(AQUA_ERR_INVALID, "local budget: unknown device " + std::to_string(device));
  ledger_.local_budget[device] = bytes;
  record(AQUA_EV_BUDGET, -1, AQUA_TIER_NONE, device, bytes, 0, 0, 0);
  return AQUA_OK;
}

int Core::set_lend_budget(int device, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device < 0 || device >= num_devices_)
    return fail(AQUA_ERR_INVALID, "lend budget: unknown device " + std::to_string(device));
  ledger_.lend_budget[device] = bytes;
  record(AQUA_EV_BUDGET, -1, AQUA_TIER_NONE, device, bytes, 0, 1, 0);
  return AQUA_OK;
}

int Core::set_host_budget(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  ledger_.host_budget = bytes;
  record(AQUA_EV_BUDGET, -1, AQUA_TIER_NONE, AQUA_TIER_HOST, bytes, 0, 0, 0);
  return AQUA_OK;
}

int Core::set_peer_rank(int device, int peer, int rank) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device < 0 || device >= num_devices_ || peer < 0 || peer >= num_devices_ || device == peer)
    return fail(AQUA_ERR_INVALID, "peer rank: bad device pair (" + std::to_string(device) + ", " +
                                      std::to_string(peer) + ")");
  if (rank >= 0 && !backend_->can_access_peer(device, peer))
    return fail(AQUA_ERR_INVALID, "peer rank: " + tier_name(device) + " cannot access " + tier_name(peer) +
                                      " (no peer access)");
  peer_rank_[device][peer] = rank;
  return AQUA_OK;
}

int Core::set_chunk_bytes(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t units = granularity_ ? bytes / granularity_ : 0;
  if (bytes == 0 || bytes % granularity_ || (units & (units - 1)) != 0)
    return fail(AQUA_ERR_INVALID, "chunk bytes: " + std::to_string(bytes) + " is not a power of two times " +
                                      std::to_string(granularity_) + " bytes");
  if (backings_.host_pool().total_bytes() > 0 || !segments_.empty())
    return fail(AQUA_ERR_STATE, "chunk bytes can only change before the first allocation");
  chunk_bytes_ = bytes;
  backings_.configure(granularity_, chunk_bytes_);
  return AQUA_OK;
}

// --- host pool ---------------------------------------------------------------------------

int Core::host_pool_reserve(uint64_t bytes, bool background) {
  std::unique_lock<std::mutex> lock(mutex_);
  return backings_.reserve_host(bytes, background, lock);
}

int Core::host_pool_trim(uint64_t keep_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.trim_host(keep_bytes);
  return AQUA_OK;
}

// --- contexts ----------------------------------------------------------------------------

Context* Core::find_context(int id) {
  auto it = contexts_.find(id);
  return it == contexts_.end() || it->second->released ? nullptr : it->second.get();
}

Context* Core::default_context(int device) {
  auto it = default_contexts_.find(device);
  if (it != default_contexts_.end()) return contexts_.at(it->second).get();
  auto ctx = std::make_unique<Context>();
  ctx->id = next_context_id_++;
  ctx->device = device;
  ctx->tag = "untagged:gpu" + std::to_string(device);
  ctx->last_run = ++clock_;
  Context* raw = ctx.get();
  default_contexts_[device] = raw->id;
  contexts_[raw->id] = std::move(ctx);
  record(AQUA_EV_CONTEXT_CREATE, raw->id, AQUA_TIER_NONE, device, 0, 0, 0, 0);
  return raw;
}

int Core::context_create(int device, const char* tag, int* out_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device < 0 || device >= num_devices_)
    return fail(AQUA_ERR_INVALID, "context: unknown device " + std::to_string(device) + " (" +
                                      std::to_string(num_devices_) + " devices)");
  auto ctx = std::make_unique<Context>();
  ctx->id = next_context_id_++;
  ctx->device = device;
  ctx->tag = tag ? tag : "";
  ctx->last_run = ++clock_;
  *out_id = ctx->id;
  contexts_[ctx->id] = std::move(ctx);
  record(AQUA_EV_CONTEXT_CREATE, *out_id, AQUA_TIER_NONE, device, 0, 0, 0, 0);
  return AQUA_OK;
}

int Core::context_release(int id) {
  std::lock_guard<std::mutex> lock(mutex_);
  Context* ctx = find_context(id);
  if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "release: no live context with id " + std::to_string(id));
  ctx->released = true;
  record(AQUA_EV_CONTEXT_RELEASE, id, AQUA_TIER_NONE, AQUA_TIER_NONE, 0, 0, 0, 0);
  if (ctx->segments.empty()) {
    if (ctx->park_event) idle_events_[ctx->device].push_back(ctx->park_event);
    contexts_.erase(id);
  }
  return AQUA_OK;
}

int Core::park(int id, uint64_t stream) {
  wait_async_resume_of(id);
  std::lock_guard<std::mutex> lock(mutex_);
  Context* ctx = find_context(id);
  if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "park: no live context with id " + std::to_string(id));
  if (int r = backend_->bind(ctx->device)) return driver_fail(*backend_, "binding the device", r);
  if (int r = record_park(*ctx, stream)) return r;
  note_lender_moves(*ctx, "park");
  return AQUA_OK;
}

// Marks `ctx` parked and records its park event on `stream` (mutex held, device bound).
int Core::record_park(Context& ctx, uint64_t stream) {
  if (!ctx.park_event) {
    if (int r = take_event(ctx.device, &ctx.park_event)) return driver_fail(*backend_, "creating the park event", r);
  }
  if (int r = backend_->event_record(ctx.park_event, stream)) return driver_fail(*backend_, "recording the park event", r);
  ctx.park_recorded = true;
  if (!ctx.parked) {
    ctx.parked = true;
    ctx.last_run = ++clock_;
    record(AQUA_EV_CONTEXT_PARK, ctx.id, AQUA_TIER_NONE, AQUA_TIER_NONE, 0, 0, 0, 0);
  }
  return AQUA_OK;
}

int Core::where(int id, uint64_t* out, int len, bool wait) {
  std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
  if (!wait && !lock.try_lock()) return AQUA_ERR_BUSY;
  if (!lock.owns_lock()) lock.lock();
  Context* ctx = find_context(id);
  if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "where: no live context with id " + std::to_string(id));
  if (len < num_devices_ + 1)
    return fail(AQUA_ERR_INVALID, "where: the output needs " + std::to_string(num_devices_ + 1) + " entries");
  std::fill(out, out + len, 0);
  for (uintptr_t va : ctx->segments)
    for (const Piece& p : segments_.at(va)->pieces) out[ledger_.index(p.tier)] += p.size;
  return AQUA_OK;
}

const Segment* Core::segment_holding(uint64_t ptr) const {
  auto it = segments_.upper_bound(static_cast<uintptr_t>(ptr));
  if (it == segments_.begin()) return nullptr;
  --it;
  const Segment& seg = *it->second;
  return ptr >= seg.va && ptr < seg.va + seg.size ? &seg : nullptr;
}

int Core::pointer_context(uint64_t ptr, int* out_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Segment* seg = segment_holding(ptr);
  if (!seg) return fail(AQUA_ERR_NOT_FOUND, "no aqua_alloc segment holds the pointer");
  *out_id = seg->context;
  return AQUA_OK;
}

int Core::range_where(uint64_t ptr, uint64_t len, uint64_t* out, int n) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (n < num_devices_ + 1)
    return fail(AQUA_ERR_INVALID, "range_where: the output needs " + std::to_string(num_devices_ + 1) + " entries");
  const Segment* found = segment_holding(ptr);
  if (!found) return fail(AQUA_ERR_NOT_FOUND, "range_where: no aqua_alloc segment holds the pointer");
  const Segment& seg = *found;
  if (len > seg.va + seg.size - ptr)
    return fail(AQUA_ERR_INVALID, "range_where: the range of " + std::to_string(len) +
                                      " bytes runs past the end of its segment");
  std::fill(out, out + n, 0);
  const uint64_t begin = ptr - seg.va, end = begin + len;  // offsets in the segment
  for (const Piece& p : seg.pieces) {
    const uint64_t lo = std::max(begin, p.offset), hi = std::min(end, p.offset + p.size);
    if (lo < hi) out[ledger_.index(p.tier)] += hi - lo;
  }
  return AQUA_OK;
}

int Core::counts(int* contexts, int* segments) {
  std::lock_guard<std::mutex> lock(mutex_);
  int n = 0;
  for (auto& [id, ctx] : contexts_) {
    (void)id;
    if (!ctx->released) n++;
  }
  if (contexts) *contexts = n;
  if (segments) *segments = static_cast<int>(segments_.size());
  return AQUA_OK;
}

int Core::tier_stats(int tier, aqua_tier_stats* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!ledger_.valid(tier)) return fail(AQUA_ERR_INVALID, "tier stats: unknown tier " + std::to_string(tier));
  const TierCounters& c = ledger_.counters[ledger_.index(tier)];
  std::memset(out, 0, sizeof *out);
  out->current = c.current;
  out->peak = c.peak;
  out->total = c.total;
  out->num_moves_in = c.moves_in;
  out->num_moves_out = c.moves_out;
  out->bytes_in = c.bytes_in;
  out->bytes_out = c.bytes_out;
  if (tier == AQUA_TIER_HOST) {
    out->budget = ledger_.host_budget;
    out->pool_free = backings_.host_pool().idle_bytes();
    out->pool_total = backings_.host_pool().total_bytes();
  } else {
    out->budget = ledger_.local_budget[tier];
    out->lend_budget = ledger_.lend_budget[tier];
    out->lent = ledger_.lent_used[tier];
  }
  return AQUA_OK;
}

// --- placement and budgets --------------------------------------------------------------

bool Core::room_on(int tier, int home, uint64_t size, bool for_move) const {
  if (tier == AQUA_TIER_HOST) {
    if (ledger_.host_used + size > ledger_.host_budget) return false;
    if (backings_.host_pool().can_take(size)) return true;
    // New allocations may create host backing; a move never does (creating it costs about
    // ten times the copy it would serve: host_pool.h).
    uint64_t cls = backings_.host_pool().class_for(size);
    return !for_move && cls && backings_.host_pool().total_bytes() + cls <= ledger_.host_budget;
  }
  if (tier == home) return ledger_.own_used[tier] + size <= ledger_.local_budget[tier];
  return peer_rank_[home][tier] >= 0 && ledger_.lent_used[tier] + size <= ledger_.lend_budget[tier];
}

// Where a context of `home` spills, best first: peers by rank then most lendable bytes
// left, then host.
std::vector<int> Core::spill_order(int home) const {
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

void Core::profile_record_spans(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  profiler_.record_spans(on);
}

int Core::profile_spans(uint64_t* out, int max_spans) {
  std::lock_guard<std::mutex> lock(mutex_);
  return profiler_.take_spans(out, max_spans);
}

int Core::profile_get(uint64_t* ns, uint64_t* calls, int n) {
  std::lock_guard<std::mutex> lock(mutex_);
  profiler_.totals(ns, calls, n);
  return AQUA_OK;
}

void Core::profile_reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  profiler_.reset();
}

void Core::flush_releases() {
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.release_deferred(-1, 0);
}

// Frees local room for `need` bytes by evicting pieces of parked contexts of `device`,
// least recently run first. Returns whether the budget now has the room.
// The parked context of `device` (other than `exclude_context`) run least recently that
// still has pieces on the device, or nullptr.
Context* Core::lru_parked_victim(int device, int exclude_context) {
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

bool Core::make_local_room(int device, uint64_t need, int exclude_context) {
  while (ledger_.own_used[device] + need > ledger_.local_budget[device]) {
    Context* victim = lru_parked_victim(device, exclude_context);
    if (!victim) return false;
    uint64_t deficit = ledger_.own_used[device] + need - ledger_.local_budget[device];
    if (evict_pieces_of(*victim, deficit) == 0) return false;
  }
  return true;
}

// Plans moving local pieces of `victim` to the best spill tiers until `need` bytes leave
// its device: the steps' backings are acquired and reserved, nothing moves yet. Appends to
// `steps`; returns the bytes planned.
uint64_t Core::plan_eviction(Context& victim, uint64_t need, std::vector<Step>& steps) {
  uint64_t planned = 0;
  std::vector<int> order = spill_order(victim.device);
  for (uintptr_t va : victim.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size() && planned < need; ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier != victim.device) continue;
      Step step{seg, i, p.tier};
      step.ctx = &victim;
      bool placed = false;
      for (int tier : order) {
        if (!room_on(tier, victim.device, p.size, true)) continue;
        if (backings_.acquire(tier, p.size, true, &step.handle, &step.handle_bytes) != 0) continue;
        step.dst = tier;
        ledger_.reserve(tier, victim.device, p.size);
        placed = true;
        break;
      }
      if (!placed) return planned;
      steps.push_back(step);
      planned += p.size;
    }
    if (planned >= need) break;
  }
  return planned;
}

// Gives back what plan_eviction acquired for steps [from, end) and drops them.
void Core::drop_planned(std::vector<Step>& steps, size_t from) {
  for (size_t k = from; k < steps.size(); ++k) {
    Step& s = steps[k];
    ledger_.remove(s.dst, s.ctx->device, s.segment->pieces[s.index].size, false);
    backings_.give_back(s.dst, s.handle, s.handle_bytes);
  }
  steps.resize(from);
}

// Moves local pieces of `victim` to the best spill tiers until `need` bytes left its
// device. Returns the bytes moved (0 when nothing could move).
uint64_t Core::evict_pieces_of(Context& victim, uint64_t need) {
  std::vector<Step> steps;
  plan_eviction(victim, need, steps);
  if (steps.empty()) return 0;
  uint64_t moved = 0;
  if (execute_move(victim, steps, &moved) != AQUA_OK) {
    std::fprintf(stderr, "[aqua_alloc] evicting context '%s' failed: %s\n", victim.tag.c_str(),
                 last_error().c_str());
    return 0;
  }
  return moved;
}

// --- lending and reclaim -----------------------------------------------------------------

// Moves pieces of `ctx` off lenders that hold more than their lend budget (`only_tier`: that
// lender only; -1: any) to other lenders with room, else host, until each is within budget
// or this context has nothing more there. The context's park event is recorded (mutex_
// held, its device bound): the copies wait for its last kernels. All or nothing.
int Core::move_off_lenders(Context& ctx, int only_tier, uint64_t* moved) {
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
  std::vector<Step> steps;
  for (uintptr_t va : ctx.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier < 0 || p.tier == ctx.device || excess[p.tier] == 0) continue;
      Step step{seg, i, p.tier};
      bool placed = false;
      for (int t : order) {
        if (t == p.tier || !room_on(t, ctx.device, p.size, true)) continue;
        if (backings_.acquire(t, p.size, true, &step.handle, &step.handle_bytes) != 0) continue;
        step.dst = t;
        ledger_.reserve(t, ctx.device, p.size);
        placed = true;
        break;
      }
      if (!placed) continue;  // no room anywhere: this piece stays, the reclaim stays pending
      excess[p.tier] -= std::min(excess[p.tier], p.size);
      steps.push_back(step);
    }
  }
  if (steps.empty()) return AQUA_OK;
  return execute_move(ctx, steps, moved);
}

// Moves pieces of parked contexts off lender `device`, least recently run first, until it
// is within its lend budget. Returns the bytes moved. mutex_ held.
uint64_t Core::reclaim_locked(int device) {
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
    if (backend_->bind(victim->device) != 0) continue;
    uint64_t moved = 0;
    if (move_off_lenders(*victim, device, &moved) != AQUA_OK)
      std::fprintf(stderr, "[aqua_alloc] reclaim of %s: moving context '%s' failed: %s\n", tier_name(device).c_str(),
                   victim->tag.c_str(), last_error().c_str());
    total += moved;
  }
  return total;
}

int Core::reclaim(int device, uint64_t* moved, uint64_t* pending) {
  std::lock_guard<std::mutex> lock(mutex_);
  *moved = 0;
  *pending = 0;
  if (device < 0 || device >= num_devices_)
    return fail(AQUA_ERR_INVALID, "reclaim: unknown device " + std::to_string(device));
  *moved = reclaim_locked(device);
  *pending = ledger_.lent_excess(device);
  return AQUA_OK;
}

// At a park or a resume: the context's pieces on lenders over budget move on now (a
// reclaim waits for running contexts to reach one of these points). mutex_ held, device
// bound, park event recorded. A failure is logged, not returned: the reclaim stays pending.
void Core::note_lender_moves(Context& ctx, const char* when) {
  uint64_t moved = 0;
  if (move_off_lenders(ctx, -1, &moved) != AQUA_OK)
    std::fprintf(stderr, "[aqua_alloc] %s of '%s': moving it off a reclaiming lender failed: %s\n", when,
                 ctx.tag.c_str(), last_error().c_str());
}

// Backs one new piece at va: the local device if its budget has room (after evicting
// parked contexts), else the spill tiers in order. Maps it with access for the device.
int Core::place_new_piece(Context& ctx, uintptr_t va, Piece* piece) {
  int home = ctx.device;
  std::vector<int> order{home};
  for (int t : spill_order(home)) order.push_back(t);
  int last_error_code = 0;
  for (int tier : order) {
    if (tier == home) make_local_room(home, piece->size, ctx.id);
    if (!room_on(tier, home, piece->size, false)) continue;
    int r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    if (r != 0 && tier == home && backend_->is_out_of_memory(r) && ledger_.lent_used[home] > 0) {
      // The owner needs memory it lent: lower its lend budget by what it needs and move
      // parked borrowers off (an elastic lender gets its memory back first).
      ledger_.lend_budget[home] = std::min(ledger_.lend_budget[home], ledger_.lent_used[home]);
      ledger_.lend_budget[home] -= std::min(ledger_.lend_budget[home], piece->size);
      record(AQUA_EV_BUDGET, -1, AQUA_TIER_NONE, home, ledger_.lend_budget[home], 0, 1, 0);
      reclaim_locked(home);
      backend_->bind(home);
      r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    }
    if (r != 0 && tier == home && backend_->is_out_of_memory(r)) {
      // The budget had room but the device did not (other users of the GPU): evict the
      // least recently run parked context's local pieces, then try once more.
      if (Context* victim = lru_parked_victim(home, ctx.id)) evict_pieces_of(*victim, piece->size);
      backend_->bind(home);
      r = backings_.acquire(tier, piece->size, false, &piece->handle, &piece->handle_bytes);
    }
    if (r != 0) {
      if (r > 0) last_error_code = r;
      continue;
    }
    int m = backend_->map(va + piece->offset, piece->size, piece->handle);
    bool mapped = m == 0;
    if (mapped) m = backend_->set_access(va + piece->offset, piece->size, home);
    if (m != 0) {
      // The backing may serve anyone else only once it is mapped nowhere; if the unmap
      // fails it is leaked (and said so), never reused while mapped.
      if (mapped && !retry(*backend_, &Backend::unmap, va + piece->offset, piece->size))
        std::fprintf(stderr, "[aqua_alloc] unmapping a failed new piece failed; its backing is leaked\n");
      else
        backings_.give_back(tier, piece->handle, piece->handle_bytes);
      return driver_fail(*backend_, "mapping a new segment", m);
    }
    piece->tier = tier;
    piece->away_since = tier == home ? 0 : ++clock_;
    ledger_.add(tier, home, piece->size, false);
    return AQUA_OK;
  }
  std::string why = last_error_code ? "; last driver error " + backend_->error_name(last_error_code) : "";
  return fail(AQUA_ERR_OUT_OF_MEMORY, "no tier has room for " + bytes_text(piece->size) + why);
}

// --- allocator callbacks ----------------------------------------------------------------

void* Core::malloc(size_t size, int device, int thread_context) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device < 0 || device >= num_devices_) {
    set_last_error("aqua_malloc: unknown device " + std::to_string(device));
    return nullptr;
  }
  Context* ctx = find_context(thread_context);
  if (!ctx || ctx->device != device) ctx = default_context(device);
  if (ctx->parked) {  // allocating means running
    ctx->parked = false;
    ctx->last_run = ++clock_;
  }
  if (int r = backend_->bind(device)) {
    driver_fail(*backend_, "binding the device", r);
    return nullptr;
  }
  uint64_t bytes = round_up(size == 0 ? 1 : size, granularity_);
  auto seg = std::make_unique<Segment>();
  seg->size = bytes;
  seg->context = ctx->id;
  int r = backend_->reserve(bytes, &seg->va);
  if (r == 0) {
    r = backend_->reserve(bytes, &seg->shadow);
    if (r != 0) backend_->free_va(seg->va, bytes);
  }
  if (r != 0) {
    driver_fail(*backend_, "reserving address space", r);
    record(AQUA_EV_ALLOC_FAILED, ctx->id, AQUA_TIER_NONE, AQUA_TIER_NONE, bytes, 0, 0, r);
    return nullptr;
  }
  // Pieces: whole chunks, then the rest cut into powers of two (times the granularity),
  // largest first, so that every piece has the size of a host pool class.
  std::vector<uint64_t> sizes;
  for (uint64_t left = bytes; left > 0;) {
    uint64_t piece = chunk_bytes_;
    while (piece > left) piece /= 2;
    sizes.push_back(piece);
    left -= piece;
  }
  uint64_t off = 0;
  for (uint64_t piece_size : sizes) {
    Piece piece;
    piece.offset = off;
    piece.size = piece_size;
    off += piece_size;
    int status = place_new_piece(*ctx, seg->va, &piece);
    if (status != AQUA_OK) {
      std::string why = last_error();
      for (const Piece& p : seg->pieces) {
        ledger_.remove(p.tier, ctx->device, p.size, false);
        if (retry(*backend_, &Backend::unmap, seg->va + p.offset, p.size))
          backings_.give_back(p.tier, p.handle, p.handle_bytes);
        else
          std::fprintf(stderr, "[aqua_alloc] unmapping a failed allocation failed; its backing is leaked\n");
      }
      backend_->free_va(seg->va, bytes);
      backend_->free_va(seg->shadow, bytes);
      record(AQUA_EV_ALLOC_FAILED, ctx->id, AQUA_TIER_NONE, AQUA_TIER_NONE, bytes, 0, 0, status);
      std::string message = "out of memory: context '" + ctx->tag + "' asked for " + bytes_text(bytes) + ": " +
                            why + ". Tiers: " + usage_line();
      std::fprintf(stderr, "[aqua_alloc] %s\n", message.c_str());
      set_last_error(message);
      return nullptr;
    }
    seg->pieces.push_back(piece);
  }
  for (const Piece& p : seg->pieces) record(AQUA_EV_MAP, ctx->id, AQUA_TIER_NONE, p.tier, p.size, 0, seg->va + p.offset, 0);
  record(AQUA_EV_SEGMENT_ALLOC, ctx->id, AQUA_TIER_NONE, seg->pieces.front().tier, bytes, 0, seg->va, 0);
  void* ptr = reinterpret_cast<void*>(seg->va);
  ctx->segments.insert(seg->va);
  segments_[seg->va] = std::move(seg);
  return ptr;
}

void Core::free(void* ptr) {
  int home = -1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = segments_.find(reinterpret_cast<uintptr_t>(ptr));
    if (it != segments_.end()) home = contexts_.at(it->second->context)->device;
  }
  // Like cudaFree: kernels still using the memory finish before it is unmapped. Not under
  // mutex_: a stream may be waiting (on the GPU) for an asynchronous resume, whose worker
  // needs mutex_ to finish.
  if (home >= 0) {
    if (int r = backend_->device_sync(home))
      std::fprintf(stderr, "[aqua_alloc] synchronizing before a free failed: %s\n", backend_->error_name(r).c_str());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = segments_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == segments_.end()) {
    std::fprintf(stderr, "[aqua_alloc] aqua_free: %p is not a segment of aqua_alloc; ignored\n", ptr);
    set_last_error("aqua_free: unknown pointer");
    return;
  }
  Segment* seg = it->second.get();
  auto ctx_it = contexts_.find(seg->context);
  bool all_unmapped = true, shadow_unmapped = true;
  for (Piece& p : seg->pieces) {
    record(AQUA_EV_UNMAP, seg->context, p.tier, AQUA_TIER_NONE, p.size, 0, seg->va + p.offset, 0);
    ledger_.remove(p.tier, home, p.size, false);
    if (p.shadow_mapped && retry(*backend_, &Backend::unmap, seg->shadow + p.offset, p.size)) p.shadow_mapped = false;
    bool home_unmapped = retry(*backend_, &Backend::unmap, seg->va + p.offset, p.size);
    shadow_unmapped = shadow_unmapped && !p.shadow_mapped;
    all_unmapped = all_unmapped && home_unmapped;
    if (home_unmapped && !p.shadow_mapped) {
      backings_.give_back(p.tier, p.handle, p.handle_bytes);
    } else {
      // Still mapped: never hand this backing to anyone else (leaked, and said so).
      std::fprintf(stderr, "[aqua_alloc] unmapping a freed segment at 0x%lx%s failed; its %s backing is leaked\n",
                   static_cast<unsigned long>(seg->va + p.offset), home_unmapped ? " (its staging mapping)" : "",
                   tier_name(p.tier).c_str());
    }
  }
  if (all_unmapped) backend_->free_va(seg->va, seg->size);
  if (shadow_unmapped) backend_->free_va(seg->shadow, seg->size);
  record(AQUA_EV_SEGMENT_FREE, seg->context, AQUA_TIER_NONE, AQUA_TIER_NONE, seg->size, 0, seg->va, 0);
  Context* ctx = ctx_it->second.get();
  ctx->segments.erase(seg->va);
  segments_.erase(it);
  if (ctx->released && ctx->segments.empty()) {
    if (ctx->park_event) idle_events_[ctx->device].push_back(ctx->park_event);
    contexts_.erase(ctx_it);
  }
}

// --- moves -------------------------------------------------------------------------------

int Core::resume(int id, uint64_t stream, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  std::lock_guard<std::mutex> lock(mutex_);
  Context* ctx = find_context(id);
  *bytes_moved = 0;
  *bytes_elsewhere = 0;
  if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "resume: no live context with id " + std::to_string(id));
  if (int r = backend_->bind(ctx->device)) return driver_fail(*backend_, "binding the device", r);
  if (!ctx->parked) {
    // Running: its kernels may still be writing on `stream`; the move must wait for them.
    if (int r = record_park(*ctx, stream)) return r;
  }
  ctx->parked = false;
  ctx->last_run = ++clock_;
  record(AQUA_EV_CONTEXT_RESUME, id, AQUA_TIER_NONE, AQUA_TIER_NONE, 0, 0, 0, 0);
  return resume_locked(*ctx, bytes_moved, bytes_elsewhere);
}

// --- asynchronous resume ---------------------------------------------------------------

int Core::resume_async(int id, uint64_t stream, uint32_t* ticket) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Context* ctx = find_context(id);
    if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "resume: no live context with id " + std::to_string(id));
    if (int r = backend_->bind(ctx->device)) return driver_fail(*backend_, "binding the device", r);
    if (!flag_host_) {
      if (int r = backend_->flag_create(&flag_host_, &flag_device_)) {
        flag_host_ = nullptr;
        return driver_fail(*backend_, "creating the resume flag (pinned host memory)", r);
      }
    }
    // Here, not on the worker: the park event of a running context must be recorded on the
    // caller's stream before the caller queues a wait for the move after it.
    if (!ctx->parked) {
      if (int r = record_park(*ctx, stream)) return r;
    }
    ctx->parked = false;
    ctx->last_run = ++clock_;
    record(AQUA_EV_CONTEXT_RESUME, id, AQUA_TIER_NONE, AQUA_TIER_NONE, 0, 0, 0, 0);
  }
  {
    std::lock_guard<std::mutex> lock(async_mutex_);
    if (async_stop_) return fail(AQUA_ERR_STATE, "resume: aqua_alloc is shutting down");
    *ticket = ++async_next_ticket_;
    async_queue_.push_back(AsyncResume{*ticket, id});
    if (!async_thread_.joinable()) async_thread_ = std::thread(&Core::async_thread_main, this);
  }
  async_cv_.notify_all();
  std::lock_guard<std::mutex> lock(mutex_);  // (if the job is already done, waiting for it is free)
  if (Context* ctx = find_context(id)) ctx->async_ticket = *ticket;
  return AQUA_OK;
}

void Core::async_thread_main() {
  std::unique_lock<std::mutex> lock(async_mutex_);
  for (;;) {
    async_cv_.wait(lock, [&] { return async_stop_ || !async_queue_.empty(); });
    if (async_queue_.empty()) return;  // stopping, and every job is done
    AsyncResume job = async_queue_.front();
    async_queue_.erase(async_queue_.begin());
    lock.unlock();
    AsyncOutcome out{AQUA_OK, 0, 0, {}};
    {
      std::lock_guard<std::mutex> core_lock(mutex_);
      Context* ctx = find_context(job.context);
      if (!ctx) {
        out.status = fail(AQUA_ERR_NOT_FOUND, "resume: context " + std::to_string(job.context) + " was released");
      } else if (int r = backend_->bind(ctx->device)) {
        out.status = driver_fail(*backend_, "binding the device", r);
      } else {
        out.status = resume_locked(*ctx, &out.moved, &out.elsewhere);
      }
      if (out.status != AQUA_OK) out.error = last_error();
      // Done (moved, or rolled back with the bytes where they were: either way the context
      // may run): release the GPU-side waits.
      __atomic_store_n(flag_host_, job.ticket, __ATOMIC_RELEASE);
    }
    lock.lock();
    async_done_[job.ticket] = std::move(out);
    async_last_done_ = job.ticket;
    async_cv_.notify_all();
  }
}

int Core::resume_wait_on_stream(uint32_t ticket, uint64_t stream) {
  {
    std::lock_guard<std::mutex> lock(async_mutex_);
    if (ticket == 0 || static_cast<int32_t>(ticket - async_next_ticket_) > 0)
      return fail(AQUA_ERR_INVALID, "resume wait: unknown ticket " + std::to_string(ticket));
  }
  uintptr_t flag = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    flag = flag_device_;  // made before the first ticket, never changed
  }
  // Not under mutex_: the simulated backend's wait blocks until the worker, which needs
  // mutex_, has finished the move.
  if (int r = backend_->stream_wait_value(stream, flag, ticket))
    return driver_fail(*backend_, "queueing the GPU-side wait for a resume", r);
  return AQUA_OK;
}

int Core::resume_result(uint32_t ticket, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  std::unique_lock<std::mutex> lock(async_mutex_);
  if (ticket == 0 || static_cast<int32_t>(ticket - async_next_ticket_) > 0)
    return fail(AQUA_ERR_INVALID, "resume result: unknown ticket " + std::to_string(ticket));
  async_cv_.wait(lock, [&] { return async_done_.count(ticket) || static_cast<int32_t>(async_last_done_ - ticket) >= 0; });
  auto it = async_done_.find(ticket);
  if (it == async_done_.end()) return fail(AQUA_ERR_INVALID, "resume result: ticket " + std::to_string(ticket) + " was already taken");
  AsyncOutcome out = std::move(it->second);
  async_done_.erase(it);
  *bytes_moved = out.moved;
  *bytes_elsewhere = out.elsewhere;
  if (out.status != AQUA_OK) set_last_error(out.error);
  return out.status;
}

// A park or an eviction of a context whose asynchronous resume is still queued waits for
// it first: its park event, recorded again now, must not be what that move waits for
// (work queued on the stream after a GPU-side wait for a later ticket would never run).
void Core::wait_async_resume_of(int id) {
  uint32_t ticket = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (Context* ctx = find_context(id)) ticket = ctx->async_ticket;
  }
  if (ticket == 0) return;
  std::unique_lock<std::mutex> lock(async_mutex_);
  async_cv_.wait(lock, [&] { return async_stop_ || static_cast<int32_t>(async_last_done_ - ticket) >= 0; });
}

void Core::stop_async_thread() {
  {
    std::lock_guard<std::mutex> lock(async_mutex_);
    async_stop_ = true;
  }
  async_cv_.notify_all();
  if (async_thread_.joinable()) async_thread_.join();
}

// Brings the pieces of running `ctx` home as far as room allows (mutex_ held, its device
// bound, its park event recorded if it was running).
int Core::resume_locked(Context& context, uint64_t* bytes_moved, uint64_t* bytes_elsewhere) {
  Context* ctx = &context;
  *bytes_moved = 0;
  *bytes_elsewhere = 0;
  uint64_t need = 0;
  for (uintptr_t va : ctx->segments)
    for (const Piece& p : segments_.at(va)->pieces)
      if (p.tier != ctx->device) need += p.size;
  if (need == 0) return AQUA_OK;
  // Pieces come home least recently spilled first, as far as the budget has room.
  std::vector<std::pair<Segment*, size_t>> away;
  for (uintptr_t va : ctx->segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i)
      if (seg->pieces[i].tier != ctx->device) away.emplace_back(seg, i);
  }
  std::stable_sort(away.begin(), away.end(), [](const auto& a, const auto& b) {
    return a.first->pieces[a.second].away_since < b.first->pieces[b.second].away_since;
  });
  int device = ctx->device;
  // A context switch under a full budget: parked contexts, least recently run first, are
  // evicted in the same move as this one comes home, so that both directions of the link
  // work at once. Budget room counts the bytes planned to leave.
  std::vector<Step> steps;
  uint64_t leaving = 0;
  if (ledger_.own_used[device] + need > ledger_.local_budget[device]) {
    uint64_t deficit = ledger_.own_used[device] + need - ledger_.local_budget[device];
    std::vector<Context*> victims;
    for (auto& [id, c] : contexts_) {
      (void)id;
      if (c->id != ctx->id && c->device == device && c->parked) victims.push_back(c.get());
    }
    std::sort(victims.begin(), victims.end(), [](Context* a, Context* b) { return a->last_run < b->last_run; });
    for (Context* v : victims) {
      if (leaving >= deficit) break;
      leaving += plan_eviction(*v, deficit - leaving, steps);
    }
  }
  // Plans bringing the pieces of `away` home, in order, while the budget plus `extra_room`
  // (bytes planned to leave) has room; a piece whose backing cannot be made stays away.
  auto plan_homecoming = [&](uint64_t extra_room, std::vector<Step>& out) {
    for (auto [seg, i] : away) {
      const Piece& p = seg->pieces[i];
      if (p.tier == device || ledger_.own_used[device] + p.size > ledger_.local_budget[device] + extra_room) continue;
      Step step{seg, i, p.tier, device};
      step.ctx = ctx;
      if (backings_.acquire(device, p.size, true, &step.handle, &step.handle_bytes) != 0) continue;
      ledger_.reserve(device, device, p.size);
      out.push_back(step);
    }
  };
  size_t num_evictions = steps.size();
  std::vector<Step> incoming;
  plan_homecoming(leaving, incoming);
  if (incoming.empty()) {
    drop_planned(steps, 0);  // nothing can come home: evict nobody
  } else {
    // Interleave: one piece out, one piece in, so that commits follow both streams.
    std::vector<Step> merged;
    for (size_t k = 0; k < std::max(num_evictions, incoming.size()); ++k) {
      if (k < num_evictions) merged.push_back(steps[k]);
      if (k < incoming.size()) merged.push_back(incoming[k]);
    }
    steps.swap(merged);
  }
  int status = steps.empty() ? AQUA_OK : execute_move(*ctx, steps, bytes_moved);
  if (status == AQUA_OK && num_evictions > 0 && *bytes_moved < need) {
    // What did not fit in the exchange (no physical room for both at once, or the budget):
    // evict first, then bring home (the old backings of the first move are reused).
    uint64_t left = need - *bytes_moved;
    make_local_room(device, left, ctx->id);
    std::vector<Step> rest;
    plan_homecoming(0, rest);
    uint64_t more = 0;
    if (!rest.empty() && execute_move(*ctx, rest, &more) != AQUA_OK) {
      // The exchange stands (its pieces are home); this second move rolled back, so the
      // rest stays where it was, usable in place: a partial resume, not a failed one.
      std::fprintf(stderr, "[aqua_alloc] resume of '%s': bringing the rest home failed (%s); it stays in place\n",
                   ctx->tag.c_str(), last_error().c_str());
    }
    *bytes_moved += more;
  }
  if (status == AQUA_OK) note_lender_moves(*ctx, "resume");
  for (uintptr_t va : ctx->segments)
    for (const Piece& p : segments_.at(va)->pieces)
      if (p.tier != ctx->device) *bytes_elsewhere += p.size;
  return status;
}

int Core::evict(int id, int tier, uint64_t stream, uint64_t* bytes_moved) {
  wait_async_resume_of(id);
  std::lock_guard<std::mutex> lock(mutex_);
  *bytes_moved = 0;
  Context* ctx = find_context(id);
  if (!ctx) return fail(AQUA_ERR_NOT_FOUND, "evict: no live context with id " + std::to_string(id));
  if (tier != AQUA_TIER_AUTO && !ledger_.valid(tier))
    return fail(AQUA_ERR_INVALID, "evict: unknown tier " + std::to_string(tier));
  if (tier == ctx->device)
    return fail(AQUA_ERR_INVALID, "evict: " + tier_name(tier) + " is the context's own device; use resume");
  if (tier >= 0 && peer_rank_[ctx->device][tier] < 0)
    return fail(AQUA_ERR_INVALID, "evict: " + tier_name(ctx->device) + " may not use " + tier_name(tier) +
                                      " (no peer access, or disabled)");
  if (int r = backend_->bind(ctx->device)) return driver_fail(*backend_, "binding the device", r);
  // Valid request: the context is parked now (its moves wait for work already on `stream`);
  // a refusal below puts its state back.
  bool was_parked = ctx->parked;
  uint64_t was_run = ctx->last_run;
  if (int r = record_park(*ctx, stream)) return r;
  auto refuse = [&](int code) {
    ctx->parked = was_parked;
    ctx->last_run = was_run;
    return code;
  };
  std::vector<int> order = tier == AQUA_TIER_AUTO ? spill_order(ctx->device) : std::vector<int>{tier};
  int driver_error = 0;
  std::vector<Step> steps;
  for (uintptr_t va : ctx->segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (tier == AQUA_TIER_AUTO ? p.tier != ctx->device : p.tier == tier) continue;
      Step step{seg, i, p.tier};
      bool placed = false;
      for (int t : order) {
        if (!room_on(t, ctx->device, p.size, true)) continue;
        if (int r = backings_.acquire(t, p.size, true, &step.handle, &step.handle_bytes)) {
          if (r > 0 && !backend_->is_out_of_memory(r)) driver_error = r;
          continue;
        }
        step.dst = t;
        ledger_.reserve(t, ctx->device, p.size);
        placed = true;
        break;
      }
      if (!placed) {
        for (Step& s : steps) {
          ledger_.remove(s.dst, ctx->device, s.segment->pieces[s.index].size, false);
          backings_.give_back(s.dst, s.handle, s.handle_bytes);
        }
        if (driver_error)
          return refuse(driver_fail(*backend_, ("evict '" + ctx->tag + "': creating backing").c_str(), driver_error));
        std::string target = tier == AQUA_TIER_AUTO ? "any spill tier" : tier_name(tier);
        return refuse(fail(AQUA_ERR_OUT_OF_MEMORY, "evict '" + ctx->tag + "': " + target + " has no room for " +
                                                bytes_text(p.size) + ". Tiers: " + usage_line()));
      }
      steps.push_back(step);
    }
  }
  if (steps.empty()) return AQUA_OK;
  return execute_move(*ctx, steps, bytes_moved);
}

// An event of `device` (events belong to the context current when made; the caller has
// bound `device`).
int Core::take_event(int device, Event* event) {
  std::vector<Event>& idle = idle_events_[device];
  if (!idle.empty()) {
    *event = idle.back();
    idle.pop_back();
    return 0;
  }
  return backend_->event_create(event);
}

// The stream that copies out of `device` (inbound false) or into it (inbound true).
int Core::mover_stream(int device, bool inbound, Stream* stream) {
  Stream& s = inbound ? in_streams_[device] : streams_[device];
  if (!s) {
    if (int r = backend_->stream_create(device, &s)) return r;
  }
  *stream = s;
  return 0;
}

// Maps `handle` at va with access for `device`, each call retried (restore paths).
// *mapped says whether the map itself took (then the caller owns an unmap on failure).
bool Core::remap_retried(uintptr_t va, size_t size, Handle handle, int device, bool* mapped) {
  *mapped = false;
  for (int i = 0; i < kRestoreAttempts && !*mapped; ++i) *mapped = backend_->map(va, size, handle) == 0;
  bool access = false;
  for (int i = 0; *mapped && i < kRestoreAttempts && !access; ++i)
    access = backend_->set_access(va, size, device) == 0;
  return access;
}

bool Core::in_shadowed_tail(const Context& ctx, const Segment* seg, size_t index) const {
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
void Core::unwind(std::vector<Step>& steps) {
  for (Step& s : steps) {
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
      if (retry(*backend_, &Backend::unmap, s.source, p.size)) {
        s.source_shadowed = false;
      } else {
        old_backing_pinned = true;
        std::fprintf(stderr, "[aqua_alloc] unmapping a move's source mapping of context '%s' failed: "
                     "its staging range stays mapped (later moves of the piece fail and roll back)\n",
                     ctx.tag.c_str());
      }
    }
    if (s.committed) {
      bool unmapped = retry(*backend_, &Backend::unmap, home, p.size);
      bool mapped = false;
      bool access = unmapped && remap_retried(home, p.size, p.handle, ctx.device, &mapped);
      if (!access) {
        if (mapped) retry(*backend_, &Backend::unmap, home, p.size);
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
          if (keep_source) old_backing_pinned = !retry(*backend_, &Backend::unmap, s.source, p.size);  // the old backing leaves
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
    if (s.staged && !retry(*backend_, &Backend::unmap, s.target, p.size)) {
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
      if (!p.shadow_mapped && mapped && !retry(*backend_, &Backend::unmap, shadow, p.size))
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
int Core::execute_move(Context& ctx, std::vector<Step>& steps, uint64_t* bytes_moved) {
  uint64_t start = now_ns();
  uint64_t total = 0;
  std::map<int, Context*> involved;  // context id -> context
  for (Step& s : steps) {
    if (!s.ctx) s.ctx = &ctx;
    involved[s.ctx->id] = s.ctx;
    total += s.segment->pieces[s.index].size;
  }
  int src_tier = steps.front().src, dst_tier = steps.front().dst;
  for (auto& [id, c] : involved) {
    uint64_t bytes = 0;
    for (Step& s : steps)
      if (s.ctx == c) bytes += s.segment->pieces[s.index].size;
    const Step& first = *std::find_if(steps.begin(), steps.end(), [c = c](const Step& s) { return s.ctx == c; });
    events_.add(start, AQUA_EV_MOVE_START, id, first.src, first.dst, bytes, 0, first.segment->va, 0);
  }
  // Waits for every copy issued so far (before an unwind touches backings they may use).
  auto drain_issued = [&]() {
    for (const Step& s : steps)
      if (s.copied) backend_->event_sync(s.copied);
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
                                     backend_->error_name(code) + "; rolled back, bytes intact");
  };
  auto drained_and_failed = [&](const char* what, int code) {
    drain_issued();
    return failed(what, code);
  };
  auto into_device = [](const Step& s) { return s.dst == s.ctx->device; };

  // One stream per direction; each waits for the last kernels of every context involved
  // (recorded at park), so no copy reads a range a kernel may still write.
  Stream streams[2] = {0, 0};  // [0]: out of the device (and between other tiers), [1]: into it
  for (const Step& s : steps) {
    int dir = into_device(s) ? 1 : 0;
    if (streams[dir]) continue;
    if (int r = mover_stream(ctx.device, dir == 1, &streams[dir])) return failed("creating a mover stream", r);
    for (auto& [id, c] : involved) {
      (void)id;
      if (!c->park_recorded) continue;
      if (int r = backend_->stream_wait_event(streams[dir], c->park_event))
        return failed("waiting for the park event", r);
    }
  }
  bool copies_out = std::any_of(steps.begin(), steps.end(), [&](const Step& s) { return !into_device(s); });
  // Pieces of a park to host read through a second mapping (see above): up to kShadowedTail
  // of the pieces that leave their home device for pre-mapped host backings, first those
  // still mapped at the shadow since their resume (nothing to map), then the last ones.
  std::vector<bool> read_through_shadow(steps.size(), false);
  auto piece_of = [](const Step& s) -> Piece& { return s.segment->pieces[s.index]; };
  auto may_read_through = [&](const Step& s) {
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
    if (int r = backend_->unmap(steps[k].segment->shadow + p.offset, p.size))
      return failed("dropping a kept staging mapping", r);
    p.shadow_mapped = false;
    steps[k].had_kept = true;  // an unwind maps it again
  }
  // Maps where step k's copy writes (and reads, for a second mapping). AQUA_OK or failed().
  auto prepare = [&](size_t k) -> int {
    Step& s = steps[k];
    Piece& p = s.segment->pieces[s.index];
    uint64_t t0 = now_ns();
    if (s.dst == AQUA_TIER_HOST && backings_.host_mapping(s.handle, &s.target)) {
      s.prestaged = true;
    } else {
      s.target = s.segment->shadow + p.offset;
      if (int r = backend_->map(s.target, p.size, s.handle)) return drained_and_failed("staging map", r);
      s.staged = true;
      if (int r = backend_->set_access(s.target, p.size, s.ctx->device))
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
        if (int r = backend_->map(s.source, p.size, p.handle)) return drained_and_failed("source map", r);
        s.source_shadowed = true;
        if (int r = backend_->set_access(s.source, p.size, s.ctx->device))
          return drained_and_failed("source set-access", r);
      }
    }
    profiler_.add(AQUA_PHASE_STAGE, t0, now_ns());
    return AQUA_OK;
  };
  // Issues step k's copy on its direction's stream, with an event after it. AQUA_OK or failed().
  auto issue = [&](size_t k) -> int {
    Step& s = steps[k];
    Stream stream = streams[into_device(s) ? 1 : 0];
    uint64_t t0 = now_ns();
    // The event first: a copy is issued only with an event that the drains can wait on.
    if (int r = take_event(s.ctx->device, &s.copied)) return drained_and_failed("copy", r);
    if (int r = backend_->copy_async(s.target, s.source, s.segment->pieces[s.index].size, stream))
      return drained_and_failed("copy", r);
    if (int r = backend_->event_record(s.copied, stream)) {
      // Issued but not waitable: wait for the whole device before anything is unwound.
      if (backend_->device_sync(s.ctx->device) != 0)
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
    Step& s = steps[k];
    Piece& p = s.segment->pieces[s.index];
    uintptr_t home = s.segment->va + p.offset;
    uint64_t t0 = now_ns();
    if (s.early && !kernels_done) {
      for (auto& [id, c] : involved) {
        (void)id;
        if (!c->park_recorded) continue;
        if (int r = backend_->event_sync(c->park_event)) return drained_and_failed("waiting for the park event", r);
      }
      kernels_done = true;
    } else if (!s.early) {
      if (int r = backend_->event_sync(s.copied)) return drained_and_failed("waiting for the copy", r);
    }
    uint64_t t1 = now_ns();
    profiler_.add(AQUA_PHASE_WAIT, t0, t1);
    if (s.staged && !keep_staging[k] && !s.early) {
      if (int r = backend_->unmap(s.target, p.size)) return drained_and_failed("unstaging unmap", r);
      s.staged = false;
    }
    if (int r = backend_->unmap(home, p.size)) return drained_and_failed("unmap", r);
    int r = backend_->map(home, p.size, s.handle);
    if (r == 0) {
      r = backend_->set_access(home, p.size, s.ctx->device);
      if (r != 0) retry(*backend_, &Backend::unmap, home, p.size);
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
    Step& s = steps[k];
    if (!s.early) continue;
    const Piece& p = s.segment->pieces[s.index];
    uint64_t t0 = now_ns();
    if (int r = backend_->event_sync(s.copied)) return drained_and_failed("waiting for the copy", r);
    uint64_t t1 = now_ns();
    profiler_.add(AQUA_PHASE_WAIT, t0, t1);
    if (s.source_shadowed) {
      if (int r = backend_->unmap(s.source, p.size)) return drained_and_failed("source unmap", r);
      s.source_shadowed = false;
    }
    if (s.staged && !keep_staging[k]) {
      if (int r = backend_->unmap(s.target, p.size)) return drained_and_failed("unstaging unmap", r);
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
  for (Step& s : steps) {
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

// --- teardown ----------------------------------------------------------------------------

int Core::shutdown(bool force) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!segments_.empty() && !force)
      return fail(AQUA_ERR_STATE, std::to_string(segments_.size()) +
                                      " segments are still live (tensors allocated in contexts); free them first");
  }
  stop_async_thread();  // queued resumes finish first
  backings_.stop_thread();
  std::vector<void*> live;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [va, seg] : segments_) {
      (void)seg;
      live.push_back(reinterpret_cast<void*>(va));
    }
  }
  for (void* ptr : live) free(ptr);
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.release_deferred(-1, 0);
  backings_.trim_host(0);
  for (std::vector<Event>& idle : idle_events_) {
    for (Event e : idle) backend_->event_destroy(e);
    idle.clear();
  }
  return AQUA_OK;
}

}  // namespace aqua
