/* The shared segment: header, one slot per worker, their rings; the arena follows it. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gf/workers.h"

#define GF_PAGE_ALIGN(n) (((n) + GF_PAGE - 1) & ~(size_t)(GF_PAGE - 1))

static size_t gf_slots_end(uint32_t nslots) {
  return GF_PAGE_ALIGN(sizeof(gf_segment) + nslots * sizeof(gf_slot) + sizeof(gf_segment_ids));
}

gf_segment_ids *gf_segment_ids_of(gf_segment *seg) {
  /* Right after the last slot; gf_slot's size is a multiple of 8. */
  return (gf_segment_ids *)((unsigned char *)seg + sizeof(gf_segment) +
                            seg->nslots * sizeof(gf_slot));
}

size_t gf_segment_footprint(uint32_t nslots, size_t ring_cap) {
  return gf_slots_end(nslots) + 2u * nslots * GF_PAGE_ALIGN(gf_ring_footprint(ring_cap));
}

int gf_segment_init(gf_segment *seg, uint32_t nslots, size_t ring_cap, uint64_t arena_size) {
  int rc;
  size_t ring_bytes = GF_PAGE_ALIGN(gf_ring_footprint(ring_cap));
  memset(seg, 0, gf_slots_end(nslots));
  seg->magic = GF_SEGMENT_MAGIC;
  seg->nslots = nslots;
  seg->size = gf_segment_footprint(nslots, ring_cap);
  seg->arena_size = arena_size;
  seg->parent_pid = getpid();
  seg->doorbell_fd = -1;

  /* The parent sends every task argument; workers send results: half and half. */
  uint64_t parent_share = (arena_size / 2) & ~(uint64_t)(GF_PAGE - 1);
  uint64_t slot_share = ((arena_size - parent_share) / nslots) & ~(uint64_t)(GF_PAGE - 1);
  /* Offset 0 is never a block: 0 marks an empty holdings entry. */
  gf_region_init(&seg->parent_region, GF_PAGE, parent_share - GF_PAGE);

  size_t at = gf_slots_end(nslots);
  for (uint32_t i = 0; i < nslots; i++) {
    gf_slot *slot = &seg->slots[i];
    slot->req_off = at;
    if ((rc = gf_ring_init((gf_ring *)((unsigned char *)seg + at), ring_cap)) < 0)
      goto error;
    at += ring_bytes;
    slot->resp_off = at;
    if ((rc = gf_ring_init((gf_ring *)((unsigned char *)seg + at), ring_cap)) < 0)
      goto error;
    at += ring_bytes;
    gf_region_init(&slot->region, parent_share + i * slot_share, slot_share);
  }
  return 0;

error:
  return rc;
}

gf_ring *gf_slot_requests(gf_segment *seg, uint32_t slot) {
  return (gf_ring *)((unsigned char *)seg + seg->slots[slot].req_off);
}

gf_ring *gf_slot_responses(gf_segment *seg, uint32_t slot) {
  return (gf_ring *)((unsigned char *)seg + seg->slots[slot].resp_off);
}

int gf_shm_create(size_t seg_size, uint64_t arena_size, int *fd_out, unsigned char **map_out) {
  int rc;
  int fd = memfd_create("gilfree", MFD_CLOEXEC);
  if (fd < 0)
    return -errno;
  /* Sparse: tmpfs allocates pages only when they are touched. */
  if (ftruncate(fd, (off_t)(seg_size + arena_size)) < 0) {
    rc = -errno;
    goto error;
  }
  void *map = mmap(NULL, seg_size + arena_size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (map == MAP_FAILED) {
    rc = -errno;
    goto error;
  }
  *fd_out = fd;
  *map_out = map;
  return 0;

error:
  close(fd);
  return rc;
}

int gf_shm_attach(int fd, unsigned char **map_out, size_t *size_out) {
  struct stat st;
  if (fstat(fd, &st) < 0)
    return -errno;
  void *map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                   fd, 0);
  if (map == MAP_FAILED)
    return -errno;
  if (((gf_segment *)map)->magic != GF_SEGMENT_MAGIC) {
    munmap(map, (size_t)st.st_size);
    return -EINVAL;
  }
  *map_out = map;
  *size_out = (size_t)st.st_size;
  return 0;
}
