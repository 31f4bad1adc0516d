/* Unit tests of core/workers: dispatch, results and crash recovery, with this process playing
 * both the template (through the control socket) and the worker (through a gf_worker). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gf/workers.h"
#include "gf_test.h"

typedef struct {
  int results, deaths;
  uint64_t last_task, died_task;
  int timed_out;
} seen;

static int record(void *ctx, const gf_event *ev) {
  seen *s = ctx;
  if (ev->kind == GF_EV_RESULT) {
    s->results++;
    s->last_task = ev->task_id;
  } else if (ev->kind == GF_EV_DIED) {
    s->deaths++;
    s->died_task = ev->task_id;
    s->timed_out = ev->timed_out;
  }
  return 0;
}

static int submit(gf_manager *m, uint64_t id) {
  gf_msg hdr = {.task_id = id, .kind = GF_MSG_TASK, .payload_len = 8};
  struct iovec iov[2] = {{&hdr, sizeof(hdr)}, {&id, 8}};
  return gf_manager_submit(m, iov, 2);
}

static int reply(gf_worker *w, uint64_t id) {
  gf_msg hdr = {.task_id = id, .kind = GF_MSG_RESULT};
  struct iovec iov = {&hdr, sizeof(hdr)};
  return gf_worker_reply(w, &iov, 1, 0);
}

static uint64_t take(gf_worker *w) {
  const gf_msg *msg;
  size_t len;
  if (gf_worker_next(w, 0, &msg, &len) < 0)
    return 0;
  uint64_t id = msg->task_id;
  gf_worker_begin(w, id, len);
  return id;
}

GF_TEST(manager_dispatch_result_and_crash_recovery) {
  gf_manager m;
  gf_worker w;
  gf_ctl ctl;
  seen s = {0};
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  GF_CHECK_EQ(ctl.kind, GF_CTL_SPAWN);

  /* A new worker, whose task durations are unknown, gets one task; the rest wait. */
  for (uint64_t id = 1; id <= 3; id++)
    GF_CHECK_EQ(submit(&m, id), 0);
  GF_CHECK_EQ(gf_manager_queued(&m), 2);

  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 0);
  GF_CHECK_EQ(take(&w), 1);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 1);
  GF_CHECK_EQ(gf_manager_running(&m, 2), 0);
  GF_CHECK_EQ(reply(&w, 1), 0);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 0);
  GF_CHECK_EQ(gf_manager_wait(&m, 0, 1000000000), 1);
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(s.results, 1);
  GF_CHECK_EQ(s.last_task, 1);
  GF_CHECK_EQ(gf_manager_queued(&m), 0); /* a fast worker: tasks 2 and 3 moved to its ring */

  /* The worker dies while running task 2: task 2 fails, task 3 is requeued. */
  GF_CHECK_EQ(take(&w), 2);
  gf_ctl died = {.kind = GF_CTL_EXITED, .slot = 0, .pid = 4242, .status = SIGKILL};
  GF_CHECK_EQ(send(m.ctl_child_fd, &died, sizeof(died), 0), (ssize_t)sizeof(died));
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(s.deaths, 1);
  GF_CHECK_EQ(s.died_task, 2);
  GF_CHECK_EQ(s.timed_out, 0);
  GF_CHECK_EQ(gf_manager_running(&m, 2), 0); /* a dead worker runs nothing */
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  GF_CHECK_EQ(ctl.kind, GF_CTL_SPAWN); /* a replacement was asked for */

  /* The replacement finds exactly task 3. */
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(take(&w), 3);
  GF_CHECK(gf_ring_empty(w.requests));

  /* Cancelling works only while a task is queued in the parent. */
  GF_CHECK_EQ(gf_manager_cancel(&m, 3), -ENOENT);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_moves_a_starting_workers_task_first_even_with_a_queue) {
  gf_manager m;
  gf_worker w1;
  gf_ctl ctl;
  seen s = {0};
  GF_CHECK_EQ(gf_manager_init(&m, 2, 16384, 16u << 20), 0);
  for (uint32_t i = 0; i < 2; i++) {
    GF_CHECK_EQ(gf_manager_spawn(&m, i), 0);
    GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  }
  GF_CHECK_EQ(submit(&m, 1), 0); /* to worker 0, which never starts */
  GF_CHECK_EQ(submit(&m, 2), 0); /* to worker 1 */
  GF_CHECK_EQ(gf_worker_attach(&w1, m.map, m.map_size, 1, m.memfd), 0);
  GF_CHECK_EQ(submit(&m, 3), 0); /* both rings full: queued in the parent */
  GF_CHECK_EQ(gf_manager_queued(&m), 1);
  GF_CHECK_EQ(take(&w1), 2);
  GF_CHECK_EQ(reply(&w1, 2), 0);
  GF_CHECK_EQ(gf_manager_wait(&m, 0, 1000000000), 1);
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  /* Task 1 was dispatched before task 3 was queued: the idle worker gets it first. */
  GF_CHECK(!gf_ring_empty(w1.requests));
  if (!gf_ring_empty(w1.requests)) /* else take() would wait for ever */
    GF_CHECK_EQ(take(&w1), 1);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_kills_only_the_worker_running_a_task) {
  gf_manager m;
  gf_worker w;
  gf_ctl ctl;
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  pid_t child = fork(); /* stands in for the worker process */
  if (child == 0) {
    alarm(30); /* a failed check leaves it unkilled: it must not hold the runner's output */
    pause();
    _exit(0);
  }
  GF_CHECK_EQ(submit(&m, 1), 0);
  GF_CHECK_EQ(submit(&m, 2), 0);
  GF_CHECK_EQ(gf_manager_kill_task(&m, 1), -ENOENT); /* queued: nobody runs it yet */
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(atomic_load(&m.seg->slots[0].pid), getpid()); /* the worker's own, at once */
  atomic_store(&m.seg->slots[0].pid, child);
  GF_CHECK_EQ(take(&w), 1);
  GF_CHECK_EQ(gf_manager_kill_task(&m, 2), -ENOENT);
  GF_CHECK_EQ(gf_manager_kill_task(&m, 0), -EINVAL); /* not an idle worker's "task 0" */
  GF_CHECK_EQ(gf_manager_kill_task(&m, 1), 0);
  int status;
  GF_CHECK_EQ(waitpid(child, &status, 0), child);
  GF_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_kills_and_fails_a_task_claimed_but_not_marked_running) {
  gf_manager m;
  gf_worker w;
  gf_ctl ctl;
  seen s = {0};
  const gf_msg *msg;
  size_t len;
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  pid_t child = fork(); /* stands in for the worker process */
  if (child == 0) {
    alarm(30); /* a failed check leaves it unkilled: it must not hold the runner's output */
    pause();
    _exit(0);
  }
  atomic_store(&m.seg->slots[0].pid, child);
  GF_CHECK_EQ(submit(&m, 1), 0);
  GF_CHECK_EQ(submit(&m, 2), 0);
  /* The worker has claimed task 1 and not yet marked it: it is its, not the queue's. */
  GF_CHECK_EQ(gf_worker_next(&w, 0, &msg, &len), 0);
  GF_CHECK_EQ(msg->task_id, 1);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 1);
  GF_CHECK_EQ(gf_manager_cancel(&m, 1), -ENOENT);
  GF_CHECK_EQ(gf_manager_kill_task(&m, 1), 0);
  int status;
  GF_CHECK_EQ(waitpid(child, &status, 0), child);
  GF_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  /* Its death fails task 1; task 2 waits for the replacement, task 1 does not. */
  gf_ctl died = {.kind = GF_CTL_EXITED, .slot = 0, .pid = child, .status = SIGKILL};
  GF_CHECK_EQ(send(m.ctl_child_fd, &died, sizeof(died), 0), (ssize_t)sizeof(died));
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(s.deaths, 1);
  GF_CHECK_EQ(s.died_task, 1);
  GF_CHECK_EQ(gf_manager_cancel(&m, 1), -ENOENT);
  GF_CHECK_EQ(gf_manager_cancel(&m, 2), 0);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_blocks_released_on_crash) {
  gf_manager m;
  gf_worker w;
  seen s = {0};
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  uint64_t block;
  GF_CHECK_EQ(gf_manager_alloc(&m, 100000, &block), 0);
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(gf_worker_hold(&w, block), 0); /* the worker took over the reference */
  gf_ctl died = {.kind = GF_CTL_EXITED, .slot = 0, .pid = 1, .status = SIGSEGV};
  GF_CHECK_EQ(send(m.ctl_child_fd, &died, sizeof(died), 0), (ssize_t)sizeof(died));
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(atomic_load(&gf_block_at(&m.arena, block)->refs), 0);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_forgotten_in_a_forked_child_keeps_working_in_the_parent) {
  gf_manager m;
  gf_worker w;
  gf_ctl ctl;
  seen s = {0};
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  int doorbell = m.seg->doorbell_fd, memfd = m.memfd;
  uint64_t block;
  GF_CHECK_EQ(gf_manager_alloc(&m, 100000, &block), 0);
  gf_block_data(&m.arena, block)[99999] = 42;
  pid_t child = fork();
  if (child == 0) {
    gf_manager_forget(&m);
    /* Views received before the fork still read the arena; descriptors are closed. */
    int ok = m.ctl_fd == -1 && m.memfd == -1 && fcntl(memfd, F_GETFD) == -1 &&
             fcntl(doorbell, F_GETFD) == -1 && gf_block_data(&m.arena, block)[99999] == 42 &&
             atomic_load(&gf_block_at(&m.arena, block)->refs) == 1;
    gf_manager_free(&m);
    _exit(ok && m.map == NULL ? 0 : 1);
  }
  int status;
  GF_CHECK_EQ(waitpid(child, &status, 0), child);
  GF_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* Nothing shared was touched: no stop signal, no EOF on the control socket. */
  GF_CHECK_EQ(m.seg->doorbell_fd, doorbell);
  GF_CHECK_EQ(gf_manager_wait(&m, 0, 1000000), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), MSG_DONTWAIT), -1);
  GF_CHECK_EQ(errno, EAGAIN);
  GF_CHECK_EQ(submit(&m, 1), 0);
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 0);
  GF_CHECK_EQ(take(&w), 1);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 1);
  GF_CHECK_EQ(gf_manager_running(&m, 2), 0);
  GF_CHECK_EQ(reply(&w, 1), 0);
  GF_CHECK_EQ(gf_manager_running(&m, 1), 0);
  GF_CHECK_EQ(gf_manager_wait(&m, 0, 1000000000), 1);
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(s.last_task, 1);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

