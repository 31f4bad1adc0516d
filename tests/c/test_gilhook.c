/* gf_gilhook against build/libgf_gilhook_fixture.so: a GIL with CPython's call sequence, in a
 * shared library whose PLT the hooks rewrite. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gf/gilhook.h"
#include "gf/got.h"
#include "gf_test.h"

static struct {
  void *lib;
  void (*take)(void *);
  void (*drop)(void *);
  int (*drop_requested)(void);
  void (*set_interval)(unsigned long);
  void (*targets)(struct gf_gilhook_targets *);
} fx;

static int fx_load(void) {
  if (fx.lib != NULL)
    return 0;
  const char *path = getenv("GF_GILHOOK_FIXTURE");
  fx.lib = dlopen(path ? path : "build/libgf_gilhook_fixture.so", RTLD_NOW | RTLD_LOCAL);
  if (fx.lib == NULL) {
    fprintf(stderr, "  %s\n", dlerror());
    return -1;
  }
  void (*init)(void) = (void (*)(void))dlsym(fx.lib, "fx_init");
  fx.take = (void (*)(void *))dlsym(fx.lib, "fx_take");
  fx.drop = (void (*)(void *))dlsym(fx.lib, "fx_drop");
  fx.drop_requested = (int (*)(void))dlsym(fx.lib, "fx_drop_requested");
  fx.set_interval = (void (*)(unsigned long))dlsym(fx.lib, "fx_set_interval");
  fx.targets = (void (*)(struct gf_gilhook_targets *))dlsym(fx.lib, "fx_targets");
  init();
  return 0;
}

/* Holds the fixture GIL for ms, dropping and retaking it whenever a drop is requested (what
 * the eval loop does). */
static void fx_run(void *tstate, unsigned ms) {
  uint64_t end = gf_gilhook_now_ns() + ms * 1000000ull;
  while (gf_gilhook_now_ns() < end) {
    if (fx.drop_requested()) {
      fx.drop(tstate);
      fx.take(tstate);
    }
  }
}

struct worker {
  int rounds;
  unsigned ms;
  int priority;
  pthread_t thread;
  uint32_t tid;
  uint32_t id; /* its hook record's */
};

static void *worker_main(void *arg) {
  struct worker *w = arg;
  w->tid = (uint32_t)syscall(SYS_gettid);
  gf_gilhook_set_priority(w->priority);
  for (int i = 0; i < w->rounds; i++) {
    fx.take(w);
    w->id = gf_gilhook_self_id();
    fx_run(w, w->ms);
    fx.drop(w);
  }
  return NULL;
}

struct find_tid {
  uint32_t tid;
  struct gf_gilhook_thread_stats stats;
  int found;
};

static int find_tid_visit(const struct gf_gilhook_thread_stats *s, void *arg) {
  struct find_tid *f = arg;
  if (s->tid != f->tid)
    return 0;
  f->stats = *s;
  f->found = 1;
  return 1;
}

static struct gf_gilhook_thread_stats stats_of(uint32_t tid) {
  struct find_tid f = {.tid = tid};
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), find_tid_visit, &f);
  return f.stats;
}

static void wait_for_state(uint32_t *tid, int state) {
  while (__atomic_load_n(tid, __ATOMIC_ACQUIRE) == 0 || stats_of(*tid).state != state)
    usleep(200);
}

static int install_holding(void *self) {
  struct gf_gilhook_targets targets;
  fx.targets(&targets);
  fx.take(self);
  return gf_gilhook_install((void *)fx.take, &targets);
}

GF_TEST(got_find_reads_versions_and_rejects_unknown_addresses) {
  GF_CHECK(fx_load() == 0);
  struct gf_got_slot slots[4];
  int n = gf_got_find((void *)fx.take, "pthread_cond_timedwait", slots, 4);
  GF_CHECK(n >= 1);
  GF_CHECK(strcmp(slots[0].version, "GLIBC_2.3.2") == 0);
  GF_CHECK_EQ(gf_got_find((void *)fx.take, "no_such_function", slots, 4), 0);
  GF_CHECK_EQ(gf_got_find((void *)16, "pthread_mutex_lock", slots, 4), -ENOENT);
}

