/* Single-producer single-consumer message ring in shared memory (see gf/transport.h). */
#include <errno.h>
#include <string.h>

#include "gf/transport.h"

/* Every record starts with this; len == GF_WRAP marks the filler before the end of the area. */
typedef struct {
  uint32_t len;
  uint32_t reserved;
} gf_record;

#define GF_WRAP UINT32_MAX
#define GF_ALIGN8(n) (((n) + 7u) & ~(uint64_t)7u)

size_t gf_ring_footprint(size_t cap) { return sizeof(gf_ring) + cap; }

int gf_ring_init(gf_ring *ring, size_t cap) {
  if (cap < GF_PAGE || (cap & (cap - 1)) != 0)
    return -EINVAL;
  memset(ring, 0, sizeof(*ring));
  ring->cap = cap;
  return 0;
}

void gf_ring_reset(gf_ring *ring) {
  atomic_store(&ring->head, 0);
  atomic_store(&ring->tail, 0);
  atomic_store(&ring->waiting, 0);
}

size_t gf_ring_max_message(const gf_ring *ring) {
  /* Half the area: a message plus the wrap filler before it always fit an empty ring. */
  return ring->cap / 2 - sizeof(gf_record);
}

int gf_ring_write(gf_ring *ring, const struct iovec *iov, int iovcnt) {
  size_t len = 0;
  for (int i = 0; i < iovcnt; i++)
    len += iov[i].iov_len;
  if (len > gf_ring_max_message(ring))
    return -EMSGSIZE;

  uint64_t need = GF_ALIGN8(sizeof(gf_record) + len);
  uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_relaxed);
  uint64_t head = atomic_load_explicit(&ring->head, memory_order_acquire);
  uint64_t at = tail & (ring->cap - 1);
  uint64_t to_end = ring->cap - at;
  uint64_t total = need <= to_end ? need : to_end + need;
  if (ring->cap - (tail - head) < total)
    return -EAGAIN;

  if (need > to_end) {
    gf_record *wrap = (gf_record *)(ring->data + at);
    wrap->len = GF_WRAP;
    at = 0;
  }
  gf_record *rec = (gf_record *)(ring->data + at);
  rec->len = (uint32_t)len;
  unsigned char *dst = (unsigned char *)(rec + 1);
  for (int i = 0; i < iovcnt; i++) {
    memcpy(dst, iov[i].iov_base, iov[i].iov_len);
    dst += iov[i].iov_len;
  }
  atomic_store_explicit(&ring->tail, tail + total, memory_order_release);
  return 0;
}

void gf_ring_wake(gf_ring *ring) {
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load_explicit(&ring->waiting, memory_order_relaxed)) {
    atomic_fetch_add(&ring->wake_seq, 1);
    gf_futex_wake(&ring->wake_seq, 1);
  }
}

int gf_ring_peek_at(gf_ring *ring, uint64_t pos, const void **msg, size_t *len, uint64_t *next) {
  uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_acquire);
  if (pos >= tail)
    return -EAGAIN;
  uint64_t at = pos & (ring->cap - 1);
  const gf_record *rec = (const gf_record *)(ring->data + at);
  if (rec->len == GF_WRAP) {
    pos += ring->cap - at;
    rec = (const gf_record *)ring->data;
  }
  *msg = rec + 1;
  *len = rec->len;
  if (next != NULL)
    *next = pos + GF_ALIGN8(sizeof(gf_record) + rec->len);
  return 0;
}

int gf_ring_peek(gf_ring *ring, const void **msg, size_t *len) {
  uint64_t head = atomic_load_explicit(&ring->head, memory_order_relaxed);
  return gf_ring_peek_at(ring, head, msg, len, NULL);
}

void gf_ring_consume(gf_ring *ring) {
  uint64_t head = atomic_load_explicit(&ring->head, memory_order_relaxed);
  uint64_t next;
  const void *msg;
  size_t len;
  if (gf_ring_peek_at(ring, head, &msg, &len, &next) == 0)
    atomic_store_explicit(&ring->head, next, memory_order_release);
}

int gf_ring_empty(gf_ring *ring) {
  return atomic_load_explicit(&ring->head, memory_order_relaxed) ==
         atomic_load_explicit(&ring->tail, memory_order_acquire);
}

int gf_ring_wait(gf_ring *ring, int64_t spin_ns, int64_t timeout_ns) {
  int64_t start = gf_now_ns();
  int64_t deadline = timeout_ns < 0 ? -1 : start + timeout_ns;
  while (gf_ring_empty(ring)) {
    int64_t now = gf_now_ns();
    if (now - start < spin_ns) {
      gf_spin_step();
      continue;
    }
    if (deadline >= 0 && now >= deadline)
      return -ETIMEDOUT;
    uint32_t seq = atomic_load(&ring->wake_seq);
    atomic_store(&ring->waiting, 1);
    atomic_thread_fence(memory_order_seq_cst);
    if (!gf_ring_empty(ring)) {
      atomic_store(&ring->waiting, 0);
      break;
    }
    int rc = gf_futex_wait(&ring->wake_seq, seq, deadline < 0 ? -1 : deadline - now);
    atomic_store(&ring->waiting, 0);
    if (rc == -EINTR)
      return rc;
  }
  return 0;
}
