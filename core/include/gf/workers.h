/* gilfree worker manager: the shared segment (one slot per worker), the parent's scheduler and
 * crash handling, the worker's side of a slot, and process start-up (spawn, fork).
 *
 * Processes: the parent (the user's program) spawns one template process by fork+exec; the
 * template imports what the pool preloads and forks workers on request. Parent and template
 * talk over a SOCK_SEQPACKET control socket (gf_ctl messages); tasks and results never touch
 * it: they go through each slot's request and response rings. Functions return 0 or a
 * negative errno.
 */
#ifndef GF_WORKERS_H
#define GF_WORKERS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include "gf/transport.h"

#define GF_SEGMENT_MAGIC 0x67667367u /* "gfsg" */
#define GF_HOLDINGS 512
/* Workers per pool: a bound for the template's tables, far above one machine's cores. */
#define GF_MAX_WORKERS 1024
/* Exit status of a worker that found a descriptor it needs closed or replaced by a task: its
 * results are in its ring, and the parent learns of the exit from the template. */
#define GF_EXIT_DESCRIPTORS 86

/* Slot states, written by the parent (STARTING, DEAD) and the worker (READY, EXITING). */
enum { GF_SLOT_EMPTY = 0, GF_SLOT_STARTING, GF_SLOT_READY, GF_SLOT_EXITING, GF_SLOT_DEAD };

/* Where one worker's state lives in the segment. Fields marked (worker) are written only by
 * the live worker of the slot and read by the parent with relaxed loads: they are statistics,
 * or, for holdings, read only after the worker is known dead (the template reaped it), when no
 * write can race. current_task is also read live, seq_cst, to find the worker of a task. */
typedef struct gf_slot {
  _Atomic uint64_t current_task; /* (worker) task being run, 0 when idle */
  _Atomic int64_t task_started_ns; /* (worker) CLOCK_MONOTONIC start of current_task */
  /* (worker) start of current_task, or of the map item it runs now: task_timeout counts from
   * here. Written before current_task at a task's start, so a parent that sees the task sees
   * its start; a stale read within a chunk is an earlier item's start, never a later one. */
  _Atomic int64_t item_started_ns;
  _Atomic uint64_t tasks_done;  /* (worker) */
  _Atomic uint64_t busy_ns;     /* (worker) time inside tasks */
  _Atomic uint64_t bytes_in;    /* (worker) task bytes received, out-of-band included */
  _Atomic uint64_t bytes_out;   /* (worker) result bytes sent */
  _Atomic int64_t born_ns;      /* (worker) when it became ready; the parent clears it once the
                                 * worker is dead, before asking for the next one */
  /* Stored by the worker as it attaches, before it takes a task, and by the parent from the
   * template's SPAWNED message (the same value, whichever comes first); cleared by the parent
   * under its lock once the worker is dead, before the next one is asked for. seq_cst: a parent
   * that sees a task taken reads the pid of the worker that took it. */
  _Atomic int32_t pid;
  _Atomic uint32_t state;       /* see enum above */
  uint64_t req_off, resp_off;   /* (set once) ring offsets in the segment */
  gf_region region;             /* (worker) allocator state of this slot's arena region */
  uint64_t holdings[GF_HOLDINGS]; /* (worker) arena blocks the worker holds references to */
} gf_slot;

typedef struct gf_segment {
  uint32_t magic;
  uint32_t nslots;
  uint64_t size;       /* bytes of the segment; the arena follows it in the same memfd */
  uint64_t arena_size;
  /* Set by the parent's waiter thread before it sleeps in epoll (then it re-checks the
   * rings); parent_spinning counts parent threads polling the rings. A worker publishing a
   * result reads both after a seq_cst fence and rings the doorbell eventfd only when someone
   * sleeps and nobody spins: the same Dekker pairing as gf_ring.waiting. */
  _Atomic uint32_t parent_sleeping;
  _Atomic uint32_t parent_spinning;
  int32_t doorbell_fd; /* eventfd; the same number in every process (inherited) */
  int32_t parent_pid;
  gf_region parent_region; /* allocated by the parent only */
  gf_slot slots[];
} gf_segment;

/* What the memfd and the doorbell are, for workers to check that a task left them in place
 * (gf_fd_id_check). Set once by the parent before any process attaches. It lives after the
 * slots (gf_segment_ids), not in the header: the header's and the slots' cache-line layout is
 * the round trip's (moving the slots by 32 bytes made results wait for the doorbell 20 times
 * as often). */
