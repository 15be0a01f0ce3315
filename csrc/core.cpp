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

Core::Core(std::unique_ptr<Backend> backend, SimControl* sim)
    : backend_(std::move(backend)),
      sim_(sim),
      num_devices_(backend_->device_count()),
      granularity_(backend_->granularity()),
      ledger_(num_devices_),
      backings_(*backend_, mutex_, ledger_, profiler_, num_devices_),
      mover_(*backend_, ledger_, backings_, profiler_, events_, segments_, clock_, num_devices_) {
  chunk_bytes_ = round_up(64 * kMiB, granularity_);
  backings_.configure(granularity_, chunk_bytes_);
  peer_rank_.assign(num_devices_, std::vector<int>(num_devices_, -1));
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

// --- errors and events ------------------------------------------------------------------

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

// --- settings ---------------------------------------------------------------------------

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

// --- host pool --------------------------------------------------------------------------

int Core::host_pool_reserve(uint64_t bytes, bool background) {
  std::unique_lock<std::mutex> lock(mutex_);
  return backings_.reserve_host(bytes, background, lock);
}

int Core::host_pool_trim(uint64_t keep_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.trim_host(keep_bytes);
  return AQUA_OK;
}

// --- contexts ---------------------------------------------------------------------------

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
    if (ctx->park_event) mover_.recycle_event(ctx->device, ctx->park_event);
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
    if (int r = mover_.take_event(ctx.device, &ctx.park_event)) return driver_fail(*backend_, "creating the park event", r);
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
uint64_t Core::plan_eviction(Context& victim, uint64_t need, std::vector<MoveStep>& steps) {
  uint64_t planned = 0;
  std::vector<int> order = spill_order(victim.device);
  for (uintptr_t va : victim.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size() && planned < need; ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier != victim.device) continue;
      MoveStep step{seg, i, p.tier};
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
void Core::drop_planned(std::vector<MoveStep>& steps, size_t from) {
  for (size_t k = from; k < steps.size(); ++k) {
    MoveStep& s = steps[k];
    ledger_.remove(s.dst, s.ctx->device, s.segment->pieces[s.index].size, false);
    backings_.give_back(s.dst, s.handle, s.handle_bytes);
  }
  steps.resize(from);
}

// Moves local pieces of `victim` to the best spill tiers until `need` bytes left its
// device. Returns the bytes moved (0 when nothing could move).
uint64_t Core::evict_pieces_of(Context& victim, uint64_t need) {
  std::vector<MoveStep> steps;
  plan_eviction(victim, need, steps);
  if (steps.empty()) return 0;
  uint64_t moved = 0;
  if (mover_.execute(victim, steps, &moved) != AQUA_OK) {
    std::fprintf(stderr, "[aqua_alloc] evicting context '%s' failed: %s\n", victim.tag.c_str(),
                 last_error().c_str());
    return 0;
  }
  return moved;
}

// --- lending and reclaim ----------------------------------------------------------------

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
  std::vector<MoveStep> steps;
  for (uintptr_t va : ctx.segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (p.tier < 0 || p.tier == ctx.device || excess[p.tier] == 0) continue;
      MoveStep step{seg, i, p.tier};
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
  return mover_.execute(ctx, steps, moved);
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
    if (ctx->park_event) mover_.recycle_event(ctx->device, ctx->park_event);
    contexts_.erase(ctx_it);
  }
}

// --- moves ------------------------------------------------------------------------------

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

// --- asynchronous resume ----------------------------------------------------------------

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
  std::vector<MoveStep> steps;
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
  auto plan_homecoming = [&](uint64_t extra_room, std::vector<MoveStep>& out) {
    for (auto [seg, i] : away) {
      const Piece& p = seg->pieces[i];
      if (p.tier == device || ledger_.own_used[device] + p.size > ledger_.local_budget[device] + extra_room) continue;
      MoveStep step{seg, i, p.tier, device};
      step.ctx = ctx;
      if (backings_.acquire(device, p.size, true, &step.handle, &step.handle_bytes) != 0) continue;
      ledger_.reserve(device, device, p.size);
      out.push_back(step);
    }
  };
  size_t num_evictions = steps.size();
  std::vector<MoveStep> incoming;
  plan_homecoming(leaving, incoming);
  if (incoming.empty()) {
    drop_planned(steps, 0);  // nothing can come home: evict nobody
  } else {
    // Interleave: one piece out, one piece in, so that commits follow both streams.
    std::vector<MoveStep> merged;
    for (size_t k = 0; k < std::max(num_evictions, incoming.size()); ++k) {
      if (k < num_evictions) merged.push_back(steps[k]);
      if (k < incoming.size()) merged.push_back(incoming[k]);
    }
    steps.swap(merged);
  }
  int status = steps.empty() ? AQUA_OK : mover_.execute(*ctx, steps, bytes_moved);
  if (status == AQUA_OK && num_evictions > 0 && *bytes_moved < need) {
    // What did not fit in the exchange (no physical room for both at once, or the budget):
    // evict first, then bring home (the old backings of the first move are reused).
    uint64_t left = need - *bytes_moved;
    make_local_room(device, left, ctx->id);
    std::vector<MoveStep> rest;
    plan_homecoming(0, rest);
    uint64_t more = 0;
    if (!rest.empty() && mover_.execute(*ctx, rest, &more) != AQUA_OK) {
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
  std::vector<MoveStep> steps;
  for (uintptr_t va : ctx->segments) {
    Segment* seg = segments_.at(va).get();
    for (size_t i = 0; i < seg->pieces.size(); ++i) {
      const Piece& p = seg->pieces[i];
      if (tier == AQUA_TIER_AUTO ? p.tier != ctx->device : p.tier == tier) continue;
      MoveStep step{seg, i, p.tier};
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
        for (MoveStep& s : steps) {
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
  return mover_.execute(*ctx, steps, bytes_moved);
}

// --- teardown ---------------------------------------------------------------------------

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
  mover_.destroy_idle_events();
  return AQUA_OK;
}

}  // namespace aqua
