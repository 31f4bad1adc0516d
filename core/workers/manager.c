/* The parent's side of a pool: dispatching tasks to workers, collecting results, and
 * recovering from a worker's death (see gf/workers.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gf/workers.h"

struct gf_pending {
  gf_pending *next;
  uint64_t task_id;
  size_t len;
  unsigned char msg[];
};

/* Tasks a worker may have queued in its ring: enough to hide wake-up latency for tiny tasks,
 * one for long ones so that a slow task never holds others hostage. A task running longer than
 * the target is long whatever the average: its worker gets nothing more, and what waits behind
 * it moves to an idle worker (gf_steal). */
#define GF_DEPTH_MAX 64u
#define GF_DEPTH_TARGET_NS 200000
/* How soon to look again while a worker idles and another has tasks queued behind a running one. */
#define GF_STEAL_RECHECK_NS 1000000

static uint32_t gf_slot_depth(gf_slot *slot) {
  uint64_t done = atomic_load_explicit(&slot->tasks_done, memory_order_relaxed);
  uint64_t busy = atomic_load_explicit(&slot->busy_ns, memory_order_relaxed);
  if (done == 0)
    return 1; /* unknown durations: never queue a task behind one that may be long */
  uint64_t avg = busy / done;
  if (avg == 0)
    return GF_DEPTH_MAX;
  uint64_t depth = GF_DEPTH_TARGET_NS / avg + 1;
  return depth > GF_DEPTH_MAX ? GF_DEPTH_MAX : (uint32_t)depth;
}

static int gf_slot_accepts(gf_manager *m, uint32_t i) {
  uint32_t state = atomic_load(&m->seg->slots[i].state);
  return state == GF_SLOT_STARTING || state == GF_SLOT_READY;
}

/* When the slot's running task becomes long (see GF_DEPTH_TARGET_NS); INT64_MAX when idle. */
static int64_t gf_long_at(gf_slot *slot) {
  if (atomic_load_explicit(&slot->current_task, memory_order_relaxed) == 0)
    return INT64_MAX;
  return atomic_load_explicit(&slot->task_started_ns, memory_order_relaxed) + GF_DEPTH_TARGET_NS;
}

/* The slot with room and the fewest tasks in flight, a ready worker's before a starting one's
 * (tasks taken over from a starting worker must not go back to it), or -1. Under m->lock. */
static int gf_pick_slot(gf_manager *m, int64_t now) {
  int best = -1;
  uint64_t best_rank = UINT64_MAX;
  for (uint32_t i = 0; i < m->seg->nslots; i++) {
    if (!gf_slot_accepts(m, i) || m->sched[i].inflight >= gf_slot_depth(&m->seg->slots[i]))
      continue;
    if (m->sched[i].inflight > 0 && gf_long_at(&m->seg->slots[i]) <= now)
      continue;
    /* The state read as in gf_starting_with_tasks: a stale one only misranks this pick. */
    uint64_t rank = 2 * (uint64_t)m->sched[i].inflight +
                    (atomic_load(&m->seg->slots[i].state) == GF_SLOT_STARTING);
    if (rank < best_rank) {
      best = (int)i;
      best_rank = rank;
    }
  }
  return best;
}

void gf_msg_release(const gf_arena *arena, const gf_msg *msg) {
  const gf_bufref *bufs = (const gf_bufref *)(msg + 1);
  for (uint32_t i = 0; i < msg->nbufs; i++)
    if (gf_block_check(arena, bufs[i].block) == 0)
      gf_block_decref(arena, bufs[i].block);
}

