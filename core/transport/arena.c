/* Block allocator for out-of-band buffers in the shared arena (see gf/transport.h).
 *
 * Next fit over the region's blocks, coalescing free neighbours as it walks: an allocation
 * starts at the rover, where the last one stopped, and takes the first free block that fits
 * among GF_BLOCK_PROBE blocks, else bumps `top`; it walks every block only when the top has
 * no room. Tasks complete roughly in submission order, so the rover finds the oldest (first
 * freed) blocks, and a burst of live blocks costs GF_BLOCK_PROBE looks per allocation, not
 * one per live block. A bump leaves the rover where the probe stopped, so successive
 * allocations sweep the whole region and every free block is found again within a sweep:
 * top grows by at most one block per GF_BLOCK_PROBE blocks looked at while nothing fits.
 * A free run at the top goes back to the space above top, and space beyond GF_KEEP_RESIDENT
 * over the top is punched out of the memfd so that memory returns to the system, while the
 * rest stays warm for the next buffer. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>

#include "gf/transport.h"

#define GF_KEEP_RESIDENT (256ull << 20)
#define GF_PREFAULT_MIN (1ull << 20)
#define GF_FILL_THREADS_MAX 4
#define GF_FILL_PART_MIN (8ull << 20)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define GF_NONE UINT64_MAX
#define GF_PAGE_ALIGN(n) (((n) + GF_PAGE - 1) & ~(uint64_t)(GF_PAGE - 1))

void gf_region_init(gf_region *region, uint64_t start, uint64_t size) {
  region->start = start;
  region->size = size;
  region->top = 0;
  region->resident = 0;
}

void gf_allocator_init(gf_allocator *alloc, gf_region *region) {
  alloc->region = region;
  alloc->rover = region->start;
  alloc->last = GF_NONE;
}

gf_block *gf_block_at(const gf_arena *arena, uint64_t off) {
  return (gf_block *)(arena->base + off);
}

unsigned char *gf_block_data(const gf_arena *arena, uint64_t off) {
  return arena->base + off + GF_BLOCK_HEADER;
}

int gf_block_check(const gf_arena *arena, uint64_t off) {
  if (off % GF_PAGE != 0 || off + GF_BLOCK_HEADER > arena->size)
    return -EINVAL;
  const gf_block *b = gf_block_at(arena, off);
  if (b->magic != GF_BLOCK_MAGIC || b->size > arena->size - off ||
      b->len + GF_BLOCK_HEADER > b->size)
    return -EINVAL;
  return 0;
}

void gf_block_incref(const gf_arena *arena, uint64_t off) {
  atomic_fetch_add_explicit(&gf_block_at(arena, off)->refs, 1, memory_order_relaxed);
}

int gf_block_decref(const gf_arena *arena, uint64_t off) {
  /* acq_rel: our reads of the data happen before the owner may reuse the block. */
  return atomic_fetch_sub_explicit(&gf_block_at(arena, off)->refs, 1, memory_order_acq_rel) == 1;
}

static void gf_block_format(const gf_arena *arena, uint64_t off, uint64_t size) {
  gf_block *b = gf_block_at(arena, off);
  b->magic = GF_BLOCK_MAGIC;
  b->size = size;
  b->len = 0;
  atomic_store_explicit(&b->refs, 0, memory_order_relaxed);
}

static int gf_block_free(const gf_arena *arena, uint64_t off) {
  return atomic_load_explicit(&gf_block_at(arena, off)->refs, memory_order_acquire) == 0;
}

/* Gives back the pages of [start, end) of the arena. -EBADFD, punching nothing, when arena->fd
 * is no longer the memfd: a hole in whatever file sits at its number now would destroy data. */
static int gf_arena_punch(const gf_arena *arena, uint64_t start, uint64_t end) {
  int rc;
  if (end <= start)
    return 0;
  if ((rc = gf_fd_id_check(arena->fd, &arena->fd_id)) < 0)
    return rc;
  fallocate(arena->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            (off_t)(arena->offset + start), (off_t)(end - start));
  return 0;
}

/* Gives back the pages above top + GF_KEEP_RESIDENT. */
static void gf_region_release(const gf_arena *arena, gf_region *region) {
  uint64_t keep = region->top + GF_KEEP_RESIDENT;
  /* Without its memfd the process keeps the pages (they go when it ends). */
  if (region->resident > keep &&
      gf_arena_punch(arena, region->start + keep, region->start + region->resident) == 0)
    region->resident = keep;
  if (region->top > region->resident)
    region->resident = region->top;
}

