/* GOT slot lookup and rewriting for loaded ELF objects (see gf/got.h). */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gf/got.h"

#if defined(__x86_64__)
#define GF_R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define GF_R_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define GF_R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define GF_R_GLOB_DAT R_AARCH64_GLOB_DAT
#else
#error "gf_got supports x86-64 and aarch64"
#endif

struct gf_got_search {
  const void *object_addr;
  const char *symbol;
  struct gf_got_slot *out;
  int cap;
  int found;     /* slots written to out */
  int matched;   /* 1 once the object containing object_addr was seen */
};

/* ld.so rewrites most d_ptr entries to absolute addresses, but not all; a value below the
 * load base is still relative. */
static uintptr_t gf_got_abs(ElfW(Addr) base, ElfW(Addr) value) {
  return value < base ? base + value : value;
}

static const char *gf_got_version_name(const ElfW(Verneed) *verneed, long verneednum,
                                       const char *strtab, ElfW(Half) index) {
  const ElfW(Verneed) *need = verneed;
  for (long i = 0; need != NULL && i < verneednum; i++) {
    const ElfW(Vernaux) *aux = (const void *)((const char *)need + need->vn_aux);
    for (unsigned j = 0; j < need->vn_cnt; j++) {
      if (aux->vna_other == index)
        return strtab + aux->vna_name;
      aux = (const void *)((const char *)aux + aux->vna_next);
    }
    if (need->vn_next == 0)
      break;
    need = (const void *)((const char *)need + need->vn_next);
  }
  return "";
}

static void gf_got_scan(struct gf_got_search *search, ElfW(Addr) base, const ElfW(Rela) *rela,
                        size_t size, const ElfW(Sym) *symtab, const char *strtab,
                        const ElfW(Half) *versym, const ElfW(Verneed) *verneed,
                        long verneednum) {
  for (size_t i = 0; rela != NULL && i < size / sizeof(*rela); i++) {
    unsigned long type = ELF64_R_TYPE(rela[i].r_info);
    if (type != GF_R_JUMP_SLOT && type != GF_R_GLOB_DAT)
      continue;
    size_t symidx = ELF64_R_SYM(rela[i].r_info);
    if (strcmp(strtab + symtab[symidx].st_name, search->symbol) != 0)
      continue;
    if (search->found == search->cap)
      return;
    struct gf_got_slot *slot = &search->out[search->found++];
    slot->slot = (void **)(base + rela[i].r_offset);
    const char *version =
        versym ? gf_got_version_name(verneed, verneednum, strtab, versym[symidx] & 0x7fff) : "";
    snprintf(slot->version, sizeof(slot->version), "%s", version);
  }
}

static int gf_got_visit(struct dl_phdr_info *info, size_t size, void *arg) {
  struct gf_got_search *search = arg;
  const ElfW(Phdr) *dynamic = NULL;
  int contains = 0;
  uintptr_t target = (uintptr_t)search->object_addr;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    uintptr_t start = info->dlpi_addr + ph->p_vaddr;
    if (ph->p_type == PT_LOAD && target >= start && target < start + ph->p_memsz)
      contains = 1;
    if (ph->p_type == PT_DYNAMIC)
      dynamic = ph;
  }
  if (!contains)
    return 0;
  search->matched = 1;
  if (dynamic == NULL)
    return 1;

  ElfW(Addr) base = info->dlpi_addr;
  const ElfW(Rela) *jmprel = NULL, *rela = NULL;
  size_t jmprel_size = 0, rela_size = 0;
  const ElfW(Sym) *symtab = NULL;
  const char *strtab = NULL;
  const ElfW(Half) *versym = NULL;
  const ElfW(Verneed) *verneed = NULL;
  long verneednum = 0;
  for (const ElfW(Dyn) *d = (const void *)(base + dynamic->p_vaddr); d->d_tag != DT_NULL; d++) {
    switch (d->d_tag) {
    case DT_JMPREL: jmprel = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_PLTRELSZ: jmprel_size = d->d_un.d_val; break;
    case DT_RELA: rela = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_RELASZ: rela_size = d->d_un.d_val; break;
    case DT_SYMTAB: symtab = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_STRTAB: strtab = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_VERSYM: versym = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_VERNEED: verneed = (const void *)gf_got_abs(base, d->d_un.d_ptr); break;
    case DT_VERNEEDNUM: verneednum = (long)d->d_un.d_val; break;
    }
  }
  if (symtab == NULL || strtab == NULL)
    return 1;
  gf_got_scan(search, base, jmprel, jmprel_size, symtab, strtab, versym, verneed, verneednum);
  gf_got_scan(search, base, rela, rela_size, symtab, strtab, versym, verneed, verneednum);
  return 1;
}

int gf_got_find(const void *object_addr, const char *symbol, struct gf_got_slot *out, int cap) {
  struct gf_got_search search = {object_addr, symbol, out, cap, 0, 0};
  dl_iterate_phdr(gf_got_visit, &search);
  if (!search.matched)
    return -ENOENT;
  return search.found;
}

/* The protection of the mapping holding addr, from /proc/self/maps. */
static int gf_got_protection(uintptr_t addr, int *prot) {
  FILE *maps = fopen("/proc/self/maps", "re");
  if (maps == NULL)
    return -errno;
  char line[512];
  int rc = -ENOENT;
  while (fgets(line, sizeof(line), maps) != NULL) {
    unsigned long start, end;
    char perms[5];
    if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) != 3)
      continue;
    if (addr >= start && addr < end) {
      *prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
              (perms[2] == 'x' ? PROT_EXEC : 0);
      rc = 0;
      break;
    }
  }
  fclose(maps);
  return rc;
}

int gf_got_write(void **slot, void *value) {
  int prot;
  int rc = gf_got_protection((uintptr_t)slot, &prot);
  if (rc < 0)
    return rc;
  long pagesize = sysconf(_SC_PAGESIZE);
  void *page = (void *)((uintptr_t)slot & ~(uintptr_t)(pagesize - 1));
  if (!(prot & PROT_WRITE) && mprotect(page, (size_t)pagesize, prot | PROT_WRITE) != 0)
    return -errno;
  /* Other threads may be calling through this slot right now: one aligned store means they
   * see either the old or the new function, never a torn pointer. */
  __atomic_store_n(slot, value, __ATOMIC_RELEASE);
  if (!(prot & PROT_WRITE) && mprotect(page, (size_t)pagesize, prot) != 0)
    return -errno;
  return 0;
}