int gf_manager_init(gf_manager *m, uint32_t nslots, size_t ring_cap, uint64_t arena_size) {
  int rc, sv[2];
  struct epoll_event ev = {.events = EPOLLIN};
  if (nslots == 0 || nslots > GF_MAX_WORKERS)
    return -EINVAL;
  memset(m, 0, sizeof(*m));
  m->memfd = m->ctl_fd = m->ctl_child_fd = m->epoll_fd = m->stop_fd = m->template_pidfd = -1;
  pthread_mutex_init(&m->lock, NULL);
  pthread_mutex_init(&m->drain_lock, NULL);
  pthread_mutex_init(&m->alloc_lock, NULL);

  size_t seg_size = gf_segment_footprint(nslots, ring_cap);
  if ((rc = gf_shm_create(seg_size, arena_size, &m->memfd, &m->map)) < 0)
    goto error;
  m->map_size = seg_size + arena_size;
  m->seg = (gf_segment *)m->map;
  if ((rc = gf_segment_init(m->seg, nslots, ring_cap, arena_size)) < 0)
    goto error;
  m->arena.base = m->map + seg_size;
  m->arena.size = arena_size;
  m->arena.fd = m->memfd;
  m->arena.offset = seg_size;
  gf_allocator_init(&m->alloc, &m->seg->parent_region);
  m->sched = calloc(nslots, sizeof(*m->sched));
  if (m->sched == NULL) {
    rc = -ENOMEM;
    goto error;
  }

  m->seg->doorbell_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  m->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  m->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  if (m->seg->doorbell_fd < 0 || m->stop_fd < 0 || m->epoll_fd < 0 ||
      socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
    rc = -errno;
    goto error;
  }
  m->ctl_fd = sv[0];
  m->ctl_child_fd = sv[1];
  gf_segment_ids *ids = gf_segment_ids_of(m->seg);
  if ((rc = gf_fd_id_get(m->memfd, &ids->memfd)) < 0 ||
      (rc = gf_fd_id_get(m->seg->doorbell_fd, &ids->doorbell)) < 0)
    goto error;
  m->arena.fd_id = ids->memfd;
  int watched[] = {m->seg->doorbell_fd, m->stop_fd, m->ctl_fd};
  for (size_t i = 0; i < sizeof(watched) / sizeof(watched[0]); i++) {
    ev.data.fd = watched[i];
    if (epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, watched[i], &ev) < 0) {
      rc = -errno;
      goto error;
    }
  }
  return 0;

error:
  /* Nothing started yet: close the descriptors, then drop the mapping and the memfd. */
  gf_manager_close(m, 0);
  gf_manager_free(m);
  return rc;
}

void gf_manager_child_fds(const gf_manager *m, int fds[3]) {
  fds[0] = m->memfd;
  fds[1] = m->seg->doorbell_fd;
  fds[2] = m->ctl_child_fd;
}

int gf_manager_start_template(gf_manager *m, const char *path, char *const argv[],
                              char *const envp[], int config_fd) {
  int rc, fds[4];
  struct epoll_event ev = {.events = EPOLLIN};
  gf_manager_child_fds(m, fds);
  fds[3] = config_fd;
  int nfds = config_fd >= 0 ? 4 : 3;
  if ((rc = gf_spawn(path, argv, envp, fds, nfds, &m->template_pid, &m->template_pidfd)) < 0)
    return rc;
  close(m->ctl_child_fd);
  m->ctl_child_fd = -1;
  ev.data.fd = m->template_pidfd;
  if (epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, m->template_pidfd, &ev) < 0)
    return -errno;
  return 0;
}

/* With m->lock held: sends slot's spawn request without blocking. A full control socket means
 * the template still has requests to answer; the request then waits in spawn_queued and goes
 * out after the waiter reads those answers (gf_flush_spawns). Blocking instead could deadlock:
 * the template blocks too when its answers fill our side, and the waiter (which respawns dead
 * workers) is the thread that reads them. Returns 0 (sent or queued) or a negative errno. */
