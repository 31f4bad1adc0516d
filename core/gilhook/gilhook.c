/* GIL accounting and priorities through GOT hooks of the GIL's pthread calls (see gf/gilhook.h).
 *
 * What the hooks see, per thread, in CPython 3.11-3.13 (Python/ceval_gil.c, FORCE_SWITCHING):
 *   take_gil: lock(mutex) [timedwait(cond, mutex)]* lock(switch_mutex) locked=1
 *             signal(switch_cond) unlock(switch_mutex) unlock(mutex)
 *   drop_gil: lock(mutex) locked=0 signal(cond) unlock(mutex)
 *             [when a drop was requested: lock(switch_mutex) [wait(switch_cond)] unlock(..)]
 * So signal(switch_cond) marks an acquisition and signal(cond) a release, whatever state the
 * thread was in when the hooks went in; lock(mutex) by a non-holder enters take_gil, which
 * waits if it finds the GIL held (the timedwait) - an uncontended take is not a wait, however
 * long the call takes; unlock(mutex) while still waiting means take_gil gave up (thread exit at
 * shutdown).
 *
 * A release that answers a drop request (asked by a waiter whose interval expired, or by
 * priority) is forced: the thread wants the GIL back at once, so when its next take_gil comes
 * within GF_HANDOVER_NS without the thread having blocked in between (drop_gil's hand-over
 * wait aside; blocking means it went on to I/O: a voluntary release that met a request), its
 * wait is counted from the release. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "gf/gilhook.h"
#include "gf/got.h"

/* A thread's first chunk is one page: most threads of a thread-per-task program record a
 * handful of events. Its later chunks are 64 KiB. (With the 16-byte header.) */
#define GF_FIRST_CHUNK_EVENTS 255
#define GF_CHUNK_EVENTS 4095
#define GF_SLOTS_PER_FUNCTION 4
#define GF_HOOKED_FUNCTIONS 5 /* the entries of gf_hooked */
#define GF_PRIORITY_SLOTS (2 * GF_GILHOOK_MAX_PRIORITY + 1)
#define GF_HANDOVER_NS 20000000ull
/* Longest a thread defers, per wait, to a higher-priority waiter before taking the GIL anyway. */
#define GF_DEFER_NS 5000000ull
/* Longest a higher-priority waiter polls for the GIL it asked a holder to drop, instead of
 * sleeping on the cond: the holder drops within microseconds, a futex wake-up takes longer. */
#define GF_PRIORITY_SPIN_NS 50000ull
#define GF_PRIORITY_SPIN_MIN_NS 10000ull
/* How long such a poll spins before it starts yielding its CPU (see gf_poll_pause). */
#define GF_POLL_YIELD_AFTER_NS 10000ull
/* A waiter below the holder's priority first watches the GIL for up to GF_WATCH_NS (halved by
 * each watch that fails, down to GF_WATCH_MIN_NS; restored by a wait that ends within
 * GF_WATCH_NS), yielding its CPU every GF_WATCH_YIELD_NS (see gf_watch_release). */
#define GF_WATCH_NS 300000ull
#define GF_WATCH_MIN_NS 20000ull
#define GF_WATCH_YIELD_NS 20000ull
/* Then it sleeps in slices starting at GF_SLICE_NS and doubling up to the maximum, which bounds
 * how long a free GIL can stay unnoticed (see gf_cond_wait_sliced). Its timer slack is
 * GF_SLICE_SLACK_NS meanwhile: the default 50 us would outlast a slice. */
#define GF_SLICE_NS 20000ull
#define GF_SLICE_MAX_NS 400000ull
#define GF_SLICE_SLACK_NS 1000ul
/* trylock rounds (16 pauses each, about 10 us in all) before sleeping on the GIL's mutex. */
#define GF_RELOCK_TRIES 256
/* Ended records a self-reaping walk waits for, at least (see gf_gilhook_self_reap). */
#define GF_REAP_BATCH 64

/* Relaxed atomics for fields one thread writes and others read (tearing-free snapshots come
 * from the per-record seqlock). */
#define GF_LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define GF_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define GF_ADD(x, v) GF_STORE(x, GF_LOAD(x) + (v))

struct gf_chunk { /* 16 bytes, then the events */
  struct gf_chunk *next; /* set once by the owner (release), read by the drainer (acquire) */
  uint32_t count;        /* events published: owner stores with release, drainer loads acquire */
  uint32_t capacity;     /* set before the chunk is published, then constant */
  struct gf_gilhook_event events[];
};

struct gf_thread {
  /* Threads push their record at the head of the list (CAS); only a reaper unlinks, and it is
   * serialized with every reader (it holds the GIL, as they do, and frees nothing while a walk
   * gave the GIL up: gf.walking), so readers need no lock. */
  struct gf_thread *next;
  uint32_t id;  /* set before the record is published, then constant */
  uint32_t tid;
  /* Set (release) by the owner as its very last access, at thread exit: from then on the
   * reaper may free the record. */
  int done;
  /* Seqlock over the stats below: odd while the owner updates them. */
  uint32_t seq;
  uint64_t first_ns, exit_ns, held_ns, wait_ns, acquisitions, waits, switches_in, forced,
      drop_requests, timeouts, since_ns;
  uint64_t cpu_ns; /* its CPU time, stored when it ends (read from its clock before) */
  /* Its first event lost to the budget since its last recorded one, in tracing session
   * `session` (0: none); see gf_emit_at. */
  uint64_t lost_ns;
  unsigned session;
  int state;
  unsigned generation; /* the install this state belongs to */
  char name[16];       /* set before the record is published, then constant */
  int priority;        /* written by its owner or by set_priority_of (gf_store_priority) */
  int exiting;         /* set by the owner at exit; see gf_gilhook_set_priority_of */
  /* Owner-only fields. */
  int contended; /* the current wait had to sleep */
  uint64_t want_at;   /* when it entered take_gil */
  uint64_t forced_at; /* time of its last release if that was forced, else 0 */
  long blocked_at;    /* its voluntary context switches then (or after drop_gil's hand-over) */
  int handing_over;   /* inside drop_gil's forced hand-over (switch_mutex held) */
  int priority_forced; /* its last release answered a priority request */
  int wait_slot; /* gf.waiting[] slot counted for the current wait, -1 if none */
  unsigned wait_generation;
  uint64_t defer_ns; /* deferral used in the current wait */
  uint64_t spin_ns;  /* current adaptive poll for a requested drop (0: not yet set) */
  uint64_t watch_ns; /* current adaptive watch below the holder (0: not yet set) */
  uint32_t asked; /* id of the holder this wait already asked to drop (ids, unlike pointers, are
                     not reused when a record is freed) */
  uint32_t took_from;      /* see gf_gilhook_took_from */
  struct gf_chunk *tail;
  /* Set once by the owner (release); the drainer starts from it, and clears it once it has
   * freed the chunks of a done record. */
  struct gf_chunk *head;
  /* Drainer-only fields. */
  struct gf_chunk *drain_chunk;
  uint32_t drain_pos;
};

struct gf_saved_slot {
  void **slot;
  void *original;
};

typedef int (*gf_mutex_fn)(pthread_mutex_t *);
typedef int (*gf_timedwait_fn)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
typedef int (*gf_cond_fn)(pthread_cond_t *);
typedef int (*gf_cond_wait_fn)(pthread_cond_t *, pthread_mutex_t *);

