/* gilfree._gilhook: finds and self-checks the GIL of this interpreter, then drives the
 * gf_gilhook core (GOT hooks of the GIL's pthread calls). Used by gilfree.gil and
 * gilfree.priority; every function runs with the GIL held, which serializes draining and
 * reaping (the hooks reap holding it too).
 * Installing gives the GIL up (the self-check and its proof switch threads), so install,
 * uninstall and the user counts take the module's users_lock too. */
#define PY_SSIZE_T_CLEAN
/* The GIL's layout is internal: compile against this exact CPython's internal headers. */
#define Py_BUILD_CORE_MODULE 1
#include <Python.h>

#include "internal/pycore_ceval.h"
#include "internal/pycore_gil.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_runtime.h"

#include <dlfcn.h>
#include <math.h>

#include "gf/gilhook.h"

#define GF_SUPPORTED(major, minor)                                                           \
  ((major) == 3 && ((minor) == 11 || (minor) == 12 || (minor) == 13))

#define GF_TRACE_BUDGET_DEFAULT (256u << 20)

/* Touched only with the GIL held (every entry point is a Python call): no other locking. */
typedef struct {
  int users;             /* acquire() calls not yet released; under users_lock */
  int tracers;           /* of which asked for events; under users_lock */
  int keepers;           /* of which need ended threads' final rows from reap(); under users_lock */
  PyThread_type_lock users_lock;
} gilhook_state;

static gilhook_state *get_state(PyObject *module) { return PyModule_GetState(module); }

static struct _gil_runtime_state *main_gil(void) {
#if PY_VERSION_HEX < 0x030C0000
  return &_PyRuntime.ceval.gil;
#else
  return _PyInterpreterState_Main()->ceval.gil;
#endif
}

/* Asks the GIL's holder to drop it at once. The core calls it with the GIL's mutex held and
 * locked == 1: the holder cannot release, so its thread state stays valid while we write. */
static void request_drop(void *arg) {
  struct _gil_runtime_state *gil = arg;
#if PY_VERSION_HEX < 0x030D0000
  (void)gil;
  PyInterpreterState *interp = _PyInterpreterState_Main();
  _Py_atomic_store_relaxed(&interp->ceval.gil_drop_request, 1);
  _Py_atomic_store_relaxed(&interp->ceval.eval_breaker, 1);
#else
  PyThreadState *holder = (PyThreadState *)_Py_atomic_load_ptr_relaxed(&gil->last_holder);
  if (holder != NULL)
    _Py_set_eval_breaker_bit(holder, _PY_GIL_DROP_REQUEST_BIT);
#endif
}

static unsigned long gil_interval(struct _gil_runtime_state *gil) {
  return __atomic_load_n(&gil->interval, __ATOMIC_RELAXED);
}

static int gil_locked(struct _gil_runtime_state *gil) {
  return __atomic_load_n((int *)&gil->locked, __ATOMIC_RELAXED);
}

static PyThreadState *gil_last_holder(struct _gil_runtime_state *gil) {
  return (PyThreadState *)__atomic_load_n((uintptr_t *)&gil->last_holder, __ATOMIC_RELAXED);
}

/* sys.getswitchinterval() in microseconds, as CPython keeps it. Returns 0 with an exception
 * set on failure. */
static unsigned long get_switch_interval_us(PyObject *sys) {
  PyObject *current = PyObject_CallMethod(sys, "getswitchinterval", NULL);
  if (current == NULL)
    return 0;
  double seconds = PyFloat_AsDouble(current);
  Py_DECREF(current);
  return PyErr_Occurred() ? 0 : (unsigned long)llround(seconds * 1e6);
}

/* sys.setswitchinterval(seconds). Returns 0, or -1 with an exception set. */
static int set_switch_interval(PyObject *sys, double seconds) {
  PyObject *result = PyObject_CallMethod(sys, "setswitchinterval", "d", seconds);
  Py_XDECREF(result);
  return result == NULL ? -1 : 0;
}

/* Raises UnsupportedInterpreter(reason) and returns NULL (no reference). gilfree.errors is
 * imported only then: it imports concurrent.futures (multiprocessing, socket, queue, ...), which
 * `diagnose` must not import before the program it runs. */
static PyObject *unsupported(const char *reason) {
  PyObject *errors = PyImport_ImportModule("gilfree.errors");
  PyObject *cls = errors == NULL ? NULL : PyObject_GetAttrString(errors, "UnsupportedInterpreter");
  Py_XDECREF(errors);
  if (cls != NULL) {
    PyErr_SetString(cls, reason);
    Py_DECREF(cls);
  }
  return NULL;
}