GF_TEST(gilhook_accounts_held_wait_and_forced_switches) {
  GF_CHECK(fx_load() == 0);
  fx.set_interval(5000);
  int main_state;
  uint32_t self_tid = (uint32_t)syscall(SYS_gettid);
  gf_gilhook_tracing(1, 1 << 20);
  uint64_t start = gf_gilhook_now_ns();
  GF_CHECK_EQ(install_holding(&main_state), 0);
  struct gf_gilhook_targets targets;
  fx.targets(&targets);
  GF_CHECK_EQ(gf_gilhook_install((void *)fx.take, &targets), -EEXIST);
  struct worker w = {.rounds = 3, .ms = 20};
  pthread_create(&w.thread, NULL, worker_main, &w);
  wait_for_state(&w.tid, GF_GIL_WANT); /* a busy machine may start it late */
  fx_run(&main_state, 30); /* the worker waits, times out, asks us to drop */
  fx.drop(&main_state);
  pthread_join(w.thread, NULL);
  uint64_t elapsed = gf_gilhook_now_ns() - start;
  struct gf_gilhook_thread_stats ws = stats_of(w.tid), ms = stats_of(self_tid);
  fx.take(&main_state);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&main_state);
  gf_gilhook_tracing(-1, 1 << 20);

  /* One of the two held the fixture GIL nearly all along (hand-overs and the worker's exit
   * aside; precision is checked in pytest against ground truth). */
  GF_CHECK(ws.held_ns + ms.held_ns <= elapsed);
  GF_CHECK(ws.held_ns + ms.held_ns >= elapsed * 3 / 4);
  GF_CHECK(ws.acquisitions >= 3);
  GF_CHECK(ws.waits >= 1);
  GF_CHECK(ws.timeouts >= 1);
  GF_CHECK(ws.drop_requests >= 1);
  GF_CHECK(ws.exit_ns != 0);
  GF_CHECK_EQ(ms.state, GF_GIL_FREE);

  struct gf_gilhook_event events[4096];
  size_t n = gf_gilhook_drain(events, 4096);
  GF_CHECK(n > 0);
  uint64_t acquires = 0, last_t = 0;
  uint32_t last_kind = 0;
  for (size_t i = 0; i < n; i++) {
    if (events[i].thread != w.id)
      continue;
    GF_CHECK(events[i].t_ns >= last_t);
    if ((events[i].kind & ~GF_GIL_CONTENDED) == GF_GIL_ACQUIRE) {
      if (events[i].kind & GF_GIL_CONTENDED)
        GF_CHECK_EQ(last_kind, GF_GIL_WAIT);
      acquires++;
    }
    if (events[i].kind == GF_GIL_RELEASE)
      GF_CHECK_EQ(last_kind, GF_GIL_ACQUIRE);
    last_t = events[i].t_ns;
    last_kind = events[i].kind & ~GF_GIL_CONTENDED;
  }
  GF_CHECK_EQ(acquires, ws.acquisitions);
  GF_CHECK_EQ(last_kind, GF_GIL_EXIT);
  GF_CHECK_EQ(gf_gilhook_dropped(), 0);
}

GF_TEST(gilhook_uninstall_restores_the_got) {
  GF_CHECK(fx_load() == 0);
  struct gf_got_slot slots[4];
  GF_CHECK(gf_got_find((void *)fx.take, "pthread_mutex_lock", slots, 4) >= 1);
  void *before = *slots[0].slot;
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  GF_CHECK(*slots[0].slot != before);
  GF_CHECK_EQ(gf_gilhook_slots_restored(), 0);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(*slots[0].slot == before);
  GF_CHECK_EQ(gf_gilhook_slots_restored(), 1);
  GF_CHECK_EQ(gf_gilhook_uninstall(), -ENOENT);
}

GF_TEST(gilhook_higher_priority_waiter_gets_the_holder_to_drop_at_once) {
  GF_CHECK(fx_load() == 0);
  fx.set_interval(1000000); /* without priorities the waiter would wait the whole 300 ms */
  int self;
  GF_CHECK_EQ(gf_gilhook_set_priority(-1), 0);
  GF_CHECK_EQ(gf_gilhook_get_priority(), -1);
  uint32_t self_tid = (uint32_t)syscall(SYS_gettid);
  GF_CHECK_EQ(install_holding(&self), 0);
  uint64_t forced_before = stats_of(self_tid).forced;
  struct worker w = {.rounds = 1, .ms = 1, .priority = 1};
  pthread_create(&w.thread, NULL, worker_main, &w);
  fx_run(&self, 300);
  fx.drop(&self);
  pthread_join(w.thread, NULL);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK_EQ(gf_gilhook_set_priority(0), 0);
  fx.set_interval(5000);
  GF_CHECK_EQ(gf_gilhook_get_priority(), 0);
  struct gf_gilhook_thread_stats ws = stats_of(w.tid);
  GF_CHECK(stats_of(self_tid).forced - forced_before <= 1);
  GF_CHECK_EQ(ws.drop_requests, 1);
  GF_CHECK_EQ(ws.timeouts, 0);
  GF_CHECK(ws.wait_ns < 250000000ull);
}