static struct {
  /* Written by install before any GOT slot points at a hook, then only read by the hooks. */
  struct gf_gilhook_targets targets;
  gf_mutex_fn mutex_lock, mutex_unlock;
  gf_timedwait_fn cond_timedwait;
  gf_cond_fn cond_signal, cond_broadcast;
  gf_cond_wait_fn cond_wait;
  uint64_t install_ns;
  /* Atomic: hooks of a previous install may still be running while these change. */
  int installed;
  unsigned generation;
  struct gf_thread *threads;
  /* Written only under the GIL's mutex (at acquire/release/request), read holding it. holder and
   * asked_holder point to the thread holding the GIL, which cannot have ended; the previous
   * holder is kept by id and tid, since its record may be freed once it ends. */
  struct gf_thread *holder, *asked_holder;
  uint32_t last_holder_id, last_holder_tid;
  /* The CPU the holder took the GIL on, and the one the last priority request came from: hints
   * for gf_poll_pause, written under the GIL's mutex. Atomic, as the dropped holder reads
   * requester_cpu holding only switch_mutex; a stale CPU only makes a poll yield sooner or
   * later. */
  int holder_cpu, requester_cpu;
  /* asked_holder was asked by a higher-priority waiter. Written under the GIL's mutex; atomic
   * because the holder reads it without the mutex, as a hint (gf_hook_mutex_lock). */
  int asked_by_priority;
  /* Signals of switch_cond so far. take_gil sends them under switch_mutex, so a reader holding
   * switch_mutex knows no signal is missed between its read and its wait; atomic, because
   * drop_gil's polling hand-over reads it without the mutex. */
  unsigned switch_signals;
  int cond_clock; /* the clock of the GIL's cond, learned from take_gil's deadline; -1 unknown */
  /* Written by the (serialized) tracing switch, read by every hooked thread: atomic. A session
   * is one stretch of tracing > 0; it starts before tracing shows (release/acquire). */
  int tracing;
  unsigned trace_session;
  size_t budget;
  uint32_t next_id; /* atomic: records are created by their own threads */
  /* Counts of the records reaped so far; only the (serialized) reapers and totals touch them. */
  struct gf_gilhook_totals retired;
  /* Records of ended threads not freed yet: added by the ending threads before they set done,
   * subtracted by the reapers once they saw done, so it never goes below zero; atomic. */
  size_t ended;
  /* Set by the (serialized) caller, read by the hooks: atomic. */
  int self_reap;
  /* The self-reap walks once `ended` reaches it; written by the (serialized) reapers, read by
   * the hooks: atomic. */
  size_t reap_at;
  /* Walks over the records (foreach_thread, reap) in progress: their callbacks may give the GIL
   * up (a Python finalizer), letting a reaper in mid-walk, so reapers free nothing while it is
   * nonzero. Changed by readers holding the GIL, read by reapers holding it: atomic. */
  int walking;
  size_t used;      /* atomic: chunk bytes, added by their owners, subtracted by the drainer */
  uint64_t dropped; /* atomic */
  int priority_threads;                  /* threads with a nonzero priority; atomic */
  int waiting[GF_PRIORITY_SLOTS];        /* waiters per priority; atomic */
  /* Waiters asleep on the GIL's cond until a signal or their deadline (gf_plain_wait). Changed
   * and read only with the GIL's mutex held, which a cond wait gives up and takes back
   * atomically: a releaser holding the mutex sees every such sleeper counted. Each sleeper
   * takes its count back, whatever install it began under, so it is never reset but in a
   * forked child (whose other threads are gone). */
  int plain_waiters;
  /* 1 while a waiter watches the GIL (gf_watch_release): one watcher at a time, so that several
   * background threads do not keep a CPU each. Taken by compare-and-swap, given back by the
   * watcher; reset in a forked child, where the watcher may be gone. */
  int watching;
  int watch_enabled; /* gf_gilhook_set_watch; atomic: set by any thread, read by the hooks */
  struct gf_saved_slot saved[GF_HOOKED_FUNCTIONS * GF_SLOTS_PER_FUNCTION];
  int nsaved;
  pthread_key_t key;
  pthread_once_t once;
} gf = {.cond_clock = -1, .holder_cpu = -1, .requester_cpu = -1, .reap_at = GF_REAP_BATCH,
      .watch_enabled = 1, .once = PTHREAD_ONCE_INIT};

static __thread struct gf_thread *gf_self;
/* gf_self of a thread whose record was closed at exit: its last hooked calls are not counted. */
static struct gf_thread gf_exited;

uint64_t gf_gilhook_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void gf_write_begin(struct gf_thread *t) {
  __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
  __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void gf_write_end(struct gf_thread *t) {
  __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE);
}

static size_t gf_chunk_size(uint32_t capacity) {
  return sizeof(struct gf_chunk) + capacity * sizeof(struct gf_gilhook_event);
}

/* Chunks are mapped, not malloc'd: a drained chunk's memory goes back to the system at once,
 * so draining into the monitor's buffer does not hold the events twice. */
static struct gf_chunk *gf_map_chunk(size_t size) {
  void *chunk = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return chunk == MAP_FAILED ? NULL : chunk;
}

/* For the drainer and the reaper, once the owner no longer touches the chunk. */
static void gf_free_chunk(struct gf_chunk *chunk) {
  size_t size = gf_chunk_size(chunk->capacity);
  __atomic_sub_fetch(&gf.used, size, __ATOMIC_RELAXED);
  munmap(chunk, size);
}

/* Frees a done record's chunks from `chunk` on. */
static void gf_free_chunks(struct gf_chunk *chunk) {
  while (chunk != NULL) {
    struct gf_chunk *next = chunk->next;
    gf_free_chunk(chunk);
    chunk = next;
  }
}

static void gf_set_lost(struct gf_thread *t, unsigned session, uint64_t lost_ns) {
  gf_write_begin(t);
  GF_STORE(t->session, session);
  GF_STORE(t->lost_ns, lost_ns);
  gf_write_end(t);
}

/* Appends an event to t's chunks. When the budget refuses a chunk, the event is dropped and
 * the thread's timeline breaks off there: the time goes to lost_ns, and the next event that
 * finds room is preceded by a GF_GIL_GAP event at that time. */
static void gf_emit_at(struct gf_thread *t, uint32_t kind, uint64_t t_ns) {
  if (!__atomic_load_n(&gf.tracing, __ATOMIC_ACQUIRE))
    return;
  unsigned session = __atomic_load_n(&gf.trace_session, __ATOMIC_RELAXED);
  if (t->session != session) /* a loss in an earlier session matters to no monitor now */
    gf_set_lost(t, session, 0);
  struct gf_chunk *chunk = t->tail;
  uint32_t count = chunk != NULL ? chunk->count : 0;
  int gap = 0;
  if (chunk == NULL || count == chunk->capacity) {
    uint32_t capacity = chunk == NULL ? GF_FIRST_CHUNK_EVENTS : GF_CHUNK_EVENTS;
    size_t size = gf_chunk_size(capacity);
    size_t used = __atomic_add_fetch(&gf.used, size, __ATOMIC_RELAXED);
    struct gf_chunk *fresh =
        used <= __atomic_load_n(&gf.budget, __ATOMIC_RELAXED) ? gf_map_chunk(size) : NULL;
    if (fresh == NULL) {
      __atomic_sub_fetch(&gf.used, size, __ATOMIC_RELAXED);
      __atomic_add_fetch(&gf.dropped, 1, __ATOMIC_RELAXED);
      if (t->lost_ns == 0)
        gf_set_lost(t, session, t_ns);
      return;
    }
    fresh->capacity = capacity;
    if (chunk != NULL)
      __atomic_store_n(&chunk->next, fresh, __ATOMIC_RELEASE);
    else
      __atomic_store_n(&t->head, fresh, __ATOMIC_RELEASE);
    t->tail = chunk = fresh;
    count = 0;
    gap = t->lost_ns != 0;
    if (gap)
      chunk->events[count++] = (struct gf_gilhook_event){t->lost_ns, t->id, GF_GIL_GAP};
  }
  chunk->events[count++] = (struct gf_gilhook_event){t_ns, t->id, kind};
  __atomic_store_n(&chunk->count, count, __ATOMIC_RELEASE);
  if (gap) /* after the GAP is published: a reader that sees no loss will drain the GAP */
    gf_set_lost(t, session, 0);
}

/* Voluntary context switches of the calling thread: it blocked (I/O, sleep, a cond wait). */
static long gf_blocked_count(void) {
  struct rusage usage;
  return getrusage(RUSAGE_THREAD, &usage) == 0 ? usage.ru_nvcsw : -1;
}

static int gf_slot_of(int priority) { return priority + GF_GILHOOK_MAX_PRIORITY; }