typedef struct gf_segment_ids {
  gf_fd_id memfd;
  gf_fd_id doorbell;
} gf_segment_ids;

/* Header of every ring message. Buffers (gf_bufref) follow it, then the payload: head_len
 * bytes of head (a task's pickled function, which workers cache by these bytes) and the
 * pickled body. */
typedef struct gf_msg {
  uint64_t task_id;
  uint32_t kind;
  uint32_t nbufs;
  uint64_t payload_len;
  uint32_t head_len;
  /* A task in a request ring is taken by its worker or withdrawn by the parent (for an idle
   * worker, or a cancel), whichever moves it from QUEUED first by compare-and-swap: the ring
   * is shared, and neither side may run or requeue a task the other already has. */
  _Atomic uint32_t claim;
} gf_msg;

enum { GF_CLAIM_QUEUED = 0, GF_CLAIM_TAKEN, GF_CLAIM_WITHDRAWN };

/* TASK: fn(*args, **kwargs); CHUNK: fn over a list of items; RESULT, ERROR: a task's outcome. */
enum { GF_MSG_TASK = 1, GF_MSG_CHUNK, GF_MSG_RESULT, GF_MSG_ERROR };

/* An out-of-band buffer: len bytes at offset `at` inside the data of arena block `block`.
 * The message owns one reference to the block for each bufref. */
typedef struct gf_bufref {
  uint64_t block;
  uint64_t at;
  uint64_t len;
  uint32_t flags;
  uint32_t reserved;
} gf_bufref;

enum { GF_BUF_BYTES = 1u, GF_BUF_PAYLOAD = 2u };

/* Control messages between the parent and the template. */
typedef struct gf_ctl {
  uint32_t kind;
  uint32_t slot;
  int32_t pid;
  int32_t status; /* wait status (WIFEXITED/WIFSIGNALED) for GF_CTL_EXITED */
} gf_ctl;

enum { GF_CTL_SPAWN = 1, GF_CTL_SPAWNED, GF_CTL_EXITED, GF_CTL_SPAWN_FAILED };

/* ------------------------------------------------------------- segment */

/* Bytes of segment for nslots workers with rings of ring_cap bytes each way. */
size_t gf_segment_footprint(uint32_t nslots, size_t ring_cap);
/* Lays out the segment and the arena regions: the parent gets half, each slot an equal
 * share of the rest. */
int gf_segment_init(gf_segment *seg, uint32_t nslots, size_t ring_cap, uint64_t arena_size);
gf_ring *gf_slot_requests(gf_segment *seg, uint32_t slot);
gf_segment_ids *gf_segment_ids_of(gf_segment *seg);
gf_ring *gf_slot_responses(gf_segment *seg, uint32_t slot);

/* Creates the memfd holding segment + arena and maps it. */
int gf_shm_create(size_t seg_size, uint64_t arena_size, int *fd, unsigned char **map);
/* Maps an existing memfd (template, tests). */
int gf_shm_attach(int fd, unsigned char **map, size_t *map_size);

/* ------------------------------------------------------- parent side */

typedef struct gf_pending gf_pending;

/* Per-slot scheduling state, under gf_manager.lock. */
typedef struct gf_slot_sched {
  uint32_t inflight;         /* tasks written to the request ring and not yet answered */
  uint64_t timed_out_task;   /* task whose worker we killed for the timeout, or 0 */
  uint64_t restarts;
  int64_t lived_ns;          /* lifetimes of the slot's earlier workers, for its idle time */
  int spawn_queued;          /* a spawn request the full control socket refused, sent later */
  int64_t unclaimed_since;   /* since when tasks wait in a ready worker's ring, none started */
  uint64_t unclaimed_done;   /* the worker's tasks_done then: any progress restarts the clock */
} gf_slot_sched;

/* The parent's view of a pool. `lock` guards scheduling state; `drain_lock` lets one thread
 * at a time consume the response rings; `alloc_lock` guards the parent's arena region. */