struct held_thread {
  pthread_t thread;
  uint32_t tid, id; /* its record's id, once it has one */
  int level;        /* its priority as it saw it once woken */
  int go[2];        /* a pipe: it waits for a byte, looks at its priority and ends */
};

static void *held_main(void *arg) {
  struct held_thread *h = arg;
  gf_gilhook_set_priority(1);
  h->tid = (uint32_t)syscall(SYS_gettid);
  __atomic_store_n(&h->id, gf_gilhook_self_id(), __ATOMIC_RELEASE);
  char byte;
  if (read(h->go[0], &byte, 1) == 1)
    h->level = gf_gilhook_get_priority();
  return NULL;
}

GF_TEST(gilhook_sets_another_threads_priority_until_it_ends) {
  struct held_thread h = {0};
  GF_CHECK_EQ(pipe(h.go), 0);
  pthread_create(&h.thread, NULL, held_main, &h);
  while (__atomic_load_n(&h.id, __ATOMIC_ACQUIRE) == 0)
    usleep(200);
  GF_CHECK_EQ(gf_gilhook_set_priority_of(h.id, -100), 0);
  GF_CHECK_EQ(stats_of(h.tid).priority, -GF_GILHOOK_MAX_PRIORITY);
  GF_CHECK_EQ(write(h.go[1], "x", 1), 1);
  pthread_join(h.thread, NULL);
  GF_CHECK_EQ(h.level, -GF_GILHOOK_MAX_PRIORITY);
  /* Ended (its record not reaped yet): a level set now does not stay. */
  GF_CHECK_EQ(gf_gilhook_set_priority_of(h.id, 3), 0);
  GF_CHECK_EQ(stats_of(h.tid).priority, 0);
  GF_CHECK_EQ(gf_gilhook_set_priority_of(0, 3), -ESRCH);
  close(h.go[0]);
  close(h.go[1]);
}

GF_TEST(gilhook_lower_priority_waiter_lets_the_higher_one_take_first) {
  GF_CHECK(fx_load() == 0);
  fx.set_interval(1000000);
  int self;
  gf_gilhook_tracing(1, 1 << 20);
  GF_CHECK_EQ(install_holding(&self), 0);
  struct worker low = {.rounds = 1, .ms = 1, .priority = -1};
  struct worker high = {.rounds = 1, .ms = 1, .priority = 1};
  pthread_create(&low.thread, NULL, worker_main, &low);
  wait_for_state(&low.tid, GF_GIL_WANT);
  pthread_create(&high.thread, NULL, worker_main, &high);
  wait_for_state(&high.tid, GF_GIL_WANT);
  usleep(2000); /* let both sleep in the timed wait */
  fx.drop(&self);
  pthread_join(low.thread, NULL);
  pthread_join(high.thread, NULL);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  gf_gilhook_tracing(-1, 1 << 20);
  fx.set_interval(5000);

  struct gf_gilhook_event events[4096];
  size_t n = gf_gilhook_drain(events, 4096);
  uint64_t low_at = 0, high_at = 0;
  for (size_t i = 0; i < n; i++) {
    if ((events[i].kind & ~GF_GIL_CONTENDED) != GF_GIL_ACQUIRE)
      continue;
    if (events[i].thread == low.id)
      low_at = events[i].t_ns;
    if (events[i].thread == high.id)
      high_at = events[i].t_ns;
  }
  GF_CHECK(low_at != 0 && high_at != 0);
  GF_CHECK(high_at < low_at);
}

static int read_pid_max(void) {
  FILE *f = fopen("/proc/sys/kernel/pid_max", "r");
  int pid_max = 0;
  if (f != NULL) {
    if (fscanf(f, "%d", &pid_max) != 1)
      pid_max = 0;
    fclose(f);
  }
  return pid_max;
}

struct find_reused {
  uint32_t tid;
  int found;
  uint32_t ids[2];
  uint64_t acquisitions[2];
};

static int find_reused_visit(const struct gf_gilhook_thread_stats *s, void *arg) {
  struct find_reused *f = arg;
  if (s->tid == f->tid && f->found < 2) {
    f->ids[f->found] = s->id;
    f->acquisitions[f->found++] = s->acquisitions;
  }
  return 0;
}