static void gf_end_wait_slot(struct gf_thread *t) {
  if (t->wait_slot >= 0 && t->wait_generation == __atomic_load_n(&gf.generation, __ATOMIC_RELAXED))
    __atomic_sub_fetch(&gf.waiting[t->wait_slot], 1, __ATOMIC_RELAXED);
  t->wait_slot = -1;
}

/* CPU time of thread tid, read from another thread; 0 if it has ended. */
static uint64_t gf_cpu_of(uint32_t tid) {
  /* The kernel's clock id of a thread's CPU time (CPUCLOCK_SCHED | CPUCLOCK_PERTHREAD_MASK over
   * ~tid), what pthread_getcpuclockid returns; computed unsigned, as shifting a negative is
   * undefined. */
  clockid_t clock = (clockid_t)((~(unsigned)tid << 3) | 6u);
  struct timespec ts;
  if (clock_gettime(clock, &ts) != 0)
    return 0;
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Stores t's priority, keeping gf.priority_threads the count of nonzero ones. The exchange
 * tells each writer what it replaced, so writers racing on one record (its owner, a thread
 * setting it for the owner, the owner's exit) never count a change twice; it is sequentially
 * consistent for gf_gilhook_set_priority_of's handshake with the owner's exit. */
static void gf_store_priority(struct gf_thread *t, int level) {
  int old = __atomic_exchange_n(&t->priority, level, __ATOMIC_SEQ_CST);
  if (old == 0 && level != 0)
    __atomic_add_fetch(&gf.priority_threads, 1, __ATOMIC_RELAXED);
  else if (old != 0 && level == 0)
    __atomic_sub_fetch(&gf.priority_threads, 1, __ATOMIC_RELAXED);
}

static void gf_thread_exit(void *arg) {
  struct gf_thread *t = arg;
  uint64_t now = gf_gilhook_now_ns();
  struct timespec cpu;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
  gf_end_wait_slot(t);
  gf_write_begin(t);
  GF_STORE(t->cpu_ns, (uint64_t)cpu.tv_sec * 1000000000ull + (uint64_t)cpu.tv_nsec);
  GF_STORE(t->exit_ns, now);
  GF_STORE(t->state, GF_GIL_FREE);
  gf_write_end(t);
  gf_emit_at(t, GF_GIL_EXIT, now);
  /* Marked before its priority is cleared: see gf_gilhook_set_priority_of. */
  __atomic_store_n(&t->exiting, 1, __ATOMIC_SEQ_CST);
  gf_store_priority(t, 0);
  gf_self = &gf_exited;
  __atomic_add_fetch(&gf.ended, 1, __ATOMIC_RELAXED);
  __atomic_store_n(&t->done, 1, __ATOMIC_RELEASE);
}

/* In a forked child only the thread that forked lives on: the other records, every event (the
 * parent's monitors read them) and the counts are the parent's. Its own record starts afresh,
 * with a new id, the child's tid and priority 0, as any new process's thread (the level was
 * the parent thread's, relative to the parent's other threads); the hooks and tracing stay as
 * they were (their users release them). Runs inside fork(), before any other code of the
 * child. */
static void gf_after_fork_in_child(void) {
  struct gf_thread *self = gf_self == &gf_exited ? NULL : gf_self, *next;
  for (struct gf_thread *t = gf.threads; t != NULL; t = next) {
    next = t->next;
    gf_free_chunks(t->drain_chunk != NULL ? t->drain_chunk : t->head);
    if (t != self)
      free(t);
  }
  gf.threads = self;
  gf.holder = gf.asked_holder = NULL;
  gf.last_holder_id = gf.last_holder_tid = 0;
  __atomic_store_n(&gf.asked_by_priority, 0, __ATOMIC_RELAXED);
  gf.retired = (struct gf_gilhook_totals){0};
  /* walking stays: a walk of the forking thread goes on in the child (one of a thread gone
   * keeps the reapers off: a leak, never a use after free). */
  gf.ended = 0;
  gf.reap_at = GF_REAP_BATCH;
  gf.used = 0;
  gf.dropped = 0;
  gf.priority_threads = 0;
  memset(gf.waiting, 0, sizeof(gf.waiting));
  gf.plain_waiters = 0;
  gf.watching = 0;
  if (self == NULL)
    return;
  /* What it was doing at the fork (holding the GIL, if it forked from Python), it still does. */
  int state = self->state;
  unsigned generation = self->generation;
  uint64_t now = gf_gilhook_now_ns();
  *self = (struct gf_thread){.id = __atomic_add_fetch(&gf.next_id, 1, __ATOMIC_RELAXED),
                             .tid = (uint32_t)syscall(SYS_gettid),
                             .first_ns = now,
                             .since_ns = now,
                             .state = state,
                             .generation = generation,
                             .wait_slot = -1};
  if (state == GF_GIL_HELD)
    gf.holder = self;
}

static void gf_make_key(void) {
  pthread_key_create(&gf.key, gf_thread_exit);
  pthread_atfork(NULL, NULL, gf_after_fork_in_child);
}

/* The calling thread's record, created on first use; NULL if it cannot be had. */
static struct gf_thread *gf_thread_self(void) {
  struct gf_thread *t = gf_self;
  if (t == &gf_exited)
    return NULL;
  if (t == NULL) {
    pthread_once(&gf.once, gf_make_key);
    t = calloc(1, sizeof(*t));
    if (t == NULL)
      return NULL;
    t->id = __atomic_add_fetch(&gf.next_id, 1, __ATOMIC_RELAXED);
    t->tid = (uint32_t)syscall(SYS_gettid);
    prctl(PR_GET_NAME, t->name, 0, 0, 0); /* a C thread's own name: Python has none for it */
    t->first_ns = gf_gilhook_now_ns();
    t->wait_slot = -1;
    t->generation = __atomic_load_n(&gf.generation, __ATOMIC_RELAXED);
    t->next = __atomic_load_n(&gf.threads, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(&gf.threads, &t->next, t, 1, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED))
      ;
    pthread_setspecific(gf.key, t);
    gf_self = t;
  }
  unsigned generation = __atomic_load_n(&gf.generation, __ATOMIC_RELAXED);
  if (t->generation != generation) {
    gf_write_begin(t);
    GF_STORE(t->generation, generation);
    GF_STORE(t->state, GF_GIL_UNKNOWN);
    gf_write_end(t);
    t->forced_at = 0;
    t->handing_over = 0;
    t->wait_slot = -1;
  }
  return t;
}

/* Waiting since `since`; emits the WAIT event at that time. */
static void gf_begin_wait(struct gf_thread *t, uint64_t since) {
  gf_write_begin(t);
  GF_STORE(t->state, GF_GIL_WANT);
  GF_STORE(t->since_ns, since);
  gf_write_end(t);
  t->contended = 0;
  t->forced_at = 0;
  t->defer_ns = 0;
  t->asked = 0;
  t->wait_slot = gf_slot_of(GF_LOAD(t->priority));
  t->wait_generation = __atomic_load_n(&gf.generation, __ATOMIC_RELAXED);
  __atomic_add_fetch(&gf.waiting[t->wait_slot], 1, __ATOMIC_RELAXED);
  gf_emit_at(t, GF_GIL_WAIT, since);
}

/* A thread in UNKNOWN state that is seen waiting was already waiting when the hooks went in. */
static uint64_t gf_unknown_since(struct gf_thread *t) {
  return t->first_ns > gf.install_ns ? t->first_ns : gf.install_ns;
}

/* t enters take_gil at `now`. It is not waiting yet: the GIL may be free, and the time take_gil
 * takes then (the hooks' own cost included) is not time another thread made it wait. */
static void gf_enter_take(struct gf_thread *t, uint64_t now) {
  if (t->state == GF_GIL_UNKNOWN) { /* it takes, so it does not hold the GIL */
    gf_write_begin(t);
    GF_STORE(t->state, GF_GIL_FREE);
    GF_STORE(t->since_ns, now);
    gf_write_end(t);
  }
  t->want_at = now;
  t->forced_at = 0;
  t->defer_ns = 0;
}

/* t, in take_gil, has to wait after all: the GIL is held, or it defers to a higher-priority
 * waiter. The wait counts from its take_gil call (or from the install, for a thread that was
 * waiting then). */
static void gf_must_wait(struct gf_thread *t) {
  if (t->state != GF_GIL_WANT)
    gf_begin_wait(t, t->state == GF_GIL_UNKNOWN ? gf_unknown_since(t) : t->want_at);
}

static void gf_on_acquire(struct gf_thread *t) {
  uint64_t now = gf_gilhook_now_ns();
  int state = t->state;
  if (state == GF_GIL_UNKNOWN) {
    gf_begin_wait(t, gf_unknown_since(t));
    state = GF_GIL_WANT;
  }
  gf_write_begin(t);
  if (state == GF_GIL_WANT) {
    GF_ADD(t->wait_ns, now - t->since_ns);
    GF_ADD(t->waits, (uint64_t)t->contended);
  }
  GF_ADD(t->acquisitions, 1);
  t->took_from = state == GF_GIL_WANT && t->contended && gf.last_holder_id != 0 &&
                         gf.last_holder_id != t->id
                     ? gf.last_holder_tid
                     : 0;
  if (gf.last_holder_id != t->id)
    GF_ADD(t->switches_in, 1);
  GF_STORE(t->state, GF_GIL_HELD);
  GF_STORE(t->since_ns, now);
  gf_write_end(t);
  gf_end_wait_slot(t);
  gf.holder = t;
  __atomic_store_n(&gf.holder_cpu, sched_getcpu(), __ATOMIC_RELAXED);
  gf.last_holder_id = t->id;
  gf.last_holder_tid = t->tid;
  gf.asked_holder = NULL;
  __atomic_store_n(&gf.asked_by_priority, 0, __ATOMIC_RELAXED);
  gf_emit_at(t, GF_GIL_ACQUIRE | (state == GF_GIL_WANT && t->contended ? GF_GIL_CONTENDED : 0), now);
}

/* Returns 1 when the release was forced (it answers a drop request). */
static int gf_on_release(struct gf_thread *t) {
  uint64_t now = gf_gilhook_now_ns();
  int forced = gf.asked_holder == t;
  gf_write_begin(t);
  if (t->state == GF_GIL_HELD)
    GF_ADD(t->held_ns, now - t->since_ns);
  GF_ADD(t->forced, (uint64_t)forced);
  GF_STORE(t->state, GF_GIL_FREE);
  GF_STORE(t->since_ns, now);
  gf_write_end(t);
  gf.holder = NULL;
  gf.asked_holder = NULL;
  t->priority_forced = forced && __atomic_load_n(&gf.asked_by_priority, __ATOMIC_RELAXED);
  __atomic_store_n(&gf.asked_by_priority, 0, __ATOMIC_RELAXED);
  t->forced_at = forced ? now : 0;
  if (forced)
    t->blocked_at = gf_blocked_count();
  gf_emit_at(t, GF_GIL_RELEASE, now);
  if (forced)
    gf_emit_at(t, GF_GIL_FORCED, now);
  return forced;
}

/* Whether any thread of `priority` or above waits for the GIL. */
static int gf_waiting_from(int priority) {
  for (int slot = gf_slot_of(priority); slot < GF_PRIORITY_SLOTS; slot++)
    if (__atomic_load_n(&gf.waiting[slot], __ATOMIC_RELAXED) > 0)
      return 1;
  return 0;
}

/* Counts one drop request of t's current wait against `holder`. */
static void gf_count_request(struct gf_thread *t, struct gf_thread *holder) {
  gf.asked_holder = holder;
  if (t->asked == holder->id)
    return;
  t->asked = holder->id;
  gf_write_begin(t);
  GF_ADD(t->drop_requests, 1);
  gf_write_end(t);
}

/* With the GIL's mutex held by waiting thread t: ask a lower-priority holder to drop. Returns
 * 1 when it asked. */
static int gf_priority_request(struct gf_thread *t) {
  if (!__atomic_load_n(&gf.priority_threads, __ATOMIC_RELAXED) || gf.targets.request_drop == NULL)
    return 0;
  struct gf_thread *holder = gf.holder;
  if (__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED) == 1 && holder != NULL &&
      holder != t && GF_LOAD(holder->priority) < GF_LOAD(t->priority)) {
    __atomic_store_n(&gf.requester_cpu, sched_getcpu(), __ATOMIC_RELAXED);
    gf.targets.request_drop(gf.targets.request_drop_arg);
    gf_count_request(t, holder);
    __atomic_store_n(&gf.asked_by_priority, 1, __ATOMIC_RELAXED);
    return 1;
  }
  return 0;
}

static inline void gf_gilhook_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Whether the thread a poll waits for may need the poller's CPU: it was last seen there (`cpu`:
 * the holder at its acquire, the requester at its request), or where is unknown (-1). */