/* Checks, holding the GIL, that the GIL is where and what the headers say. Returns 0, or -1
 * with UnsupportedInterpreter (or another exception) set. Never writes into the GIL. */
static int self_check(gilhook_state *st) {
  char reason[256];
#ifdef Py_GIL_DISABLED
  unsupported("free-threaded build: there is no GIL to account for");
  return -1;
#endif
  unsigned long runtime = Py_Version;
  if (!GF_SUPPORTED(PY_MAJOR_VERSION, PY_MINOR_VERSION) ||
      (runtime >> 8) != ((unsigned long)PY_VERSION_HEX >> 8)) {
    snprintf(reason, sizeof(reason),
             "gilfree._gilhook was built for CPython %s and knows the GIL of 3.11-3.13 only; "
             "this is %lu.%lu.%lu (rebuild gilfree for it)",
             PY_VERSION, runtime >> 24, (runtime >> 16) & 0xff, (runtime >> 8) & 0xff);
    unsupported(reason);
    return -1;
  }
  PyThreadState *tstate = PyThreadState_Get();
  if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
    /* The text of gilfree.gil._SUBINTERPRETER, for where this module does not load. */
    unsupported("GIL priorities and accounting are unavailable in subinterpreters (gilfree "
                    "hooks the main interpreter's GIL only)");
    return -1;
  }
  struct _gil_runtime_state *gil = main_gil();
  if (gil != NULL && gil_last_holder(gil) != tstate) {
    /* A thread state swap (subinterpreter calls) does not update last_holder; a release and
     * take by this thread does. */
    Py_BEGIN_ALLOW_THREADS;
    Py_END_ALLOW_THREADS;
  }
  if (gil == NULL || gil_locked(gil) != 1 || gil_last_holder(gil) != tstate) {
    unsupported("GIL layout check failed: the GIL does not read as held by this thread");
    return -1;
  }
  /* The interval must follow sys.setswitchinterval, in microseconds: probe it with another
   * value, then put the user's back. */
  PyObject *sys = PyImport_ImportModule("sys");
  if (sys == NULL)
    return -1;
  int rc = -1;
  unsigned long before = get_switch_interval_us(sys);
  if (PyErr_Occurred())
    goto done;
  unsigned long layout_before = gil_interval(gil);
  if (set_switch_interval(sys, (double)(before + 17) / 1e6) < 0)
    goto done;
  unsigned long probe = get_switch_interval_us(sys), layout_probe = gil_interval(gil);
  if (PyErr_Occurred() || set_switch_interval(sys, (double)before / 1e6) < 0)
    goto done;
  unsigned long restored = get_switch_interval_us(sys);
  if (PyErr_Occurred())
    goto done;
  if (layout_before != before || layout_probe != probe || probe == before ||
      gil_interval(gil) != restored) {
    unsupported("GIL layout check failed: the switch interval is not where expected");
    goto done;
  }
  rc = 0;
done:
  Py_DECREF(sys);
  return rc;
}

struct own_stats {
  uint32_t id;
  struct gf_gilhook_thread_stats stats;
};

static int find_own(const struct gf_gilhook_thread_stats *s, void *arg) {
  struct own_stats *own = arg;
  if (s->id != own->id)
    return 0;
  own->stats = *s;
  return 1;
}

static struct gf_gilhook_thread_stats own_stats(void) {
  struct own_stats own = {.id = gf_gilhook_self_id()};
  gf_gilhook_foreach_thread(gf_gilhook_now_ns(), find_own, &own);
  return own.stats;
}

/* Installs the hooks, then proves they see this thread release and retake the GIL. */
static int install(gilhook_state *st) {
  char reason[256];
  if (self_check(st) < 0)
    return -1;
  struct _gil_runtime_state *gil = main_gil();
  struct gf_gilhook_targets targets = {
      .mutex = &gil->mutex,
      .cond = &gil->cond,
      .switch_mutex = &gil->switch_mutex,
      .switch_cond = &gil->switch_cond,
      .locked = (const int *)&gil->locked,
      .request_drop = request_drop,
      .request_drop_arg = gil,
  };
  /* _PyRuntime lives in the object whose take_gil/drop_gil we hook: libpython, or the
   * executable when CPython is linked statically. */
  int rc = gf_gilhook_install(&_PyRuntime, &targets);
  if (rc < 0) {
    snprintf(reason, sizeof(reason),
             "cannot hook the GIL's pthread calls in the object holding _PyRuntime: %s",
             strerror(-rc));
    unsupported(reason);
    return -1;
  }
  struct gf_gilhook_thread_stats before = own_stats();
  Py_BEGIN_ALLOW_THREADS;
  Py_END_ALLOW_THREADS;
  struct gf_gilhook_thread_stats after = own_stats();
  if (after.acquisitions != before.acquisitions + 1 || after.state != GF_GIL_HELD) {
    gf_gilhook_uninstall();
    unsupported("the GIL hooks did not see this thread release and retake the GIL");
    return -1;
  }
  return 0;
}

