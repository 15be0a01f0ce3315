/*
 * aqua_alloc C ABI: every symbol the shared library exports.
 *
 * Loaded twice in one process: by ctypes (aqua_alloc/memory/native.py declares every signature
 * below) and by torch.cuda.memory.CUDAPluggableAllocator (aqua_malloc / aqua_free).
 * All functions are thread-safe. Functions that return int return an aqua_status code;
 * on failure aqua_last_error() gives the calling thread's message. aqua_malloc and
 * aqua_free never throw, exit or call into Python or torch.
 *
 * Tiers: a device ordinal 0..N-1 names that GPU's memory; AQUA_TIER_HOST names pinned
 * host memory. Sizes are bytes. Times are CLOCK_MONOTONIC nanoseconds.
 */
#ifndef AQUA_ALLOC_H_
#define AQUA_ALLOC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AQUA_EXPORT __attribute__((visibility("default")))

enum aqua_status {
  AQUA_OK = 0,
  AQUA_ERR_INVALID = 1,        /* a bad argument: the message names it */
  AQUA_ERR_NOT_FOUND = 2,      /* unknown context id or pointer */
  AQUA_ERR_OUT_OF_MEMORY = 3,  /* no tier has room */
  AQUA_ERR_DRIVER = 4,         /* a driver call failed; state rolled back */
  AQUA_ERR_NO_DEVICE = 5,      /* no CUDA driver or device */
  AQUA_ERR_STATE = 6,          /* not initialized, already initialized, busy */
  AQUA_ERR_BUSY = 7,           /* (nowait calls only) another thread holds the core: try later */
};

enum aqua_backend_kind { AQUA_BACKEND_NONE = 0, AQUA_BACKEND_CUDA = 1, AQUA_BACKEND_SIM = 2 };

#define AQUA_TIER_HOST (-1)
#define AQUA_TIER_AUTO (-2) /* evict: the best tier with room */
#define AQUA_TIER_NONE (-3) /* events: no tier */

/* Driver operations, for failure injection in the simulated backend and for counts. */
enum aqua_op {
  AQUA_OP_RESERVE = 0,
  AQUA_OP_FREE_VA = 1,
  AQUA_OP_CREATE = 2,
  AQUA_OP_RELEASE = 3,
  AQUA_OP_MAP = 4,
  AQUA_OP_UNMAP = 5,
  AQUA_OP_SET_ACCESS = 6,
  AQUA_OP_COPY = 7,
  AQUA_OP_SYNC = 8,
  AQUA_OP_COUNT = 9,
};

enum aqua_event_kind {
  AQUA_EV_SEGMENT_ALLOC = 1,
  AQUA_EV_SEGMENT_FREE = 2,
  AQUA_EV_MAP = 3,
  AQUA_EV_UNMAP = 4,
  AQUA_EV_MOVE_START = 5,
  AQUA_EV_MOVE_END = 6,
  AQUA_EV_MOVE_FAILED = 7,
  AQUA_EV_BUDGET = 8,
  AQUA_EV_ALLOC_FAILED = 9,
  AQUA_EV_CONTEXT_PARK = 10,
  AQUA_EV_CONTEXT_RESUME = 11,
  AQUA_EV_CONTEXT_CREATE = 12,
  AQUA_EV_CONTEXT_RELEASE = 13,
};

/* One recorded event (56 bytes, plain data). */
typedef struct aqua_event {
  uint64_t t_ns;     /* CLOCK_MONOTONIC at the start */
  uint64_t bytes;
  uint64_t dur_ns;   /* moves: duration */
  uint64_t addr;     /* segment base address, 0 if none */
  int32_t kind;      /* enum aqua_event_kind */
  int32_t context;   /* context id, -1 if none */
  int32_t src_tier;  /* AQUA_TIER_NONE if none */
  int32_t dst_tier;
  int32_t status;    /* 0, or the error code */
  int32_t reserved;
} aqua_event;

/* Per-tier counters. Device tiers count own and lent bytes together. */
typedef struct aqua_tier_stats {
  uint64_t current;        /* bytes of context memory on the tier now */
  uint64_t peak;           /* highest `current` seen */
  uint64_t total;          /* bytes ever placed on the tier (allocations + moves in) */
  uint64_t budget;         /* device: local budget; host: host budget */
  uint64_t lend_budget;    /* device: bytes it may lend to other devices' contexts */
  uint64_t lent;           /* device: bytes of other devices' contexts on it now */
  uint64_t pool_free;      /* host: bytes of backing created ahead and idle */
  uint64_t pool_total;     /* host: bytes of backing created (idle + in use) */
  uint64_t num_moves_in;
  uint64_t num_moves_out;
  uint64_t bytes_in;
  uint64_t bytes_out;
} aqua_tier_stats;

/* --- set-up ------------------------------------------------------------------------ */