static int gf_may_share_cpu(int cpu) { return cpu < 0 || cpu == sched_getcpu(); }

/* One step of a poll for another thread's move, `polled_ns` into the poll. When that thread may
 * share this CPU (`shares_cpu`, see gf_may_share_cpu) the poll yields at once; otherwise the
 * move comes within microseconds, and the poll yields only after GF_POLL_YIELD_AFTER_NS (a
 * holder that migrated here since costs up to that much more). An early yield has a cost: on
 * Linux 6.18 (EEVDF), once the urgent thread of an echo server had yielded, the client its reply
 * woke on the same CPU no longer preempted it and waited for it to block in recv
 * (docs/beazley.md). */
static void gf_poll_pause(uint64_t polled_ns, int shares_cpu) {
  for (int i = 0; i < 16; i++)
    gf_gilhook_cpu_relax();
  if (shares_cpu || polled_ns >= GF_POLL_YIELD_AFTER_NS)
    sched_yield();
}

/* Takes the GIL's mutex back after a poll without it. The releasing holder keeps the mutex for
 * a moment after clearing `locked`: spinning on trylock avoids sleeping in the futex for it and
 * paying a wake-up that costs more than the whole hand-over. */
static void gf_relock(pthread_mutex_t *mutex) {
  for (int i = 0; i < GF_RELOCK_TRIES; i++) {
    if (pthread_mutex_trylock(mutex) == 0)
      return;
    for (int j = 0; j < 16; j++)
      gf_gilhook_cpu_relax();
  }
  gf.mutex_lock(mutex);
}

/* Ends a poll of `locked` made without the GIL's mutex (`freed`: it saw the GIL free): takes the
 * mutex back and sets the thread's next poll, *budget_ns, to full_ns after a poll that saw the
 * GIL free, else to half, down to floor_ns. Returns 1 when the GIL is free. */
static int gf_end_poll(pthread_mutex_t *mutex, int freed, uint64_t *budget_ns, uint64_t full_ns,
                       uint64_t floor_ns) {
  gf_relock(mutex);
  /* A drop between the last look and the relock signalled the cond with nobody on it: sleeping
   * on the cond now would wait out the whole interval. */
  if (!__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED))
    freed = 1;
  *budget_ns = freed ? full_ns : (*budget_ns / 2 > floor_ns ? *budget_ns / 2 : floor_ns);
  return freed;
}

/* With the GIL's mutex held by t, which just asked the holder to drop: releases the mutex and
 * polls `locked` for a while, then takes the mutex back. Returns 1 when the GIL came free:
 * the caller then returns from the cond wait at once (take_gil re-checks `locked` under the
 * mutex, as after any spurious wake-up). A poll that fails halves the next one, so that a
 * holder stuck in a long C call does not cost a core per wait; the floor stays above the
 * microsecond or two a Python holder takes to drop (a poll shorter than that would never
 * succeed again), and one success restores the full poll. */
static int gf_priority_poll(struct gf_thread *t, pthread_mutex_t *mutex) {
  if (t->spin_ns == 0)
    t->spin_ns = GF_PRIORITY_SPIN_NS;
  int shares_cpu = gf_may_share_cpu(__atomic_load_n(&gf.holder_cpu, __ATOMIC_RELAXED));
  gf.mutex_unlock(mutex);
  uint64_t start = gf_gilhook_now_ns(), polled = 0;
  int freed = 0;
  do {
    if (!__atomic_load_n(gf.targets.locked, __ATOMIC_ACQUIRE)) {
      freed = 1;
      break;
    }
    gf_poll_pause(polled, shares_cpu);
    polled = gf_gilhook_now_ns() - start;
  } while (polled < t->spin_ns);
  return gf_end_poll(mutex, freed, &t->spin_ns, GF_PRIORITY_SPIN_NS, GF_PRIORITY_SPIN_MIN_NS);
}

