/* Unit tests of core/transport: rings, arena blocks, futex wake-ups. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gf/transport.h"
#include "gf_test.h"

static gf_ring *ring_new(size_t cap) {
  gf_ring *ring = aligned_alloc(GF_CACHELINE, gf_ring_footprint(cap));
  gf_ring_init(ring, cap);
  return ring;
}

GF_TEST(ring_rejects_bad_capacity) {
  gf_ring ring;
  GF_CHECK_EQ(gf_ring_init(&ring, 1000), -EINVAL);
  GF_CHECK_EQ(gf_ring_init(&ring, 1024), -EINVAL);
}

GF_TEST(ring_fifo_and_wrap) {
  gf_ring *ring = ring_new(4096);
  char out[600];
  /* Many more bytes than the capacity: messages must wrap and come out in order. */
  for (int i = 0; i < 200; i++) {
    size_t len = (size_t)(i * 37) % 500 + 1;
    memset(out, 'a' + i % 26, len);
    struct iovec iov = {out, len};
    GF_CHECK_EQ(gf_ring_write(ring, &iov, 1), 0);
    const void *msg;
    size_t got;
    GF_CHECK_EQ(gf_ring_peek(ring, &msg, &got), 0);
    GF_CHECK_EQ(got, len);
    GF_CHECK(memcmp(msg, out, len) == 0);
    gf_ring_consume(ring);
    GF_CHECK(gf_ring_empty(ring));
  }
  free(ring);
}

GF_TEST(ring_full_and_too_big) {
  gf_ring *ring = ring_new(4096);
  char buf[1000] = {0};
  struct iovec iov = {buf, sizeof(buf)};
  int written = 0;
  while (gf_ring_write(ring, &iov, 1) == 0)
    written++;
  GF_CHECK_EQ(written, 4);
  GF_CHECK_EQ(gf_ring_write(ring, &iov, 1), -EAGAIN);
  struct iovec huge = {buf, gf_ring_max_message(ring) + 1};
  GF_CHECK_EQ(gf_ring_write(ring, &huge, 1), -EMSGSIZE);
  free(ring);
}

GF_TEST(ring_gather_write_and_walk) {
  gf_ring *ring = ring_new(4096);
  struct iovec iov[2] = {{"head", 4}, {"-tail", 5}};
  GF_CHECK_EQ(gf_ring_write(ring, iov, 2), 0);
  GF_CHECK_EQ(gf_ring_write(ring, iov, 1), 0);
  const void *msg;
  size_t len;
  uint64_t pos = 0, next;
  GF_CHECK_EQ(gf_ring_peek_at(ring, pos, &msg, &len, &next), 0);
  GF_CHECK(len == 9 && memcmp(msg, "head-tail", 9) == 0);
  GF_CHECK_EQ(gf_ring_peek_at(ring, next, &msg, &len, &next), 0);
  GF_CHECK(len == 4 && memcmp(msg, "head", 4) == 0);
  GF_CHECK_EQ(gf_ring_peek_at(ring, next, &msg, &len, &next), -EAGAIN);
  free(ring);
}

GF_TEST(ring_wait_times_out) {
  gf_ring *ring = ring_new(4096);
  int64_t start = gf_now_ns();
  GF_CHECK_EQ(gf_ring_wait(ring, 1000, 20000000), -ETIMEDOUT);
  GF_CHECK(gf_now_ns() - start >= 20000000);
  free(ring);
}

struct producer_arg {
  gf_ring *ring;
  int count;
};

static void *producer(void *p) {
  struct producer_arg *arg = p;
  for (int i = 0; i < arg->count; i++) {
    struct iovec iov = {&i, sizeof(i)};
    while (gf_ring_write(arg->ring, &iov, 1) == -EAGAIN)
      gf_cpu_relax();
    gf_ring_wake(arg->ring);
    if (i % 1000 == 0)
      usleep(200); /* let the consumer fall asleep now and then */
  }
  return NULL;
}