GF_TEST(gilhook_keeps_threads_with_a_reused_tid_apart) {
  GF_CHECK(fx_load() == 0);
  int pid_max = read_pid_max();
  if (pid_max <= 0 || pid_max > 100000) {
    fprintf(stderr, "  skipped: tids wrap only after pid_max=%d threads\n", pid_max);
    return;
  }
  /* Threads one after the other until the kernel gives one the tid of an earlier one. */
  char *seen = calloc((size_t)pid_max + 1, 1);
  GF_CHECK(seen != NULL);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  uint32_t reused = 0;
  for (int i = 0; i < 2 * pid_max && reused == 0; i++) {
    struct worker w = {.rounds = 1};
    pthread_create(&w.thread, NULL, worker_main, &w);
    pthread_join(w.thread, NULL);
    if (w.tid <= (uint32_t)pid_max && seen[w.tid]++)
      reused = w.tid;
  }
  free(seen);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(reused != 0);
  struct find_reused f = {.tid = reused};
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), find_reused_visit, &f);
  GF_CHECK_EQ(f.found, 2);
  GF_CHECK(f.ids[0] != f.ids[1]);
  GF_CHECK_EQ(f.acquisitions[0], 1);
  GF_CHECK_EQ(f.acquisitions[1], 1);
}

static int count_ended(const struct gf_gilhook_thread_stats *s, void *arg) {
  *(int *)arg += s->exit_ns != 0;
  return 0;
}

static int count_visit(const struct gf_gilhook_thread_stats *s, void *arg) {
  ++*(int *)arg;
  return 0;
}

GF_TEST(gilhook_frees_an_ended_threads_chunks_and_record) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  /* Room for a few small first chunks: each ended thread must give its chunk back once its
   * events are read, or the budget is gone after four threads. */
  size_t budget = 4 * 4096;
  gf_gilhook_tracing(1, budget);
  uint64_t dropped = gf_gilhook_dropped();
  struct gf_gilhook_event events[64];
  size_t drained = 0;
  for (int i = 0; i < 20; i++) {
    struct worker w = {.rounds = 1};
    pthread_create(&w.thread, NULL, worker_main, &w);
    pthread_join(w.thread, NULL);
    for (size_t n; (n = gf_gilhook_drain(events, 64)) > 0;)
      drained += n;
  }
  int ended = 0;
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_ended, &ended);
  GF_CHECK(ended >= 20);
  /* Reaping frees the ended records; the totals keep their counts. */
  uint64_t now = gf_gilhook_now_ns();
  struct gf_gilhook_totals before, after;
  gf_gilhook_totals(now, &before);
  int reaped = 0;
  GF_CHECK_EQ(gf_gilhook_reap(count_visit, &reaped), (size_t)reaped);
  gf_gilhook_totals(now, &after);
  int left = 0;
  ended = 0;
  gf_gilhook_foreach_thread(now, count_visit, &left);
  gf_gilhook_foreach_thread(now, count_ended, &ended);
  gf_gilhook_tracing(-1, budget);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);

  GF_CHECK_EQ(gf_gilhook_dropped(), dropped);
  GF_CHECK(drained >= 20 * 3); /* wait or acquire, release, exit per thread */
  GF_CHECK(reaped >= 20);
  GF_CHECK_EQ(ended, 0);
  GF_CHECK_EQ(left, (int)after.live_threads);
  GF_CHECK_EQ(after.live_threads, before.live_threads);
  GF_CHECK_EQ(after.acquisitions, before.acquisitions);
  GF_CHECK_EQ(after.held_ns, before.held_ns);
  GF_CHECK_EQ(after.wait_ns, before.wait_ns);
}

GF_TEST(gilhook_an_uncontended_take_is_not_a_wait) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  gf_gilhook_tracing(1, 1 << 20);
  struct worker alone = {.rounds = 2000}; /* takes and drops a GIL nobody else wants */
  pthread_create(&alone.thread, NULL, worker_main, &alone);
  pthread_join(alone.thread, NULL);
  struct gf_gilhook_event events[4096];
  size_t n = gf_gilhook_drain(events, 4096);
  gf_gilhook_tracing(-1, 1 << 20);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  struct gf_gilhook_thread_stats s = stats_of(alone.tid);
  GF_CHECK_EQ(s.acquisitions, 2000);
  GF_CHECK_EQ(s.waits, 0);
  GF_CHECK_EQ(s.wait_ns, 0);
  for (size_t i = 0; i < n; i++)
    GF_CHECK(events[i].thread != alone.id || events[i].kind != GF_GIL_WAIT);
}

struct spans_seen {
  struct gf_gilhook_span spans[16];
  int n;
};

static void collect_span(const struct gf_gilhook_span *span, void *arg) {
  struct spans_seen *seen = arg;
  if (seen->n < 16)
    seen->spans[seen->n++] = *span;
}

#define EV(t, kind) {(t), 7, (kind)}