/* With the GIL's mutex held by waiting thread t and the GIL free: let a higher-priority waiter
 * take it first (wake them all, sleep on the cond), within GF_DEFER_NS per wait. */
static void gf_priority_defer(struct gf_thread *t, pthread_mutex_t *mutex) {
  if (!__atomic_load_n(&gf.priority_threads, __ATOMIC_RELAXED) || gf.cond_clock < 0 ||
      gf.cond_broadcast == NULL)
    return;
  pthread_cond_t *cond = gf.targets.cond;
  while (!__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED) &&
         gf_waiting_from(GF_LOAD(t->priority) + 1) && t->defer_ns < GF_DEFER_NS) {
    gf_must_wait(t);
    uint64_t start = gf_gilhook_now_ns();
    struct timespec deadline;
    clock_gettime(gf.cond_clock, &deadline);
    deadline.tv_nsec += 200000; /* recheck often: the higher waiter may have left */
    if (deadline.tv_nsec >= 1000000000) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000;
    }
    gf.cond_broadcast(cond);
    gf.cond_timedwait(cond, mutex, &deadline);
    t->defer_ns += gf_gilhook_now_ns() - start;
  }
}

static int gf_below_holder(struct gf_thread *t) {
  struct gf_thread *holder = gf.holder;
  return gf.cond_clock >= 0 && holder != NULL && GF_LOAD(holder->priority) > GF_LOAD(t->priority);
}

/* A cond wait that only a signal or the deadline ends, with the GIL's mutex held. Counted, so
 * that a release never skips the signal while such a waiter sleeps: its priority may have
 * risen above the waiter's after the waiter chose this kind of wait (gf_hook_cond_signal). */
static int gf_plain_wait(pthread_cond_t *cond, pthread_mutex_t *mutex,
                         const struct timespec *abstime) {
  gf.plain_waiters++;
  int rc = gf.cond_timedwait(cond, mutex, abstime);
  gf.plain_waiters--;
  return rc;
}

/* With the GIL's mutex held by t, a waiter below the holder's priority: releases the mutex and
 * watches `locked` for up to t->watch_ns, then takes the mutex back. Returns 1 when the GIL came
 * free (the caller returns from the cond wait, as gf_priority_poll's caller does). The holder
 * releases silently (gf_hook_cond_signal), and a sleeper needs a timer and a wake-up to notice:
 * on a VM that halts idle vCPUs that costs 24-72 us, each time an urgent thread blocks. The
 * watch pauses rather than yields, but for one yield every GF_WATCH_YIELD_NS (a yield per look
 * cost the echo server's round trip more); one waiter watches at a time (gf.watching). */
static int gf_watch_release(struct gf_thread *t, pthread_mutex_t *mutex) {
  int idle = 0;
  if (!__atomic_load_n(&gf.watch_enabled, __ATOMIC_RELAXED) ||
      !__atomic_compare_exchange_n(&gf.watching, &idle, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
    return 0;
  if (t->watch_ns == 0)
    t->watch_ns = GF_WATCH_NS;
  gf.mutex_unlock(mutex);
  uint64_t start = gf_gilhook_now_ns(), now = start, yielded = start;
  int freed = 0;
  while (now - start < t->watch_ns) {
    if (!__atomic_load_n(gf.targets.locked, __ATOMIC_ACQUIRE)) {
      freed = 1;
      break;
    }
    for (int i = 0; i < 64; i++)
      gf_gilhook_cpu_relax();
    now = gf_gilhook_now_ns();
    if (now - yielded >= GF_WATCH_YIELD_NS) {
      sched_yield();
      yielded = now;
    }
  }
  __atomic_store_n(&gf.watching, 0, __ATOMIC_RELEASE);
  return gf_end_poll(mutex, freed, &t->watch_ns, GF_WATCH_NS, GF_WATCH_MIN_NS);
}

/* gf_cond_wait_sliced's sleeps, with the GIL's mutex held by waiting thread t. */
static int gf_sleep_in_slices(struct gf_thread *t, pthread_cond_t *cond, pthread_mutex_t *mutex,
                              const struct timespec *abstime) {
  uint64_t slice_ns = GF_SLICE_NS;
  for (;;) {
    if (!__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED))
      return 0; /* a silent release: take_gil re-checks `locked`, as after a spurious wake-up */
    if (!gf_below_holder(t))
      return gf_plain_wait(cond, mutex, abstime);
    struct timespec slice_end;
    clock_gettime(gf.cond_clock, &slice_end);
    slice_end.tv_nsec += (long)slice_ns;
    slice_end.tv_sec += slice_end.tv_nsec / 1000000000;
    slice_end.tv_nsec %= 1000000000;
    if (slice_end.tv_sec > abstime->tv_sec ||
        (slice_end.tv_sec == abstime->tv_sec && slice_end.tv_nsec >= abstime->tv_nsec))
      return gf_plain_wait(cond, mutex, abstime);
    int rc = gf.cond_timedwait(cond, mutex, &slice_end);
    if (rc != ETIMEDOUT)
      return rc;
    slice_ns = slice_ns * 2 < GF_SLICE_MAX_NS ? slice_ns * 2 : GF_SLICE_MAX_NS;
  }
}

/* The cond wait of take_gil for waiter t (GIL mutex held). A holder of higher priority than
 * every waiter releases without waking them (gf_hook_cond_signal), so that a short system call
 * of an urgent thread does not cost it a futex wake-up. A waiter below the holder's priority
 * therefore notices a free GIL by itself: it watches for a while (gf_watch_release), then sleeps
 * in short slices and takes a GIL it finds free (at most GF_SLICE_MAX_NS late). The watch has a
 * price, beside the CPU it spins: every munmap of the process interrupts the watcher's CPU to
 * flush its TLB (docs/beazley.md: asyncio's streams). A slice ending with the GIL still held is
 * not a timeout: take_gil sees ETIMEDOUT only at its own deadline. */
static int gf_cond_wait_sliced(struct gf_thread *t, pthread_cond_t *cond, pthread_mutex_t *mutex,
                               const struct timespec *abstime) {
  if (!gf_below_holder(t))
    return gf_plain_wait(cond, mutex, abstime);
  uint64_t start = gf_gilhook_now_ns();
  if (gf_watch_release(t, mutex))
    return 0;
  int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
  prctl(PR_SET_TIMERSLACK, GF_SLICE_SLACK_NS, 0, 0, 0);
  int rc = gf_sleep_in_slices(t, cond, mutex, abstime);
  if (slack > 0)
    prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
  /* A GIL that came free within a full watch: the next watch is a full one again, or a single
   * holder's long turn would leave every later watch too short to succeed. */
  if (!__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED) &&
      gf_gilhook_now_ns() - start <= GF_WATCH_NS)
    t->watch_ns = GF_WATCH_NS;
  return rc;
}

/* take_gil's deadline is "now + interval" on the cond's clock: whichever clock it is close to
 * is the one our own timed waits must use. */
static void gf_learn_clock(const struct timespec *abstime) {
  static const clockid_t candidates[] = {CLOCK_MONOTONIC, CLOCK_REALTIME};
  for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
    struct timespec now;
    clock_gettime(candidates[i], &now);
    long long delta = (long long)(abstime->tv_sec - now.tv_sec);
    if (delta >= -1 && delta <= 2) {
      __atomic_store_n(&gf.cond_clock, (int)candidates[i], __ATOMIC_RELAXED);
      return;
    }
  }
}