static int gf_send_spawn(gf_manager *m, uint32_t slot) {
  gf_ctl msg = {.kind = GF_CTL_SPAWN, .slot = slot};
  if (send(m->ctl_fd, &msg, sizeof(msg), MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
    return 0;
  if (errno != EAGAIN)
    return -errno;
  if (!m->sched[slot].spawn_queued) {
    m->sched[slot].spawn_queued = 1;
    m->spawns_queued++;
  }
  return 0;
}

int gf_manager_spawn(gf_manager *m, uint32_t slot) {
  if (slot >= m->seg->nslots)
    return -EINVAL;
  atomic_store(&m->seg->slots[slot].state, GF_SLOT_STARTING);
  pthread_mutex_lock(&m->lock);
  int rc = gf_send_spawn(m, slot);
  pthread_mutex_unlock(&m->lock);
  return rc;
}

/* With m->lock held: sends the queued spawn requests, in slot order, until the socket is full
 * again. */
static void gf_flush_spawns(gf_manager *m) {
  for (uint32_t i = 0; i < m->seg->nslots && m->spawns_queued > 0; i++) {
    if (!m->sched[i].spawn_queued)
      continue;
    m->sched[i].spawn_queued = 0;
    m->spawns_queued--;
    if (gf_send_spawn(m, i) < 0 || m->sched[i].spawn_queued)
      break; /* full again, or the template is gone (its EOF is handled as such) */
  }
}

/* A queue entry holding a copy of a ring message, claimable again. NULL without memory. */
static gf_pending *gf_pending_copy(const void *msg, size_t len) {
  gf_pending *p = malloc(sizeof(*p) + len);
  if (p == NULL)
    return NULL;
  memcpy(p->msg, msg, len);
  atomic_store_explicit(&((gf_msg *)p->msg)->claim, GF_CLAIM_QUEUED, memory_order_relaxed);
  p->len = len;
  p->task_id = ((const gf_msg *)msg)->task_id;
  p->next = NULL;
  return p;
}

/* Puts the list from head to last (n entries, in order) at the front of the queue. Under
 * m->lock. */
static void gf_pending_prepend(gf_manager *m, gf_pending *head, gf_pending *last, uint64_t n) {
  if (head == NULL)
    return;
  last->next = m->pending_head;
  if (m->pending_head == NULL)
    m->pending_tail = last;
  m->pending_head = head;
  m->npending += n;
}

/* Takes back from slot's request ring the tasks its worker has not claimed: all of them, or
 * only task_id when it is not 0. Each is copied before the claim is won, so none is lost if
 * memory runs out. Appends them to the list *head..*last in ring order. Under m->lock, which makes us the
 * ring's only writer: messages between head and tail stay intact while we read them, even
 * those the worker consumes meanwhile (their claim is no longer QUEUED). Returns how many. */
static uint64_t gf_withdraw(gf_manager *m, uint32_t slot, uint64_t task_id, gf_pending **head,
                            gf_pending **last) {
  gf_ring *ring = gf_slot_requests(m->seg, slot);
  uint64_t n = 0, pos = atomic_load(&ring->head), next;
  const void *msg;
  size_t len;
  for (; gf_ring_peek_at(ring, pos, &msg, &len, &next) == 0; pos = next) {
    gf_msg *hdr = (gf_msg *)msg;
    if ((task_id != 0 && hdr->task_id != task_id) ||
        atomic_load(&hdr->claim) != GF_CLAIM_QUEUED)
      continue;
    gf_pending *p = gf_pending_copy(msg, len);
    uint32_t queued = GF_CLAIM_QUEUED;
    if (p == NULL || !atomic_compare_exchange_strong(&hdr->claim, &queued, GF_CLAIM_WITHDRAWN)) {
      free(p);
      continue;
    }
    if (*last != NULL)
      (*last)->next = p;
    else
      *head = p;
    *last = p;
    m->sched[slot].inflight--;
    n++;
  }
  return n;
}

/* A starting worker with tasks in its ring. The state is the worker's (or the manager's at a
 * spawn or death) and read at any time: a stale value only delays a steal to the next look. */
static int gf_starting_with_tasks(gf_manager *m, uint32_t i) {
  return m->sched[i].inflight > 0 && atomic_load(&m->seg->slots[i].state) == GF_SLOT_STARTING;
}

/* A ready worker with nothing in flight: it can take tasks over. */
static int gf_idle_ready(gf_manager *m, uint32_t i) {
  return m->sched[i].inflight == 0 && atomic_load(&m->seg->slots[i].state) == GF_SLOT_READY;
}

/* Tasks in slot i's ring that an idle worker should take over: those behind a long-running
 * task, or all of them while the worker is still starting (its initializer may take long, or
 * hang). Under m->lock. */
static int gf_waiting_behind(gf_manager *m, uint32_t i, int64_t now) {
  return gf_starting_with_tasks(m, i) ||
         (m->sched[i].inflight > 1 && gf_long_at(&m->seg->slots[i]) <= now);
}

/* While a worker idles with nothing queued in the parent, moves the tasks waiting behind a
 * long-running task or a starting worker in another worker's ring back to the front of the
 * queue, to be dispatched to the idle one. Under m->lock. */
static void gf_steal(gf_manager *m, int64_t now) {
  int idle = 0;
  for (uint32_t i = 0; i < m->seg->nslots && !idle; i++)
    idle = gf_idle_ready(m, i);
  if (!idle)
    return;
  /* A starting worker's tasks were dispatched before those queued here: they go first, also
   * while the queue holds more. Behind a running task, only once the queue is empty. */
  gf_pending *head = NULL, *last = NULL;
  uint64_t n = 0;
  for (uint32_t i = 0; i < m->seg->nslots; i++)
    if (m->pending_head == NULL ? gf_waiting_behind(m, i, now) : gf_starting_with_tasks(m, i))
      n += gf_withdraw(m, i, 0, &head, &last);
  gf_pending_prepend(m, head, last, n);
}

static int gf_pending_push(gf_manager *m, const struct iovec *iov, int iovcnt) {
  size_t len = 0;
  for (int i = 0; i < iovcnt; i++)
    len += iov[i].iov_len;
  gf_pending *p = malloc(sizeof(*p) + len);
  if (p == NULL)
    return -ENOMEM;
  p->len = len;
  unsigned char *dst = p->msg;
  for (int i = 0; i < iovcnt; i++) {
    memcpy(dst, iov[i].iov_base, iov[i].iov_len);
    dst += iov[i].iov_len;
  }
  p->task_id = ((const gf_msg *)p->msg)->task_id;
  p->next = NULL;
  if (m->pending_tail != NULL)
    m->pending_tail->next = p;
  else
    m->pending_head = p;
  m->pending_tail = p;
  m->npending++;
  return 0;
}

/* Moves queued tasks into rings with room. Under m->lock. Returns a bitmask of slots to wake
 * (the caller wakes them after unlocking). */
static uint64_t gf_dispatch_pending(gf_manager *m) {
  uint64_t wake = 0;
  int64_t now = gf_now_ns();
  gf_steal(m, now);
  while (m->pending_head != NULL) {
    int slot = gf_pick_slot(m, now);
    if (slot < 0)
      break;
    gf_pending *p = m->pending_head;
    struct iovec iov = {.iov_base = p->msg, .iov_len = p->len};
    if (gf_ring_write(gf_slot_requests(m->seg, (uint32_t)slot), &iov, 1) < 0)
      break;
    m->sched[slot].inflight++;
    wake |= 1ull << (slot & 63);
    m->pending_head = p->next;
    if (m->pending_head == NULL)
      m->pending_tail = NULL;
    m->npending--;
    free(p);
  }
  return wake;
}

static void gf_wake_slots(gf_manager *m, uint64_t mask) {
  for (uint32_t i = 0; i < m->seg->nslots; i++)
    if (mask & (1ull << (i & 63)))
      gf_ring_wake(gf_slot_requests(m->seg, i));
}

int gf_manager_submit(gf_manager *m, const struct iovec *iov, int iovcnt) {
  int rc = 0, slot = -1;
  pthread_mutex_lock(&m->lock);
  if (m->closing) {
    rc = -ESHUTDOWN;
    goto done;
  }
  if (m->pending_head == NULL && (slot = gf_pick_slot(m, gf_now_ns())) >= 0) {
    rc = gf_ring_write(gf_slot_requests(m->seg, (uint32_t)slot), iov, iovcnt);
    if (rc == 0) {
      m->sched[slot].inflight++;
      goto done;
    }
    slot = -1;
  }
  rc = gf_pending_push(m, iov, iovcnt);

done:
  pthread_mutex_unlock(&m->lock);
  if (slot >= 0)
    gf_ring_wake(gf_slot_requests(m->seg, (uint32_t)slot));
  return rc;
}

int gf_manager_cancel(gf_manager *m, uint64_t task_id) {
  int rc = -ENOENT;
  pthread_mutex_lock(&m->lock);
  for (gf_pending **link = &m->pending_head, *prev = NULL; *link != NULL;
       prev = *link, link = &(*link)->next) {
    gf_pending *p = *link;
    if (p->task_id != task_id)
      continue;
    *link = p->next;
    if (m->pending_tail == p)
      m->pending_tail = prev;
    m->npending--;
    gf_msg_release(&m->arena, (const gf_msg *)p->msg);
    free(p);
    rc = 0;
    break;
  }
  for (uint32_t i = 0; rc != 0 && i < m->seg->nslots; i++) {
    gf_pending *head = NULL, *last = NULL;
    if (gf_withdraw(m, i, task_id, &head, &last) > 0) {
      gf_msg_release(&m->arena, (const gf_msg *)head->msg);
      free(head);
      rc = 0;
    }
  }
  pthread_mutex_unlock(&m->lock);
  return rc;
}

uint64_t gf_manager_queued(gf_manager *m) {
  pthread_mutex_lock(&m->lock);
  uint64_t n = m->npending;
  pthread_mutex_unlock(&m->lock);
  return n;
}

/* The task slot i's worker has claimed from its ring and not marked running yet: the message
 * at the ring's head, if its claim is TAKEN; 0 for none. Under m->lock, which makes us the
 * ring's only writer: the message stays intact while we read it, even if the worker consumes
 * it meanwhile. */
static uint64_t gf_claimed_task(gf_manager *m, uint32_t i) {
  gf_ring *ring = gf_slot_requests(m->seg, i);
  const void *msg;
  size_t len;
  uint64_t next;
  if (gf_ring_peek_at(ring, atomic_load(&ring->head), &msg, &len, &next) < 0)
    return 0;
  const gf_msg *hdr = msg;
  return atomic_load(&hdr->claim) == GF_CLAIM_TAKEN ? hdr->task_id : 0;
}

/* 1 when slot i's worker has taken task_id (not 0): claimed it, or marked it running. The claim
 * is read first: the worker marks current_task before it consumes the message, so a task
 * passing from one to the other is seen in one of them. Under m->lock. */
static int gf_has_taken(gf_manager *m, uint32_t i, uint64_t task_id) {
  return gf_claimed_task(m, i) == task_id ||
         atomic_load(&m->seg->slots[i].current_task) == task_id;
}

int gf_manager_running(gf_manager *m, uint64_t task_id) {
  int running = 0;
  if (task_id == 0)
    return 0;
  pthread_mutex_lock(&m->lock);
  for (uint32_t i = 0; i < m->seg->nslots && !running; i++) {
    uint32_t state = atomic_load(&m->seg->slots[i].state);
    running = (state == GF_SLOT_READY || state == GF_SLOT_EXITING) && gf_has_taken(m, i, task_id);
  }
  pthread_mutex_unlock(&m->lock);
  return running;
}

int gf_manager_kill_task(gf_manager *m, uint64_t task_id) {
  int rc = -ENOENT;
  if (task_id == 0) /* an idle slot's current_task */
    return -EINVAL;
  /* Under m->lock, as the timeout kills: a death handled meanwhile clears the slot's pid. */
  pthread_mutex_lock(&m->lock);
  for (uint32_t i = 0; i < m->seg->nslots; i++) {
    /* The worker may have finished the task and taken its next one since: the kill then fails
     * that one (as a timeout's can). */
    if (!gf_has_taken(m, i, task_id))
      continue;
    /* Read after the task: the worker stored its pid before it took any. */
    int32_t pid = atomic_load(&m->seg->slots[i].pid);
    if (pid > 0)
      rc = kill(pid, SIGKILL) == 0 ? 0 : -errno;
    break;
  }
  pthread_mutex_unlock(&m->lock);
  return rc;
}

static int gf_any_response(gf_manager *m) {
  for (uint32_t i = 0; i < m->seg->nslots; i++)
    if (!gf_ring_empty(gf_slot_responses(m->seg, i)))
      return 1;
  return 0;
}

int gf_manager_spin(gf_manager *m, int64_t spin_ns) {
  int found = 0;
  int64_t start = gf_now_ns();
  atomic_fetch_add(&m->seg->parent_spinning, 1);
  do {
    if ((found = gf_any_response(m)))
      break;
    gf_spin_step();
  } while (gf_now_ns() - start < spin_ns);
  atomic_fetch_sub(&m->seg->parent_spinning, 1);
  /* A worker that saw us spinning did not ring the doorbell: if its result is there, whoever
   * sleeps in gf_manager_wait must hear of it. */
  atomic_thread_fence(memory_order_seq_cst);
  if (!found && gf_any_response(m) && atomic_load(&m->seg->parent_sleeping)) {
    uint64_t one = 1;
    if (write(m->seg->doorbell_fd, &one, sizeof(one)) < 0) {
      /* EAGAIN: the counter is saturated, the waiter is woken anyway. */
    }
  }
  return found;
}

/* Milliseconds until the parent must act without an event: a running task passing
 * task_timeout, or tasks waiting behind a running one or a starting worker while a worker
 * idles (gf_steal); -1 when
 * nothing can come due. Takes m->lock. */
static int gf_due_ms(gf_manager *m, int64_t now) {
  int64_t first = INT64_MAX;
  int idle = 0, waiting_behind = 0;
  pthread_mutex_lock(&m->lock);
  for (uint32_t i = 0; i < m->seg->nslots; i++) {
    gf_slot *slot = &m->seg->slots[i];
    idle |= gf_idle_ready(m, i);
    if (gf_starting_with_tasks(m, i)) {
      waiting_behind = 1; /* a worker turning ready rings the doorbell; this is the fallback */
      if (now + GF_STEAL_RECHECK_NS < first)
        first = now + GF_STEAL_RECHECK_NS;
    } else if (m->sched[i].inflight > 1) {
      waiting_behind = 1;
      int64_t long_at = gf_long_at(slot);
      /* Not started yet: look again soon. */
      int64_t due = long_at == INT64_MAX ? now + GF_STEAL_RECHECK_NS : long_at;
      if (due < first)
        first = due;
    }
  }
  pthread_mutex_unlock(&m->lock);
  if (!(idle && waiting_behind))
    first = INT64_MAX;
  if (m->task_timeout_ns > 0) {
    for (uint32_t i = 0; i < m->seg->nslots; i++) {
      gf_slot *slot = &m->seg->slots[i];
      if (atomic_load_explicit(&slot->current_task, memory_order_relaxed) == 0)
        continue;
      int64_t due = atomic_load_explicit(&slot->item_started_ns, memory_order_relaxed) +
                    m->task_timeout_ns;
      if (due < first)
        first = due;
    }
    /* With timeouts an idle pool still looks every 100 ms: a task may have started since. */
    if (first == INT64_MAX)
      first = now + 100000000;
  }
  if (first == INT64_MAX)
    return -1;
  int64_t ms = (first - now) / 1000000 + 1;
  return ms < 1 ? 1 : ms > 100 ? 100 : (int)ms;
}

int gf_manager_wait(gf_manager *m, int64_t spin_ns, int64_t timeout_ns) {
  struct epoll_event evs[8];
  uint64_t counter;
  int64_t start = gf_now_ns();
  while (gf_now_ns() - start < spin_ns) {
    if (gf_any_response(m))
      return 1;
    gf_spin_step();
  }
  atomic_store(&m->seg->parent_sleeping, 1);
  atomic_thread_fence(memory_order_seq_cst);
  if (gf_any_response(m)) {
    atomic_store(&m->seg->parent_sleeping, 0);
    return 1;
  }
  int due_ms = gf_due_ms(m, start), ms = due_ms;
  if (timeout_ns >= 0 && (ms < 0 || timeout_ns / 1000000 < ms))
    ms = (int)(timeout_ns / 1000000);
  int n = epoll_wait(m->epoll_fd, evs, 8, ms);
  atomic_store(&m->seg->parent_sleeping, 0);
  if (n < 0)
    return -errno;
  for (int i = 0; i < n; i++) {
    if (evs[i].data.fd == m->stop_fd)
      return -ECANCELED;
    if (evs[i].data.fd == m->seg->doorbell_fd && read(m->seg->doorbell_fd, &counter, 8) < 0) {
      /* EAGAIN: another thread read it first. */
    }
  }
  return n > 0 || due_ms >= 0;
}

void gf_manager_stop(gf_manager *m) {
  uint64_t one = 1;
  if (write(m->stop_fd, &one, sizeof(one)) < 0) {
    /* EAGAIN: already signalled. */
  }
}

/* Delivers every result waiting in slot's response ring. Under drain_lock. */
static int gf_drain_slot(gf_manager *m, uint32_t slot, gf_event_fn fn, void *ctx) {
  gf_ring *ring = gf_slot_responses(m->seg, slot);
  const void *msg;
  size_t len;
  int n = 0, rc;
  while (gf_ring_peek(ring, &msg, &len) == 0) {
    const gf_msg *hdr = msg;
    gf_event ev = {.kind = GF_EV_RESULT, .slot = slot, .task_id = hdr->task_id, .msg = hdr};
    rc = fn(ctx, &ev);
    gf_ring_consume(ring);
    pthread_mutex_lock(&m->lock);
    if (m->sched[slot].inflight > 0)
      m->sched[slot].inflight--;
    pthread_mutex_unlock(&m->lock);
    n++;
    if (rc < 0)
      return rc;
  }
  return n;
}

/* A worker died: deliver what it finished, fail what it held, requeue what it never took,
 * release what it referenced, and ask for a replacement. Under drain_lock. */
static int gf_handle_death(gf_manager *m, uint32_t slot_index, int32_t pid, int32_t status,
                           gf_event_fn fn, void *ctx) {
  gf_slot *slot = &m->seg->slots[slot_index];
  gf_ring *requests = gf_slot_requests(m->seg, slot_index);
  int rc = gf_drain_slot(m, slot_index, fn, ctx);
  if (rc < 0)
    return rc;

  pthread_mutex_lock(&m->lock);
  uint32_t state = atomic_load(&slot->state);
  /* The task it ran, or the one it had claimed and not marked yet: a task a worker took is
   * never run a second time (nor one a Ctrl-C stopped in that instant). */
  uint64_t failed = atomic_load(&slot->current_task);
  if (failed == 0)
    failed = gf_claimed_task(m, slot_index);
  gf_event ev = {.kind = GF_EV_DIED,
                 .slot = slot_index,
                 .pid = pid,
                 .status = status,
                 .task_id = failed,
                 .timed_out = failed != 0 && failed == m->sched[slot_index].timed_out_task,
                 .was_ready = state == GF_SLOT_READY || state == GF_SLOT_EXITING};

  /* Untaken tasks go back to the front of the queue, in order (withdrawn ones are there
   * already). The failed task may still be at the head, claimed or marked but not consumed. */
  gf_pending *requeue_head = NULL, *requeue_last = NULL;
  uint64_t requeued = 0, pos = atomic_load(&requests->head), next;
  const void *msg;
  size_t len;
  for (; gf_ring_peek_at(requests, pos, &msg, &len, &next) == 0; pos = next) {
    const gf_msg *hdr = msg;
    if (atomic_load(&hdr->claim) == GF_CLAIM_WITHDRAWN)
      continue;
    if (hdr->task_id == failed) {
      gf_msg_release(&m->arena, hdr);
      continue;
    }
    gf_pending *p = gf_pending_copy(msg, len);
    if (p == NULL)
      continue;
    if (requeue_last != NULL)
      requeue_last->next = p;
    else
      requeue_head = p;
    requeue_last = p;
    requeued++;
  }
  gf_pending_prepend(m, requeue_head, requeue_last, requeued);
  for (int i = 0; i < GF_HOLDINGS; i++) {
    if (slot->holdings[i] != 0 && gf_block_check(&m->arena, slot->holdings[i]) == 0)
      gf_block_decref(&m->arena, slot->holdings[i]);
    slot->holdings[i] = 0;
  }
  gf_ring_reset(requests);
  gf_ring_reset(gf_slot_responses(m->seg, slot_index));
  atomic_store(&slot->current_task, 0);
  atomic_store(&slot->pid, 0);
  int64_t born = atomic_load(&slot->born_ns);
  if (born > 0)
    m->sched[slot_index].lived_ns += gf_now_ns() - born;
  atomic_store(&slot->born_ns, 0);
  m->sched[slot_index].inflight = 0;
  m->sched[slot_index].timed_out_task = 0;
  m->sched[slot_index].restarts++;
  atomic_store(&slot->state, GF_SLOT_DEAD);
  int respawn = !m->closing;
  pthread_mutex_unlock(&m->lock);

  if (respawn)
    gf_manager_spawn(m, slot_index);
  return fn(ctx, &ev);
}

static int gf_read_control(gf_manager *m, gf_event_fn fn, void *ctx) {
  gf_ctl msg;
  int n = 0, rc;
  for (;;) {
    ssize_t got = recv(m->ctl_fd, &msg, sizeof(msg), MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EINTR))
      return n;
    if (got <= 0) {
      /* EOF: the template is gone; its workers die with it (PR_SET_PDEATHSIG). */
      gf_event ev = {.kind = GF_EV_TEMPLATE_DIED};
      pthread_mutex_lock(&m->lock);
      m->closing = 1;
      pthread_mutex_unlock(&m->lock);
      struct epoll_event unused;
      epoll_ctl(m->epoll_fd, EPOLL_CTL_DEL, m->ctl_fd, &unused);
      rc = fn(ctx, &ev);
      return rc < 0 ? rc : n + 1;
    }
    if (got != sizeof(msg) || msg.slot >= m->seg->nslots)
      continue;
    n++;
    if (msg.kind == GF_CTL_SPAWNED) {
      atomic_store(&m->seg->slots[msg.slot].pid, msg.pid);
      gf_event ev = {.kind = GF_EV_SPAWNED, .slot = msg.slot, .pid = msg.pid};
      rc = fn(ctx, &ev);
    } else if (msg.kind == GF_CTL_EXITED || msg.kind == GF_CTL_SPAWN_FAILED) {
      rc = gf_handle_death(m, msg.slot, msg.pid, msg.status, fn, ctx);
    } else {
      rc = 0;
    }
    if (rc < 0)
      return rc;
  }
}

/* A ready worker that leaves the tasks in its ring unstarted for task_timeout is as stuck as
 * one whose task overruns (stopped, or hung between tasks): it is killed, and its tasks go to
 * the others. Under m->lock. */
static void gf_kill_if_unclaimed(gf_manager *m, uint32_t i, int32_t pid, int64_t now) {
  gf_slot *slot = &m->seg->slots[i];
  gf_slot_sched *sched = &m->sched[i];
  /* The worker's counter, read relaxed: a stale value only starts the clock a look later. */
  uint64_t done = atomic_load_explicit(&slot->tasks_done, memory_order_relaxed);
  if (sched->inflight == 0 || pid <= 0 || atomic_load(&slot->state) != GF_SLOT_READY) {
    sched->unclaimed_since = 0;
    return;
  }
  if (sched->unclaimed_since == 0 || done != sched->unclaimed_done) {
    sched->unclaimed_since = now;
    sched->unclaimed_done = done;
    return;
  }
  if (now - sched->unclaimed_since < m->task_timeout_ns)
    return;
  sched->unclaimed_since = 0;
  kill(pid, SIGKILL);
}

/* Kills workers whose task ran past task_timeout (their death is reported as a timeout), and
 * workers that do not start their queued tasks. */
static void gf_enforce_timeouts(gf_manager *m) {
  if (m->task_timeout_ns <= 0)
    return;
  int64_t now = gf_now_ns();
  pthread_mutex_lock(&m->lock);
  for (uint32_t i = 0; i < m->seg->nslots; i++) {
    gf_slot *slot = &m->seg->slots[i];
    uint64_t task = atomic_load(&slot->current_task);
    int32_t pid = atomic_load(&slot->pid);
    if (task == 0) {
      gf_kill_if_unclaimed(m, i, pid, now);
      continue;
    }
    m->sched[i].unclaimed_since = 0;
    if (pid <= 0 || m->sched[i].timed_out_task == task)
      continue;
    if (now - atomic_load(&slot->item_started_ns) < m->task_timeout_ns)
      continue;
    m->sched[i].timed_out_task = task;
    kill(pid, SIGKILL);
  }
  pthread_mutex_unlock(&m->lock);
}

int gf_manager_collect(gf_manager *m, int control, gf_event_fn fn, void *ctx) {
  int total = 0, rc = 0;
  pthread_mutex_lock(&m->drain_lock);
  for (uint32_t i = 0; i < m->seg->nslots; i++) {
    if ((rc = gf_drain_slot(m, i, fn, ctx)) < 0)
      goto done;
    total += rc;
  }
  if (control) {
    if ((rc = gf_read_control(m, fn, ctx)) < 0)
      goto done;
    total += rc;
    gf_enforce_timeouts(m);
  }
  pthread_mutex_lock(&m->lock);
  if (control)
    gf_flush_spawns(m);
  uint64_t wake = gf_dispatch_pending(m);
  pthread_mutex_unlock(&m->lock);
  gf_wake_slots(m, wake);
  rc = total;

done:
  pthread_mutex_unlock(&m->drain_lock);
  return rc;
}

int gf_manager_alloc(gf_manager *m, uint64_t len, uint64_t *off) {
  pthread_mutex_lock(&m->alloc_lock);
  int rc = gf_block_alloc(&m->arena, &m->alloc, len, off);
  pthread_mutex_unlock(&m->alloc_lock);
  return rc;
}

/* Drops the tasks still queued in the parent, giving back their buffers' blocks when release
 * is set (not in a forked child: the counts are the parent's). Under m->lock, or with no other
 * thread. */
static void gf_pending_clear(gf_manager *m, int release) {
  while (m->pending_head != NULL) {
    gf_pending *p = m->pending_head;
    m->pending_head = p->next;
    if (release)
      gf_msg_release(&m->arena, (const gf_msg *)p->msg);
    free(p);
  }
  m->pending_tail = NULL;
  m->npending = 0;
}

void gf_manager_close(gf_manager *m, int64_t timeout_ns) {
  pthread_mutex_lock(&m->lock);
  m->closing = 1;
  gf_pending_clear(m, 1);
  pthread_mutex_unlock(&m->lock);

  if (m->ctl_fd >= 0)
    close(m->ctl_fd);
  m->ctl_fd = -1;
  if (m->template_pid > 0) {
    /* The template sees EOF, kills its workers and exits; make sure of it. */
    siginfo_t info;
    struct pollfd exited = {.fd = m->template_pidfd, .events = POLLIN};
    if (poll(&exited, 1, (int)(timeout_ns / 1000000)) <= 0)
      kill(m->template_pid, SIGKILL);
    waitid(P_PID, (id_t)m->template_pid, &info, WEXITED);
    m->template_pid = 0;
  }
  /* No worker allocates any more: results the program keeps hold their own pages, not the
   * regions' warm ones (the arena lives as long as they do). A region a worker left torn keeps
   * what lies past the tear. */
  if (m->seg != NULL) {
    pthread_mutex_lock(&m->alloc_lock);
    gf_region_trim(&m->arena, &m->seg->parent_region);
    pthread_mutex_unlock(&m->alloc_lock);
    for (uint32_t i = 0; i < m->seg->nslots; i++)
      gf_region_trim(&m->arena, &m->seg->slots[i].region);
  }
  int fds[] = {m->template_pidfd, m->ctl_child_fd, m->epoll_fd, m->stop_fd};
  for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
    if (fds[i] >= 0)
      close(fds[i]);
  m->template_pidfd = m->ctl_child_fd = m->epoll_fd = m->stop_fd = -1;
  if (m->seg != NULL && m->seg->doorbell_fd >= 0) {
    close(m->seg->doorbell_fd);
    m->seg->doorbell_fd = -1;
  }
  free(m->sched);
  m->sched = NULL;
}

void gf_manager_free(gf_manager *m) {
  if (m->map != NULL)
    munmap(m->map, m->map_size);
  if (m->memfd >= 0)
    close(m->memfd);
  m->map = NULL;
  m->seg = NULL;
  m->memfd = -1;
}

void gf_manager_forget(gf_manager *m) {
  /* Another thread may have held a lock at the fork: take none. The doorbell's number is read
   * from the segment, never written: the segment is the parent's. */
  int fds[] = {m->ctl_fd,   m->ctl_child_fd, m->template_pidfd, m->epoll_fd,
               m->stop_fd,  m->memfd,        m->seg != NULL ? m->seg->doorbell_fd : -1};
  for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
    if (fds[i] >= 0)
      close(fds[i]);
  m->ctl_fd = m->ctl_child_fd = m->template_pidfd = m->epoll_fd = m->stop_fd = -1;
  m->memfd = m->arena.fd = -1; /* the mapping outlives its descriptor */
  m->template_pid = 0;
  gf_pending_clear(m, 0);
  free(m->sched);
  m->sched = NULL;
  /* The map stays: results received before the fork may still be read through it. */
}