GF_TEST(ring_two_threads_no_lost_wakeups) {
  gf_ring *ring = ring_new(4096);
  struct producer_arg arg = {ring, 100000};
  pthread_t t;
  pthread_create(&t, NULL, producer, &arg);
  for (int expect = 0; expect < arg.count; expect++) {
    /* No spinning: every wait that finds the ring empty goes to sleep on the futex. */
    GF_CHECK_EQ(gf_ring_wait(ring, 0, 5000000000LL), 0);
    const void *msg;
    size_t len;
    GF_CHECK_EQ(gf_ring_peek(ring, &msg, &len), 0);
    GF_CHECK_EQ(*(const int *)msg, expect);
    gf_ring_consume(ring);
  }
  pthread_join(t, NULL);
  free(ring);
}

static int arena_new(gf_arena *arena, gf_region *region, gf_allocator *alloc, uint64_t size) {
  int fd = memfd_create("gf-test", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
    return -1;
  arena->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  arena->size = size;
  arena->fd = fd;
  arena->offset = 0;
  gf_region_init(region, 0, size);
  gf_allocator_init(alloc, region);
  if (gf_fd_id_get(fd, &arena->fd_id) < 0)
    return -1;
  return arena->base == MAP_FAILED ? -1 : 0;
}

static void arena_free(gf_arena *arena) {
  munmap(arena->base, arena->size);
  close(arena->fd);
}

GF_TEST(arena_alloc_reuse_and_coalesce) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  uint64_t a, b, c, d;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 100000, &a), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 100000, &b), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 100000, &c), 0);
  GF_CHECK(a != b && b != c);
  GF_CHECK_EQ(gf_block_check(&arena, b), 0);
  GF_CHECK_EQ(gf_block_at(&arena, b)->len, 100000);
  memset(gf_block_data(&arena, b), 7, 100000);
  /* Freeing the first two lets a block of twice the size reuse their space. */
  GF_CHECK_EQ(gf_block_decref(&arena, a), 1);
  gf_block_incref(&arena, b);
  GF_CHECK_EQ(gf_block_decref(&arena, b), 0);
  GF_CHECK_EQ(gf_block_decref(&arena, b), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 200000, &d), 0);
  GF_CHECK_EQ(d, a);
  GF_CHECK_EQ(gf_block_check(&arena, c), 0);
  GF_CHECK_EQ(gf_block_check(&arena, 12345), -EINVAL);
  arena_free(&arena);
}

GF_TEST(arena_full_region) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 1u << 20), 0);
  uint64_t off;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 2u << 20, &off), -ENOMEM);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 500000, &off), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 600000, &off), -ENOMEM);
  arena_free(&arena);
}

GF_TEST(arena_steady_churn_stays_bounded) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 256u << 20), 0);
  uint64_t live[8] = {0};
  unsigned seed = 1;
  for (int i = 0; i < 5000; i++) {
    int k = i % 8;
    if (live[k])
      gf_block_decref(&arena, live[k]);
    uint64_t len = 65536 + (uint64_t)(rand_r(&seed) % (4u << 20));
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, len, &live[k]), 0);
  }
  /* Eight live blocks of at most ~4 MiB never need more than a few dozen MiB. */
  GF_CHECK(region.top < (96u << 20));
  arena_free(&arena);
}

#define SMALL 65536u                          /* one block: a header page and 64 KiB */
#define SMALL_BLOCK (GF_BLOCK_HEADER + SMALL)

/* Blocks from the one at `from` up to the one at `to`, following the block sizes and wrapping
 * at the top; stops counting at limit. */
static unsigned blocks_between(const gf_arena *arena, const gf_region *region, uint64_t from,
                               uint64_t to, unsigned limit) {
  uint64_t end = region->start + region->top;
  unsigned n = 0;
  while (from != to && n < limit) {
    if (from >= end) {
      from = region->start;
    } else {
      from += gf_block_at(arena, from)->size;
      n++;
    }
  }
  return n;
}