typedef struct gf_manager {
  gf_segment *seg;
  gf_arena arena;
  gf_allocator alloc; /* over seg->parent_region, under alloc_lock */
  int memfd;
  unsigned char *map;
  size_t map_size;
  int ctl_fd;  /* parent end of the control socket */
  int ctl_child_fd; /* template end, open until the template is started */
  int epoll_fd;
  int stop_fd; /* eventfd: asks the waiter thread to return */
  pid_t template_pid;
  int template_pidfd;
  int64_t task_timeout_ns; /* 0: none */
  pthread_mutex_t lock;
  pthread_mutex_t drain_lock;
  pthread_mutex_t alloc_lock;
  gf_pending *pending_head, *pending_tail;
  uint64_t npending;
  gf_slot_sched *sched;
  uint32_t spawns_queued; /* slots with spawn_queued set (under lock) */
  int closing;
} gf_manager;

/* What gf_manager_collect reports for each event. */
typedef struct gf_event {
  uint32_t kind;   /* GF_EV_* */
  uint32_t slot;
  int32_t pid;
  int32_t status;
  uint64_t task_id; /* the result's task, or the task a dead worker held (0: none) */
  int timed_out;    /* GF_EV_DIED: the task ran past task_timeout */
  int was_ready;    /* GF_EV_DIED: the worker had started up */
  const gf_msg *msg; /* GF_EV_RESULT: the message, valid during the callback */
} gf_event;

enum { GF_EV_RESULT = 1, GF_EV_SPAWNED, GF_EV_DIED, GF_EV_TEMPLATE_DIED };

typedef int (*gf_event_fn)(void *ctx, const gf_event *ev);

/* On failure nothing stays allocated: no descriptor, no mapping (gf_manager_free not needed). */
int gf_manager_init(gf_manager *m, uint32_t nslots, size_t ring_cap, uint64_t arena_size);
/* Starts the template process: argv/envp prepared by the caller, who passes
 * gf_manager_child_fds() to it on its command line, and config_fd (>= 0) if the template is
 * to inherit one more descriptor. */
int gf_manager_start_template(gf_manager *m, const char *path, char *const argv[],
                              char *const envp[], int config_fd);
/* The descriptors the template inherits: memfd, doorbell eventfd, its control socket end. */
void gf_manager_child_fds(const gf_manager *m, int fds[3]);
/* Tells the template to start (or restart) the worker of slot. */
int gf_manager_spawn(gf_manager *m, uint32_t slot);
/* Queues or dispatches one task message (header, buffer table, payload). */
int gf_manager_submit(gf_manager *m, const struct iovec *iov, int iovcnt);
/* Removes a task that no worker has taken yet (queued in the parent, or waiting in a worker's
 * ring); -ENOENT when it is gone already. Releases the message's block references. */
int gf_manager_cancel(gf_manager *m, uint64_t task_id);
/* Waits up to timeout_ns (< 0: until something happens) for results or control messages,
 * spinning first for spin_ns. Returns 1 when there is something to collect, 0 on timeout,
 * -EINTR, or -ECANCELED when gf_manager_stop was called. */
int gf_manager_wait(gf_manager *m, int64_t spin_ns, int64_t timeout_ns);
/* Spins up to spin_ns on the response rings; 1 when results are waiting. For a thread that
 * waits for one result and would rather collect it itself than be woken. */
int gf_manager_spin(gf_manager *m, int64_t spin_ns);
/* Calls fn for every result waiting and, with control set, every control event (spawns,
 * deaths), consumes them, kills workers whose task ran past task_timeout, and hands queued
 * tasks to workers with room. Several threads may call it; drain_lock makes them take turns.
 * A thread collecting its own result passes control = 0 and saves the socket read.
 * Returns the number of events or -errno. */
int gf_manager_collect(gf_manager *m, int control, gf_event_fn fn, void *ctx);
/* Wakes gf_manager_wait with -ECANCELED. */
void gf_manager_stop(gf_manager *m);
/* Allocates an arena block in the parent's region (thread-safe). */
int gf_manager_alloc(gf_manager *m, uint64_t len, uint64_t *off);
/* Number of tasks queued in the parent (not yet in a worker's ring). */
uint64_t gf_manager_queued(gf_manager *m);
/* 1 when a live worker has taken task_id (claimed it from its ring, or started it) and not
 * finished it, else 0: from then on gf_manager_cancel fails and gf_manager_kill_task works. */