static uint32_t head_claim(gf_worker *w) {
  const void *msg;
  size_t len;
  if (gf_ring_peek(w->requests, &msg, &len) < 0)
    return UINT32_MAX;
  return atomic_load(&((gf_msg *)msg)->claim);
}

GF_TEST(manager_moves_tasks_from_behind_a_long_one_to_an_idle_worker) {
  gf_manager m;
  gf_worker w0, w1;
  gf_ctl ctl;
  seen s = {0};
  GF_CHECK_EQ(gf_manager_init(&m, 2, 16384, 16u << 20), 0);
  for (uint32_t i = 0; i < 2; i++) {
    GF_CHECK_EQ(gf_manager_spawn(&m, i), 0);
    GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
    /* Microsecond tasks so far: each ring may hold several. */
    atomic_store(&m.seg->slots[i].tasks_done, 10);
    atomic_store(&m.seg->slots[i].busy_ns, 10000);
  }
  GF_CHECK_EQ(gf_worker_attach(&w0, m.map, m.map_size, 0, m.memfd), 0);
  GF_CHECK_EQ(gf_worker_attach(&w1, m.map, m.map_size, 1, m.memfd), 0);
  for (uint64_t id = 1; id <= 4; id++)
    GF_CHECK_EQ(submit(&m, id), 0); /* 1, 3 to worker 0; 2, 4 to worker 1 */
  GF_CHECK_EQ(take(&w0), 1);
  GF_CHECK_EQ(take(&w1), 2);
  GF_CHECK_EQ(reply(&w1, 2), 0);
  GF_CHECK_EQ(take(&w1), 4);
  GF_CHECK_EQ(reply(&w1, 4), 0);

  /* Task 1 has run long: task 3 behind it goes to the idle worker 1. */
  atomic_store(&m.seg->slots[0].task_started_ns, gf_now_ns() - 10000000);
  GF_CHECK(gf_manager_collect(&m, 0, record, &s) >= 2);
  GF_CHECK_EQ(head_claim(&w0), GF_CLAIM_WITHDRAWN);
  GF_CHECK_EQ(take(&w1), 3);

  /* A worker running a long task gets no more; a task waiting in a ring can be cancelled. */
  GF_CHECK_EQ(submit(&m, 5), 0);
  GF_CHECK_EQ(head_claim(&w1), GF_CLAIM_QUEUED);
  GF_CHECK_EQ(gf_manager_cancel(&m, 5), 0);
  GF_CHECK_EQ(head_claim(&w1), GF_CLAIM_WITHDRAWN);
  GF_CHECK_EQ(gf_manager_cancel(&m, 5), -ENOENT);

  /* Worker 0 dies running task 1: task 3, withdrawn, is not queued a second time. */
  gf_ctl died = {.kind = GF_CTL_EXITED, .slot = 0, .pid = 4242, .status = SIGKILL};
  GF_CHECK_EQ(send(m.ctl_child_fd, &died, sizeof(died), 0), (ssize_t)sizeof(died));
  GF_CHECK(gf_manager_collect(&m, 1, record, &s) >= 1);
  GF_CHECK_EQ(s.died_task, 1);
  GF_CHECK_EQ(gf_manager_queued(&m), 0);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(manager_refuses_slot_counts_out_of_range) {
  gf_manager m;
  GF_CHECK_EQ(gf_manager_init(&m, 0, 16384, 16u << 20), -EINVAL);
  GF_CHECK_EQ(gf_manager_init(&m, GF_MAX_WORKERS + 1, 16384, 16u << 20), -EINVAL);
}

/* Descriptors open in this process. */
static int open_fds(void) {
  int n = 0;
  for (int fd = 0; fd < 4096; fd++)
    n += fcntl(fd, F_GETFD) >= 0;
  return n;
}

GF_TEST(manager_init_failure_leaves_no_descriptor_nor_mapping) {
  gf_manager m;
  struct rlimit old;
  GF_CHECK_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
  int before = open_fds(), lowest = dup(0);
  GF_CHECK(lowest >= 0);
  close(lowest);
  /* Room for the memfd and the doorbell only (descriptors are allocated lowest first and
   * counted from the first free one up): the stop eventfd fails with EMFILE. */
  int free_below = 0;
  for (int fd = lowest; fd < lowest + 2; fd++)
    free_below += fcntl(fd, F_GETFD) < 0;
  GF_CHECK_EQ(free_below, 2);
  struct rlimit low = {.rlim_cur = (rlim_t)lowest + 2, .rlim_max = old.rlim_max};
  GF_CHECK_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  int rc = gf_manager_init(&m, 2, 16384, 1ull << 30);
  setrlimit(RLIMIT_NOFILE, &old);
  GF_CHECK_EQ(rc, -EMFILE);
  GF_CHECK_EQ(open_fds(), before);
  GF_CHECK(m.map == NULL);
  GF_CHECK_EQ(m.memfd, -1);
}

static volatile sig_atomic_t atfork_armed;
static int atfork_pipe = -1;

/* A pthread_atfork child handler as gilhook's: it must never run in gf_spawn's child. */
static void atfork_child(void) {
  if (atfork_armed) {
    char c = 1;
    if (write(atfork_pipe, &c, 1) < 0) {
    }
  }
}

GF_TEST(spawn_runs_no_atfork_handler_in_the_child) {
  int p[2];
  pid_t pid;
  int pidfd, status;
  char *argv[] = {"/bin/true", NULL};
  char *envp[] = {NULL};
  GF_CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
  atfork_pipe = p[1];
  static int registered;
  if (!registered)
    GF_CHECK_EQ(pthread_atfork(NULL, NULL, atfork_child), 0);
  registered = 1;
  atfork_armed = 1;
  int rc = gf_spawn("/bin/true", argv, envp, NULL, 0, &pid, &pidfd);
  atfork_armed = 0;
  close(p[1]);
  GF_CHECK_EQ(rc, 0);
  GF_CHECK_EQ(waitpid(pid, &status, 0), pid);
  close(pidfd);
  char c;
  ssize_t n = read(p[0], &c, 1);
  close(p[0]);
  GF_CHECK_EQ(n, 0); /* EOF: no handler wrote */
}

GF_TEST(spawn_runs_program_and_reports_exec_failure) {
  pid_t pid;
  int pidfd;
  char *argv[] = {"/bin/sh", "-c", "exit 7", NULL};
  char *envp[] = {NULL};
  GF_CHECK_EQ(gf_spawn("/bin/sh", argv, envp, NULL, 0, &pid, &pidfd), 0);
  int status;
  GF_CHECK_EQ(waitpid(pid, &status, 0), pid);
  GF_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 7);
  close(pidfd);
  char *missing[] = {"/nonexistent/program", NULL};
  GF_CHECK_EQ(gf_spawn("/nonexistent/program", missing, envp, NULL, 0, &pid, &pidfd), -ENOENT);
}