GF_TEST(arena_fifo_reuse_keeps_top_bounded) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 256u << 20), 0);
  /* Sixteen tasks in flight, completing in submission order: each allocation happens while
   * the oldest is still live, then the oldest is freed. */
  enum { INFLIGHT = 16 };
  static uint64_t ring[INFLIGHT];
  for (int i = 0; i < 20000; i++) {
    uint64_t off, rover = alloc.rover;
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), 0);
    if (i >= 4 * INFLIGHT) /* steady state: the first or second block looked at fits */
      GF_CHECK(blocks_between(&arena, &region, rover, alloc.rover, 8) <= 2);
    if (i >= INFLIGHT)
      GF_CHECK_EQ(gf_block_decref(&arena, ring[i % INFLIGHT]), 1);
    ring[i % INFLIGHT] = off;
  }
  /* Freed space is reused: 17 blocks are live at most, plus the ones a probe skipped. */
  GF_CHECK(region.top <= (INFLIGHT + 1 + 2) * SMALL_BLOCK);
  GF_CHECK(region.resident <= region.top + (256u << 20));
  arena_free(&arena);
}

GF_TEST(arena_burst_probes_a_bounded_number_of_blocks) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 512u << 20), 0);
  /* A submit burst: everything stays live. An allocation looks at no more than
   * GF_BLOCK_PROBE blocks from the rover (where it resumes) before bumping the top (the rover
   * may wrap past the new block there: one more). */
  enum { BURST = 4000 };
  static uint64_t offs[BURST];
  for (int i = 0; i < BURST; i++) {
    uint64_t rover = alloc.rover;
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &offs[i]), 0);
    GF_CHECK(blocks_between(&arena, &region, rover, alloc.rover, BURST) <= GF_BLOCK_PROBE + 1);
    GF_CHECK_EQ(offs[i], region.start + (uint64_t)i * SMALL_BLOCK); /* bumped, no gaps */
  }
  GF_CHECK_EQ(region.top, BURST * SMALL_BLOCK);
  /* Then the tasks complete: the next burst reuses the space instead of growing the top. */
  for (int i = 0; i < BURST; i++)
    GF_CHECK_EQ(gf_block_decref(&arena, offs[i]), 1);
  for (int i = 0; i < BURST; i++) {
    uint64_t rover = alloc.rover;
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &offs[i]), 0);
    GF_CHECK(blocks_between(&arena, &region, rover, alloc.rover, BURST) <= GF_BLOCK_PROBE + 1);
  }
  GF_CHECK(region.top <= BURST * SMALL_BLOCK);
  arena_free(&arena);
}

GF_TEST(arena_sweeps_past_long_lived_blocks) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 1u << 30), 0);
  /* Blocks held for good (pool.share() data, results kept) in front of steady churn of mixed
   * sizes: the probes that find nothing near them must not make the top grow for ever. */
  uint64_t off;
  for (int i = 0; i < 200; i++)
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), 0);
  uint64_t held = region.top;
  static uint64_t live[8];
  unsigned seed = 7;
  for (int i = 0; i < 20000; i++) {
    int k = i % 8;
    if (live[k])
      gf_block_decref(&arena, live[k]);
    uint64_t len = SMALL + (uint64_t)(rand_r(&seed) % (1u << 20));
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, len, &live[k]), 0);
  }
  GF_CHECK(region.top < held + (24u << 20)); /* eight live blocks of at most ~1 MiB */
  arena_free(&arena);
}

GF_TEST(arena_coalesces_across_the_rover) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  uint64_t b[5], off;
  for (int i = 0; i < 5; i++)
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &b[i]), 0);
  /* Free the middle three; the rover stands on one of them. */
  alloc.rover = b[2];
  for (int i = 1; i < 4; i++)
    GF_CHECK_EQ(gf_block_decref(&arena, b[i]), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 2 * SMALL_BLOCK - GF_BLOCK_HEADER, &off), 0);
  GF_CHECK_EQ(off, b[2]); /* from the rover: b[2] and b[3] merged */
  GF_CHECK_EQ(gf_block_decref(&arena, off), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 3 * SMALL_BLOCK - GF_BLOCK_HEADER, &off), 0);
  GF_CHECK_EQ(off, b[1]); /* b[1] merged with the rest into one block of three */
  GF_CHECK_EQ(region.top, 5 * SMALL_BLOCK);
  GF_CHECK_EQ(gf_block_check(&arena, b[4]), 0);
  arena_free(&arena);
}