int gf_manager_running(gf_manager *m, uint64_t task_id);
/* Kills the worker that has taken task_id (Ctrl-C stopped the caller waiting for it): its death
 * is reported with task_id, and it is replaced as after a crash. -ENOENT when no worker has
 * taken it (queued, or finished), -EINVAL for 0. */
int gf_manager_kill_task(gf_manager *m, uint64_t task_id);
/* Closes the control socket (the template then kills the workers and exits), kills the
 * template if it lingers past timeout_ns, reaps it, and frees everything. No other call on m
 * may run meanwhile or after it (gf_manager_free excepted): the caller makes sure no thread is
 * still inside one, collect and spin included. */
void gf_manager_close(gf_manager *m, int64_t timeout_ns);
/* Unmaps the shared memory: only once no buffer of the arena is referenced in this process. */
void gf_manager_free(gf_manager *m);
/* In a child forked from the pool's process: closes this copy's descriptors, touching nothing
 * the parent still uses (no signal, no write, no shared field). The mapping stays, since views
 * of the arena may live on in the child: gf_manager_free unmaps it once none does. */
void gf_manager_forget(gf_manager *m);
/* Releases the block references a message owns. */
void gf_msg_release(const gf_arena *arena, const gf_msg *msg);

/* ------------------------------------------------------- worker side */

typedef struct gf_worker {
  gf_segment *seg;
  gf_arena arena;
  gf_allocator alloc; /* over the slot's region */
  gf_slot *slot;
  gf_ring *requests;
  gf_ring *responses;
  pid_t parent; /* the template: the worker exits when it is gone */
  int doorbell_fd; /* read once at attach: the segment's copy is the parent's to change */
  gf_fd_id doorbell_id; /* what doorbell_fd named at the parent (gf_segment_ids) */
} gf_worker;

/* Attaches to slot of the segment mapped at map from memfd fd. -EBADFD when fd or the doorbell
 * is not the pool's any more (an initializer closed or replaced it). */
int gf_worker_attach(gf_worker *w, unsigned char *map, size_t map_size, uint32_t slot, int fd);
/* Waits for the next task (spin up to spin_ns, then futex; checks every second that the
 * template lives) and claims it; tasks the parent withdrew are skipped.
 * On success *msg points at the message inside the ring. -EPIPE when the template is gone. */
int gf_worker_next(gf_worker *w, int64_t spin_ns, const gf_msg **msg, size_t *len);
/* Marks the task of the message at the ring head as running, then drops the message from the
 * ring (in that order, so a crash in between leaves it recoverable). Call after copying it. */
void gf_worker_begin(gf_worker *w, uint64_t task_id, uint64_t bytes_in);
/* Marks the start of the next item of a map chunk: task_timeout applies to each item. */
void gf_worker_item(gf_worker *w);
/* Records and releases the references the worker holds (for crash cleanup by the parent). */
int gf_worker_hold(gf_worker *w, uint64_t block);
void gf_worker_release(gf_worker *w, uint64_t block);
/* Sends a result message and marks the worker idle; waits while the ring is full. Rings the
 * doorbell if the parent sleeps, after checking that it is still the pool's eventfd: -EBADFD
 * (the result is sent, nobody was woken) when a task closed or replaced it; the worker must
 * then exit (GF_EXIT_DESCRIPTORS), which the parent hears of through the template. */
int gf_worker_reply(gf_worker *w, const struct iovec *iov, int iovcnt, uint64_t bytes_out);
/* Allocates an arena block in the worker's region. */
int gf_worker_alloc(gf_worker *w, uint64_t len, uint64_t *off);

/* ------------------------------------------------------- processes */

/* fork+exec of path with argv/envp (prepared by the caller), keeping keep_fds open across exec
 * (all other descriptors are closed), in a new session so the terminal's Ctrl-C reaches only
 * the parent. Only async-signal-safe calls happen in the child. *pidfd gets a pidfd. */
int gf_spawn(const char *path, char *const argv[], char *const envp[], const int *keep_fds,
             int nkeep, pid_t *pid, int *pidfd);
/* In a single-threaded process: prepares a worker child. Call between fork() and returning to
 * the interpreter in the child: asks for SIGKILL when the parent (template) dies and checks
 * it did not die already. */
int gf_worker_child_setup(pid_t parent);
/* Resident set size of this process in bytes, less the pages shared with others (the arena,
 * files): what the process itself uses (from /proc/self/statm). */
int gf_rss_bytes(uint64_t *rss);

#endif