PyDoc_STRVAR(check_doc, "check()\n--\n\nRaises UnsupportedInterpreter (with the reason) if the "
                        "GIL of this interpreter cannot be hooked.");

/* Returns a new reference (None), or NULL with the reason raised. */
static PyObject *gilhook_check(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  if (gf_gilhook_installed())
    Py_RETURN_NONE;
  if (self_check(get_state(module)) < 0)
    return NULL;
  Py_RETURN_NONE;
}

/* Takes users_lock; waits for it without the GIL, since its holder may be installing (which
 * needs the GIL back). */
static void lock_users(gilhook_state *st) {
  if (PyThread_acquire_lock(st->users_lock, NOWAIT_LOCK))
    return;
  Py_BEGIN_ALLOW_THREADS
  PyThread_acquire_lock(st->users_lock, WAIT_LOCK);
  Py_END_ALLOW_THREADS
}

PyDoc_STRVAR(acquire_doc, "acquire(trace, budget_bytes, keep)\n--\n\nAdds a user of the hooks "
                          "(installing them on the first); with trace, events are recorded. "
                          "While no user keeps, the hooks free ended threads' records themselves; "
                          "with keep, they stay until reap().");

/* The hooks reap by themselves while no user wants the final rows reap() gives. Called under
 * users_lock, holding the GIL. */
static void update_self_reap(gilhook_state *st) { gf_gilhook_self_reap(st->keepers == 0); }

/* Borrows args. Returns a new reference (None), or NULL with an exception set. */
static PyObject *gilhook_acquire(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  gilhook_state *st = get_state(module);
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "acquire(trace, budget_bytes, keep)");
    return NULL;
  }
  int trace = PyObject_IsTrue(args[0]);
  Py_ssize_t budget = PyLong_AsSsize_t(args[1]);
  if (trace < 0 || (budget == -1 && PyErr_Occurred()))
    return NULL;
  int keep = PyObject_IsTrue(args[2]);
  if (keep < 0)
    return NULL;
  lock_users(st);
  if (st->users == 0 && install(st) < 0) {
    PyThread_release_lock(st->users_lock);
    return NULL;
  }
  st->users++;
  st->keepers += keep;
  update_self_reap(st);
  if (trace) {
    st->tracers++;
    gf_gilhook_tracing(1, budget > 0 ? (size_t)budget : GF_TRACE_BUDGET_DEFAULT);
  }
  PyThread_release_lock(st->users_lock);
  Py_RETURN_NONE;
}

PyDoc_STRVAR(release_doc, "release(trace, keep)\n--\n\nRemoves a user (as acquired); the last "
                          "one uninstalls the hooks and restores the GOT.");

/* Borrows args. Returns a new reference (None), or NULL with an exception set. */
static PyObject *gilhook_release(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  gilhook_state *st = get_state(module);
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "release(trace, keep)");
    return NULL;
  }
  int trace = PyObject_IsTrue(args[0]);
  if (trace < 0)
    return NULL;
  int keep = PyObject_IsTrue(args[1]);
  if (keep < 0)
    return NULL;
  lock_users(st);
  int rc = 0;
  if (st->users == 0 || (trace && st->tracers == 0) || (keep && st->keepers == 0)) {
    PyThread_release_lock(st->users_lock);
    PyErr_SetString(PyExc_RuntimeError, "release() without acquire()");
    return NULL;
  }
  if (trace) {
    st->tracers--;
    gf_gilhook_tracing(-1, GF_TRACE_BUDGET_DEFAULT);
  }
  st->keepers -= keep;
  update_self_reap(st);
  if (--st->users == 0)
    rc = gf_gilhook_uninstall();
  PyThread_release_lock(st->users_lock);
  if (rc < 0) {
    errno = -rc;
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  Py_RETURN_NONE;
}

/* Returns a new reference to a bool. */
static PyObject *gilhook_installed(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyBool_FromLong(gf_gilhook_installed());
}