GF_TEST(arena_free_top_block_lowers_top) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  uint64_t a, b, c, d;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &a), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &b), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 4u << 20, &c), 0);
  GF_CHECK_EQ(gf_block_decref(&arena, c), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &d), 0);
  GF_CHECK_EQ(d, c);
  GF_CHECK_EQ(region.top, 3 * SMALL_BLOCK); /* not the 4 MiB block's end */
  /* Free runs at the top go too. */
  GF_CHECK_EQ(gf_block_decref(&arena, d), 1);
  GF_CHECK_EQ(gf_block_decref(&arena, b), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 2 * SMALL, &d), 0);
  GF_CHECK_EQ(d, b);
  GF_CHECK_EQ(region.top, SMALL_BLOCK + GF_BLOCK_HEADER + 2 * SMALL);
  arena_free(&arena);
}

GF_TEST(arena_ignores_a_stale_last_block) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  uint64_t a, b, off;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &a), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &b), 0);
  GF_CHECK_EQ(gf_block_decref(&arena, a), 1);
  /* A worker killed mid-allocation can leave its replacement a `last` that no longer ends at
   * top: dropping the top to it would hand out the live block above. */
  alloc.last = a;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 2 * SMALL_BLOCK, &off), 0);
  GF_CHECK(off != a && off != b);
  GF_CHECK_EQ(off, 2 * SMALL_BLOCK);
  GF_CHECK_EQ(gf_block_check(&arena, b), 0);
  arena_free(&arena);
}

GF_TEST(arena_full_walk_when_the_top_has_no_room) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 100 * SMALL_BLOCK), 0);
  static uint64_t offs[100];
  uint64_t off;
  for (int i = 0; i < 100; i++)
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &offs[i]), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), -ENOMEM);
  /* Two lone free blocks far from the rover: one fits, a double one does not. */
  alloc.rover = offs[90];
  GF_CHECK_EQ(gf_block_decref(&arena, offs[10]), 1);
  GF_CHECK_EQ(gf_block_decref(&arena, offs[50]), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 2 * SMALL, &off), -ENOMEM);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), 0);
  GF_CHECK_EQ(off, offs[10]);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), 0);
  GF_CHECK_EQ(off, offs[50]);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), -ENOMEM);
  arena_free(&arena);
}

GF_TEST(arena_punches_pages_beyond_the_kept_slack) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 1u << 30), 0);
  static uint64_t offs[24];
  uint64_t off;
  for (int i = 0; i < 24; i++) /* 384 MiB live, data pages never touched */
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 16u << 20, &offs[i]), 0);
  GF_CHECK(region.resident >= 384u << 20);
  for (int i = 0; i < 24; i++)
    GF_CHECK_EQ(gf_block_decref(&arena, offs[i]), 1);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &off), 0);
  GF_CHECK_EQ(region.top, SMALL_BLOCK);
  GF_CHECK_EQ(region.resident, SMALL_BLOCK + (256u << 20));
  arena_free(&arena);
}

/* Bytes of the arena's memfd backed by pages. */
static uint64_t arena_backed(const gf_arena *arena) {
  struct stat st;
  return fstat(arena->fd, &st) == 0 ? (uint64_t)st.st_blocks * 512u : UINT64_MAX;
}

