/* A worker's side of its slot: take tasks, send results, track the blocks it references. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gf/workers.h"

/* Rings the doorbell if the parent sleeps: after a reply, or once ready (tasks waiting in a
 * starting worker's ring may then move to it, see gf_steal). */
static int gf_worker_wake_parent(gf_worker *w) {
  int rc;
  /* seq_cst: our stores (the reply, the slot's state) are visible before we read whether the
   * parent sleeps, which it sets before it last looks at them. */
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load(&w->seg->parent_sleeping) && !atomic_load(&w->seg->parent_spinning)) {
    /* Only here, where a write is due anyway: a task may have closed the doorbell, or opened a
     * file at its number, whose data the write would change. Another eventfd there passes the
     * check; epoll, signalfd and the like refuse the write. */
    uint64_t one = 1;
    if ((rc = gf_fd_id_check(w->doorbell_fd, &w->doorbell_id)) < 0)
      return rc;
    if (write(w->doorbell_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
      return -EBADFD; /* EAGAIN: the counter is saturated, the parent is woken anyway */
  }
  return 0;
}

int gf_worker_attach(gf_worker *w, unsigned char *map, size_t map_size, uint32_t slot, int fd) {
  gf_segment *seg = (gf_segment *)map;
  if (seg->magic != GF_SEGMENT_MAGIC || slot >= seg->nslots)
    return -EINVAL;
  memset(w, 0, sizeof(*w));
  w->seg = seg;
  w->arena.base = map + seg->size;
  w->arena.size = seg->arena_size;
  w->arena.fd = fd;
  w->arena.offset = seg->size;
  w->arena.fd_id = gf_segment_ids_of(seg)->memfd;
  w->doorbell_id = gf_segment_ids_of(seg)->doorbell;
  w->doorbell_fd = seg->doorbell_fd;
  w->slot = &seg->slots[slot];
  gf_allocator_init(&w->alloc, &w->slot->region);
  w->requests = gf_slot_requests(seg, slot);
  w->responses = gf_slot_responses(seg, slot);
  w->parent = getppid();
  if (gf_fd_id_check(fd, &w->arena.fd_id) < 0 ||
      gf_fd_id_check(w->doorbell_fd, &w->doorbell_id) < 0)
    return -EBADFD;
  atomic_store(&w->slot->born_ns, gf_now_ns());
  atomic_store(&w->slot->current_task, 0);
  /* Before any task is taken: the parent may have to kill us for one (Ctrl-C) before it has
   * read the template's SPAWNED message, which carries the same pid. */
  atomic_store(&w->slot->pid, getpid());
  atomic_store(&w->slot->state, GF_SLOT_READY);
  (void)map_size;
  return gf_worker_wake_parent(w);
}

int gf_worker_next(gf_worker *w, int64_t spin_ns, const gf_msg **msg, size_t *len) {
  const void *at;
  int rc;
  for (;;) {
    /* Sleep in one-second slices: PR_SET_PDEATHSIG covers the template's death, and this
     * check covers the instant before it was set. */
    rc = gf_ring_wait(w->requests, spin_ns, 1000000000);
    if (rc == 0 && gf_ring_peek(w->requests, &at, len) == 0) {
      gf_msg *hdr = (gf_msg *)at; /* the ring is writable: the claim word is shared */
      uint32_t queued = GF_CLAIM_QUEUED;
      if (!atomic_compare_exchange_strong(&hdr->claim, &queued, GF_CLAIM_TAKEN)) {
        gf_ring_consume(w->requests); /* withdrawn: the parent owns it now */
        continue;
      }
      *msg = at;
      return 0;
    }
    if (rc == -EINTR)
      return rc;
    if (getppid() != w->parent)
      return -EPIPE;
  }
}

void gf_worker_begin(gf_worker *w, uint64_t task_id, uint64_t bytes_in) {
  /* current_task first: if we die before consuming, the parent finds the task both marked and
   * still in the ring, and fails it rather than running it twice. */
  int64_t now = gf_now_ns();
  atomic_store(&w->slot->task_started_ns, now);
  atomic_store(&w->slot->item_started_ns, now);
  atomic_store(&w->slot->current_task, task_id);
  gf_ring_consume(w->requests);
  atomic_fetch_add_explicit(&w->slot->bytes_in, bytes_in, memory_order_relaxed);
}

void gf_worker_item(gf_worker *w) {
  atomic_store_explicit(&w->slot->item_started_ns, gf_now_ns(), memory_order_relaxed);
}

int gf_worker_hold(gf_worker *w, uint64_t block) {
  for (int i = 0; i < GF_HOLDINGS; i++) {
    if (w->slot->holdings[i] == 0) {
      w->slot->holdings[i] = block;
      return 0;
    }
  }
  /* Full: the reference still works, it is only not released if this worker crashes. */
  return -ENOSPC;
}

void gf_worker_release(gf_worker *w, uint64_t block) {
  for (int i = 0; i < GF_HOLDINGS; i++) {
    if (w->slot->holdings[i] == block) {
      w->slot->holdings[i] = 0;
      break;
    }
  }
  gf_block_decref(&w->arena, block);
}

int gf_worker_reply(gf_worker *w, const struct iovec *iov, int iovcnt, uint64_t bytes_out) {
  int rc;
  struct timespec pause = {0, 50000};
  /* The parent drains continuously; a full ring only means it is busy for a moment. */
  while ((rc = gf_ring_write(w->responses, iov, iovcnt)) == -EAGAIN) {
    if (getppid() != w->parent)
      return -EPIPE;
    nanosleep(&pause, NULL);
  }
  if (rc < 0)
    return rc;
  gf_slot *slot = w->slot;
  int64_t started = atomic_load_explicit(&slot->task_started_ns, memory_order_relaxed);
  atomic_fetch_add_explicit(&slot->busy_ns, (uint64_t)(gf_now_ns() - started),
                            memory_order_relaxed);
  atomic_fetch_add_explicit(&slot->tasks_done, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&slot->bytes_out, bytes_out, memory_order_relaxed);
  atomic_store(&slot->current_task, 0);

  return gf_worker_wake_parent(w);
}

int gf_worker_alloc(gf_worker *w, uint64_t len, uint64_t *off) {
  return gf_block_alloc(&w->arena, &w->alloc, len, off);
}