GF_TEST(gilhook_spans_follow_events_and_end_where_they_were_lost) {
  const struct gf_gilhook_event events[] = {
      EV(15, GF_GIL_RELEASE), /* held since before the window */
      EV(20, GF_GIL_WAIT),    EV(30, GF_GIL_ACQUIRE | GF_GIL_CONTENDED), EV(40, GF_GIL_RELEASE),
      EV(45, GF_GIL_WAIT),    EV(50, GF_GIL_GAP), /* lost from 50 to 70: the timeline ends */
      EV(70, GF_GIL_ACQUIRE), EV(80, GF_GIL_RELEASE)};
  struct spans_seen seen = {.n = 0};
  struct gf_gilhook_spanner s;
  gf_gilhook_spans_begin(&s, 10, 100, collect_span, &seen);
  gf_gilhook_spans_feed(&s, events, 3); /* fed in pieces, as runs of several drains */
  gf_gilhook_spans_feed(&s, events + 3, 5);
  GF_CHECK_EQ(gf_gilhook_spans_end(&s), 50);
  GF_CHECK_EQ(seen.n, 4);
  GF_CHECK(seen.spans[0].state == GF_GIL_HELD && seen.spans[0].start_ns == 10 && seen.spans[0].end_ns == 15);
  GF_CHECK(seen.spans[1].state == GF_GIL_WANT && seen.spans[1].end_ns == 30);
  GF_CHECK_EQ(seen.spans[1].waited_ns, 10);
  GF_CHECK(seen.spans[2].state == GF_GIL_HELD && seen.spans[2].end_ns == 40);
  GF_CHECK(seen.spans[3].state == GF_GIL_WANT && seen.spans[3].end_ns == 50);
  GF_CHECK_EQ(seen.spans[3].waited_ns, 0);

  /* A loss before the window does not cut it; a wait from before it counts whole. */
  seen.n = 0;
  gf_gilhook_spans_begin(&s, 60, 100, collect_span, &seen);
  gf_gilhook_spans_feed(&s, events + 4, 2);
  const struct gf_gilhook_event later[] = {EV(55, GF_GIL_WAIT), EV(65, GF_GIL_ACQUIRE | GF_GIL_CONTENDED)};
  gf_gilhook_spans_feed(&s, later, 2);
  GF_CHECK_EQ(gf_gilhook_spans_end(&s), 100);
  GF_CHECK_EQ(seen.n, 2);
  GF_CHECK(seen.spans[0].state == GF_GIL_WANT && seen.spans[0].start_ns == 60 && seen.spans[0].end_ns == 65);
  GF_CHECK_EQ(seen.spans[0].waited_ns, 10);
  GF_CHECK(seen.spans[1].state == GF_GIL_HELD && seen.spans[1].end_ns == 100);

  /* Lost with nothing after it: the timeline ends at the loss. */
  seen.n = 0;
  gf_gilhook_spans_begin(&s, 10, 100, collect_span, &seen);
  gf_gilhook_spans_feed(&s, events + 1, 2);
  const struct gf_gilhook_event gap[] = {EV(35, GF_GIL_GAP)};
  gf_gilhook_spans_feed(&s, gap, 1);
  GF_CHECK_EQ(gf_gilhook_spans_end(&s), 35);
  GF_CHECK_EQ(seen.n, 2);
  GF_CHECK(seen.spans[1].state == GF_GIL_HELD && seen.spans[1].end_ns == 35);
}

struct slices_seen {
  struct gf_gilhook_slice slices[64];
  int n;
};

static void collect_slice(const struct gf_gilhook_slice *slice, void *arg) {
  struct slices_seen *seen = arg;
  if (seen->n < 64)
    seen->slices[seen->n] = *slice;
  seen->n++;
}