/* Load libcuda.so.1 at run time and initialize the core over the real driver. */
AQUA_EXPORT int aqua_init_cuda(void);
/* Initialize over simulated devices made of host memory.
 * capacities[i]: bytes of simulated device i; peer_access: num_devices^2 bytes, row-major,
 * peer_access[i*n+j] != 0 when device i may map memory of device j. */
AQUA_EXPORT int aqua_init_sim(int num_devices, const uint64_t* capacities, uint64_t host_capacity,
                              const uint8_t* peer_access, uint64_t granularity);
/* Tear down. Refuses (AQUA_ERR_STATE) while segments are live unless force != 0;
 * force unmaps and frees everything (pointers into it become invalid). */
AQUA_EXPORT int aqua_shutdown(int force);
AQUA_EXPORT int aqua_backend(void); /* enum aqua_backend_kind */
AQUA_EXPORT const char* aqua_last_error(void);

AQUA_EXPORT int aqua_device_count(int* out);
AQUA_EXPORT int aqua_can_access_peer(int device, int peer, int* out);
AQUA_EXPORT int aqua_mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes);

/* --- settings ------------------------------------------------------------------------ */

AQUA_EXPORT int aqua_set_local_budget(int device, uint64_t bytes);
AQUA_EXPORT int aqua_set_lend_budget(int device, uint64_t bytes);
AQUA_EXPORT int aqua_set_host_budget(uint64_t bytes);
/* Preference of peer tiers for contexts of `device`: lower rank first; rank < 0: never. */
AQUA_EXPORT int aqua_set_peer_rank(int device, int peer, int rank);
/* Largest piece a segment is cut into, bytes (a multiple of the granularity). */
AQUA_EXPORT int aqua_set_chunk_bytes(uint64_t bytes);
/* Create host backing ahead: the pool holds at least `bytes` (within the host budget).
 * Blocking; `background` != 0 also keeps the pool topped up to that level from a thread. */
AQUA_EXPORT int aqua_host_pool_reserve(uint64_t bytes, int background);
/* Release idle host backing beyond `keep_bytes`. */
AQUA_EXPORT int aqua_host_pool_trim(uint64_t keep_bytes);
/* Idle bytes of borrowed pieces' backings each lending GPU keeps mapped at their own
 * address for reuse by the next park there, within its lend budget (0, the default:
 * released a few ms after use). Setting it releases the idle ones now. */
AQUA_EXPORT int aqua_set_device_keep(uint64_t bytes);

/* --- contexts ------------------------------------------------------------------------ */

AQUA_EXPORT int aqua_context_create(int device, const char* tag, int* out_id);
/* Free the context once its segments are freed (immediately if it has none). */
AQUA_EXPORT int aqua_context_release(int id);
/* Route the calling thread's aqua_malloc to context `id` (-1: none); *prev gets the old id. */
AQUA_EXPORT int aqua_set_thread_context(int id, int* prev);
/* Mark not running; record an event on `stream` (a CUstream, 0 = legacy default) that
 * every later move of the context waits for. Its pieces on a lender over its lend budget
 * move on now (see aqua_reclaim). */
AQUA_EXPORT int aqua_park(int id, uint64_t stream);
/* Mark running and bring its bytes back to its device as far as room allows, least recently
 * spilled first; pieces left on a lender over its lend budget move on (see aqua_reclaim). If
 * the context is running, the move first waits for the work already queued on `stream`.
 * *bytes_moved: bytes brought back; *bytes_elsewhere: bytes still on other tiers. */
AQUA_EXPORT int aqua_resume(int id, uint64_t stream, uint64_t* bytes_moved, uint64_t* bytes_elsewhere);
/* Asynchronous resume: as aqua_resume, but the move runs on a worker thread and this returns
 * at once with *ticket. aqua_resume_wait_on_stream(ticket, stream) makes work queued after
 * it on `stream` wait, on the GPU, until the move is done (moved, or rolled back: either
 * way the context may run); aqua_resume_result(ticket, ...) waits on the host and returns
 * the move's status and byte counts (once per ticket). Resumes run in ticket order. */
AQUA_EXPORT int aqua_resume_async(int id, uint64_t stream, uint32_t* ticket);
AQUA_EXPORT int aqua_resume_wait_on_stream(uint32_t ticket, uint64_t stream);
AQUA_EXPORT int aqua_resume_result(uint32_t ticket, uint64_t* bytes_moved, uint64_t* bytes_elsewhere);
/* Park the context (its event recorded on `stream`) and move every byte of it that is not
 * on `tier` to `tier` (AQUA_TIER_AUTO: the best tier other than its device with room, per
 * piece). All or nothing. A refused request (bad tier) leaves the context as it was. */