/* Returns a new reference to a bool. */
static PyObject *gilhook_slots_restored(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyBool_FromLong(gf_gilhook_slots_restored());
}

/* Appends a new tuple for the record to the list in arg (borrowed; the list takes its own
 * reference); stops the walk with an exception set on error. */
static int append_thread(const struct gf_gilhook_thread_stats *s, void *arg) {
  PyObject *row = Py_BuildValue(
      "(kkKKKKKKKKKKiiKKy)", (unsigned long)s->id, (unsigned long)s->tid,
      (unsigned long long)s->first_ns,
      (unsigned long long)s->exit_ns, (unsigned long long)s->held_ns,
      (unsigned long long)s->wait_ns, (unsigned long long)s->acquisitions,
      (unsigned long long)s->waits, (unsigned long long)s->switches_in,
      (unsigned long long)s->forced, (unsigned long long)s->drop_requests,
      (unsigned long long)s->timeouts, s->state, s->priority, (unsigned long long)s->lost_ns,
      (unsigned long long)s->cpu_ns, s->name);
  if (row == NULL)
    return 1;
  int rc = PyList_Append(arg, row);
  Py_DECREF(row);
  return rc < 0;
}

PyDoc_STRVAR(threads_doc,
             "threads()\n--\n\nReturns a new tuple (now_ns, rows): rows is a list of (id, tid, first_ns, exit_ns, held_ns, wait_ns, "
             "acquisitions, waits, switches_in, forced, drop_requests, timeouts, state, "
             "priority, lost_ns, cpu_ns, name), cumulative per thread up to now_ns, times on "
             "time.monotonic_ns()'s clock; lost_ns: its events are lost from then on (0: none); "
             "cpu_ns: the thread's CPU time; name: its OS name when its record was made.");

/* Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_threads(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  PyObject *rows = PyList_New(0);
  if (rows == NULL)
    return NULL;
  uint64_t now = gf_gilhook_now_ns();
  gf_gilhook_foreach_thread(now, append_thread, rows);
  if (PyErr_Occurred()) {
    Py_DECREF(rows);
    return NULL;
  }
  return Py_BuildValue("(KN)", (unsigned long long)now, rows); /* N steals rows */
}

PyDoc_STRVAR(reap_doc,
             "reap()\n--\n\nFrees the records of threads that have ended and whose events were "
             "drained; returns a new list of their final rows (as in threads()). Their counts stay "
             "in totals().");

/* Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_reap(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  PyObject *rows = PyList_New(0);
  if (rows == NULL)
    return NULL;
  gf_gilhook_reap(append_thread, rows);
  if (PyErr_Occurred()) {
    Py_DECREF(rows);
    return NULL;
  }
  return rows;
}

/* Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_totals(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  struct gf_gilhook_totals sum;
  gf_gilhook_totals(gf_gilhook_now_ns(), &sum);
  return Py_BuildValue("(KKKKKKKK)", (unsigned long long)sum.live_threads,
                       (unsigned long long)sum.held_ns, (unsigned long long)sum.wait_ns,
                       (unsigned long long)sum.acquisitions, (unsigned long long)sum.waits,
                       (unsigned long long)sum.switches_in, (unsigned long long)sum.forced,
                       (unsigned long long)sum.drop_requests);
}

PyDoc_STRVAR(drain_doc, "drain(target)\n--\n\nAppends the recorded events to the bytearray "
                        "target (or, with None, discards them) as (t_ns: u64, thread: u32, kind: "
                        "u32) records (thread: the record id of threads()), forgets them, and "
                        "returns how many there were.");

/* Borrows target. Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_drain(PyObject *module, PyObject *target) {
  enum { BATCH = 8192 };
  if (target != Py_None && !PyByteArray_Check(target)) {
    PyErr_SetString(PyExc_TypeError, "drain() takes a bytearray or None");
    return NULL;
  }
  struct gf_gilhook_event *batch = PyMem_Malloc(BATCH * sizeof(*batch));
  if (batch == NULL)
    return PyErr_NoMemory();
  size_t total = 0, n;
  while ((n = gf_gilhook_drain(batch, BATCH)) > 0) {
    total += n;
    if (target == Py_None)
      continue;
    Py_ssize_t size = PyByteArray_GET_SIZE(target);
    if (PyByteArray_Resize(target, size + (Py_ssize_t)(n * sizeof(*batch))) < 0) {
      PyMem_Free(batch);
      return NULL;
    }
    memcpy(PyByteArray_AS_STRING(target) + size, batch, n * sizeof(*batch));
  }
  PyMem_Free(batch);
  return PyLong_FromSize_t(total);
}

/* Timelines from a buffer of drained events (drains one after another). A drain gives each
 * thread's events in order, thread after thread, so a thread's events are the runs of its
 * consecutive events, taken in buffer order: no sort, no copy of the events. */