GF_TEST(gilhook_coalescing_merges_short_spans_within_a_bound) {
  const struct gf_gilhook_span spans[] = {
      {0, 2, GF_GIL_HELD, 0}, {3, 5, GF_GIL_WANT, 0},  {6, 8, GF_GIL_HELD, 0},
      {9, 11, GF_GIL_HELD, 0}, {12, 50, GF_GIL_WANT, 0}, {200, 201, GF_GIL_HELD, 0}};
  struct slices_seen seen = {.n = 0};
  struct gf_gilhook_coalescer c = {.resolution_ns = 10, .fn = collect_slice, .arg = &seen};
  for (int i = 0; i < 6; i++)
    gf_gilhook_coalesce(&c, &spans[i]);
  gf_gilhook_coalesce_end(&c);
  GF_CHECK_EQ(seen.n, 3);
  struct gf_gilhook_slice *merged = &seen.slices[0];
  GF_CHECK(merged->start_ns == 0 && merged->end_ns == 11 && merged->spans == 4);
  GF_CHECK(merged->held_ns == 6 && merged->wait_ns == 2 && merged->state == GF_GIL_HELD);
  GF_CHECK(seen.slices[1].spans == 1 && seen.slices[1].state == GF_GIL_WANT && seen.slices[1].start_ns == 12);
  GF_CHECK(seen.slices[2].start_ns == 200 && seen.slices[2].spans == 1);

  seen.n = 0; /* resolution 0: every span is its own slice */
  c = (struct gf_gilhook_coalescer){.resolution_ns = 0, .fn = collect_slice, .arg = &seen};
  for (int i = 0; i < 6; i++)
    gf_gilhook_coalesce(&c, &spans[i]);
  gf_gilhook_coalesce_end(&c);
  GF_CHECK_EQ(seen.n, 6);

  /* 10,000 short spans over a window of 20,000: at most 3 slices per resolution. */
  seen.n = 0;
  c = (struct gf_gilhook_coalescer){.resolution_ns = 1000, .fn = collect_slice, .arg = &seen};
  for (uint64_t t = 0; t < 20000; t += 2)
    gf_gilhook_coalesce(&c, &(struct gf_gilhook_span){t, t + 1, t % 4 ? GF_GIL_HELD : GF_GIL_WANT, 0});
  gf_gilhook_coalesce_end(&c);
  GF_CHECK(seen.n <= 3 * 20000 / 1000 + 1);
}

/* A worker that takes and drops the fixture GIL in two bursts, told when to start each. */
struct bursts {
  int go, done; /* atomic: 1, 2 */
  uint32_t tid, id;
  pthread_t thread;
};

static void *bursts_main(void *arg) {
  struct bursts *b = arg;
  b->tid = (uint32_t)syscall(SYS_gettid);
  for (int burst = 1; burst <= 2; burst++) {
    while (__atomic_load_n(&b->go, __ATOMIC_ACQUIRE) < burst)
      usleep(100);
    for (int i = 0; i < 200; i++) {
      fx.take(b);
      b->id = gf_gilhook_self_id();
      fx.drop(b);
    }
    __atomic_store_n(&b->done, burst, __ATOMIC_RELEASE);
  }
  return NULL;
}

GF_TEST(gilhook_marks_where_a_threads_events_were_lost) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  static struct gf_gilhook_event events[8192];
  gf_gilhook_tracing(1, 1 << 20);
  while (gf_gilhook_drain(events, 8192) > 0) /* what earlier tests left */
    ;
  /* Beyond this thread's chunk: room for two first chunks and a 64 KiB one, less a little. */
  size_t small = 4096, big = 65536;
  size_t budget = gf_gilhook_event_bytes() + small + big + small - 64;
  gf_gilhook_tracing(0, budget);
  struct worker other = {.rounds = 1}; /* ends, its first chunk taken until drained */
  pthread_create(&other.thread, NULL, worker_main, &other);
  pthread_join(other.thread, NULL);
  struct bursts b = {.go = 1};
  pthread_create(&b.thread, NULL, bursts_main, &b);
  while (__atomic_load_n(&b.done, __ATOMIC_ACQUIRE) < 1)
    usleep(100);
  /* 400 events do not fit in its first chunk, and the next does not fit in the budget. */
  uint64_t lost = stats_of(b.tid).lost_ns;
  size_t n = gf_gilhook_drain(events, 8192); /* frees the ended thread's chunk */
  __atomic_store_n(&b.go, 2, __ATOMIC_RELEASE);
  pthread_join(b.thread, NULL);
  n += gf_gilhook_drain(events + n, 8192 - n);
  uint64_t lost_after = stats_of(b.tid).lost_ns;
  gf_gilhook_tracing(-1, budget);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);

  GF_CHECK(lost != 0);
  GF_CHECK_EQ(lost_after, 0);
  size_t gaps = 0, mine = 0, gap_at = 0;
  for (size_t i = 0; i < n; i++) {
    if (events[i].thread != b.id)
      continue;
    mine++;
    if (events[i].kind == GF_GIL_GAP) {
      gaps++;
      gap_at = mine;
      GF_CHECK_EQ(events[i].t_ns, lost);
    }
  }
  GF_CHECK_EQ(gaps, 1);
  GF_CHECK_EQ(gap_at, 256); /* right after its first chunk's 255 events */
  GF_CHECK(mine >= 256 + 400); /* the second burst, all of it */
}

static uint64_t own_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct spinner {
  uint64_t spun_ns; /* its own CPU time once it spun, by its own clock */
  int leave;        /* atomic */
  uint32_t tid;
  pthread_t thread;
};