AQUA_EXPORT int aqua_evict(int id, int tier, uint64_t stream, uint64_t* bytes_moved);
/* Move pieces of parked contexts of other devices off lender `device` (to other lenders
 * with room, else host), least recently run first, until it holds no more than its lend
 * budget (lower the budget first with aqua_set_lend_budget). Running contexts' pieces there
 * move at their next aqua_park or aqua_resume. *bytes_pending: bytes still over the budget. */
AQUA_EXPORT int aqua_reclaim(int device, uint64_t* bytes_moved, uint64_t* bytes_pending);
/* Bytes of the context per tier: out[0..n_devices-1] devices, out[n_devices] host. */
AQUA_EXPORT int aqua_context_where(int id, uint64_t* out, int len);
/* aqua_context_where, or AQUA_ERR_BUSY at once (nothing written, no error message) while
 * another thread holds the core, e.g. a move in progress: for a caller on a hot path (a
 * model's forward) that would rather reuse what it knew than wait for the move. */
AQUA_EXPORT int aqua_context_where_nowait(int id, uint64_t* out, int len);
/* The context owning a pointer (anywhere inside a segment), and that segment's tiers. */
AQUA_EXPORT int aqua_pointer_context(uint64_t ptr, int* out_id);
/* Bytes of the address range [ptr, ptr + len) per tier, laid out as aqua_context_where's.
 * The range must lie inside one segment (a tensor's storage does). */
AQUA_EXPORT int aqua_range_where(uint64_t ptr, uint64_t len, uint64_t* out, int n);
AQUA_EXPORT int aqua_context_count(int* out);
AQUA_EXPORT int aqua_segment_count(int* out);

/* --- statistics and events ------------------------------------------------------------ */

AQUA_EXPORT int aqua_tier_stats_get(int tier, aqua_tier_stats* out);
AQUA_EXPORT int aqua_events_set_capacity(uint64_t capacity);
AQUA_EXPORT int aqua_events_drain(aqua_event* out, int max_events);
AQUA_EXPORT uint64_t aqua_events_dropped(void);

/* Where moves spend their time, cumulative since start or the last reset: ns[i] and
 * calls[i] for phase i (AQUA_PHASE_*), n entries at most. */
enum aqua_phase {
  AQUA_PHASE_ACQUIRE = 0, /* taking or creating the new backings */
  AQUA_PHASE_STAGE = 1,   /* mapping them at the shadow range, with access */
  AQUA_PHASE_ISSUE = 2,   /* issuing the copies and their events */
  AQUA_PHASE_WAIT = 3,    /* waiting for a piece's copy to complete */
  AQUA_PHASE_REMAP = 4,   /* unmap shadow and old, map new at home, access */
  AQUA_PHASE_RELEASE = 5, /* releasing the old backings, accounting */
  AQUA_PHASE_COUNT = 6,
};
AQUA_EXPORT int aqua_profile_get(uint64_t* ns, uint64_t* calls, int n);
AQUA_EXPORT int aqua_profile_reset(void);
/* Record each timed phase call as a span (on != 0; clears what was recorded) or stop. */
AQUA_EXPORT int aqua_profile_record_spans(int on);
/* Copies up to max_spans recorded spans into out as (phase, t0_ns, t1_ns) triples of
 * CLOCK_MONOTONIC ns, forgets them, and sets *count to how many. */
AQUA_EXPORT int aqua_profile_spans(uint64_t* out, int max_spans, int* count);
/* Device backings given back by moves and frees are released a few ms later by a
 * background thread (a context switch reuses them instead); this releases them now. */
AQUA_EXPORT int aqua_flush_releases(void);

/* --- the PyTorch pluggable allocator ---------------------------------------------------- */

AQUA_EXPORT void* aqua_malloc(size_t size, int device, void* stream);
AQUA_EXPORT void aqua_free(void* ptr, size_t size, int device, void* stream);

/* --- simulated backend only ------------------------------------------------------------ */

/* Fail the `nth` (0-based, counted from now) call of `op`, `count` times in a row. */
AQUA_EXPORT int aqua_sim_fail_nth(int op, uint64_t nth, uint64_t count);
/* Fail each call of an op in `op_mask` (bit i = op i) with probability p (seeded). */
AQUA_EXPORT int aqua_sim_fail_random(double p, uint64_t seed, uint32_t op_mask);
AQUA_EXPORT int aqua_sim_fail_clear(void);
AQUA_EXPORT uint64_t aqua_sim_op_count(int op);     /* calls made so far */
AQUA_EXPORT uint64_t aqua_sim_failures(void);       /* failures injected so far */
/* Physical bytes held in a simulated tier (device or AQUA_TIER_HOST), mappings live now. */
AQUA_EXPORT int aqua_sim_usage(int tier, uint64_t* physical_bytes, uint64_t* num_mappings);

#ifdef __cplusplus
}
#endif

#endif /* AQUA_ALLOC_H_ */
