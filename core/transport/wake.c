/* Futex wake-ups and clocks shared by the rings and the worker manager. */
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "gf/transport.h"

int64_t gf_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void gf_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

void gf_spin_step(void) {
  for (int i = 0; i < 32; i++)
    gf_cpu_relax();
  /* Both ends of a ring can land on one CPU: a spinner there would keep the other end, whose
   * message it waits for, off the CPU until its time slice ends (measured: a round trip of
   * 150 us instead of 35). A yield lets it run, and costs a fraction of a microsecond when
   * nobody else wants the CPU. */
  sched_yield();
}

int gf_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts, *tsp = NULL;
  if (timeout_ns >= 0) {
    ts.tv_sec = timeout_ns / 1000000000;
    ts.tv_nsec = timeout_ns % 1000000000;
    tsp = &ts;
  }
  /* Shared futex: the word lives in memory mapped by several processes. */
  if (syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, tsp, NULL, 0) == 0)
    return 0;
  if (errno == EAGAIN)
    return 0;
  return -errno;
}

void gf_futex_wake(_Atomic uint32_t *word, int n) {
  syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

int gf_fd_id_get(int fd, gf_fd_id *id) {
  struct stat st;
  if (fstat(fd, &st) < 0)
    return -errno;
  id->dev = (uint64_t)st.st_dev;
  id->ino = (uint64_t)st.st_ino;
  return 0;
}

int gf_fd_id_check(int fd, const gf_fd_id *id) {
  gf_fd_id now;
  if (id->dev == 0 && id->ino == 0)
    return 0;
  if (gf_fd_id_get(fd, &now) < 0 || now.dev != id->dev || now.ino != id->ino)
    return -EBADFD;
  return 0;
}