static int gf_hook_mutex_lock(pthread_mutex_t *mutex) {
  struct gf_thread *t = NULL;
  if (mutex == gf.targets.mutex) {
    t = gf_thread_self();
    if (t != NULL && t->state != GF_GIL_HELD) {
      uint64_t now = gf_gilhook_now_ns();
      int handover = t->forced_at != 0 && now - t->forced_at <= GF_HANDOVER_NS &&
                     t->blocked_at >= 0 && gf_blocked_count() == t->blocked_at;
      if (handover)
        gf_begin_wait(t, t->forced_at);
      else
        gf_enter_take(t, now);
    }
  } else if (mutex == gf.targets.switch_mutex) {
    t = gf_thread_self();
    if (t != NULL)
      t->handing_over = t->forced_at != 0 && t->state == GF_GIL_FREE;
    t = NULL;
  }
  int rc = 0;
  /* The holder dropping on a priority request sees it while the asking thread still holds the
   * mutex for a moment: it spins rather than sleep in the futex, whose wake-up would cost the
   * urgent thread a system call and the holder a scheduling delay. (A racy read: the flag is
   * written under the mutex, and a stale value only picks the other way to lock.) */
  if (mutex == gf.targets.mutex && t != NULL && t->state == GF_GIL_HELD &&
      __atomic_load_n(&gf.asked_by_priority, __ATOMIC_RELAXED))
    gf_relock(mutex);
  else
    rc = gf.mutex_lock(mutex);
  if (t != NULL && rc == 0 && t->state != GF_GIL_HELD) { /* in take_gil, holding its mutex */
    if (__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED)) {
      gf_must_wait(t);
      gf_priority_request(t);
    } else {
      gf_priority_defer(t, mutex);
    }
  }
  return rc;
}

/* Ends a wait that did not take the GIL (take_gil gives up when the thread must exit). */
static void gf_end_wait_without_gil(struct gf_thread *t) {
  uint64_t now = gf_gilhook_now_ns();
  gf_write_begin(t);
  GF_ADD(t->wait_ns, now - t->since_ns);
  GF_STORE(t->state, GF_GIL_FREE);
  GF_STORE(t->since_ns, now);
  gf_write_end(t);
  gf_end_wait_slot(t);
  gf_emit_at(t, GF_GIL_ABORT, now);
}

/* Called by a thread that has just taken the GIL (serialized with the readers and the other
 * reapers, which hold it too): frees the ended records once enough have piled up. */
static void gf_self_reap_if_due(void) {
  if (__atomic_load_n(&gf.self_reap, __ATOMIC_RELAXED) &&
      __atomic_load_n(&gf.ended, __ATOMIC_RELAXED) >=
          __atomic_load_n(&gf.reap_at, __ATOMIC_RELAXED))
    gf_gilhook_reap(NULL, NULL);
}

static int gf_hook_mutex_unlock(pthread_mutex_t *mutex) {
  if (mutex == gf.targets.switch_mutex) {
    struct gf_thread *t = gf_thread_self();
    if (t != NULL && t->handing_over) {
      /* The hand-over's cond wait blocked on purpose: count blocking from here on. */
      t->handing_over = 0;
      t->blocked_at = gf_blocked_count();
    }
  } else if (mutex == gf.targets.mutex) {
    struct gf_thread *t = gf_thread_self();
    if (t != NULL && t->state == GF_GIL_WANT) {
      gf_end_wait_without_gil(t);
    } else if (t != NULL && t->state == GF_GIL_HELD) { /* take_gil's end: it holds the GIL */
      int rc = gf.mutex_unlock(mutex);
      gf_self_reap_if_due(); /* after the unlock: waiters need not wait on the mutex meanwhile */
      return rc;
    }
  }
  return gf.mutex_unlock(mutex);
}

static int gf_hook_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex,
                                  const struct timespec *abstime) {
  if (cond != gf.targets.cond)
    return gf.cond_timedwait(cond, mutex, abstime);
  struct gf_thread *t = gf_thread_self();
  if (t == NULL)
    return gf.cond_timedwait(cond, mutex, abstime);
  gf_must_wait(t);
  t->contended = 1;
  if (gf.cond_clock < 0)
    gf_learn_clock(abstime);
  int asked = gf_priority_request(t);
  struct gf_thread *holder = gf.holder;
  int rc = asked && gf_priority_poll(t, mutex) ? 0 : gf_cond_wait_sliced(t, cond, mutex, abstime);
  if (rc == ETIMEDOUT) {
    gf_write_begin(t);
    GF_ADD(t->timeouts, 1);
    gf_write_end(t);
    /* Still locked by the same holder: take_gil now sets the drop request. */
    if (__atomic_load_n(gf.targets.locked, __ATOMIC_RELAXED) == 1 && gf.holder == holder &&
        holder != NULL)
      gf_count_request(t, holder);
  }
  gf_priority_defer(t, mutex);
  return rc;
}

static int gf_hook_cond_signal(pthread_cond_t *cond) {
  if (cond == gf.targets.switch_cond || cond == gf.targets.cond) {
    if (cond == gf.targets.switch_cond) /* every signal, with a record or not */
      __atomic_add_fetch(&gf.switch_signals, 1, __ATOMIC_RELEASE);
    struct gf_thread *t = gf_thread_self();
    if (t != NULL) {
      if (cond == gf.targets.switch_cond) {
        gf_on_acquire(t);
      } else if (!gf_on_release(t) && __atomic_load_n(&gf.priority_threads, __ATOMIC_RELAXED) &&
                 gf.cond_clock >= 0 && !gf_waiting_from(GF_LOAD(t->priority)) &&
                 gf.plain_waiters == 0) {
        /* A voluntary release with only lower-priority waiters (if any), each watching the
         * GIL or sleeping in slices: they notice the release themselves (gf_cond_wait_sliced)
         * instead of being woken now. The GIL's mutex is held here, so every waiter that could
         * sleep on the cond is counted. */
        return 0;
      }
    }
  }
  return gf.cond_signal(cond);
}

/* drop_gil's hand-over wait (FORCE_SWITCHING) after a drop that a higher-priority waiter
 * asked for: that waiter polls for the GIL and takes it within microseconds, so poll for its
 * switch_cond signal rather than sleep, which spares the urgent thread a futex wake-up on its
 * way back to Python. Any return is fine for drop_gil (it does not loop on the wait). */
static int gf_hook_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex) {
  if (cond != gf.targets.switch_cond)
    return gf.cond_wait(cond, mutex);
  struct gf_thread *t = gf_thread_self();
  if (t == NULL || !t->priority_forced)
    return gf.cond_wait(cond, mutex);
  unsigned seen = __atomic_load_n(&gf.switch_signals, __ATOMIC_RELAXED);
  int shares_cpu = gf_may_share_cpu(__atomic_load_n(&gf.requester_cpu, __ATOMIC_RELAXED));
  gf.mutex_unlock(mutex);
  uint64_t start = gf_gilhook_now_ns(), polled = 0;
  int signalled = 0;
  do {
    if (__atomic_load_n(&gf.switch_signals, __ATOMIC_ACQUIRE) != seen) {
      signalled = 1;
      break;
    }
    gf_poll_pause(polled, shares_cpu);
    polled = gf_gilhook_now_ns() - start;
  } while (polled < GF_PRIORITY_SPIN_NS);
  gf.mutex_lock(mutex);
  if (signalled || __atomic_load_n(&gf.switch_signals, __ATOMIC_RELAXED) != seen)
    return 0;
  return gf.cond_wait(cond, mutex);
}

static void *gf_resolve(const char *name, const char *version) {
  void *fn = version[0] ? dlvsym(RTLD_DEFAULT, name, version) : NULL;
  return fn != NULL ? fn : dlsym(RTLD_DEFAULT, name);
}

static const struct {
  const char *name;
  void *hook;
  size_t real_offset; /* where in gf the real function goes */
} gf_hooked[] = {
    {"pthread_mutex_lock", (void *)gf_hook_mutex_lock, offsetof(__typeof__(gf), mutex_lock)},
    {"pthread_mutex_unlock", (void *)gf_hook_mutex_unlock, offsetof(__typeof__(gf), mutex_unlock)},
    {"pthread_cond_timedwait", (void *)gf_hook_cond_timedwait,
     offsetof(__typeof__(gf), cond_timedwait)},
    {"pthread_cond_signal", (void *)gf_hook_cond_signal, offsetof(__typeof__(gf), cond_signal)},
    {"pthread_cond_wait", (void *)gf_hook_cond_wait, offsetof(__typeof__(gf), cond_wait)},
};
#define GF_NHOOKED (sizeof(gf_hooked) / sizeof(gf_hooked[0]))
_Static_assert(GF_NHOOKED == GF_HOOKED_FUNCTIONS, "gf.saved is sized for every hooked function");

