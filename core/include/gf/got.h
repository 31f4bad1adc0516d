/* gf_got: find and rewrite the GOT slots an ELF object calls an imported function through.
 * Pure C (glibc, x86-64 and aarch64 RELA objects). Functions return 0/count or a negative errno. */
#ifndef GF_GOT_H
#define GF_GOT_H

#define GF_GOT_VERSION_MAX 32

struct gf_got_slot {
  void **slot;                      /* where the object loads the function's address from */
  char version[GF_GOT_VERSION_MAX]; /* the symbol version it was linked against, "" if none */
};

/* Fills out[] with the JUMP_SLOT/GLOB_DAT slots of `symbol` in the loaded ELF object that
 * contains `object_addr`; returns how many (at most cap). -ENOENT: no object contains it. */
int gf_got_find(const void *object_addr, const char *symbol, struct gf_got_slot *out, int cap);

/* Stores value into slot with one atomic write, lifting a read-only (RELRO) protection of its
 * page for the write and putting it back after. */
int gf_got_write(void **slot, void *value);

#endif