static void *spinner_main(void *arg) {
  struct spinner *sp = arg;
  fx.take(sp);
  while (own_cpu_ns() < 20000000ull)
    ;
  fx.drop(sp);
  usleep(30000); /* no CPU time for a while */
  __atomic_store_n(&sp->spun_ns, own_cpu_ns(), __ATOMIC_RELEASE);
  __atomic_store_n(&sp->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
  while (!__atomic_load_n(&sp->leave, __ATOMIC_ACQUIRE))
    usleep(100);
  return NULL;
}

GF_TEST(gilhook_reports_each_threads_cpu_time) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  struct spinner sp = {.leave = 0};
  pthread_create(&sp.thread, NULL, spinner_main, &sp);
  while (__atomic_load_n(&sp.tid, __ATOMIC_ACQUIRE) == 0)
    usleep(100);
  uint64_t alive = stats_of(sp.tid).cpu_ns; /* read from its clock */
  __atomic_store_n(&sp.leave, 1, __ATOMIC_RELEASE);
  pthread_join(sp.thread, NULL);
  struct gf_gilhook_thread_stats ended = stats_of(sp.tid); /* stored as it ended */
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(ended.exit_ns != 0);
  GF_CHECK(alive >= sp.spun_ns && alive < sp.spun_ns + 10000000ull);
  GF_CHECK(ended.cpu_ns >= alive && ended.cpu_ns < sp.spun_ns + 10000000ull);
}

/* In the forked child: only its own record, afresh (priority 0 too); no events of the
 * parent's; exit status 0 when so. */
static int check_forked_child(uint32_t parent_id, void *self_state) {
  int records = 0;
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_visit, &records);
  struct gf_gilhook_thread_stats s = stats_of((uint32_t)getpid());
  struct gf_gilhook_event events[64];
  if (records != 1 || s.id == parent_id || s.id != gf_gilhook_self_id() || s.acquisitions != 0 ||
      s.state != GF_GIL_HELD || s.priority != 0 || gf_gilhook_get_priority() != 0 ||
      gf_gilhook_event_bytes() != 0 || gf_gilhook_drain(events, 64) != 0)
    return 1;
  fx.drop(self_state); /* the child's own events and counts */
  fx.take(self_state);
  size_t n = gf_gilhook_drain(events, 64);
  s = stats_of((uint32_t)getpid());
  if (s.acquisitions != 1 || n < 2)
    return 2;
  for (size_t i = 0; i < n; i++)
    if (events[i].thread != s.id)
      return 3;
  return 0;
}

GF_TEST(gilhook_a_forked_child_keeps_only_its_own_thread) {
  GF_CHECK(fx_load() == 0);
  int self;
  gf_gilhook_tracing(1, 1 << 20);
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  struct worker w = {.rounds = 3}; /* another record, with events */
  pthread_create(&w.thread, NULL, worker_main, &w);
  pthread_join(w.thread, NULL);
  fx.take(&self);
  uint32_t parent_id = gf_gilhook_self_id();
  GF_CHECK_EQ(gf_gilhook_set_priority(-1), 0);
  pid_t pid = fork();
  if (pid == 0)
    _exit(check_forked_child(parent_id, &self));
  int status = -1;
  waitpid(pid, &status, 0);
  GF_CHECK_EQ(gf_gilhook_get_priority(), -1); /* the parent's thread keeps its level */
  GF_CHECK_EQ(gf_gilhook_set_priority(0), 0);
  struct gf_gilhook_thread_stats ws = stats_of(w.tid);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  gf_gilhook_tracing(-1, 1 << 20);
  GF_CHECK(WIFEXITED(status));
  GF_CHECK_EQ(WEXITSTATUS(status), 0);
  GF_CHECK_EQ(ws.acquisitions, 3); /* the parent's records are untouched */
}

struct churner {
  int stop; /* atomic */
  int priority; /* of its short threads */
  pthread_t thread;
};

/* Starts short threads that take the fixture GIL twice and end, until told to stop. */
static void *churner_main(void *arg) {
  struct churner *c = arg;
  while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
    struct worker w = {.rounds = 2, .priority = c->priority};
    pthread_create(&w.thread, NULL, worker_main, &w);
    pthread_join(w.thread, NULL);
  }
  return NULL;
}

