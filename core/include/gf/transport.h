/* gilfree transport: shared-memory rings, a block arena for out-of-band buffers, and the
 * wake-up primitives between the pool's parent process and its workers.
 *
 * Everything here lives in one memfd mapped MAP_SHARED by the parent, the template process and
 * every worker (workers inherit the mapping across fork). Offsets, never pointers, cross process
 * boundaries. Functions return 0 or a negative errno.
 */
#ifndef GF_TRANSPORT_H
#define GF_TRANSPORT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define GF_PAGE 4096u
#define GF_CACHELINE 64u

/* ---------------------------------------------------------------- wake-ups */

/* Waits while *word == expected, at most timeout_ns (< 0: forever). Cross-process futex (the word
 * is in MAP_SHARED memory, so FUTEX_PRIVATE_FLAG must not be used). Returns 0 when woken or the
 * value differed, -ETIMEDOUT, or -EINTR when a signal handler ran. */
int gf_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t timeout_ns);
/* Wakes up to n waiters of word. */
void gf_futex_wake(_Atomic uint32_t *word, int n);
/* CLOCK_MONOTONIC in nanoseconds. */
int64_t gf_now_ns(void);
/* What names an open file: fstat's device and inode. Every anonymous-inode descriptor (eventfd,
 * epoll, signalfd...) shares one inode, so for those it tells "still that kind of file" apart
 * from "closed" or "now a regular file, pipe or socket"; a memfd has an inode of its own. */
typedef struct gf_fd_id {
  uint64_t dev, ino;
} gf_fd_id;

/* Records what fd names now. */
int gf_fd_id_get(int fd, gf_fd_id *id);
/* 0 when fd still names the file recorded in id; -EBADFD when it was closed or names another
 * file now (code run in the process closed it, and maybe opened something at its number). An
 * all-zero id is never checked (0). */
int gf_fd_id_check(int fd, const gf_fd_id *id);

/* One pause instruction: spinning politely. */
void gf_cpu_relax(void);
/* One step of a spin-wait: about half a microsecond of pause instructions, then a yield. */
void gf_spin_step(void);

/* ------------------------------------------------------------------- rings */

/* A single-producer single-consumer ring of length-prefixed messages in shared memory.
 * head and tail count bytes ever consumed and produced (they never wrap, u64); the data area
 * is `cap` bytes, a power of two. A message never straddles the end: a wrap record fills the
 * rest of the area instead. Each counter has one writer (tail: producer, head: consumer) and
 * is published with release and read with acquire, so the bytes it covers are visible. */
typedef struct gf_ring {
  _Atomic uint64_t tail; /* written by the producer only */
  char pad0[GF_CACHELINE - 8];
  _Atomic uint64_t head; /* written by the consumer only */
  char pad1[GF_CACHELINE - 8];
  /* The consumer sets waiting before it sleeps on wake_seq; the producer reads waiting after
   * publishing tail. Both sides order the two with a seq_cst fence, so either the producer
   * sees waiting == 1 and wakes, or the consumer sees the new tail and does not sleep. */
  _Atomic uint32_t waiting;
  _Atomic uint32_t wake_seq;
  uint64_t cap; /* set once before any process attaches */
  char pad2[GF_CACHELINE - 16];
  unsigned char data[];
} gf_ring;

/* Bytes of shared memory a ring with a cap-byte data area takes. */
size_t gf_ring_footprint(size_t cap);
/* Lays out an empty ring in mem; cap must be a power of two >= 4096. */
int gf_ring_init(gf_ring *ring, size_t cap);
/* Empties the ring (only when neither end is in use: its worker is dead). */
void gf_ring_reset(gf_ring *ring);
/* Largest message gf_ring_write accepts. */
size_t gf_ring_max_message(const gf_ring *ring);
/* Appends one message made of the iovecs. -EAGAIN: not enough room now; -EMSGSIZE: never fits. */
int gf_ring_write(gf_ring *ring, const struct iovec *iov, int iovcnt);
/* Wakes the consumer if it sleeps; call after gf_ring_write. */
void gf_ring_wake(gf_ring *ring);
/* The oldest message, left in place. -EAGAIN when empty. */
int gf_ring_peek(gf_ring *ring, const void **msg, size_t *len);
/* The message at byte position pos (head <= pos < tail), and the position after it. Used to
 * walk the unconsumed messages of a dead worker. -EAGAIN at tail. */
int gf_ring_peek_at(gf_ring *ring, uint64_t pos, const void **msg, size_t *len, uint64_t *next);
/* Drops the message gf_ring_peek returned. */
void gf_ring_consume(gf_ring *ring);
/* True when no message is waiting. */
int gf_ring_empty(gf_ring *ring);
/* Consumer side: spins up to spin_ns, then sleeps until a message arrives or timeout_ns passes
 * (< 0: forever). Returns 0 when a message is there, -ETIMEDOUT or -EINTR. */
int gf_ring_wait(gf_ring *ring, int64_t spin_ns, int64_t timeout_ns);

/* ------------------------------------------------------------------ arena */