struct run {
  uint32_t thread;
  size_t start, count;
};

static int run_order(const void *a, const void *b) {
  const struct run *x = a, *y = b;
  if (x->thread != y->thread)
    return x->thread < y->thread ? -1 : 1;
  return x->start < y->start ? -1 : x->start > y->start;
}

struct timeline {
  Py_buffer view;
  const struct gf_gilhook_event *events;
  size_t nevents;
  uint64_t t0, end; /* the window; end for threads not in ends */
  PyObject *ends;   /* {record id: end_ns} of threads whose timeline ends before */
  struct run *runs;
  size_t nruns;
};

static void timeline_close(struct timeline *tl) {
  PyMem_Free(tl->runs);
  if (tl->view.obj != NULL)
    PyBuffer_Release(&tl->view);
}

/* Parses (events, t0, end, ends) and finds the runs. Returns 0, or -1 with an exception set
 * (tl is closed then). */
static int timeline_open(struct timeline *tl, PyObject *const *args) {
  unsigned long long t0, end;
  *tl = (struct timeline){0};
  if (PyObject_GetBuffer(args[0], &tl->view, PyBUF_SIMPLE) < 0)
    return -1;
  t0 = PyLong_AsUnsignedLongLong(args[1]);
  end = PyLong_AsUnsignedLongLong(args[2]);
  if (PyErr_Occurred())
    goto error;
  /* (An empty buffer's pointer may be any: it is not read.) */
  if (!PyDict_Check(args[3]) || tl->view.len % sizeof(struct gf_gilhook_event) != 0 ||
      (tl->view.len > 0 && (uintptr_t)tl->view.buf % _Alignof(struct gf_gilhook_event) != 0)) {
    PyErr_SetString(PyExc_ValueError, "expected drained events and a dict of ends");
    goto error;
  }
  tl->events = tl->view.buf;
  tl->nevents = (size_t)tl->view.len / sizeof(struct gf_gilhook_event);
  tl->t0 = t0;
  tl->end = end;
  tl->ends = args[3];
  size_t cap = 0;
  for (size_t i = 0; i < tl->nevents; i++) {
    if (tl->nruns > 0 && tl->runs[tl->nruns - 1].thread == tl->events[i].thread) {
      tl->runs[tl->nruns - 1].count++;
      continue;
    }
    if (tl->nruns == cap) {
      cap = cap ? 2 * cap : 64;
      struct run *more = PyMem_Realloc(tl->runs, cap * sizeof(*more));
      if (more == NULL) {
        PyErr_NoMemory();
        goto error;
      }
      tl->runs = more;
    }
    tl->runs[tl->nruns++] = (struct run){tl->events[i].thread, i, 1};
  }
  qsort(tl->runs, tl->nruns, sizeof(*tl->runs), run_order);
  return 0;
error:
  timeline_close(tl);
  return -1;
}

/* For each thread: begin(thread, arg) (unless NULL), its events to a spanner calling
 * span_fn(span, arg), then done(thread, where its timeline ends, arg). Returns 0, or -1 with an
 * exception set (also when done fails). */