int gf_gilhook_install(const void *object_addr, const struct gf_gilhook_targets *targets) {
  struct gf_got_slot slots[GF_NHOOKED][GF_SLOTS_PER_FUNCTION];
  int counts[GF_NHOOKED];
  int rc = 0;
  if (__atomic_load_n(&gf.installed, __ATOMIC_ACQUIRE))
    return -EEXIST;
  if (targets->mutex == NULL || targets->cond == NULL || targets->switch_mutex == NULL ||
      targets->switch_cond == NULL || targets->locked == NULL)
    return -EINVAL;
  for (size_t i = 0; i < GF_NHOOKED; i++) {
    counts[i] = gf_got_find(object_addr, gf_hooked[i].name, slots[i], GF_SLOTS_PER_FUNCTION);
    if (counts[i] < 0)
      return counts[i];
    if (counts[i] == 0)
      return -ENOENT;
    void *real = gf_resolve(gf_hooked[i].name, slots[i][0].version);
    if (real == NULL)
      return -ENOENT;
    memcpy((char *)&gf + gf_hooked[i].real_offset, &real, sizeof(real));
  }
  /* Our own wakeups use the same ABI version as the timed wait CPython links against. */
  gf.cond_broadcast = (gf_cond_fn)gf_resolve("pthread_cond_broadcast", slots[2][0].version);
  gf.targets = *targets;
  gf.cond_clock = -1;
  for (int slot = 0; slot < GF_PRIORITY_SLOTS; slot++)
    __atomic_store_n(&gf.waiting[slot], 0, __ATOMIC_RELAXED);
  __atomic_add_fetch(&gf.generation, 1, __ATOMIC_RELAXED);
  gf.install_ns = gf_gilhook_now_ns();

  /* The caller holds the GIL: it is the one thread whose state is known right now. */
  struct gf_thread *self = gf_thread_self();
  if (self == NULL)
    return -ENOMEM;
  gf_write_begin(self);
  GF_STORE(self->state, GF_GIL_HELD);
  GF_STORE(self->since_ns, gf.install_ns);
  gf_write_end(self);
  gf.holder = self;
  __atomic_store_n(&gf.holder_cpu, sched_getcpu(), __ATOMIC_RELAXED);
  gf.last_holder_id = self->id;
  gf.last_holder_tid = self->tid;

  gf.nsaved = 0;
  for (size_t i = 0; i < GF_NHOOKED; i++) {
    for (int j = 0; j < counts[i]; j++) {
      void **slot = slots[i][j].slot;
      gf.saved[gf.nsaved] = (struct gf_saved_slot){slot, __atomic_load_n(slot, __ATOMIC_RELAXED)};
      rc = gf_got_write(slot, gf_hooked[i].hook);
      if (rc < 0)
        goto error;
      gf.nsaved++;
    }
  }
  __atomic_store_n(&gf.installed, 1, __ATOMIC_RELEASE);
  return 0;

error:
  for (int k = gf.nsaved - 1; k >= 0; k--)
    gf_got_write(gf.saved[k].slot, gf.saved[k].original);
  gf.nsaved = 0;
  return rc;
}

int gf_gilhook_uninstall(void) {
  int rc = 0;
  if (!__atomic_load_n(&gf.installed, __ATOMIC_ACQUIRE))
    return -ENOENT;
  for (int k = gf.nsaved - 1; k >= 0; k--) {
    int err = gf_got_write(gf.saved[k].slot, gf.saved[k].original);
    if (err < 0)
      rc = err;
  }
  /* Records still in this generation's states are stale from now on. */
  __atomic_add_fetch(&gf.generation, 1, __ATOMIC_RELAXED);
  gf.holder = NULL;
  __atomic_store_n(&gf.installed, 0, __ATOMIC_RELEASE);
  return rc;
}

int gf_gilhook_installed(void) { return __atomic_load_n(&gf.installed, __ATOMIC_ACQUIRE); }

int gf_gilhook_slots_restored(void) {
  if (gf_gilhook_installed())
    return 0;
  for (int k = 0; k < gf.nsaved; k++)
    if (__atomic_load_n(gf.saved[k].slot, __ATOMIC_RELAXED) != gf.saved[k].original)
      return 0;
  return 1;
}

static void gf_snapshot(struct gf_thread *t, struct gf_gilhook_thread_stats *s, uint64_t now) {
  unsigned generation;
  uint32_t seq;
  int retried = 0;
  do {
    while ((seq = __atomic_load_n(&t->seq, __ATOMIC_ACQUIRE)) & 1)
      ;
    s->id = t->id;
    s->tid = t->tid;
    memcpy(s->name, t->name, sizeof(s->name));
    s->first_ns = GF_LOAD(t->first_ns);
    s->exit_ns = GF_LOAD(t->exit_ns);
    s->held_ns = GF_LOAD(t->held_ns);
    s->wait_ns = GF_LOAD(t->wait_ns);
    s->acquisitions = GF_LOAD(t->acquisitions);
    s->waits = GF_LOAD(t->waits);
    s->switches_in = GF_LOAD(t->switches_in);
    s->forced = GF_LOAD(t->forced);
    s->drop_requests = GF_LOAD(t->drop_requests);
    s->timeouts = GF_LOAD(t->timeouts);
    s->lost_ns = GF_LOAD(t->lost_ns);
    s->cpu_ns = GF_LOAD(t->cpu_ns);
    unsigned session = GF_LOAD(t->session);
    s->state = GF_LOAD(t->state);
    generation = GF_LOAD(t->generation);
    uint64_t since = GF_LOAD(t->since_ns);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&t->seq, __ATOMIC_RELAXED) != seq)
      continue;
    if (session != __atomic_load_n(&gf.trace_session, __ATOMIC_RELAXED))
      s->lost_ns = 0;
    if (!gf_gilhook_installed() || generation != __atomic_load_n(&gf.generation, __ATOMIC_RELAXED))
      s->state = GF_GIL_UNKNOWN;
    else if (s->state == GF_GIL_HELD && now > since)
      s->held_ns += now - since;
    else if (s->state == GF_GIL_WANT && now > since)
      s->wait_ns += now - since;
    /* A live thread's clock; if it has just ended, a second look shows what it stored. A tid
     * reused between the two reads would need the kernel's ids to wrap within microseconds. */
    if (s->exit_ns == 0 && (s->cpu_ns = gf_cpu_of(s->tid)) == 0 && !retried++)
      continue;
    break;
  } while (1);
  s->priority = GF_LOAD(t->priority);
}

void gf_gilhook_foreach_thread(uint64_t now,
                               int (*fn)(const struct gf_gilhook_thread_stats *, void *),
                               void *arg) {
  __atomic_add_fetch(&gf.walking, 1, __ATOMIC_RELAXED);
  for (struct gf_thread *t = __atomic_load_n(&gf.threads, __ATOMIC_ACQUIRE); t; t = t->next) {
    struct gf_gilhook_thread_stats s;
    gf_snapshot(t, &s, now);
    if (fn(&s, arg))
      break;
  }
  __atomic_sub_fetch(&gf.walking, 1, __ATOMIC_RELAXED);
}

void gf_gilhook_tracing(int delta, size_t budget_bytes) {
  __atomic_store_n(&gf.budget, budget_bytes, __ATOMIC_RELAXED);
  if (delta > 0 && __atomic_load_n(&gf.tracing, __ATOMIC_RELAXED) == 0)
    __atomic_add_fetch(&gf.trace_session, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&gf.tracing, delta, __ATOMIC_RELEASE);
}