GF_TEST(rss_is_positive) {
  uint64_t rss = 0;
  GF_CHECK_EQ(gf_rss_bytes(&rss), 0);
  GF_CHECK(rss > 0);
}

/* A file standing in for a descriptor a task replaced: open at number fd. */
static int file_at(int fd, char *path) {
  int file = mkstemp(path);
  if (file < 0 || dup2(file, fd) < 0)
    return -1;
  close(file);
  return 0;
}

GF_TEST(worker_never_rings_a_doorbell_a_task_closed_or_replaced) {
  gf_manager m;
  gf_worker w;
  gf_ctl ctl;
  seen s = {0};
  struct stat st;
  char path[] = "/tmp/gf-doorbell-XXXXXX";
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 16u << 20), 0);
  GF_CHECK_EQ(gf_manager_spawn(&m, 0), 0);
  GF_CHECK_EQ(recv(m.ctl_child_fd, &ctl, sizeof(ctl), 0), (ssize_t)sizeof(ctl));
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  int doorbell = m.seg->doorbell_fd, saved = dup(doorbell);

  /* Nobody sleeps: the reply checks nothing, whatever the doorbell became. */
  GF_CHECK_EQ(file_at(doorbell, path), 0);
  GF_CHECK_EQ(submit(&m, 1), 0);
  GF_CHECK_EQ(take(&w), 1);
  GF_CHECK_EQ(reply(&w, 1), 0);
  GF_CHECK(gf_manager_collect(&m, 0, record, &s) >= 1);

  /* The parent sleeps: a file at the doorbell's number is left alone, the result is sent. */
  GF_CHECK_EQ(submit(&m, 2), 0);
  GF_CHECK_EQ(take(&w), 2);
  atomic_store(&m.seg->parent_sleeping, 1);
  GF_CHECK_EQ(reply(&w, 2), -EBADFD);
  GF_CHECK_EQ(fstat(doorbell, &st), 0);
  GF_CHECK_EQ(st.st_size, 0);
  GF_CHECK_EQ(gf_manager_running(&m, 2), 0);
  GF_CHECK(gf_manager_collect(&m, 0, record, &s) >= 1);
  GF_CHECK_EQ(s.last_task, 2);
  unlink(path);

  /* Closed: the same. */
  close(doorbell);
  GF_CHECK_EQ(submit(&m, 3), 0);
  GF_CHECK_EQ(take(&w), 3);
  GF_CHECK_EQ(reply(&w, 3), -EBADFD);
  GF_CHECK(gf_manager_collect(&m, 0, record, &s) >= 1);
  GF_CHECK_EQ(s.last_task, 3);

  /* Back in place: rung as before. */
  GF_CHECK_EQ(dup2(saved, doorbell), doorbell);
  close(saved);
  GF_CHECK_EQ(submit(&m, 4), 0);
  GF_CHECK_EQ(take(&w), 4);
  GF_CHECK_EQ(reply(&w, 4), 0);
  uint64_t rung = 0;
  GF_CHECK_EQ(read(doorbell, &rung, sizeof(rung)), (ssize_t)sizeof(rung));
  GF_CHECK_EQ(rung, 1);
  atomic_store(&m.seg->parent_sleeping, 0);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}