int gf_region_trim(const gf_arena *arena, gf_region *region) {
  uint64_t start = region->start, size = region->size;
  /* The owner may have died mid-write: trust no field beyond the region's own bounds. */
  if (start % GF_PAGE != 0 || size > arena->size || start > arena->size - size)
    return -EINVAL;
  uint64_t top = region->top < size ? region->top : size;
  uint64_t end = start + top;
  for (uint64_t pos = start; pos < end;) {
    const gf_block *b = gf_block_at(arena, pos);
    if (gf_block_check(arena, pos) < 0 || b->size < GF_BLOCK_HEADER || b->size % GF_PAGE != 0 ||
        b->size > end - pos)
      return -EINVAL; /* the walk cannot go on: what lies beyond is unknown, so keep it */
    int rc;
    if (gf_block_free(arena, pos) &&
        (rc = gf_arena_punch(arena, pos + GF_BLOCK_HEADER, pos + b->size)) < 0)
      return rc;
    pos += b->size;
  }
  int rc = gf_arena_punch(arena, end, start + size);
  if (rc == 0)
    region->resident = top;
  return rc;
}

/* alloc->last if it still names the block that ends at top, else GF_NONE: last is redirected
 * before a merge absorbs its block, cleared before top drops, and set before top grows over a
 * new block, and the check catches a value that went stale anyway. */
static uint64_t gf_allocator_last(const gf_arena *arena, const gf_allocator *alloc) {
  const gf_region *region = alloc->region;
  uint64_t end = region->start + region->top, last = alloc->last;
  if (last < region->start || last >= end || gf_block_at(arena, last)->size != end - last)
    return GF_NONE;
  return last;
}

/* Merges the free blocks that follow the free block at pos, up to end. The rover and last
 * move to pos before their block is absorbed, so they always name a block. */
static void gf_block_coalesce(const gf_arena *arena, gf_allocator *alloc, uint64_t pos,
                              uint64_t end) {
  gf_block *b = gf_block_at(arena, pos);
  while (pos + b->size < end && gf_block_free(arena, pos + b->size)) {
    uint64_t next = pos + b->size;
    if (alloc->rover == next)
      alloc->rover = pos;
    if (alloc->last == next)
      alloc->last = pos;
    b->size += gf_block_at(arena, next)->size;
  }
}

int gf_block_alloc(gf_arena *arena, gf_allocator *alloc, uint64_t len, uint64_t *off) {
  gf_region *region = alloc->region;
  uint64_t size = GF_PAGE_ALIGN(GF_BLOCK_HEADER + len);
  uint64_t start = region->start;

  /* A freed top block goes back above top at once. */
  alloc->last = gf_allocator_last(arena, alloc);
  if (alloc->last != GF_NONE && gf_block_free(arena, alloc->last)) {
    uint64_t last = alloc->last;
    alloc->last = GF_NONE;
    region->top = last - start;
  }
  uint64_t end = start + region->top;
  int room = region->top + size <= region->size;

  /* From the rover, GF_BLOCK_PROBE blocks while the top has room, else once round them all
   * (wrapping at the top, up to where the walk began). */
  uint64_t pos = alloc->rover >= start && alloc->rover < end ? alloc->rover : start;
  uint64_t from = pos, fit = GF_NONE;
  int wrapped = 0;
  for (unsigned seen = 0; !room || seen < GF_BLOCK_PROBE; seen++) {
    if (pos >= end) {
      if (wrapped)
        break;
      wrapped = 1;
      pos = start;
    }
    if (wrapped && pos >= from)
      break;
    gf_block *b = gf_block_at(arena, pos);
    if (gf_block_free(arena, pos)) {
      gf_block_coalesce(arena, alloc, pos, end);
      if (pos + b->size == end) {
        /* A free run at the top: back above top, and the new block starts there. */
        alloc->last = GF_NONE;
        region->top = pos - start;
        end = pos;
        room = region->top + size <= region->size;
        if (room)
          break;
        continue;
      }
      if (b->size >= size) {
        fit = pos;
        break;
      }
    } else if (pos + b->size == end) {
      alloc->last = pos;
    }
    pos += b->size;
  }

  gf_block *b;
  if (fit != GF_NONE) {
    b = gf_block_at(arena, fit);
    if (b->size - size >= GF_BLOCK_MIN + GF_BLOCK_HEADER) {
      gf_block_format(arena, fit + size, b->size - size);
      b->size = size;
    }
    alloc->rover = fit + b->size;
  } else {
    if (!room)
      return -ENOMEM;
    /* Nothing fits near the rover: a new block at the top; the next allocation goes on from
     * where this probe stopped. */
    alloc->rover = pos;
    fit = end;
    gf_block_format(arena, fit, size);
    alloc->last = fit;
    region->top = fit + size - start;
    b = gf_block_at(arena, fit);
  }
  gf_region_release(arena, region);

  b->len = len;
  atomic_store_explicit(&b->refs, 1, memory_order_release);
  *off = fit;
  return 0;
}