static int timeline_walk(struct timeline *tl, void (*begin)(uint32_t, void *),
                         void (*span_fn)(const struct gf_gilhook_span *, void *),
                         int (*done)(uint32_t, uint64_t, void *), void *arg) {
  struct gf_gilhook_spanner spanner;
  for (size_t i = 0; i < tl->nruns;) {
    uint32_t thread = tl->runs[i].thread;
    uint64_t end = tl->end;
    PyObject *key = PyLong_FromUnsignedLong(thread);
    PyObject *value = key != NULL ? PyDict_GetItemWithError(tl->ends, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    if (value != NULL)
      end = PyLong_AsUnsignedLongLong(value);
    if (PyErr_Occurred())
      return -1;
    if (begin != NULL)
      begin(thread, arg);
    gf_gilhook_spans_begin(&spanner, tl->t0, end, span_fn, arg);
    for (; i < tl->nruns && tl->runs[i].thread == thread; i++)
      gf_gilhook_spans_feed(&spanner, tl->events + tl->runs[i].start, tl->runs[i].count);
    if (done(thread, gf_gilhook_spans_end(&spanner), arg) < 0)
      return -1;
  }
  return 0;
}

/* One thread's spans, for summarize(). */
struct summary {
  PyObject *out; /* {record id: row} */
  size_t spans;
  uint64_t *waits; /* whole contended waits */
  size_t nwaits, cap;
  int failed;
};

static void summary_span(const struct gf_gilhook_span *span, void *arg) {
  struct summary *sum = arg;
  sum->spans++;
  if (span->waited_ns == 0 || sum->failed)
    return;
  if (sum->nwaits == sum->cap) {
    size_t cap = sum->cap ? 2 * sum->cap : 256;
    uint64_t *more = PyMem_Realloc(sum->waits, cap * sizeof(*more));
    if (more == NULL) {
      sum->failed = 1;
      return;
    }
    sum->waits = more;
    sum->cap = cap;
  }
  sum->waits[sum->nwaits++] = span->waited_ns;
}

static int wait_order(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* The q-quantile of n sorted values, rounding its index as Python's round() does. */
static uint64_t quantile(const uint64_t *sorted, size_t n, double q) {
  return n == 0 ? 0 : sorted[(size_t)llrint(q * (double)(n - 1))];
}

static int summary_done(uint32_t thread, uint64_t end, void *arg) {
  struct summary *sum = arg;
  if (sum->failed) {
    PyErr_NoMemory();
    return -1;
  }
  qsort(sum->waits, sum->nwaits, sizeof(*sum->waits), wait_order);
  PyObject *key = PyLong_FromUnsignedLong(thread);
  PyObject *row = Py_BuildValue("(KnKKK)", (unsigned long long)end, (Py_ssize_t)sum->spans,
                                (unsigned long long)quantile(sum->waits, sum->nwaits, 0.5),
                                (unsigned long long)quantile(sum->waits, sum->nwaits, 0.99),
                                (unsigned long long)quantile(sum->waits, sum->nwaits, 1.0));
  int rc = key != NULL && row != NULL ? PyDict_SetItem(sum->out, key, row) : -1;
  Py_XDECREF(key);
  Py_XDECREF(row);
  sum->spans = sum->nwaits = 0;
  return rc;
}

PyDoc_STRVAR(summarize_doc,
             "summarize(events, t0, end, ends)\n--\n\nPer thread of the drained events: a new dict "
             "{record id: (timeline_end_ns, spans, wait_p50_ns, wait_p99_ns, wait_max_ns)} over "
             "the window from t0 to end, or to ends[record id]; earlier where its events were "
             "lost. The percentiles are over the waits that took the GIL from another holder.");

/* Borrows args. Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_summarize(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  struct timeline tl;
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "summarize(events, t0, end, ends)");
    return NULL;
  }
  if (timeline_open(&tl, args) < 0)
    return NULL;
  struct summary sum = {.out = PyDict_New()};
  if (sum.out == NULL || timeline_walk(&tl, NULL, summary_span, summary_done, &sum) < 0)
    Py_CLEAR(sum.out);
  PyMem_Free(sum.waits);
  timeline_close(&tl);
  return sum.out;
}

/* The slices of every thread, for slices(): a packed array of struct out_slice. */
struct out_slice {
  uint32_t thread, state;
  uint64_t start_ns, end_ns, held_ns, wait_ns;
  uint32_t spans, pad;
};

struct slicer {
  struct gf_gilhook_coalescer coalescer;
  uint32_t thread;
  struct out_slice *out;
  size_t n, cap;
  int failed;
};

static void slicer_slice(const struct gf_gilhook_slice *slice, void *arg) {
  struct slicer *sl = arg;
  if (sl->failed)
    return;
  if (sl->n == sl->cap) {
    size_t cap = sl->cap ? 2 * sl->cap : 1024;
    struct out_slice *more = PyMem_Realloc(sl->out, cap * sizeof(*more));
    if (more == NULL) {
      sl->failed = 1;
      return;
    }
    sl->out = more;
    sl->cap = cap;
  }
  sl->out[sl->n++] = (struct out_slice){sl->thread, slice->state, slice->start_ns, slice->end_ns,
                                        slice->held_ns, slice->wait_ns, slice->spans, 0};
}

static void slicer_span(const struct gf_gilhook_span *span, void *arg) {
  gf_gilhook_coalesce(&((struct slicer *)arg)->coalescer, span);
}

static void slicer_begin(uint32_t thread, void *arg) { ((struct slicer *)arg)->thread = thread; }

static int slicer_done(uint32_t thread, uint64_t end, void *arg) {
  struct slicer *sl = arg;
  gf_gilhook_coalesce_end(&sl->coalescer);
  if (sl->failed) {
    PyErr_NoMemory();
    return -1;
  }
  return 0;
}

PyDoc_STRVAR(slices_doc,
             "slices(events, t0, end, ends, resolution_ns)\n--\n\nThe timeline of every thread "
             "(window as in summarize), its spans shorter than resolution_ns merged: new bytes "
             "of (thread: u32, state: u32, start_ns, end_ns, held_ns, wait_ns: u64, spans: u32, "
             "pad: u32) records, state STATE_HELD or STATE_WANT (whichever covers more).");

/* Borrows args. Returns a new reference, or NULL with an exception set. */
static PyObject *gilhook_slices(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  struct timeline tl;
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "slices(events, t0, end, ends, resolution_ns)");
    return NULL;
  }
  unsigned long long resolution = PyLong_AsUnsignedLongLong(args[4]);
  if (PyErr_Occurred() || timeline_open(&tl, args) < 0)
    return NULL;
  struct slicer sl = {.coalescer = {.resolution_ns = resolution, .fn = slicer_slice}};
  sl.coalescer.arg = &sl;
  PyObject *out = NULL;
  if (timeline_walk(&tl, slicer_begin, slicer_span, slicer_done, &sl) == 0)
    out = PyBytes_FromStringAndSize((const char *)sl.out, (Py_ssize_t)(sl.n * sizeof(*sl.out)));
  PyMem_Free(sl.out);
  timeline_close(&tl);
  return out;
}