GF_TEST(arena_never_maps_nor_punches_a_file_at_the_memfds_number) {
  gf_manager m;
  gf_worker w;
  struct stat st;
  unsigned char *data;
  char path[] = "/tmp/gf-memfd-XXXXXX";
  GF_CHECK_EQ(gf_manager_init(&m, 1, 16384, 1ull << 30), 0); /* regions above the reserve */
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), 0);
  uint64_t block;
  GF_CHECK_EQ(gf_manager_alloc(&m, 100000, &block), 0);
  GF_CHECK_EQ(gf_arena_map(&m.arena, block, 16, &data), 0);
  gf_arena_unmap(data, 100000);
  int saved = dup(m.memfd);
  GF_CHECK_EQ(file_at(m.memfd, path), 0);
  GF_CHECK_EQ(gf_arena_map(&w.arena, block, 16, &data), -EBADFD);
  /* A worker asked for the pool's descriptors finds the file, not the memfd. */
  GF_CHECK_EQ(gf_worker_attach(&w, m.map, m.map_size, 0, m.memfd), -EBADFD);
  /* Allocating still works; pages above the kept reserve are not punched into the file. */
  uint64_t big;
  gf_region *region = &m.seg->slots[0].region;
  region->resident = region->size; /* as if the region had been full once */
  GF_CHECK_EQ(gf_worker_alloc(&w, 100000, &big), 0);
  GF_CHECK_EQ(region->resident, region->size);
  GF_CHECK_EQ(fstat(m.memfd, &st), 0);
  GF_CHECK_EQ(st.st_size, 0);
  unlink(path);
  GF_CHECK_EQ(dup2(saved, m.memfd), m.memfd);
  close(saved);
  gf_manager_close(&m, 0);
  gf_manager_free(&m);
}
