/* gf_gilhook: sees every GIL acquisition, release and wait of a running CPython by rewriting
 * the GOT slots through which its take_gil/drop_gil call pthread_mutex_lock/unlock,
 * pthread_cond_timedwait and pthread_cond_signal. Pure C, no Python.h: the caller (the binding)
 * finds and checks the GIL's addresses and passes them in.
 *
 * Threading model: each hooked thread updates only its own record (stats under a seqlock,
 * events in its own chunk list). Everything else - install, uninstall, the tracing switch and
 * the readers (foreach_thread, totals, drain, reap, set_priority_of) - may run on any thread
 * but must be serialized by the caller (the binding holds the GIL): the reaper frees records.
 * With self-reaping on, the hooks reap too, in a thread that has just taken the hooked GIL:
 * the caller must then hold that GIL in all of these (their callbacks may give it up).
 * All functions return 0 or a negative errno unless stated. */
#ifndef GF_GILHOOK_H
#define GF_GILHOOK_H

#include <stddef.h>
#include <stdint.h>

/* Where the GIL lives in the hooked program. mutex/cond/switch_mutex/switch_cond are compared
 * by address only; locked is read (never written) to know whether the GIL is taken. */
struct gf_gilhook_targets {
  void *mutex;        /* guards locked; take_gil waits on cond with it */
  void *cond;         /* signalled by drop_gil right after locked = 0 */
  void *switch_mutex; /* taken by take_gil before locked = 1, and by a forced drop_gil */
  void *switch_cond;  /* signalled by take_gil right after locked = 1 */
  const int *locked;
  /* Asks the current holder to drop the GIL at once. Called with `mutex` held and
   * *locked == 1, so the holder cannot release (nor free its state) meanwhile. May be NULL:
   * priorities are then unavailable. */
  void (*request_drop)(void *arg);
  void *request_drop_arg;
};

enum gf_gilhook_kind {
  GF_GIL_WAIT = 1, /* the thread starts waiting for the GIL */
  GF_GIL_ACQUIRE,  /* it holds the GIL from now on */
  GF_GIL_RELEASE,  /* it released the GIL */
  GF_GIL_FORCED,   /* the release just before answered a drop request */
  GF_GIL_ABORT,    /* it stopped waiting without the GIL (thread exit at shutdown) */
  GF_GIL_EXIT,     /* the thread ended */
  GF_GIL_GAP,      /* its events were lost (budget) from t_ns until its next event */
};

/* Set in an ACQUIRE event's kind when the thread had to wait for another holder. */
#define GF_GIL_CONTENDED 0x100u

struct gf_gilhook_event {
  uint64_t t_ns;   /* CLOCK_MONOTONIC */
  uint32_t thread; /* the record's id (gf_gilhook_thread_stats.id): kernel tids are reused */
  uint32_t kind;   /* enum gf_gilhook_kind, | GF_GIL_CONTENDED */
};

enum gf_gilhook_state { GF_GIL_UNKNOWN, GF_GIL_FREE, GF_GIL_WANT, GF_GIL_HELD };

/* Cumulative since the thread was first seen; the in-progress interval is included. */
struct gf_gilhook_thread_stats {
  uint32_t id;  /* unique per record in this process (from 1; wraps after 2^32 threads) */
  uint32_t tid; /* kernel thread id (threading.get_native_id()); reused once the thread ends */
  uint64_t first_ns, exit_ns; /* exit_ns 0 while alive */
  uint64_t held_ns, wait_ns;
  uint64_t acquisitions; /* every take of the GIL */
  uint64_t waits;        /* takes that had to wait for another holder */
  uint64_t switches_in;  /* takes that followed a different holder */
  uint64_t forced;       /* releases that answered a drop request */
  uint64_t drop_requests; /* times this waiter asked the holder to drop (interval expired, or
                             priority) */
  uint64_t timeouts;     /* switch intervals that expired while waiting */
  uint64_t cpu_ns;       /* its CPU time (since it started, the hooks or not) */
  uint64_t lost_ns;      /* its events are lost (budget) from then on, in this tracing session;
                            0: none (a GF_GIL_GAP event marks where they resumed) */
  int state;             /* enum gf_gilhook_state */
  int priority;
  char name[16];         /* its OS name when the record was made (PR_GET_NAME) */
};

/* Sums over every record, those still listed and those reaped. */
struct gf_gilhook_totals {
  uint64_t live_threads; /* records of threads that have not ended */
  uint64_t held_ns, wait_ns, acquisitions, waits, switches_in, forced, drop_requests, timeouts;
};

uint64_t gf_gilhook_now_ns(void);

/* Rewrites the GOT slots of the ELF object containing `object_addr` (libpython, or the
 * executable when Python is linked statically). The calling thread must hold the GIL.
 * -ENOENT if the object has no slot for one of the four functions, -EEXIST if installed. */
int gf_gilhook_install(const void *object_addr, const struct gf_gilhook_targets *targets);
/* Restores the saved GOT slots. Threads inside a hook finish normally. */
int gf_gilhook_uninstall(void);
int gf_gilhook_installed(void);
/* 1 when every slot holds the value install found (or nothing is installed), else 0. */
int gf_gilhook_slots_restored(void);

/* Calls fn for every thread record not yet reaped (until it returns nonzero), with the
 * in-progress interval counted up to now_ns (gf_gilhook_now_ns()). */
void gf_gilhook_foreach_thread(uint64_t now_ns,
                               int (*fn)(const struct gf_gilhook_thread_stats *, void *), void *arg);