/* Out-of-band buffers live in blocks of the arena. A block is a header page followed by the
 * data, page aligned so that it can be mapped on its own (see gf_arena_map). Any process may
 * hold references; the region's owner allocates and reuses blocks whose count fell to zero. */
typedef struct gf_block {
  uint32_t magic;
  /* Cross-process reference count. A process only increments a block it already holds a
   * reference to, so once it reaches zero nobody can revive it and the owner may reuse it. */
  _Atomic uint32_t refs;
  uint64_t size; /* bytes from this header to the next block; owner-written */
  uint64_t len;  /* data bytes in use; written before the block is published */
} gf_block;

#define GF_BLOCK_MAGIC 0x6766626cu /* "gfbl" */
#define GF_BLOCK_HEADER GF_PAGE
#define GF_BLOCK_MIN (64u * 1024u)

/* Blocks examined from the rover before an allocation bumps `top` instead. */
#define GF_BLOCK_PROBE 32u

/* One allocator's share of the arena. It lives in shared memory (the segment) but only the
 * owning process allocates in it (under its own process-local lock), so every field and the
 * block sizes have one writer and need no atomics; other processes only touch the refs of
 * blocks they hold. Its size is part of the segment's cache-line layout, which the round trip
 * is sensitive to (see gf_segment_ids): the allocator's cursor lives in the owner's memory. */
typedef struct gf_region {
  uint64_t start; /* arena offset of the first block */
  uint64_t size;
  uint64_t top;          /* bytes of the region carved into blocks */
  uint64_t resident;     /* bytes below top known to be backed by pages */
} gf_region;

/* The owning process's allocator over its region (process-local). The cursor is a hint: a
 * replacement worker starts a fresh one over the region its predecessor left. */
typedef struct gf_allocator {
  gf_region *region;
  /* Next fit: the arena offset of the block the next allocation looks at first (or the top:
   * wrap to start). Allocations resume where the last one stopped so that, with tasks
   * completing in submission order, the oldest blocks (the first freed) are looked at first. */
  uint64_t rover;
  /* Arena offset of the block that ends at top, UINT64_MAX when unknown: lets an allocation
   * see in one step that the top block was freed, and lower top. */
  uint64_t last;
} gf_allocator;

/* A process's mapping of the arena (process-local). */
typedef struct gf_arena {
  unsigned char *base;
  uint64_t size;
  int fd;
  uint64_t offset; /* where the arena starts in fd */
  /* What fd named when the arena was mapped (all zero: unchecked). Code run in the process (a
   * task) may close fd or put another file at its number: gf_arena_map and the hole punching
   * check it first, so they never map or punch someone else's file. */
  gf_fd_id fd_id;
} gf_arena;

void gf_region_init(gf_region *region, uint64_t start, uint64_t size);
/* A fresh cursor over region, which the calling process owns from now on. */
void gf_allocator_init(gf_allocator *alloc, gf_region *region);
/* Allocates a block for len bytes with refs = 1 and stores its arena offset in *off.
 * Next fit: the first free block (free neighbours coalesced) that fits among the
 * GF_BLOCK_PROBE blocks from the rover, else a new block at the top; only when the top has no
 * room does it look at every block. -ENOMEM when no free block fits and the top has no room.
 * The caller serialises calls per region. Free pages are given back only while arena->fd
 * still names the arena's memfd (else they stay until the process ends). */
int gf_block_alloc(gf_arena *arena, gf_allocator *alloc, uint64_t len, uint64_t *off);
gf_block *gf_block_at(const gf_arena *arena, uint64_t off);
unsigned char *gf_block_data(const gf_arena *arena, uint64_t off);
/* Adds a reference; the caller must already hold one. */
void gf_block_incref(const gf_arena *arena, uint64_t off);
/* Drops a reference; returns 1 when it was the last. */
int gf_block_decref(const gf_arena *arena, uint64_t off);
/* Validates that off names a block inside the arena (a worker can be killed mid-write). */
int gf_block_check(const gf_arena *arena, uint64_t off);

/* Gives back the pages of every free block's data and of the space above top, for a region
 * nobody allocates in any more (its owner is gone): the live blocks then keep only their own
 * pages. The block headers stay. -EINVAL, stopping there, at a block that does not look whole
 * (an owner killed mid-write); -EBADFD when arena->fd no longer names the arena's memfd. */
int gf_region_trim(const gf_arena *arena, gf_region *region);
/* Copies len bytes into arena memory at dst: pages populated in one call, and large copies
 * split over a few short-lived threads (one per usable CPU, at most 4). */
void gf_arena_fill(unsigned char *dst, const void *src, uint64_t len);
/* Maps the data of block off read-only at a fresh address with `before` bytes of private
 * writable memory just in front of it (before <= GF_PAGE). *data points at the block's data.
 * Lets a process wrap a header of its own around shared bytes. Undo with gf_arena_unmap.
 * -EBADFD when arena->fd no longer names the arena's memfd (the data stay readable at
 * gf_block_data: copy them instead). */
int gf_arena_map(const gf_arena *arena, uint64_t off, size_t before, unsigned char **data);
void gf_arena_unmap(unsigned char *data, uint64_t len);

#endif