/* Returns a new reference. */
static PyObject *gilhook_dropped(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyLong_FromUnsignedLongLong(gf_gilhook_dropped());
}

/* Returns a new reference: the file of the object whose GOT the hooks rewrite. */
static PyObject *gilhook_hooked_object(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  Dl_info info;
  if (dladdr(&_PyRuntime, &info) == 0 || info.dli_fname == NULL)
    Py_RETURN_NONE;
  return PyUnicode_DecodeFSDefault(info.dli_fname);
}

/* Returns a new reference. */
static PyObject *gilhook_record_id(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyLong_FromUnsignedLong(gf_gilhook_self_id());
}

/* Returns a new reference. */
static PyObject *gilhook_took_from(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyLong_FromUnsignedLong(gf_gilhook_took_from());
}

PyDoc_STRVAR(set_priority_doc,
             "set_priority(level, record=0)\n--\n\nSets the GIL priority (clamped to +-8) of "
             "the calling thread, or of the thread whose record_id() is record (nothing if it "
             "has ended).");

/* Borrows args. Returns a new reference (None), or NULL with an exception set. */
static PyObject *gilhook_set_priority(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "set_priority(level, record=0)");
    return NULL;
  }
  int overflow;
  long level = PyLong_AsLongAndOverflow(args[0], &overflow);
  if (level == -1 && PyErr_Occurred())
    return NULL;
  if (overflow != 0)
    level = overflow > 0 ? LONG_MAX : LONG_MIN; /* beyond a C long: clamped like the rest */
  level = level > 1000 ? 1000 : level < -1000 ? -1000 : level;
  unsigned long record = nargs == 2 ? PyLong_AsUnsignedLong(args[1]) : 0;
  if (record == (unsigned long)-1 && PyErr_Occurred())
    return NULL;
  if (record > UINT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "no such record id");
    return NULL;
  }
  int rc = record != 0 ? gf_gilhook_set_priority_of((uint32_t)record, (int)level)
                       : gf_gilhook_set_priority((int)level);
  if (rc < 0 && rc != -ESRCH) { /* -ESRCH: that thread has ended, with no level to keep */
    errno = -rc;
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  Py_RETURN_NONE;
}

/* Returns a new reference. */
static PyObject *gilhook_get_priority(PyObject *module, PyObject *Py_UNUSED(ignored)) {
  return PyLong_FromLong(gf_gilhook_get_priority());
}

/* Borrows enabled. Returns a new reference (None), or NULL with an exception set. */
static PyObject *gilhook_set_watch(PyObject *module, PyObject *enabled) {
  int truth = PyObject_IsTrue(enabled);
  if (truth < 0)
    return NULL;
  gf_gilhook_set_watch(truth);
  Py_RETURN_NONE;
}

