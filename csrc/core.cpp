// Core: see core.h for the model and its invariants.
#include "core.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

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
      mover_(*backend_, ledger_, backings_, profiler_, events_, segments_, clock_, num_devices_),
      placement_(*backend_, ledger_, backings_, mover_, events_, contexts_, segments_, clock_, num_devices_) {
  chunk_bytes_ = round_up(64 * kMiB, granularity_);
  backings_.configure(granularity_, chunk_bytes_);
  for (int d = 0; d < num_devices_; ++d) {
    size_t free_bytes = 0, total = 0;
    if (backend_->mem_info(d, &free_bytes, &total) == 0) ledger_.local_budget[d] = total;
    for (int p = 0; p < num_devices_; ++p)
      if (p != d && backend_->can_access_peer(d, p)) placement_.set_peer_rank(d, p, 0);
  }
}

Core::~Core() {
  stop_async_thread();
  backings_.stop_thread();
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.release_deferred(-1, 0);
  backings_.release_kept(-1);
}

// --- errors and events ------------------------------------------------------------------

void Core::record(int kind, int context, int src, int dst, uint64_t bytes, uint64_t dur_ns, uint64_t addr,
                  int status) {
  events_.add(now_ns(), kind, context, src, dst, bytes, dur_ns, addr, status);
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
  backings_.release_kept_over_budget(device);  // a lower budget: kept memory goes back first
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
  placement_.set_peer_rank(device, peer, rank);
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

int Core::set_device_keep(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  backings_.set_device_keep(bytes);
  backings_.release_kept(-1);  // idle ones made under the old setting
  return AQUA_OK;
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
  placement_.note_lender_moves(*ctx, "park");
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

// --- profiling and releases --------------------------------------------------------------

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
  backings_.release_deferred(-1, 0);  // kept device backings stay: they are kept on purpose
}

// --- reclaim ----------------------------------------------------------------

int Core::reclaim(int device, uint64_t* moved, uint64_t* pending) {
  std::lock_guard<std::mutex> lock(mutex_);
  *moved = 0;
  *pending = 0;
  if (device < 0 || device >= num_devices_)
    return fail(AQUA_ERR_INVALID, "reclaim: unknown device " + std::to_string(device));
  *moved = placement_.reclaim(device);
  backings_.release_kept_over_budget(device);  // what the moves gave back there beyond the budget
  *pending = ledger_.lent_excess(device);
  return AQUA_OK;
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
    int status = placement_.place_new_piece(*ctx, seg->va, &piece);
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
                            why + ". Tiers: " + placement_.usage_line();
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
  return placement_.bring_home(*ctx, bytes_moved, bytes_elsewhere);
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
  if (tier >= 0 && placement_.peer_rank(ctx->device, tier) < 0)
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
  std::vector<MoveStep> steps;
  if (int r = placement_.plan_evict(*ctx, tier, &steps)) return refuse(r);
  if (steps.empty()) return AQUA_OK;
  return mover_.execute(*ctx, steps, bytes_moved);
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
        out.status = placement_.bring_home(*ctx, &out.moved, &out.elsewhere);
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
  backings_.release_kept(-1);
  backings_.trim_host(0);
  mover_.destroy_idle_events();
  return AQUA_OK;
}

}  // namespace aqua
