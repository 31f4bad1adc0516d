/* Process start-up. gf_spawn follows CPython's Modules/_posixsubprocess.c: everything is
 * prepared before forking (_Fork: no atfork handlers run), the child makes only
 * async-signal-safe calls, and an exec failure travels back through a close-on-exec pipe. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gf/workers.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static int gf_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

/* _Fork (glibc 2.34+, declared in <unistd.h> with _GNU_SOURCE) forks without running the
 * pthread_atfork handlers: fork() would run the child handlers (gilhook's frees and unmaps) in
 * the child of a multithreaded parent, which are not async-signal-safe. Built against an older
 * glibc (or another libc) fork() is all there is. */
#if defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 34)
#define GF_FORK() _Fork()
#endif
#endif
#ifndef GF_FORK
#define GF_FORK() fork()
#endif

/* Runs in the forked child: async-signal-safe calls only. Never returns. */
static void gf_spawn_child(int errpipe, const char *path, char *const argv[], char *const envp[],
                           const int *keep_fds, int nkeep) {
  int err;
  sigset_t all;
  struct sigaction dfl;
  /* Close-on-exec for everything above stderr, then clear it for the descriptors we pass. */
  if (syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC) < 0) {
    for (int fd = 3; fd < 1024; fd++)
      if (fd != errpipe)
        fcntl(fd, F_SETFD, FD_CLOEXEC);
  }
  fcntl(errpipe, F_SETFD, FD_CLOEXEC);
  for (int i = 0; i < nkeep; i++)
    if (fcntl(keep_fds[i], F_SETFD, 0) < 0)
      goto error;
  /* A new session: the terminal's SIGINT goes to the user's program, which shuts the pool
   * down; workers never see a half-handled Ctrl-C. */
  if (setsid() < 0)
    goto error;
  /* exec resets caught signals but keeps ignored ones (CPython ignores SIGPIPE). */
  memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; sig++)
    sigaction(sig, &dfl, NULL);
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, NULL);
  execve(path, argv, envp);

error:
  err = errno;
  while (write(errpipe, &err, sizeof(err)) < 0 && errno == EINTR)
    ;
  _exit(127);
}

int gf_spawn(const char *path, char *const argv[], char *const envp[], const int *keep_fds,
             int nkeep, pid_t *pid_out, int *pidfd_out) {
  int rc, pipefd[2], child_err = 0;
  sigset_t all, old;
  if (pipe2(pipefd, O_CLOEXEC) < 0)
    return -errno;
  /* Block signals across fork so no handler of the parent's runs in the child before exec. */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pid_t pid = GF_FORK();
  if (pid == 0)
    gf_spawn_child(pipefd[1], path, argv, envp, keep_fds, nkeep);
  rc = pid < 0 ? -errno : 0;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  close(pipefd[1]);
  if (rc < 0)
    goto error;

  ssize_t n;
  while ((n = read(pipefd[0], &child_err, sizeof(child_err))) < 0 && errno == EINTR)
    ;
  if (n > 0) {
    rc = -child_err;
    waitpid(pid, NULL, 0);
    goto error;
  }
  int pidfd = gf_pidfd_open(pid);
  if (pidfd < 0) {
    rc = -errno;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    goto error;
  }
  fcntl(pidfd, F_SETFD, FD_CLOEXEC);
  *pid_out = pid;
  *pidfd_out = pidfd;
  close(pipefd[0]);
  return 0;

error:
  close(pipefd[0]);
  return rc;
}

int gf_worker_child_setup(pid_t parent) {
  /* The template is single-threaded, so "parent thread died" means the template died. */
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
    return -errno;
  if (getppid() != parent)
    return -ESRCH;
  return 0;
}

int gf_rss_bytes(uint64_t *rss) {
  char buf[128];
  unsigned long long size, resident, shared;
  int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return -errno;
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0)
    return -EIO;
  buf[n] = '\0';
  if (sscanf(buf, "%llu %llu %llu", &size, &resident, &shared) != 3)
    return -EIO;
  *rss = (resident - shared) * (uint64_t)sysconf(_SC_PAGESIZE);
  return 0;
}