static PyMethodDef gilhook_methods[] = {
    {"check", gilhook_check, METH_NOARGS, check_doc},
    {"acquire", (PyCFunction)(void (*)(void))gilhook_acquire, METH_FASTCALL, acquire_doc},
    {"release", (PyCFunction)(void (*)(void))gilhook_release, METH_FASTCALL, release_doc},
    {"installed", gilhook_installed, METH_NOARGS, "installed()\n--\n\nTrue while hooked."},
    {"slots_restored", gilhook_slots_restored, METH_NOARGS,
     "slots_restored()\n--\n\nTrue when every GOT slot holds its original value."},
    {"threads", gilhook_threads, METH_NOARGS, threads_doc},
    {"drain", gilhook_drain, METH_O, drain_doc},
    {"summarize", (PyCFunction)(void (*)(void))gilhook_summarize, METH_FASTCALL, summarize_doc},
    {"slices", (PyCFunction)(void (*)(void))gilhook_slices, METH_FASTCALL, slices_doc},
    {"reap", gilhook_reap, METH_NOARGS, reap_doc},
    {"totals", gilhook_totals, METH_NOARGS,
     "totals()\n--\n\n(live_threads, held_ns, wait_ns, acquisitions, waits, switches_in, "
     "forced, drop_requests) over every record, reaped ones included."},
    {"dropped", gilhook_dropped, METH_NOARGS, "dropped()\n--\n\nEvents lost to the budget."},
    {"hooked_object", gilhook_hooked_object, METH_NOARGS,
     "hooked_object()\n--\n\nThe file (libpython or the executable) whose GOT is hooked."},
    {"record_id", gilhook_record_id, METH_NOARGS,
     "record_id()\n--\n\nThe id of the calling thread's record in threads() (unique, unlike "
     "native ids, which the kernel reuses), 0 if it has none."},
    {"took_from", gilhook_took_from, METH_NOARGS,
     "took_from()\n--\n\nNative id of the thread this one last took the GIL from after "
     "waiting for it, 0 if the GIL was free."},
    {"set_priority", (PyCFunction)(void (*)(void))gilhook_set_priority, METH_FASTCALL,
     set_priority_doc},
    {"get_priority", gilhook_get_priority, METH_NOARGS,
     "get_priority()\n--\n\nThe calling thread's GIL priority."},
    {"set_watch", gilhook_set_watch, METH_O,
     "set_watch(enabled)\n--\n\nWhether a waiter below the holder's priority may watch the GIL "
     "before sleeping (on by default; see docs/priority.md)."},
    {NULL, NULL, 0, NULL},
};

static int gilhook_exec(PyObject *module) {
  gilhook_state *st = get_state(module);
  if ((st->users_lock = PyThread_allocate_lock()) == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  if (PyModule_AddIntConstant(module, "STATE_UNKNOWN", GF_GIL_UNKNOWN) < 0 ||
      PyModule_AddIntConstant(module, "STATE_FREE", GF_GIL_FREE) < 0 ||
      PyModule_AddIntConstant(module, "STATE_WANT", GF_GIL_WANT) < 0 ||
      PyModule_AddIntConstant(module, "STATE_HELD", GF_GIL_HELD) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_WAIT", GF_GIL_WAIT) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_ACQUIRE", GF_GIL_ACQUIRE) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_RELEASE", GF_GIL_RELEASE) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_FORCED", GF_GIL_FORCED) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_ABORT", GF_GIL_ABORT) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_EXIT", GF_GIL_EXIT) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_GAP", GF_GIL_GAP) < 0 ||
      PyModule_AddIntConstant(module, "EVENT_CONTENDED", GF_GIL_CONTENDED) < 0 ||
      PyModule_AddIntConstant(module, "MAX_PRIORITY", GF_GILHOOK_MAX_PRIORITY) < 0)
    return -1;
  return 0;
}

static void gilhook_free(void *module) {
  gilhook_state *st = get_state(module);
  if (st->users_lock != NULL) {
    PyThread_free_lock(st->users_lock);
    st->users_lock = NULL;
  }
}

static PyModuleDef_Slot gilhook_slots[] = {
    {Py_mod_exec, gilhook_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef gilhook_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gilfree._gilhook",
    .m_doc = "Exact GIL accounting and GIL priorities through GOT hooks (see gilfree.gil).",
    .m_size = sizeof(gilhook_state),
    .m_methods = gilhook_methods,
    .m_slots = gilhook_slots,
    .m_free = gilhook_free,
};

PyMODINIT_FUNC PyInit__gilhook(void) { return PyModuleDef_Init(&gilhook_module); }