/* Frees the records of threads that have ended and whose events were drained (all of them
 * while tracing is off: their undrained events are discarded), after passing each one's final
 * stats to fn (unless fn is NULL; a nonzero return stops before that record). Their counts stay
 * in gf_gilhook_totals. Returns how many were freed: none while a walk (foreach_thread, reap)
 * is in progress, whose callback gave the GIL up. */
size_t gf_gilhook_reap(int (*fn)(const struct gf_gilhook_thread_stats *, void *), void *arg);
/* While on (off at first), a thread that has just taken the GIL reaps as gf_gilhook_reap(NULL,
 * NULL) once as many threads have ended since the last reap as it left records (64 at least):
 * records of ended threads do not pile up while nobody calls reap. For callers that need no
 * final stats of ended threads. */
void gf_gilhook_self_reap(int on);
void gf_gilhook_totals(uint64_t now_ns, struct gf_gilhook_totals *out);

/* Events are recorded while tracing > 0, within `budget_bytes` of chunks; beyond it they are
 * dropped: counted, and marked per thread (lost_ns, then a GF_GIL_GAP event). A fork's child
 * keeps only the forking thread's record, afresh, and none of the parent's events. */
void gf_gilhook_tracing(int delta, size_t budget_bytes);
/* Moves up to cap recorded events (per thread in time order) into out; returns how many. The
 * chunks it has read are freed, the last one too once its thread has ended. */
size_t gf_gilhook_drain(struct gf_gilhook_event *out, size_t cap);
uint64_t gf_gilhook_dropped(void);
/* Bytes of event chunks allocated now (what the budget counts). */
size_t gf_gilhook_event_bytes(void);

/* The tid the calling thread took the GIL from in its last acquisition if it had to wait for
 * that holder, else 0 (the GIL was free). A sampler thread uses it to see who was running. */
uint32_t gf_gilhook_took_from(void);
/* The id of the calling thread's record, 0 if it has none yet. */
uint32_t gf_gilhook_self_id(void);

/* Priority of the calling thread for the GIL (clamped to +-GF_GILHOOK_MAX_PRIORITY). A waiter
 * asks a lower-priority holder to drop at once; a waiter does not take the GIL while a
 * higher-priority waiter exists (bounded by one defer window, so no thread starves forever).
 * Setting 0 in a thread without a record makes none. */
#define GF_GILHOOK_MAX_PRIORITY 8
int gf_gilhook_set_priority(int level);
int gf_gilhook_get_priority(void);
/* Sets the priority of the thread whose record has this id (gf_gilhook_self_id() in that
 * thread), as gf_gilhook_set_priority would there. It walks the records: serialized as the
 * readers are. -ESRCH if no record has the id; a thread that ends meanwhile ends at 0. */
int gf_gilhook_set_priority_of(uint32_t id, int level);
/* Whether a waiter below the holder's priority may watch the GIL for a while before it sleeps
 * (on by default). A watcher keeps a CPU busy while the holder runs: for a process allowed less
 * than two CPUs, that is the holder's CPU time or its cgroup's quota. */
void gf_gilhook_set_watch(int enabled);

/* Timelines, from one thread's drained events in the order it recorded them. */

struct gf_gilhook_span {
  uint64_t start_ns, end_ns; /* within the window */
  uint32_t state;            /* GF_GIL_HELD or GF_GIL_WANT */
  uint64_t waited_ns; /* a wait that ended in the window taking the GIL from another holder:
                         its whole length (also from before the window); else 0 */
};

/* Turns events into held and wait spans within the window [t0, end]. The state before a
 * thread's first event follows from that event (a release: it held the GIL); where its events
 * were lost (GF_GIL_GAP) inside the window, the timeline ends. */
struct gf_gilhook_spanner {
  uint64_t t0, end;
  void (*fn)(const struct gf_gilhook_span *, void *);
  void *arg;
  int state; /* enum gf_gilhook_state */
  uint64_t since;
  int lost, ended;
  uint64_t lost_at;
};
void gf_gilhook_spans_begin(struct gf_gilhook_spanner *s, uint64_t t0, uint64_t end,
                            void (*fn)(const struct gf_gilhook_span *, void *), void *arg);
void gf_gilhook_spans_feed(struct gf_gilhook_spanner *s, const struct gf_gilhook_event *events,
                           size_t n);
/* Closes the span in progress; returns where the timeline ends: `end`, or before it where the
 * thread's events were lost. */
uint64_t gf_gilhook_spans_end(struct gf_gilhook_spanner *s);

/* Spans merged for display: spans shorter than the resolution that follow each other within
 * it are merged into slices about a resolution long (0: none are), so a window of W gives at
 * most 3 W / resolution + 1 slices. A slice's state is the one that covers most of it. */
struct gf_gilhook_slice {
  uint64_t start_ns, end_ns, held_ns, wait_ns;
  uint32_t spans; /* merged into it */
  uint32_t state;
};
struct gf_gilhook_coalescer {
  uint64_t resolution_ns;
  void (*fn)(const struct gf_gilhook_slice *, void *);
  void *arg;
  struct gf_gilhook_slice pending; /* zero-initialize the coalescer */
};
void gf_gilhook_coalesce(struct gf_gilhook_coalescer *c, const struct gf_gilhook_span *span);
void gf_gilhook_coalesce_end(struct gf_gilhook_coalescer *c);

#endif
