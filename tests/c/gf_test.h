/* A tiny unit-test runner: GF_TEST(name) { ... } registers a test; GF_CHECK fails it. */
#ifndef GF_TEST_H
#define GF_TEST_H

#include <stdio.h>

typedef void (*gf_test_fn)(int *failed);

void gf_test_register(const char *name, gf_test_fn fn);

#define GF_TEST(name)                                                          \
  static void gf_test_##name(int *gf_failed);                                  \
  __attribute__((constructor)) static void gf_test_register_##name(void) {     \
    gf_test_register(#name, gf_test_##name);                                   \
  }                                                                            \
  static void gf_test_##name(int *gf_failed)

#define GF_CHECK(cond)                                                         \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      *gf_failed = 1;                                                          \
      return;                                                                  \
    }                                                                          \
  } while (0)

#define GF_CHECK_EQ(a, b)                                                      \
  do {                                                                         \
    long long gf_a_ = (long long)(a), gf_b_ = (long long)(b);                  \
    if (gf_a_ != gf_b_) {                                                      \
      fprintf(stderr, "  %s:%d: %s == %s failed: %lld != %lld\n", __FILE__,    \
              __LINE__, #a, #b, gf_a_, gf_b_);                                 \
      *gf_failed = 1;                                                          \
      return;                                                                  \
    }                                                                          \
  } while (0)

#endif
