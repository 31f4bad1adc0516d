/* Runs every GF_TEST registered by the test files linked in; prints "N passed, N failed". */
#include <stdlib.h>
#include <string.h>

#include "gf_test.h"

#define GF_MAX_TESTS 512

static struct {
  const char *name;
  gf_test_fn fn;
} tests[GF_MAX_TESTS];
static int ntests;

void gf_test_register(const char *name, gf_test_fn fn) {
  if (ntests == GF_MAX_TESTS) {
    fprintf(stderr, "too many tests\n");
    abort();
  }
  tests[ntests].name = name;
  tests[ntests].fn = fn;
  ntests++;
}

int main(int argc, char **argv) {
  int passed = 0, failed = 0;
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (int i = 0; i < ntests; i++) {
    if (argc > 1 && strstr(tests[i].name, argv[1]) == NULL)
      continue;
    int test_failed = 0;
    tests[i].fn(&test_failed);
    printf("%s %s\n", test_failed ? "FAIL" : "ok  ", tests[i].name);
    if (test_failed)
      failed++;
    else
      passed++;
  }
  printf("ctests: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