size_t gf_gilhook_drain(struct gf_gilhook_event *out, size_t cap) {
  size_t n = 0;
  for (struct gf_thread *t = __atomic_load_n(&gf.threads, __ATOMIC_ACQUIRE); t && n < cap;
       t = t->next) {
    /* Loaded before the events: once done is seen, every event of the owner is published. */
    int done = __atomic_load_n(&t->done, __ATOMIC_ACQUIRE);
    if (t->drain_chunk == NULL) {
      t->drain_chunk = __atomic_load_n(&t->head, __ATOMIC_ACQUIRE);
      t->drain_pos = 0;
    }
    while (t->drain_chunk != NULL && n < cap) {
      struct gf_chunk *chunk = t->drain_chunk;
      uint32_t count = __atomic_load_n(&chunk->count, __ATOMIC_ACQUIRE);
      while (t->drain_pos < count && n < cap)
        out[n++] = chunk->events[t->drain_pos++];
      if (t->drain_pos < count)
        break; /* out is full */
      struct gf_chunk *next =
          t->drain_pos == chunk->capacity ? __atomic_load_n(&chunk->next, __ATOMIC_ACQUIRE) : NULL;
      if (next == NULL) {
        if (done) { /* all read, and the owner has ended: its last chunk is not needed */
          /* Unlinked before it is unmapped: nothing may see t->head point at a gone chunk. */
          t->head = t->drain_chunk = NULL;
          gf_free_chunk(chunk);
        }
        break;
      }
      /* The owner linked a successor, so it never touches this full chunk again. */
      t->drain_chunk = next;
      t->drain_pos = 0;
      gf_free_chunk(chunk);
    }
  }
  return n;
}

/* Whether a reaper may free t: its owner has ended, and its events were drained or nobody
 * records events any more (tracing off: they are discarded). The holder's record stays, as
 * waiters read its priority: it is the reaper's own (a reaper holds the GIL), unless a thread
 * ended holding the GIL and its release went unseen. gf.holder changes only as the GIL changes
 * hands or in install/uninstall, serialized with the reaper: the read races with no write. */
static int gf_reapable(struct gf_thread *t, int tracing) {
  return __atomic_load_n(&t->done, __ATOMIC_ACQUIRE) && (!tracing || t->head == NULL) &&
         t != GF_LOAD(gf.holder);
}

static void gf_add_counts(struct gf_gilhook_totals *sum, const struct gf_gilhook_thread_stats *s) {
  sum->held_ns += s->held_ns;
  sum->wait_ns += s->wait_ns;
  sum->acquisitions += s->acquisitions;
  sum->waits += s->waits;
  sum->switches_in += s->switches_in;
  sum->forced += s->forced;
  sum->drop_requests += s->drop_requests;
  sum->timeouts += s->timeouts;
}

/* Takes t out of the list, whose head other threads may be pushing to meanwhile. */
static void gf_unlink(struct gf_thread *prev, struct gf_thread *t) {
  if (prev == NULL) {
    struct gf_thread *head = t;
    if (__atomic_compare_exchange_n(&gf.threads, &head, t->next, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
      return;
    /* Threads pushed records in front of t meanwhile: it has a predecessor now. Pushers
     * write only the head and their own record's next, so this store races with nobody. */
    for (prev = head; prev->next != t; prev = prev->next)
      ;
  }
  prev->next = t->next;
}

size_t gf_gilhook_reap(int (*fn)(const struct gf_gilhook_thread_stats *, void *), void *arg) {
  if (__atomic_load_n(&gf.walking, __ATOMIC_RELAXED) != 0)
    return 0; /* a walk gave the GIL up in its callback, and is still on the records */
  __atomic_add_fetch(&gf.walking, 1, __ATOMIC_RELAXED);
  int tracing = __atomic_load_n(&gf.tracing, __ATOMIC_RELAXED);
  size_t n = 0, left = 0;
  struct gf_thread *prev = NULL, *next;
  for (struct gf_thread *t = __atomic_load_n(&gf.threads, __ATOMIC_ACQUIRE); t; t = next) {
    next = t->next;
    if (!gf_reapable(t, tracing)) {
      prev = t;
      left++;
      continue;
    }
    struct gf_gilhook_thread_stats s;
    gf_snapshot(t, &s, 0); /* an ended thread has no interval in progress */
    if (fn != NULL && fn(&s, arg))
      break;
    if (__atomic_load_n(&gf.walking, __ATOMIC_RELAXED) != 1)
      break; /* fn gave the GIL up and another walk began meanwhile: t stays listed */
    gf_unlink(prev, t);
    gf_add_counts(&gf.retired, &s);
    gf_free_chunks(t->drain_chunk != NULL ? t->drain_chunk : t->head);
    free(t);
    __atomic_sub_fetch(&gf.ended, 1, __ATOMIC_RELAXED);
    n++;
  }
  /* The next self-reap waits for as many more ended threads as this walk left records: a walk
   * costs O(1) per record it frees. */
  size_t wait = left > GF_REAP_BATCH ? left : GF_REAP_BATCH;
  __atomic_store_n(&gf.reap_at, __atomic_load_n(&gf.ended, __ATOMIC_RELAXED) + wait,
                   __ATOMIC_RELAXED);
  __atomic_sub_fetch(&gf.walking, 1, __ATOMIC_RELAXED);
  return n;
}

void gf_gilhook_self_reap(int on) { __atomic_store_n(&gf.self_reap, on, __ATOMIC_RELAXED); }

void gf_gilhook_totals(uint64_t now, struct gf_gilhook_totals *out) {
  *out = gf.retired;
  for (struct gf_thread *t = __atomic_load_n(&gf.threads, __ATOMIC_ACQUIRE); t; t = t->next) {
    struct gf_gilhook_thread_stats s;
    gf_snapshot(t, &s, now);
    out->live_threads += s.exit_ns == 0;
    gf_add_counts(out, &s);
  }
}

uint64_t gf_gilhook_dropped(void) { return __atomic_load_n(&gf.dropped, __ATOMIC_RELAXED); }

size_t gf_gilhook_event_bytes(void) { return __atomic_load_n(&gf.used, __ATOMIC_RELAXED); }

uint32_t gf_gilhook_took_from(void) {
  struct gf_thread *t = gf_self;
  return t == NULL || t == &gf_exited ? 0 : t->took_from;
}

uint32_t gf_gilhook_self_id(void) {
  struct gf_thread *t = gf_self;
  return t == NULL || t == &gf_exited ? 0 : t->id;
}

static int gf_clamp_priority(int level) {
  return level > GF_GILHOOK_MAX_PRIORITY    ? GF_GILHOOK_MAX_PRIORITY
         : level < -GF_GILHOOK_MAX_PRIORITY ? -GF_GILHOOK_MAX_PRIORITY
                                            : level;
}

int gf_gilhook_set_priority(int level) {
  /* A thread without a record is at 0 already; a record made for nothing would outlive the
   * thread until hooks reap it, and none do while they are not installed. */
  if (level == 0 && gf_self == NULL)
    return 0;
  struct gf_thread *t = gf_thread_self();
  if (t == NULL)
    return -ENOMEM;
  gf_store_priority(t, gf_clamp_priority(level));
  return 0;
}

int gf_gilhook_set_priority_of(uint32_t id, int level) {
  for (struct gf_thread *t = __atomic_load_n(&gf.threads, __ATOMIC_ACQUIRE); t; t = t->next) {
    if (t->id != id)
      continue;
    gf_store_priority(t, gf_clamp_priority(level));
    /* Its owner's exit marks it exiting, then clears its priority. Had the clearing come before
     * our store, we see the mark (all four sequentially consistent) and clear what we stored:
     * an ended thread keeps no level, nor gf.priority_threads a count for it. */
    if (__atomic_load_n(&t->exiting, __ATOMIC_SEQ_CST))
      gf_store_priority(t, 0);
    return 0;
  }
  return -ESRCH;
}

void gf_gilhook_set_watch(int enabled) {
  __atomic_store_n(&gf.watch_enabled, enabled != 0, __ATOMIC_RELAXED);
}

int gf_gilhook_get_priority(void) {
  struct gf_thread *t = gf_self;
  return t == NULL || t == &gf_exited ? 0 : GF_LOAD(t->priority);
}