int gf_arena_map(const gf_arena *arena, uint64_t off, size_t before, unsigned char **data) {
  const gf_block *b = gf_block_at(arena, off);
  int rc;
  if (before > GF_PAGE)
    return -EINVAL;
  /* Mapping another file at the memfd's number would show its bytes as the block's. */
  if ((rc = gf_fd_id_check(arena->fd, &arena->fd_id)) < 0)
    return rc;
  uint64_t span = GF_PAGE_ALIGN(b->len + 1);
  unsigned char *reserve =
      mmap(NULL, GF_PAGE + span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (reserve == MAP_FAILED)
    return -errno;
  void *shared = mmap(reserve + GF_PAGE, span, PROT_READ, MAP_SHARED | MAP_FIXED, arena->fd,
                      (off_t)(arena->offset + off + GF_BLOCK_HEADER));
  if (shared == MAP_FAILED) {
    int err = errno;
    munmap(reserve, GF_PAGE + span);
    return -err;
  }
  *data = reserve + GF_PAGE;
  return 0;
}

/* Populates [data, data + len) with one system call instead of a page fault per 4 KiB
 * (Linux >= 5.14; older kernels refuse, and the copy faults the pages in as usual). */
static void gf_arena_prefault(unsigned char *data, uint64_t len) {
  if (len >= GF_PREFAULT_MIN) {
    uintptr_t start = (uintptr_t)data & ~(uintptr_t)(GF_PAGE - 1);
    madvise((void *)start, (uintptr_t)data + len - start, MADV_POPULATE_WRITE);
  }
}

typedef struct {
  unsigned char *dst;
  const unsigned char *src;
  uint64_t len;
} gf_fill_part;

static void *gf_fill_run(void *arg) {
  gf_fill_part *part = arg;
  gf_arena_prefault(part->dst, part->len);
  memcpy(part->dst, part->src, part->len);
  return NULL;
}

/* How many threads a copy of len bytes is split over: one per usable CPU, each part at least
 * GF_FILL_PART_MIN (a thread costs tens of microseconds; a MiB copies in about 0.2 ms). */
static int gf_fill_threads(uint64_t len) {
  cpu_set_t cpus;
  if (len < 2 * GF_FILL_PART_MIN)
    return 1; /* the common case, without the system call */
  int n = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  if (n > GF_FILL_THREADS_MAX)
    n = GF_FILL_THREADS_MAX;
  while (n > 1 && len / (uint64_t)n < GF_FILL_PART_MIN)
    n--;
  return n;
}

void gf_arena_fill(unsigned char *dst, const void *src, uint64_t len) {
  /* One core copies into shared memory at about 6 GB/s here; page faults and memory
   * bandwidth both scale with a second thread, so large copies are split. */
  gf_fill_part parts[GF_FILL_THREADS_MAX];
  pthread_t threads[GF_FILL_THREADS_MAX];
  int n = gf_fill_threads(len), started = 0;
  uint64_t step = (len / (uint64_t)n) & ~(uint64_t)(GF_PAGE - 1);
  for (int i = 0; i < n; i++) {
    parts[i].dst = dst + (uint64_t)i * step;
    parts[i].src = (const unsigned char *)src + (uint64_t)i * step;
    parts[i].len = i == n - 1 ? len - (uint64_t)i * step : step;
  }
  /* Parts 1..n-1 on helper threads; a part whose thread cannot start is copied here. */
  for (int i = 1; i < n; i++) {
    if (pthread_create(&threads[i], NULL, gf_fill_run, &parts[i]) != 0)
      gf_fill_run(&parts[i]);
    else
      started |= 1 << i;
  }
  gf_fill_run(&parts[0]);
  for (int i = 1; i < n; i++)
    if (started & (1 << i))
      pthread_join(threads[i], NULL);
}

void gf_arena_unmap(unsigned char *data, uint64_t len) {
  munmap(data - GF_PAGE, GF_PAGE + GF_PAGE_ALIGN(len + 1));
}