GF_TEST(gilhook_reaps_while_threads_come_and_go) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  gf_gilhook_tracing(1, 1 << 20);
  struct churner churners[3] = {{0}};
  for (int i = 0; i < 3; i++)
    pthread_create(&churners[i].thread, NULL, churner_main, &churners[i]);
  /* The binding's round: drain, then reap, then read; records are pushed meanwhile. */
  static struct gf_gilhook_event events[4096];
  size_t reaped = 0;
  uint64_t end = gf_gilhook_now_ns() + 300000000ull;
  while (gf_gilhook_now_ns() < end) {
    while (gf_gilhook_drain(events, 4096) > 0)
      ;
    reaped += gf_gilhook_reap(NULL, NULL);
    int n = 0;
    gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_visit, &n);
  }
  for (int i = 0; i < 3; i++) {
    __atomic_store_n(&churners[i].stop, 1, __ATOMIC_RELEASE);
    pthread_join(churners[i].thread, NULL);
  }
  while (gf_gilhook_drain(events, 4096) > 0)
    ;
  reaped += gf_gilhook_reap(NULL, NULL);
  gf_gilhook_tracing(-1, 1 << 20);
  int ended = 0;
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_ended, &ended);
  fx.take(&self);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(reaped > 30);
  GF_CHECK_EQ(ended, 0);
}

/* Runs n short threads one after another, each taking the fixture GIL twice at `priority`. */
static void short_threads(int n, int priority) {
  for (int i = 0; i < n; i++) {
    struct worker w = {.rounds = 2, .priority = priority};
    pthread_create(&w.thread, NULL, worker_main, &w);
    pthread_join(w.thread, NULL);
  }
}

/* Ended records left, counted holding the fixture GIL (self-reaping readers must hold it). */
static int ended_records(void *self) {
  int ended = 0;
  fx.take(self);
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_ended, &ended);
  fx.drop(self);
  return ended;
}

GF_TEST(gilhook_self_reaping_frees_ended_threads_records_without_a_reader) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  struct gf_gilhook_totals before, after;
  gf_gilhook_totals(gf_gilhook_now_ns(), &before);
  fx.drop(&self);
  short_threads(200, 1); /* off: the records wait for a reaper */
  int kept = ended_records(&self);
  gf_gilhook_self_reap(1);
  short_threads(300, 1); /* they end holding a priority */
  int left = ended_records(&self);
  fx.take(&self);
  gf_gilhook_totals(gf_gilhook_now_ns(), &after);
  gf_gilhook_self_reap(0);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(kept >= 200);
  GF_CHECK(left <= 64);
  GF_CHECK(after.acquisitions >= before.acquisitions + 2 * 500); /* freed, still counted */
}

struct paused_walk {
  void *self;
  int paused, ended; /* ended records once the threads had come and gone */
};

/* At the first ended record, gives the fixture GIL up while enough threads end and take it to
 * make a self-reap due: the walk goes on from that record afterwards. */
static int pause_in_walk(const struct gf_gilhook_thread_stats *s, void *arg) {
  struct paused_walk *w = arg;
  if (s->exit_ns != 0 && !w->paused) {
    w->paused = 1;
    fx.drop(w->self);
    short_threads(200, -1);
    fx.take(w->self);
    gf_gilhook_foreach_thread(gf_gilhook_now_ns(), count_ended, &w->ended);
  }
  return 0;
}

GF_TEST(gilhook_self_reaping_frees_nothing_under_a_walk_that_gave_the_gil_up) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  gf_gilhook_self_reap(1);
  short_threads(1, 0); /* an ended record for the walk to stop at */
  struct paused_walk w = {.self = &self};
  fx.take(&self);
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), pause_in_walk, &w);
  fx.drop(&self);
  short_threads(1, 0); /* the walk is over: the next take of the GIL reaps */
  int after = ended_records(&self);
  fx.take(&self);
  gf_gilhook_self_reap(0);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK_EQ(w.paused, 1);
  GF_CHECK(w.ended >= 200);
  GF_CHECK(after <= 64);
}

GF_TEST(gilhook_self_reaps_while_threads_of_every_priority_come_and_go) {
  GF_CHECK(fx_load() == 0);
  int self;
  GF_CHECK_EQ(install_holding(&self), 0);
  fx.drop(&self);
  gf_gilhook_self_reap(1);
  /* Urgent waiters compare themselves with background holders whose records are reaped. */
  struct churner churners[3] = {{.priority = -1}, {.priority = 0}, {.priority = 2}};
  for (int i = 0; i < 3; i++)
    pthread_create(&churners[i].thread, NULL, churner_main, &churners[i]);
  usleep(300000);
  for (int i = 0; i < 3; i++) {
    __atomic_store_n(&churners[i].stop, 1, __ATOMIC_RELEASE);
    pthread_join(churners[i].thread, NULL);
  }
  int ended = ended_records(&self);
  fx.take(&self);
  gf_gilhook_self_reap(0);
  GF_CHECK_EQ(gf_gilhook_uninstall(), 0);
  fx.drop(&self);
  GF_CHECK(ended <= 64);
}