GF_TEST(arena_trim_leaves_live_blocks_their_own_pages) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  uint64_t kept[2], dropped[2];
  for (int i = 0; i < 2; i++) { /* kept, dropped, kept, dropped: the last one at the top */
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &kept[i]), 0);
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 8u << 20, &dropped[i]), 0);
    memset(gf_block_data(&arena, kept[i]), 'k', SMALL);
    memset(gf_block_data(&arena, dropped[i]), 'd', 8u << 20);
  }
  for (int i = 0; i < 2; i++)
    GF_CHECK_EQ(gf_block_decref(&arena, dropped[i]), 1);
  GF_CHECK(arena_backed(&arena) >= 16u << 20);
  GF_CHECK_EQ(gf_region_trim(&arena, &region), 0);
  /* The kept blocks and the four headers. */
  GF_CHECK(arena_backed(&arena) <= 2 * SMALL_BLOCK + 2 * GF_BLOCK_HEADER);
  GF_CHECK_EQ(region.resident, region.top);
  for (int i = 0; i < 2; i++) {
    GF_CHECK_EQ(gf_block_check(&arena, kept[i]), 0);
    GF_CHECK_EQ(gf_block_data(&arena, kept[i])[SMALL - 1], 'k');
  }
  /* A later allocation still finds the trimmed blocks (their headers stayed). */
  uint64_t again;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 1u << 20, &again), 0);
  GF_CHECK(again == dropped[0] || again == dropped[1]);
  arena_free(&arena);
}

GF_TEST(arena_trim_stops_at_a_torn_block) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 32u << 20), 0);
  uint64_t before, torn, after;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 4u << 20, &before), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, SMALL, &torn), 0);
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 4u << 20, &after), 0);
  memset(gf_block_data(&arena, before), 1, 4u << 20);
  memset(gf_block_data(&arena, after), 1, 4u << 20);
  GF_CHECK_EQ(gf_block_decref(&arena, before), 1);
  GF_CHECK_EQ(gf_block_decref(&arena, after), 1);
  gf_block_at(&arena, torn)->magic = 0; /* an owner killed while formatting it */
  GF_CHECK_EQ(gf_region_trim(&arena, &region), -EINVAL);
  /* The block before the tear gave its pages back; the one after kept its own. */
  uint64_t backed = arena_backed(&arena);
  GF_CHECK(backed >= 4u << 20 && backed < (4u << 20) + (1u << 20));
  GF_CHECK_EQ(gf_block_data(&arena, after)[0], 1);
  arena_free(&arena);
}

GF_TEST(arena_map_private_header) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 8u << 20), 0);
  uint64_t off;
  GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, 70000, &off), 0);
  memset(gf_block_data(&arena, off), 'x', 70000);
  gf_block_data(&arena, off)[70000] = 0;
  gf_block_at(&arena, off)->len = 70000;
  unsigned char *data;
  GF_CHECK_EQ(gf_arena_map(&arena, off, 32, &data), 0);
  GF_CHECK(data[0] == 'x' && data[69999] == 'x' && data[70000] == 0);
  memset(data - 32, 0, 32); /* the header bytes in front are private and writable */
  gf_block_data(&arena, off)[1] = 'y';
  GF_CHECK(data[1] == 'y'); /* and the data is the shared block itself */
  gf_arena_unmap(data, 70000);
  arena_free(&arena);
}

GF_TEST(arena_fill_copies_every_byte) {
  gf_arena arena;
  gf_region region;
  gf_allocator alloc;
  GF_CHECK_EQ(arena_new(&arena, &region, &alloc, 64u << 20), 0);
  /* Sizes below, at and well above the split threshold, with odd lengths: every part of a
   * split copy must land at its place and the last part take the remainder. */
  const uint64_t sizes[] = {0, 1, 4097, (8u << 20) - 3, (16u << 20) + 12345, (40u << 20) + 1};
  unsigned char *src = malloc(41u << 20);
  GF_CHECK(src != NULL);
  for (uint64_t i = 0; i < (41u << 20); i++)
    src[i] = (unsigned char)(i * 2654435761u >> 13);
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    uint64_t off;
    GF_CHECK_EQ(gf_block_alloc(&arena, &alloc, sizes[k] + 1, &off), 0);
    unsigned char *dst = gf_block_data(&arena, off);
    dst[sizes[k]] = 0xA5;
    gf_arena_fill(dst, src + k, sizes[k]);
    GF_CHECK(memcmp(dst, src + k, sizes[k]) == 0);
    GF_CHECK_EQ(dst[sizes[k]], 0xA5); /* nothing written past the end */
    GF_CHECK_EQ(gf_block_decref(&arena, off), 1);
  }
  free(src);
  arena_free(&arena);
}
