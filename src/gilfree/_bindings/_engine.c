/* gilfree._engine: the CPython binding of the pool's C core (core/transport, core/workers).
 *
 * Types: Engine (the parent's pool: dispatch, the result-waiter thread, crash events),
 * Worker (a worker's end of its slot), SharedBuffer (a zero-copy read-only view of an arena
 * block). Module functions: serve_template (the template's fork loop), rss.
 *
 * Buffers of the arena arrive as SharedBuffer objects, or, for `bytes`, as real bytes objects
 * whose data pages are the arena's (see shm_view_bytes). Both kinds register their address
 * range, so that sending one on (a worker returning its argument) passes the block along
 * instead of copying it. The registries are only touched with the GIL held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gf/transport.h"
#include "gf/workers.h"

/* ------------------------------------------------------------------ module state */

typedef struct {
  PyTypeObject *engine_type;
  PyTypeObject *worker_type;
  PyTypeObject *buffer_type;
} module_state;

static inline module_state *get_state(PyObject *module) {
  return (module_state *)PyModule_GetState(module);
}

static struct PyModuleDef engine_module;

/* Checks a METH_FASTCALL call got exactly n positional arguments. */
static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t n) {
  if (nargs == n)
    return 1;
  PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, n, nargs);
  return 0;
}

/* Sets an OSError from a negative errno and returns NULL. */
static PyObject *set_errno(int rc) {
  errno = -rc;
  return PyErr_SetFromErrno(PyExc_OSError);
}

/* ------------------------------------------------------------------ shared memory */

typedef struct {
  uintptr_t start, end;
  uint64_t block;
} view_range;

typedef struct {
  PyObject *bytes; /* strong reference: the registry's; the object dies when only it is left */
  unsigned char *data;
  uint64_t len;
  uint64_t block;
} mapped_bytes;

/* What the parent's Engine and a Worker share: the arena and the registries of the views that
 * live in this process. */
typedef struct {
  gf_arena *arena;
  gf_manager *manager; /* parent */
  gf_worker *worker;   /* worker */
  view_range *ranges;
  Py_ssize_t nranges, cap_ranges;
  mapped_bytes *maps;
  Py_ssize_t nmaps, cap_maps;
  /* The process whose block references these are. In a child it forked (os.fork in the
   * parent or in a task) the views are copies, and the references they stand for are that
   * process's: never dropped nor added there (shm_foreign). */
  pid_t pid;
} shm_t;

/* The common head of Engine and Worker objects. */
typedef struct {
  PyObject_HEAD
  shm_t shm;
} ShmOwner;

static int shm_alloc(shm_t *shm, uint64_t len, uint64_t *off) {
  if (shm->worker != NULL)
    return gf_worker_alloc(shm->worker, len, off);
  return gf_manager_alloc(shm->manager, len, off);
}

/* Sets the error for a failed shm_alloc of len bytes and returns NULL: MemoryError, saying what
 * fills the region and what frees it, when the region is full; else OSError. Copies are made up
 * front (submit) and never wait for room: a parent holding results would wait for ever. */
static PyObject *shm_alloc_error(const shm_t *shm, int rc, uint64_t len) {
  if (rc != -ENOMEM)
    return set_errno(rc);
  int mib = len >= (1u << 20);
  unsigned long long need = mib ? (len + (1u << 20) - 1) >> 20 : (len + 1023) >> 10;
  /* A worker allocates results in its slot's region, the parent arguments in its own. */
  const gf_region *region;
  const char *what, *held, *remedy;
  if (shm->worker != NULL) {
    region = &shm->worker->slot->region;
    what = "a worker's shared memory for results";
    held = "its results that the parent still references";
    remedy = "drop the results (and arrays or views of them) you no longer need";
  } else {
    region = &shm->manager->seg->parent_region;
    what = "the shared memory for task arguments";
    held = "the arguments of tasks not finished yet and by pool.share() data";
    remedy = "wait for results before submitting more, or pass data that many tasks use once "
             "with pool.share()";
  }
  if (len + GF_BLOCK_HEADER > region->size) {
    /* Nothing held could make room: the region itself is smaller than the buffer. */
    struct rlimit limit;
    int capped = getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY;
    return PyErr_Format(PyExc_MemoryError,
                        "gilfree.Pool: %s (%llu MiB in all) cannot hold a buffer of %llu %s%s",
                        what, (unsigned long long)(region->size >> 20), need, mib ? "MiB" : "KiB",
                        capped ? ": it is sized to a quarter of the address-space limit (ulimit "
                                 "-v) set before Pool(); raise the limit, or send less at once"
                               : "; send less at once");
  }
  return PyErr_Format(PyExc_MemoryError,
                      "gilfree.Pool: %s is full (%llu MiB, held by %s; %llu %s more do not "
                      "fit); %s",
                      what, (unsigned long long)(region->size >> 20), held, need,
                      mib ? "MiB" : "KiB", remedy);
}

static int shm_foreign(const shm_t *shm) {
  return getpid() != shm->pid;
}

static void shm_release(shm_t *shm, uint64_t block) {
  if (shm_foreign(shm))
    return;
  if (shm->worker != NULL)
    gf_worker_release(shm->worker, block);
  else
    gf_block_decref(shm->arena, block);
}

static int grow(void **items, Py_ssize_t *cap, Py_ssize_t need, size_t item) {
  if (need <= *cap)
    return 0;
  Py_ssize_t ncap = *cap ? *cap * 2 : 16;
  void *n = PyMem_Realloc(*items, (size_t)ncap * item);
  if (n == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  *items = n;
  *cap = ncap;
  return 0;
}

static int shm_add_range(shm_t *shm, const void *start, uint64_t len, uint64_t block) {
  if (grow((void **)&shm->ranges, &shm->cap_ranges, shm->nranges + 1, sizeof(view_range)) < 0)
    return -1;
  shm->ranges[shm->nranges++] = (view_range){(uintptr_t)start, (uintptr_t)start + len, block};
  return 0;
}

static void shm_remove_range(shm_t *shm, const void *start) {
  for (Py_ssize_t i = 0; i < shm->nranges; i++) {
    if (shm->ranges[i].start == (uintptr_t)start) {
      shm->ranges[i] = shm->ranges[--shm->nranges];
      return;
    }
  }
}

/* Finds the arena block holding [p, p + len) among this process's views. */
static int shm_locate(shm_t *shm, const void *p, uint64_t len, uint64_t *block, uint64_t *at) {
  uintptr_t a = (uintptr_t)p;
  for (Py_ssize_t i = 0; i < shm->nranges; i++) {
    view_range *r = &shm->ranges[i];
    if (a >= r->start && a + len <= r->end) {
      *block = r->block;
      *at = a - r->start;
      return 1;
    }
  }
  return 0;
}

/* A zero-copy, read-only view of len bytes at `at` in an arena block. */
typedef struct {
  PyObject_HEAD
  PyObject *owner; /* strong: the Engine or Worker whose mapping this points into */
  uint64_t block;
  unsigned char *data; /* start of the block's data */
  uint64_t at, len;
} SharedBufferObject;

/* Returns a new reference. Takes over one reference to the block (the message's). */
static PyObject *shm_view_buffer(ShmOwner *owner, uint64_t block, uint64_t at, uint64_t len) {
  module_state *st = PyType_GetModuleState(Py_TYPE(owner));
  shm_t *shm = &owner->shm;
  SharedBufferObject *view = PyObject_New(SharedBufferObject, st->buffer_type);
  if (view == NULL) {
    shm_release(shm, block);
    return NULL;
  }
  view->owner = Py_NewRef((PyObject *)owner);
  view->block = block;
  view->data = gf_block_data(shm->arena, block);
  view->at = at;
  view->len = len;
  if (shm_add_range(shm, view->data, gf_block_at(shm->arena, block)->len, block) < 0) {
    Py_DECREF(view);
    return NULL;
  }
  return (PyObject *)view;
}

/* Returns a new reference: a real `bytes` object whose data are the block's pages, mapped
 * read-only behind a private page that holds the object header. CPython must never free it
 * (its memory is not the allocator's): the registry keeps one reference, and shm_scan unmaps
 * it once that is the only one left. Takes over one reference to the block. */
static PyObject *shm_view_bytes(ShmOwner *owner, uint64_t block, uint64_t len) {
  shm_t *shm = &owner->shm;
  unsigned char *data;
  int rc;
  if (grow((void **)&shm->maps, &shm->cap_maps, shm->nmaps + 1, sizeof(mapped_bytes)) < 0)
    goto error;
  if (gf_block_at(shm->arena, block)->len != len) {
    PyErr_SetString(PyExc_ValueError, "bytes buffer does not span its block");
    goto error;
  }
  rc = gf_arena_map(shm->arena, block, offsetof(PyBytesObject, ob_sval), &data);
  if (rc == -EBADFD) {
    /* A task closed the memfd's descriptor: the bytes are still readable, so copy them. */
    PyObject *copy =
        PyBytes_FromStringAndSize((const char *)gf_block_data(shm->arena, block), (Py_ssize_t)len);
    shm_release(shm, block);
    return copy;
  }
  if (rc < 0) {
    set_errno(rc);
    goto error;
  }
  PyBytesObject *op = (PyBytesObject *)(data - offsetof(PyBytesObject, ob_sval));
  (void)PyObject_INIT_VAR(op, &PyBytes_Type, (Py_ssize_t)len);
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
  op->ob_shash = -1;
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
  if (shm_add_range(shm, data, len, block) < 0) {
    gf_arena_unmap(data, len);
    goto error;
  }
  shm->maps[shm->nmaps++] = (mapped_bytes){(PyObject *)op, data, len, block};
  return Py_NewRef((PyObject *)op);

error:
  shm_release(shm, block);
  return NULL;
}

/* The binding's bufref flag (core's are GF_BUF_*): the buffer was passed on by reference (a
 * share() handle, a view sent back), not copied, so bytes_in/bytes_out do not count it. */
#define BUF_BY_REFERENCE 0x100u

/* bytes at least this long arrive mapped (zero-copy); shorter ones as a copy. */
#define MAP_BYTES_MIN (4u << 20)

/* Returns a new reference to a view of one buffer of a message. Takes over its reference. */
static PyObject *shm_view(ShmOwner *owner, const gf_bufref *ref) {
  if (gf_block_check(owner->shm.arena, ref->block) < 0 ||
      ref->at + ref->len > gf_block_at(owner->shm.arena, ref->block)->len) {
    PyErr_SetString(PyExc_ValueError, "corrupt buffer reference in message");
    return NULL;
  }
  if (owner->shm.worker != NULL && gf_worker_hold(owner->shm.worker, ref->block) < 0) {
    /* Table full: still usable, only not reclaimed if this worker crashes. */
  }
  if ((ref->flags & GF_BUF_BYTES) && ref->len < MAP_BYTES_MIN) {
    /* Mapping costs system calls and page faults; below a few MiB a copy is cheaper. */
    PyObject *copy = PyBytes_FromStringAndSize(
        (const char *)gf_block_data(owner->shm.arena, ref->block) + ref->at, (Py_ssize_t)ref->len);
    shm_release(&owner->shm, ref->block);
    return copy;
  }
  if (ref->flags & GF_BUF_BYTES)
    return shm_view_bytes(owner, ref->block, ref->len);
  return shm_view_buffer(owner, ref->block, ref->at, ref->len);
}

/* Unmaps every registered bytes object nobody but the registry references. */
static Py_ssize_t shm_scan(shm_t *shm) {
  Py_ssize_t freed = 0;
  for (Py_ssize_t i = 0; i < shm->nmaps;) {
    mapped_bytes *mb = &shm->maps[i];
    if (Py_REFCNT(mb->bytes) != 1) {
      i++;
      continue;
    }
    shm_remove_range(shm, mb->data);
    gf_arena_unmap(mb->data, mb->len);
    shm_release(shm, mb->block);
    shm->maps[i] = shm->maps[--shm->nmaps];
    freed++;
  }
  return freed;
}

/* Exports obj's bytes for a message: a reference to the block it already lives in, or a new
 * block holding a copy. Returns a new reference to a (block, at, len, flags) tuple. */
static PyObject *shm_export(shm_t *shm, PyObject *obj) {
  Py_buffer view;
  uint64_t block, at = 0;
  int rc;
  if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0)
    return NULL;
  uint32_t flags = PyBytes_CheckExact(obj) ? GF_BUF_BYTES : 0;
  uint64_t len = (uint64_t)view.len;
  /* Blocks that died since the last scan are free again: reuse them (their pages are warm). */
  if (shm->nmaps)
    shm_scan(shm);
  if (shm_locate(shm, view.buf, len, &block, &at) &&
      (!(flags & GF_BUF_BYTES) || (at == 0 && gf_block_at(shm->arena, block)->len == len))) {
    gf_block_incref(shm->arena, block);
    flags |= BUF_BY_REFERENCE;
  } else {
    /* One spare byte: bytes objects end with a NUL that receivers map along. */
    if ((rc = shm_alloc(shm, len + 1, &block)) < 0) {
      PyBuffer_Release(&view);
      return shm_alloc_error(shm, rc, len);
    }
    unsigned char *dst = gf_block_data(shm->arena, block);
    Py_BEGIN_ALLOW_THREADS
    gf_arena_fill(dst, view.buf, len);
    Py_END_ALLOW_THREADS
    dst[len] = 0;
    gf_block_at(shm->arena, block)->len = len;
    at = 0;
  }
  PyBuffer_Release(&view);
  return Py_BuildValue("(KKKI)", (unsigned long long)block, (unsigned long long)at,
                       (unsigned long long)len, flags);
}

static void shm_clear(shm_t *shm) {
  shm_scan(shm);
  /* Bytes still referenced elsewhere keep the registry's reference and their private mapping
   * until the process ends: their count must never reach zero (CPython cannot free them). */
  PyMem_Free(shm->maps);
  PyMem_Free(shm->ranges);
  shm->maps = NULL;
  shm->ranges = NULL;
  shm->nmaps = shm->nranges = 0;
}

/* ------------------------------------------------------------------ messages */

#define MAX_BUFS 4096

typedef struct {
  gf_msg hdr;
  gf_bufref bufs[MAX_BUFS];
  Py_ssize_t nbufs;
  Py_buffer head, body;
  uint64_t bytes;
} outgoing;

static void outgoing_release(outgoing *out) {
  if (out->head.obj != NULL)
    PyBuffer_Release(&out->head);
  if (out->body.obj != NULL)
    PyBuffer_Release(&out->body);
}

/* Fills out from head and body (bytes-like; head may be None) and a list of export() tuples.
 * Borrowed references. On failure the exported references are released. */
static int outgoing_build(outgoing *out, shm_t *shm, uint64_t task_id, uint32_t kind,
                          PyObject *head, PyObject *body, PyObject *bufs, size_t max_inline) {
  memset(&out->hdr, 0, sizeof(out->hdr));
  out->head.obj = out->body.obj = NULL;
  out->nbufs = 0;
  out->bytes = 0;
  PyObject *seq = PySequence_Fast(bufs, "bufs must be a sequence");
  if (seq == NULL)
    return -1;
  /* Every tuple is parsed, also past a bad one or past the limit, so that each reference is
   * released on failure; the first error is the one raised. */
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  int failed = 0;
  for (Py_ssize_t i = 0; i < n; i++) {
    unsigned long long block, at, len;
    unsigned int flags;
    PyObject *type, *value, *tb;
    if (failed)
      PyErr_Fetch(&type, &value, &tb);
    int parsed =
        PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKKI", &block, &at, &len, &flags);
    if (failed) {
      PyErr_Clear();
      PyErr_Restore(type, value, tb);
    }
    if (!parsed) {
      failed = 1;
      continue;
    }
    if (failed || out->nbufs + 1 >= MAX_BUFS) { /* one entry stays for the payload */
      if (!failed)
        PyErr_Format(PyExc_ValueError,
                     "too many out-of-band buffers in one message (%zd; at most %d)", n,
                     MAX_BUFS - 1);
      failed = 1;
      if (gf_block_check(shm->arena, block) == 0)
        shm_release(shm, block);
      continue;
    }
    out->bufs[out->nbufs++] = (gf_bufref){.block = block, .at = at, .len = len, .flags = flags};
    if (!(flags & BUF_BY_REFERENCE))
      out->bytes += len;
  }
  if (failed) {
    Py_DECREF(seq);
    goto error;
  }
  Py_DECREF(seq);
  if ((head != Py_None && PyObject_GetBuffer(head, &out->head, PyBUF_SIMPLE) < 0) ||
      PyObject_GetBuffer(body, &out->body, PyBUF_SIMPLE) < 0)
    goto error;
  uint64_t head_len = out->head.obj ? (uint64_t)out->head.len : 0;
  uint64_t payload_len = head_len + (uint64_t)out->body.len;
  out->hdr.task_id = task_id;
  out->hdr.kind = kind;
  out->hdr.head_len = (uint32_t)head_len;
  out->hdr.payload_len = payload_len;
  out->bytes += payload_len;
  size_t fixed = sizeof(gf_msg) + (size_t)(out->nbufs + 1) * sizeof(gf_bufref);
  if (payload_len + fixed > max_inline) {
    /* Too big for the ring: the payload itself travels through the arena. */
    uint64_t block;
    int rc = shm_alloc(shm, payload_len, &block);
    if (rc < 0) {
      shm_alloc_error(shm, rc, payload_len);
      goto error;
    }
    unsigned char *dst = gf_block_data(shm->arena, block);
    if (head_len)
      memcpy(dst, out->head.buf, head_len);
    memcpy(dst + head_len, out->body.buf, (size_t)out->body.len);
    out->bufs[out->nbufs++] =
        (gf_bufref){.block = block, .at = 0, .len = payload_len, .flags = GF_BUF_PAYLOAD};
    out->hdr.payload_len = 0;
  }
  out->hdr.nbufs = (uint32_t)out->nbufs;
  return 0;

error:
  for (Py_ssize_t i = 0; i < out->nbufs; i++)
    if (gf_block_check(shm->arena, out->bufs[i].block) == 0)
      shm_release(shm, out->bufs[i].block);
  outgoing_release(out);
  return -1;
}

static int outgoing_iov(outgoing *out, struct iovec iov[4]) {
  int inline_payload = out->hdr.payload_len != 0;
  iov[0] = (struct iovec){&out->hdr, sizeof(out->hdr)};
  iov[1] = (struct iovec){out->bufs, (size_t)out->nbufs * sizeof(gf_bufref)};
  iov[2] = (struct iovec){out->head.buf, inline_payload ? out->hdr.head_len : 0};
  iov[3] = (struct iovec){out->body.buf, inline_payload ? (size_t)out->body.len : 0};
  return 4;
}

/* Returns a new reference to (kind, head, body, views) for a received message: head is the
 * function bytes or None, body a bytes copy (or a view of the arena when the payload came that
 * way). Views take over the message's block references. */
static PyObject *incoming_decode(ShmOwner *owner, const gf_msg *msg) {
  const gf_bufref *bufs = (const gf_bufref *)(msg + 1);
  const char *inline_payload = (const char *)(bufs + msg->nbufs);
  PyObject *head = NULL, *body = NULL, *views = PyList_New(0), *item;
  if (views == NULL)
    return NULL;
  for (uint32_t i = 0; i < msg->nbufs; i++) {
    gf_bufref ref = bufs[i];
    if (ref.flags & GF_BUF_PAYLOAD) {
      if (gf_block_check(owner->shm.arena, ref.block) < 0 || ref.len < msg->head_len) {
        PyErr_SetString(PyExc_ValueError, "corrupt payload reference in message");
        item = NULL;
      } else {
        if (msg->head_len && head == NULL)
          head = PyBytes_FromStringAndSize(
              (const char *)gf_block_data(owner->shm.arena, ref.block) + ref.at, msg->head_len);
        ref.at += msg->head_len;
        ref.len -= msg->head_len;
        item = (msg->head_len && head == NULL) ? NULL : shm_view(owner, &ref);
      }
    } else {
      item = shm_view(owner, &ref);
    }
    if (item == NULL) {
      /* Release the references no view took over. */
      for (uint32_t j = i + 1; j < msg->nbufs; j++)
        if (gf_block_check(owner->shm.arena, bufs[j].block) == 0)
          shm_release(&owner->shm, bufs[j].block);
      goto error;
    }
    if (bufs[i].flags & GF_BUF_PAYLOAD) {
      body = item;
      continue;
    }
    int rc = PyList_Append(views, item);
    Py_DECREF(item);
    if (rc < 0)
      goto error;
  }
  if (body == NULL) {
    if (msg->head_len &&
        (head = PyBytes_FromStringAndSize(inline_payload, msg->head_len)) == NULL)
      goto error;
    body = PyBytes_FromStringAndSize(inline_payload + msg->head_len,
                                     (Py_ssize_t)(msg->payload_len - msg->head_len));
    if (body == NULL)
      goto error;
  }
  return Py_BuildValue("(INNN)", msg->kind, head ? head : Py_NewRef(Py_None), body, views);

error:
  Py_XDECREF(head);
  Py_XDECREF(body);
  Py_DECREF(views);
  return NULL;
}

/* ------------------------------------------------------------------ SharedBuffer */

static int SharedBuffer_getbuffer(SharedBufferObject *self, Py_buffer *view, int flags) {
  return PyBuffer_FillInfo(view, (PyObject *)self, self->data + self->at, (Py_ssize_t)self->len,
                           1, flags);
}

static void SharedBuffer_dealloc(SharedBufferObject *self) {
  PyTypeObject *tp = Py_TYPE(self);
  ShmOwner *owner = (ShmOwner *)self->owner;
  shm_remove_range(&owner->shm, self->data);
  shm_release(&owner->shm, self->block);
  Py_DECREF(self->owner);
  PyObject_Free(self);
  Py_DECREF(tp);
}

/* nbytes -> int. Returns a new reference. */
static PyObject *SharedBuffer_len(SharedBufferObject *self, void *closure) {
  return PyLong_FromUnsignedLongLong(self->len);
}

static PyGetSetDef SharedBuffer_getset[] = {
    {"nbytes", (getter)SharedBuffer_len, NULL, "Length in bytes.", NULL},
    {NULL},
};

static PyType_Slot SharedBuffer_slots[] = {
    {Py_tp_dealloc, SharedBuffer_dealloc},
    {Py_tp_getset, SharedBuffer_getset},
    {Py_bf_getbuffer, SharedBuffer_getbuffer},
    {Py_tp_doc, "A read-only view of bytes in the pool's shared memory."},
    {0, NULL},
};

static PyType_Spec SharedBuffer_spec = {
    .name = "gilfree._engine.SharedBuffer",
    .basicsize = sizeof(SharedBufferObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = SharedBuffer_slots,
};

/* ------------------------------------------------------------------ Engine */

typedef struct {
  PyObject_HEAD
  shm_t shm;
  gf_manager m;
  int initialized;
  int closed;
  pthread_t waiter;
  int waiter_running;
  /* close() was called on the waiter thread (from a callback): the waiter closes the engine
   * when the callback returns, since it cannot join itself. */
  int close_requested;
  int64_t close_timeout_ns;
  /* engine_close has begun: a second caller returns at once (it would join the waiter twice). */
  int closing;
  /* Threads inside the manager without the GIL (collect, start_template), which the manager's
   * teardown must not overlap. Only read and written with the GIL held, so a plain int: a
   * thread counts itself in after engine_check and before releasing the GIL, and out once it
   * holds the GIL again; the closer marks the engine closed first, then waits for zero. */
  int busy;
  PyObject *on_events; /* strong: called with each batch of events by the waiter thread */
  size_t max_inline;
} EngineObject;

/* Events collected without the GIL, turned into Python objects afterwards. */
typedef struct {
  gf_event ev;
  gf_msg *msg; /* malloc'd copy of a result message */
} pending_event;

typedef struct {
  pending_event *items;
  size_t n, cap;
} event_batch;

static int batch_add(void *ctx, const gf_event *ev) {
  event_batch *b = ctx;
  if (b->n == b->cap) {
    size_t ncap = b->cap ? b->cap * 2 : 64;
    pending_event *items = realloc(b->items, ncap * sizeof(*items));
    if (items == NULL)
      return -ENOMEM;
    b->items = items;
    b->cap = ncap;
  }
  pending_event *pe = &b->items[b->n];
  pe->ev = *ev;
  pe->msg = NULL;
  if (ev->kind == GF_EV_RESULT) {
    size_t len = sizeof(gf_msg) + ev->msg->nbufs * sizeof(gf_bufref) + ev->msg->payload_len;
    if ((pe->msg = malloc(len)) == NULL)
      return -ENOMEM;
    memcpy(pe->msg, ev->msg, len);
  }
  pe->ev.msg = NULL;
  b->n++;
  return 0;
}

/* Returns a new reference to a list of event tuples; empties the batch. */
static PyObject *batch_to_list(EngineObject *self, event_batch *b) {
  PyObject *list = PyList_New(0), *item = NULL;
  if (list == NULL)
    goto done;
  for (size_t i = 0; i < b->n; i++) {
    pending_event *pe = &b->items[i];
    const gf_event *ev = &pe->ev;
    switch (ev->kind) {
    case GF_EV_RESULT: {
      /* The views take over the message's references: it must not be released again. */
      PyObject *decoded = incoming_decode((ShmOwner *)self, pe->msg);
      free(pe->msg);
      pe->msg = NULL;
      if (decoded == NULL)
        goto fail;
      item = Py_BuildValue("(iKN)", ev->kind, (unsigned long long)ev->task_id, decoded);
      break;
    }
    case GF_EV_DIED:
      item = Py_BuildValue("(iKIiiii)", ev->kind, (unsigned long long)ev->task_id, ev->slot,
                           ev->pid, ev->status, ev->timed_out, ev->was_ready);
      break;
    case GF_EV_SPAWNED:
      item = Py_BuildValue("(iKIi)", ev->kind, 0ULL, ev->slot, ev->pid);
      break;
    default:
      item = Py_BuildValue("(iK)", ev->kind, 0ULL);
      break;
    }
    if (item == NULL || PyList_Append(list, item) < 0)
      goto fail;
    Py_CLEAR(item);
    free(pe->msg);
    pe->msg = NULL;
  }
  goto done;

fail:
  Py_XDECREF(item);
  Py_CLEAR(list);
done:
  for (size_t i = 0; i < b->n; i++) {
    if (b->items[i].msg != NULL) {
      gf_msg_release(&self->m.arena, b->items[i].msg);
      free(b->items[i].msg);
    }
  }
  b->n = 0;
  return list;
}

static int engine_check(EngineObject *self) {
  if (!self->initialized || self->closed || self->close_requested) {
    PyErr_SetString(PyExc_RuntimeError, "the pool's engine is closed");
    return -1;
  }
  return 0;
}

/* Engine(nslots, ring_bytes, arena_bytes, task_timeout_s) */
static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds) {
  unsigned int nslots;
  unsigned long long ring_bytes, arena_bytes;
  double timeout;
  int rc;
  if (self->initialized) {
    PyErr_SetString(PyExc_RuntimeError, "Engine already initialized");
    return -1;
  }
  if (!PyArg_ParseTuple(args, "IKKd", &nslots, &ring_bytes, &arena_bytes, &timeout))
    return -1;
  if (nslots == 0 || nslots > GF_MAX_WORKERS) {
    PyErr_Format(PyExc_ValueError, "between 1 and %d workers", GF_MAX_WORKERS);
    return -1;
  }
  if ((rc = gf_manager_init(&self->m, nslots, ring_bytes, arena_bytes)) < 0) {
    set_errno(rc);
    return -1;
  }
  self->m.task_timeout_ns = timeout > 0 ? (int64_t)(timeout * 1e9) : 0;
  self->shm.arena = &self->m.arena;
  self->shm.manager = &self->m;
  self->max_inline = gf_ring_max_message(gf_slot_requests(self->m.seg, 0));
  self->shm.pid = getpid(); /* made the pool: a forked child only forgets it */
  self->initialized = 1;
  return 0;
}

static void *waiter_main(void *arg);

/* With the GIL: waits (GIL released meanwhile) until no thread is inside the manager without
 * the GIL. The engine is marked closed already, so none enters again; those inside leave in a
 * spin's time (the pool's are 200 µs at most) plus one collect. */
static void engine_wait_idle(EngineObject *self) {
  while (self->busy > 0) {
    Py_BEGIN_ALLOW_THREADS
    struct timespec pause = {0, 20000};
    nanosleep(&pause, NULL);
    Py_END_ALLOW_THREADS
  }
}

static void engine_stop_waiter(EngineObject *self) {
  if (!self->waiter_running)
    return;
  gf_manager_stop(&self->m);
  Py_BEGIN_ALLOW_THREADS
  pthread_join(self->waiter, NULL);
  Py_END_ALLOW_THREADS
  self->waiter_running = 0;
}

/* Closes the engine: the waiter stopped and joined, the template and workers ended. On the
 * waiter thread itself, only asks the waiter to do so once the current callback returns. In
 * a forked child, only drops this process's copy (the pool is the parent's). */
static void engine_close(EngineObject *self, int64_t timeout_ns) {
  if (!self->initialized || self->closed || self->close_requested || self->closing)
    return;
  if (shm_foreign(&self->shm)) {
    /* The waiter thread was not forked; its reference to us is never returned. The mapping
     * stays until the last view's reference to us goes (Engine_dealloc), as in the parent. */
    self->waiter_running = 0;
    self->closed = 1;
    gf_manager_forget(&self->m);
    return;
  }
  if (self->waiter_running && pthread_equal(pthread_self(), self->waiter)) {
    self->close_requested = 1;
    self->close_timeout_ns = timeout_ns;
    return;
  }
  self->closing = 1;
  engine_stop_waiter(self); /* releases the GIL: collectors may enter meanwhile */
  self->closed = 1;
  engine_wait_idle(self);
  Py_BEGIN_ALLOW_THREADS
  gf_manager_close(&self->m, timeout_ns);
  Py_END_ALLOW_THREADS
}

static void Engine_dealloc(EngineObject *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  /* The waiter holds a reference while it runs: it has exited by now. */
  engine_close(self, 0);
  shm_clear(&self->shm);
  if (self->initialized)
    gf_manager_free(&self->m);
  Py_CLEAR(self->on_events);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(self->on_events);
  return 0;
}

/* child_fds() -> (memfd, doorbell, control): the descriptors the template inherits. */
static PyObject *Engine_child_fds(EngineObject *self, PyObject *unused) {
  int fds[3];
  if (engine_check(self) < 0)
    return NULL;
  gf_manager_child_fds(&self->m, fds);
  return Py_BuildValue("(iii)", fds[0], fds[1], fds[2]);
}

/* Converts a sequence of str to a NULL-terminated argv; PyMem_Free each string and the array. */
static char **to_argv(PyObject *seq_obj) {
  PyObject *seq = PySequence_Fast(seq_obj, "expected a sequence of str");
  if (seq == NULL)
    return NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  char **argv = PyMem_Calloc((size_t)n + 1, sizeof(char *));
  if (argv == NULL) {
    Py_DECREF(seq);
    PyErr_NoMemory();
    return NULL;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *bytes = PyUnicode_EncodeFSDefault(PySequence_Fast_GET_ITEM(seq, i));
    if (bytes == NULL)
      goto error;
    argv[i] = PyMem_Malloc((size_t)PyBytes_GET_SIZE(bytes) + 1);
    if (argv[i] == NULL) {
      Py_DECREF(bytes);
      PyErr_NoMemory();
      goto error;
    }
    memcpy(argv[i], PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes) + 1);
    Py_DECREF(bytes);
  }
  Py_DECREF(seq);
  return argv;

error:
  for (Py_ssize_t i = 0; i < n; i++)
    PyMem_Free(argv[i]);
  PyMem_Free(argv);
  Py_DECREF(seq);
  return NULL;
}

static void free_argv(char **argv) {
  if (argv == NULL)
    return;
  for (char **p = argv; *p != NULL; p++)
    PyMem_Free(*p);
  PyMem_Free(argv);
}

/* start_template(path, argv, env, config_fd): fork+exec the template with the child fds and
 * config_fd kept open. Returns a new reference to the template's pid. */
static PyObject *Engine_start_template(EngineObject *self, PyObject *const *args,
                                       Py_ssize_t nargs) {
  if (!check_nargs("start_template", nargs, 4) || engine_check(self) < 0)
    return NULL;
  long config_fd = PyLong_AsLong(args[3]);
  if (config_fd == -1 && PyErr_Occurred())
    return NULL;
  if (config_fd < -1 || config_fd > INT_MAX) {
    PyErr_SetString(PyExc_ValueError, "config_fd out of range");
    return NULL;
  }
  PyObject *path = PyUnicode_EncodeFSDefault(args[0]);
  if (path == NULL)
    return NULL;
  char **argv = to_argv(args[1]), **envp = argv ? to_argv(args[2]) : NULL;
  int rc = -EINVAL;
  if (argv != NULL && envp != NULL) {
    const char *cpath = PyBytes_AS_STRING(path);
    self->busy++; /* see busy */
    Py_BEGIN_ALLOW_THREADS
    rc = gf_manager_start_template(&self->m, cpath, argv, envp, (int)config_fd);
    Py_END_ALLOW_THREADS
    self->busy--;
  }
  free_argv(argv);
  free_argv(envp);
  Py_DECREF(path);
  if (PyErr_Occurred())
    return NULL;
  if (rc < 0)
    return set_errno(rc);
  return PyLong_FromLong(self->m.template_pid);
}

/* spawn(slot): ask the template for a worker in slot. */
static PyObject *Engine_spawn(EngineObject *self, PyObject *arg) {
  unsigned long slot = PyLong_AsUnsignedLong(arg);
  if (PyErr_Occurred() || engine_check(self) < 0)
    return NULL;
  int rc = gf_manager_spawn(&self->m, (uint32_t)slot);
  if (rc < 0)
    return set_errno(rc);
  Py_RETURN_NONE;
}

/* submit(task_id, chunk, head, body, bufs): queue or dispatch a task; head is the pickled
 * function, body the pickled arguments; chunk: body is (items, star) for a map chunk. bufs:
 * export() tuples, whose references the message takes over (also on failure: released). */
static PyObject *Engine_submit(EngineObject *self, PyObject *const *args, Py_ssize_t nargs) {
  outgoing *out;
  struct iovec iov[4];
  int rc;
  if (!check_nargs("submit", nargs, 5) || engine_check(self) < 0)
    return NULL;
  unsigned long long task_id = PyLong_AsUnsignedLongLong(args[0]);
  int chunk = PyObject_IsTrue(args[1]);
  if (PyErr_Occurred() || chunk < 0)
    return NULL;
  if ((out = PyMem_Malloc(sizeof(*out))) == NULL)
    return PyErr_NoMemory();
  if (outgoing_build(out, &self->shm, task_id, chunk ? GF_MSG_CHUNK : GF_MSG_TASK, args[2],
                     args[3], args[4], self->max_inline) < 0) {
    PyMem_Free(out);
    return NULL;
  }
  outgoing_iov(out, iov);
  rc = gf_manager_submit(&self->m, iov, 4);
  if (rc < 0)
    gf_msg_release(&self->m.arena, &out->hdr);
  outgoing_release(out);
  PyMem_Free(out);
  if (rc == -ESHUTDOWN) {
    PyErr_SetString(PyExc_RuntimeError, "cannot schedule new tasks after shutdown");
    return NULL;
  }
  if (rc < 0)
    return set_errno(rc);
  Py_RETURN_NONE;
}

/* cancel(task_id) -> bool: True when the task was still queued and is now dropped. */
static PyObject *Engine_cancel(EngineObject *self, PyObject *arg) {
  unsigned long long task_id = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred() || engine_check(self) < 0)
    return NULL;
  return PyBool_FromLong(gf_manager_cancel(&self->m, task_id) == 0);
}

/* running(task_id) -> bool: True once a worker has taken the task, until it finishes. */
static PyObject *Engine_running(EngineObject *self, PyObject *arg) {
  unsigned long long task_id = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred() || engine_check(self) < 0)
    return NULL;
  return PyBool_FromLong(gf_manager_running(&self->m, task_id));
}

/* kill_task(task_id) -> bool: kills the worker that took the task; False when none has it.
 * Returns a new reference. */
static PyObject *Engine_kill_task(EngineObject *self, PyObject *arg) {
  unsigned long long task_id = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred() || engine_check(self) < 0)
    return NULL;
  return PyBool_FromLong(gf_manager_kill_task(&self->m, task_id) == 0);
}

/* export(obj) -> (block, at, len, flags); the tuple owns a block reference until sent. */
static PyObject *Engine_export(EngineObject *self, PyObject *obj) {
  if (engine_check(self) < 0)
    return NULL;
  return shm_export(&self->shm, obj);
}

/* view(block, at, len, flags) -> SharedBuffer or bytes; takes over the tuple's reference. */
static PyObject *owner_view(ShmOwner *owner, PyObject *const *args, Py_ssize_t nargs) {
  unsigned long long block, at, len;
  unsigned int flags;
  if (!check_nargs("view", nargs, 4))
    return NULL;
  block = PyLong_AsUnsignedLongLong(args[0]);
  at = PyLong_AsUnsignedLongLong(args[1]);
  len = PyLong_AsUnsignedLongLong(args[2]);
  flags = (unsigned int)PyLong_AsUnsignedLong(args[3]);
  if (PyErr_Occurred())
    return NULL;
  gf_bufref ref = {.block = block, .at = at, .len = len, .flags = flags};
  return shm_view(owner, &ref);
}

/* Engine.view: see owner_view. Returns a new reference. */
static PyObject *Engine_view(EngineObject *self, PyObject *const *args, Py_ssize_t nargs) {
  if (engine_check(self) < 0)
    return NULL;
  return owner_view((ShmOwner *)self, args, nargs);
}

/* addref(block): one more reference to a block this process holds (a share() handle sent in
 * another message). */
static PyObject *owner_addref(ShmOwner *owner, PyObject *arg) {
  unsigned long long block = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred())
    return NULL;
  if (gf_block_check(owner->shm.arena, block) < 0) {
    PyErr_SetString(PyExc_ValueError, "not a block of this arena");
    return NULL;
  }
  if (!shm_foreign(&owner->shm)) /* a forked child's references are not its own: see shm_t */
    gf_block_incref(owner->shm.arena, block);
  Py_RETURN_NONE;
}

/* release(block): drop a reference taken by export() that no message took over. */
static PyObject *owner_release(ShmOwner *owner, PyObject *arg) {
  unsigned long long block = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred())
    return NULL;
  if (gf_block_check(owner->shm.arena, block) < 0) {
    PyErr_SetString(PyExc_ValueError, "not a block of this arena");
    return NULL;
  }
  shm_release(&owner->shm, block);
  Py_RETURN_NONE;
}

/* scan() -> int: unmaps received bytes objects that are no longer referenced. */
static PyObject *owner_scan(ShmOwner *owner, PyObject *unused) {
  return PyLong_FromSsize_t(owner->shm.nmaps ? shm_scan(&owner->shm) : 0);
}

/* collect(control, spin_seconds=0.0) -> list of events waiting now: results and, with
 * control, spawns and deaths. With spin, first polls the result rings that long for a result
 * (all without the GIL). Returns a new reference. */
static PyObject *Engine_collect(EngineObject *self, PyObject *const *args, Py_ssize_t nargs) {
  event_batch batch = {0};
  int rc = 0, found = 1;
  double spin = 0.0;
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "collect(control, spin_seconds=0.0)");
    return NULL;
  }
  int control = PyObject_IsTrue(args[0]);
  if (nargs == 2)
    spin = PyFloat_AsDouble(args[1]);
  if (control < 0 || PyErr_Occurred() || engine_check(self) < 0)
    return NULL;
  self->busy++; /* see busy: close waits for this thread to leave the manager */
  Py_BEGIN_ALLOW_THREADS
  if (spin > 0)
    found = gf_manager_spin(&self->m, (int64_t)(spin * 1e9));
  if (found)
    rc = gf_manager_collect(&self->m, control, batch_add, &batch);
  Py_END_ALLOW_THREADS
  self->busy--;
  PyObject *list = batch_to_list(self, &batch);
  free(batch.items);
  if (rc < 0 && list != NULL) {
    Py_DECREF(list);
    return set_errno(rc);
  }
  return list;
}

#define WAITER_SPIN_NS 5000

/* The waiter owns a reference to the engine (taken by start_waiter), so the engine outlives
 * it; it returns that reference last, after which it must not touch the engine. */
static void *waiter_main(void *arg) {
  EngineObject *self = arg;
  event_batch batch = {0};
  sigset_t all;
  pthread_setname_np(pthread_self(), "gilfree-results"); /* in ps, top and gilfree.gil's reports */
  /* Signals belong to the main thread: Ctrl-C must interrupt the user's wait, not us. */
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  while (!self->close_requested) {
    /* A short spin only: threads waiting in Future.result() poll for themselves. */
    int rc = gf_manager_wait(&self->m, WAITER_SPIN_NS, -1);
    if (rc == -ECANCELED)
      break;
    if (rc == 0 || rc == -EINTR)
      continue;
    if (rc < 0)
      break; /* cannot happen while the engine is open: nothing else closes its descriptors */
    rc = gf_manager_collect(&self->m, 1, batch_add, &batch);
    if (batch.n == 0)
      continue;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *events = batch_to_list(self, &batch);
    if (events != NULL) {
      PyObject *res = PyObject_CallOneArg(self->on_events, events);
      if (res == NULL)
        PyErr_WriteUnraisable(self->on_events);
      Py_XDECREF(res);
      Py_DECREF(events);
    } else {
      PyErr_WriteUnraisable((PyObject *)self);
    }
    PyGILState_Release(gil);
  }
  free(batch.items);
  /* close_requested is only set on this thread, so reading it here is safe. */
  int closing_here = self->close_requested;
  PyGILState_STATE gil = PyGILState_Ensure();
  if (closing_here) {
    /* close_requested keeps new collectors out; those inside must leave first. */
    self->closed = 1;
    engine_wait_idle(self);
    Py_BEGIN_ALLOW_THREADS
    gf_manager_close(&self->m, self->close_timeout_ns);
    Py_END_ALLOW_THREADS
    /* Nobody joins a thread that closed its own engine. */
    self->waiter_running = 0;
    pthread_detach(pthread_self());
  }
  Py_DECREF(self);
  PyGILState_Release(gil);
  return NULL;
}

/* start_waiter(on_events): start the C thread that waits for results without the GIL and
 * calls on_events(list) with each batch. */
static PyObject *Engine_start_waiter(EngineObject *self, PyObject *callback) {
  if (engine_check(self) < 0)
    return NULL;
  if (self->waiter_running) {
    PyErr_SetString(PyExc_RuntimeError, "waiter already running");
    return NULL;
  }
  Py_XSETREF(self->on_events, Py_NewRef(callback));
  Py_INCREF(self); /* the waiter's reference, returned as it exits */
  int rc = pthread_create(&self->waiter, NULL, waiter_main, self);
  if (rc != 0) {
    Py_DECREF(self);
    return set_errno(-rc);
  }
  self->waiter_running = 1;
  Py_RETURN_NONE;
}

/* close(timeout): stop the waiter, end the template and workers, release descriptors. */
static PyObject *Engine_close(EngineObject *self, PyObject *arg) {
  double timeout = PyFloat_AsDouble(arg);
  if (PyErr_Occurred())
    return NULL;
  engine_close(self, (int64_t)(timeout * 1e9));
  Py_RETURN_NONE;
}

/* stats() -> list of per-slot dicts read from the shared segment. */
static PyObject *Engine_stats(EngineObject *self, PyObject *unused) {
  if (engine_check(self) < 0)
    return NULL;
  int64_t now = gf_now_ns();
  PyObject *list = PyList_New(0);
  if (list == NULL)
    return NULL;
  pthread_mutex_lock(&self->m.lock);
  for (uint32_t i = 0; i < self->m.seg->nslots; i++) {
    gf_slot *s = &self->m.seg->slots[i];
    int64_t born = atomic_load(&s->born_ns);
    int64_t alive = self->m.sched[i].lived_ns + (born ? now - born : 0);
    uint64_t busy = atomic_load(&s->busy_ns);
    uint64_t current = atomic_load(&s->current_task);
    int64_t running = current ? now - atomic_load(&s->task_started_ns) : 0;
    PyObject *d = Py_BuildValue(
        "{s:I,s:i,s:K,s:d,s:d,s:K,s:K,s:K,s:O,s:I}", "slot", i, "pid", atomic_load(&s->pid),
        "tasks", (unsigned long long)atomic_load(&s->tasks_done), "busy_s",
        (busy + (uint64_t)(running > 0 ? running : 0)) / 1e9, "alive_s",
        alive / 1e9, "bytes_in", (unsigned long long)atomic_load(&s->bytes_in),
        "bytes_out", (unsigned long long)atomic_load(&s->bytes_out), "restarts",
        (unsigned long long)self->m.sched[i].restarts, "busy", current ? Py_True : Py_False,
        "inflight", self->m.sched[i].inflight);
    if (d == NULL || PyList_Append(list, d) < 0) {
      Py_XDECREF(d);
      Py_CLEAR(list);
      break;
    }
    Py_DECREF(d);
  }
  pthread_mutex_unlock(&self->m.lock);
  return list;
}

/* queued() -> tasks waiting in the parent's queue. Returns a new reference. */
static PyObject *Engine_queued(EngineObject *self, PyObject *unused) {
  if (engine_check(self) < 0)
    return NULL;
  return PyLong_FromUnsignedLongLong(gf_manager_queued(&self->m));
}

static PyMethodDef Engine_methods[] = {
    {"child_fds", (PyCFunction)Engine_child_fds, METH_NOARGS, NULL},
    {"start_template", (PyCFunction)(void (*)(void))Engine_start_template, METH_FASTCALL, NULL},
    {"spawn", (PyCFunction)Engine_spawn, METH_O, NULL},
    {"submit", (PyCFunction)(void (*)(void))Engine_submit, METH_FASTCALL, NULL},
    {"cancel", (PyCFunction)Engine_cancel, METH_O, NULL},
    {"running", (PyCFunction)Engine_running, METH_O, NULL},
    {"kill_task", (PyCFunction)Engine_kill_task, METH_O, NULL},
    {"export", (PyCFunction)Engine_export, METH_O, NULL},
    {"view", (PyCFunction)(void (*)(void))Engine_view, METH_FASTCALL, NULL},
    {"addref", (PyCFunction)owner_addref, METH_O, NULL},
    {"release", (PyCFunction)owner_release, METH_O, NULL},
    {"scan", (PyCFunction)owner_scan, METH_NOARGS, NULL},
    {"collect", (PyCFunction)(void (*)(void))Engine_collect, METH_FASTCALL, NULL},
    {"start_waiter", (PyCFunction)Engine_start_waiter, METH_O, NULL},
    {"close", (PyCFunction)Engine_close, METH_O, NULL},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, NULL},
    {"queued", (PyCFunction)Engine_queued, METH_NOARGS, NULL},
    {NULL},
};

/* template_pid -> pid of the template process (0 before start). Returns a new reference. */
static PyObject *Engine_template_pid(EngineObject *self, void *closure) {
  return PyLong_FromLong(self->initialized ? self->m.template_pid : 0);
}

static PyGetSetDef Engine_getset[] = {
    {"template_pid", (getter)Engine_template_pid, NULL, NULL, NULL},
    {NULL},
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_init, Engine_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_traverse, Engine_traverse},
    {Py_tp_methods, Engine_methods},
    {Py_tp_getset, Engine_getset},
    {Py_tp_doc, "The parent's side of a pool: shared memory, dispatch, results, crashes."},
    {0, NULL},
};

static PyType_Spec Engine_spec = {
    .name = "gilfree._engine.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Engine_slots,
};

/* ------------------------------------------------------------------ Worker */

typedef struct {
  PyObject_HEAD
  shm_t shm;
  gf_worker w;
  unsigned char *map;
  size_t map_size;
  size_t max_inline;
} WorkerObject;

/* Worker(memfd, slot): attach this (freshly forked) process to its slot. */
static int Worker_init(WorkerObject *self, PyObject *args, PyObject *kwds) {
  int fd, rc;
  unsigned int slot;
  if (self->map != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Worker already initialized");
    return -1;
  }
  if (!PyArg_ParseTuple(args, "iI", &fd, &slot))
    return -1;
  if ((rc = gf_shm_attach(fd, &self->map, &self->map_size)) < 0 ||
      (rc = gf_worker_attach(&self->w, self->map, self->map_size, slot, fd)) < 0) {
    if (rc == -EBADFD)
      PyErr_SetString(PyExc_OSError, "the pool's shared-memory or doorbell descriptor was closed "
                                     "or replaced before the worker started (by the initializer?)");
    else
      set_errno(rc);
    return -1;
  }
  self->shm.arena = &self->w.arena;
  self->shm.worker = &self->w;
  self->shm.pid = getpid();
  self->max_inline = gf_ring_max_message(self->w.responses);
  return 0;
}

static void Worker_dealloc(WorkerObject *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  shm_clear(&self->shm);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static int Worker_traverse(WorkerObject *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  return 0;
}

/* next(spin_seconds) -> (task_id, (kind, head, body, views)) or None when the template is
 * gone. The task is marked running. */
static PyObject *Worker_next(WorkerObject *self, PyObject *arg) {
  const gf_msg *msg;
  size_t len;
  int rc;
  double spin = PyFloat_AsDouble(arg);
  if (PyErr_Occurred())
    return NULL;
  for (;;) {
    Py_BEGIN_ALLOW_THREADS
    rc = gf_worker_next(&self->w, (int64_t)(spin * 1e9), &msg, &len);
    Py_END_ALLOW_THREADS
    if (rc != -EINTR)
      break;
    if (PyErr_CheckSignals() < 0)
      return NULL;
  }
  if (rc == -EPIPE)
    Py_RETURN_NONE;
  if (rc < 0)
    return set_errno(rc);
  /* Copy the message out, mark the task running, and only then decode it (which takes over
   * its block references into views recorded in the holdings table). */
  gf_msg *copy = PyMem_Malloc(len);
  if (copy == NULL)
    return PyErr_NoMemory();
  memcpy(copy, msg, len);
  uint64_t bytes_in = copy->payload_len;
  const gf_bufref *bufs = (const gf_bufref *)(copy + 1);
  for (uint32_t i = 0; i < copy->nbufs; i++)
    if (!(bufs[i].flags & BUF_BY_REFERENCE))
      bytes_in += bufs[i].len;
  gf_worker_begin(&self->w, copy->task_id, bytes_in);
  PyObject *decoded = incoming_decode((ShmOwner *)self, copy);
  unsigned long long task_id = copy->task_id;
  PyMem_Free(copy);
  if (decoded == NULL)
    return NULL;
  return Py_BuildValue("(KN)", task_id, decoded);
}

/* A task closed or replaced the doorbell: the result is in the ring, but the parent, asleep, was
 * not woken. Exiting wakes it (the template reports the exit) and gets a worker with its
 * descriptors in their place. Exits at once: a clean interpreter exit would wait for any
 * non-daemon thread a task left behind. */
static void worker_exit_descriptors(WorkerObject *self) {
  PySys_FormatStderr("gilfree: worker %d: a task closed or replaced the worker's descriptors "
                     "(the pool's doorbell, descriptor %d); the worker exits with status %d "
                     "and is replaced, its results were delivered\n",
                     (int)getpid(), self->w.doorbell_fd, GF_EXIT_DESCRIPTORS);
  const char *streams[] = {"stdout", "stderr"};
  for (size_t i = 0; i < 2; i++) {
    PyObject *stream = PySys_GetObject(streams[i]); /* borrowed */
    PyObject *res = stream != NULL ? PyObject_CallMethod(stream, "flush", NULL) : NULL;
    Py_XDECREF(res);
    PyErr_Clear();
  }
  _exit(GF_EXIT_DESCRIPTORS);
}

/* reply(task_id, ok, payload, bufs): send a result (ok) or an exception (not ok). */
static PyObject *Worker_reply(WorkerObject *self, PyObject *const *args, Py_ssize_t nargs) {
  outgoing *out;
  struct iovec iov[4];
  int rc;
  if (!check_nargs("reply", nargs, 4))
    return NULL;
  unsigned long long task_id = PyLong_AsUnsignedLongLong(args[0]);
  int ok = PyObject_IsTrue(args[1]);
  if (PyErr_Occurred() || ok < 0)
    return NULL;
  if ((out = PyMem_Malloc(sizeof(*out))) == NULL)
    return PyErr_NoMemory();
  if (outgoing_build(out, &self->shm, task_id, ok ? GF_MSG_RESULT : GF_MSG_ERROR, Py_None,
                     args[2], args[3], self->max_inline) < 0) {
    PyMem_Free(out);
    return NULL;
  }
  outgoing_iov(out, iov);
  Py_BEGIN_ALLOW_THREADS
  rc = gf_worker_reply(&self->w, iov, 4, out->bytes);
  Py_END_ALLOW_THREADS
  outgoing_release(out);
  PyMem_Free(out);
  if (rc == -EBADFD)
    worker_exit_descriptors(self);
  if (rc < 0)
    return set_errno(rc);
  Py_RETURN_NONE;
}

/* Worker.export: see shm_export. Returns a new reference. */
static PyObject *Worker_export(WorkerObject *self, PyObject *obj) {
  return shm_export(&self->shm, obj);
}

/* Worker.view: see owner_view. Returns a new reference. */
static PyObject *Worker_view(WorkerObject *self, PyObject *const *args, Py_ssize_t nargs) {
  return owner_view((ShmOwner *)self, args, nargs);
}

/* item_started(): the next item of a map chunk starts now (task_timeout counts per item). */
static PyObject *Worker_item_started(WorkerObject *self, PyObject *unused) {
  gf_worker_item(&self->w);
  Py_RETURN_NONE;
}

/* retire(): stop taking tasks (the worker is about to exit for recycling). */
static PyObject *Worker_retire(WorkerObject *self, PyObject *unused) {
  atomic_store(&self->w.slot->state, GF_SLOT_EXITING);
  Py_RETURN_NONE;
}

static PyMethodDef Worker_methods[] = {
    {"next", (PyCFunction)Worker_next, METH_O, NULL},
    {"reply", (PyCFunction)(void (*)(void))Worker_reply, METH_FASTCALL, NULL},
    {"export", (PyCFunction)Worker_export, METH_O, NULL},
    {"view", (PyCFunction)(void (*)(void))Worker_view, METH_FASTCALL, NULL},
    {"addref", (PyCFunction)owner_addref, METH_O, NULL},
    {"release", (PyCFunction)owner_release, METH_O, NULL},
    {"scan", (PyCFunction)owner_scan, METH_NOARGS, NULL},
    {"item_started", (PyCFunction)Worker_item_started, METH_NOARGS, NULL},
    {"retire", (PyCFunction)Worker_retire, METH_NOARGS, NULL},
    {NULL},
};

static PyType_Slot Worker_slots[] = {
    {Py_tp_init, Worker_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, Worker_dealloc},
    {Py_tp_traverse, Worker_traverse},
    {Py_tp_methods, Worker_methods},
    {Py_tp_doc, "A worker process's end of its slot."},
    {0, NULL},
};

static PyType_Spec Worker_spec = {
    .name = "gilfree._engine.Worker",
    .basicsize = sizeof(WorkerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Worker_slots,
};

/* ------------------------------------------------------------------ template */

typedef struct {
  pid_t pid;
  int pidfd;
} child_proc;

static void kill_children(child_proc *children, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    if (children[i].pid > 0) {
      kill(children[i].pid, SIGKILL);
      waitpid(children[i].pid, NULL, 0);
      close(children[i].pidfd);
      children[i].pid = 0;
    }
  }
}

/* serve_template(ctl_fd, nslots) -> slot number in a new worker process, or None in the
 * template when the parent is gone (its workers are killed first). Forks on the parent's
 * GF_CTL_SPAWN requests; reports exits with their wait status. Only call it in the
 * single-threaded template process. */
static PyObject *serve_template(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  int ctl_fd;
  unsigned int nslots;
  if (!check_nargs("serve_template", nargs, 2))
    return NULL;
  ctl_fd = (int)PyLong_AsLong(args[0]);
  nslots = (unsigned int)PyLong_AsUnsignedLong(args[1]);
  if (PyErr_Occurred())
    return NULL;
  if (nslots == 0 || nslots > GF_MAX_WORKERS) {
    PyErr_Format(PyExc_ValueError, "between 1 and %d slots", GF_MAX_WORKERS);
    return NULL;
  }
  /* One block for the three tables; a forked worker frees it before it returns. */
  size_t table_bytes =
      nslots * sizeof(child_proc) + (nslots + 1) * (sizeof(struct pollfd) + sizeof(uint32_t));
  child_proc *children = PyMem_Malloc(table_bytes);
  if (children == NULL)
    return PyErr_NoMemory();
  struct pollfd *fds = (struct pollfd *)(children + nslots);
  uint32_t *slot_of = (uint32_t *)(fds + nslots + 1);
  pid_t self_pid = getpid();
  PyObject *result = NULL;
  /* Every slot's pidfd is -1, not 0: a forked worker closes the pidfds of its siblings, and
   * closing a zero-initialised one would close its stdin. */
  for (unsigned int i = 0; i < nslots; i++)
    children[i] = (child_proc){0, -1};

  for (;;) {
    nfds_t n = 0;
    fds[n++] = (struct pollfd){.fd = ctl_fd, .events = POLLIN};
    for (uint32_t i = 0; i < nslots; i++) {
      if (children[i].pid > 0) {
        slot_of[n] = i;
        fds[n++] = (struct pollfd){.fd = children[i].pidfd, .events = POLLIN};
      }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = poll(fds, n, -1);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
      if (errno == EINTR)
        continue;
      kill_children(children, nslots);
      PyErr_SetFromErrno(PyExc_OSError);
      goto done;
    }
    for (nfds_t i = 1; i < n; i++) {
      if (!(fds[i].revents & POLLIN))
        continue;
      child_proc *c = &children[slot_of[i]];
      int status = 0;
      if (waitpid(c->pid, &status, WNOHANG) != c->pid)
        continue;
      gf_ctl msg = {.kind = GF_CTL_EXITED, .slot = slot_of[i], .pid = c->pid, .status = status};
      close(c->pidfd);
      c->pid = 0;
      c->pidfd = -1;
      send(ctl_fd, &msg, sizeof(msg), MSG_NOSIGNAL);
    }
    if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR)))
      continue;
    gf_ctl req;
    ssize_t got = recv(ctl_fd, &req, sizeof(req), MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EINTR))
      continue;
    if (got <= 0) {
      kill_children(children, nslots);
      result = Py_NewRef(Py_None);
      goto done;
    }
    if (got != sizeof(req) || req.kind != GF_CTL_SPAWN || req.slot >= nslots)
      continue;
    if (children[req.slot].pid > 0)
      continue; /* its exit is on the way; the parent asks again after it */

    PyOS_BeforeFork();
    pid_t pid = fork();
    if (pid == 0) {
      PyOS_AfterFork_Child();
      close(ctl_fd);
      for (uint32_t i = 0; i < nslots; i++)
        if (children[i].pidfd >= 0)
          close(children[i].pidfd);
      if ((rc = gf_worker_child_setup(self_pid)) < 0)
        _exit(70);
      result = PyLong_FromUnsignedLong(req.slot);
      goto done;
    }
    PyOS_AfterFork_Parent();
    gf_ctl reply = {.kind = GF_CTL_SPAWNED, .slot = req.slot, .pid = pid};
    int pidfd = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
    if (pid < 0 || pidfd < 0) {
      reply.kind = GF_CTL_SPAWN_FAILED;
      reply.status = errno;
      if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
      }
    } else {
      children[req.slot] = (child_proc){pid, pidfd};
    }
    send(ctl_fd, &reply, sizeof(reply), MSG_NOSIGNAL);
  }

done:
  PyMem_Free(children);
  return result;
}

static int is_large_buffer(PyObject *obj) {
  if (PyBytes_CheckExact(obj))
    return PyBytes_GET_SIZE(obj) >= GF_BLOCK_MIN;
  if (PyMemoryView_Check(obj))
    return PyMemoryView_GET_BUFFER(obj)->len >= GF_BLOCK_MIN;
  if (!PyObject_CheckBuffer(obj) || PyUnicode_Check(obj))
    return 0;
  /* numpy arrays, bytearray, array.array, PickleBuffer... */
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_FULL_RO) < 0) {
    PyErr_Clear();
    return 0;
  }
  int large = view.len >= GF_BLOCK_MIN;
  PyBuffer_Release(&view);
  return large;
}

static int scan_items(PyObject *obj, int depth);

static int scan_one(PyObject *obj, int depth) {
  if (is_large_buffer(obj))
    return 1;
  return depth > 0 ? scan_items(obj, depth - 1) : 0;
}

static int scan_items(PyObject *obj, int depth) {
  if (PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject **items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < n; i++)
      if (scan_one(items[i], depth))
        return 1;
  } else if (PyDict_CheckExact(obj)) {
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(obj, &pos, &key, &value))
      if (scan_one(value, depth))
        return 1;
  }
  return 0;
}

/* has_large_buffer(obj) -> bool: obj, or an item up to three containers (tuple, list, dict)
 * down, exposes a buffer of at least OUT_OF_BAND_MIN bytes (bytes, memoryview, numpy array,
 * bytearray...). Those go out-of-band; plain pickle would copy them in-band. */
static PyObject *has_large_buffer(PyObject *module, PyObject *obj) {
  return PyBool_FromLong(scan_one(obj, 3));
}

/* rss() -> resident set size of this process in bytes. */
static PyObject *rss(PyObject *module, PyObject *unused) {
  uint64_t bytes;
  int rc = gf_rss_bytes(&bytes);
  if (rc < 0)
    return set_errno(rc);
  return PyLong_FromUnsignedLongLong(bytes);
}

static PyMethodDef module_methods[] = {
    {"serve_template", (PyCFunction)(void (*)(void))serve_template, METH_FASTCALL, NULL},
    {"rss", rss, METH_NOARGS, NULL},
    {"has_large_buffer", has_large_buffer, METH_O, NULL},
    {NULL},
};

/* ------------------------------------------------------------------ module */

static int module_exec(PyObject *module) {
  module_state *st = get_state(module);
  st->buffer_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &SharedBuffer_spec, NULL);
  if (st->buffer_type == NULL || PyModule_AddType(module, st->buffer_type) < 0)
    return -1;
  st->engine_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Engine_spec, NULL);
  if (st->engine_type == NULL || PyModule_AddType(module, st->engine_type) < 0)
    return -1;
  st->worker_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Worker_spec, NULL);
  if (st->worker_type == NULL || PyModule_AddType(module, st->worker_type) < 0)
    return -1;
  if (PyModule_AddIntConstant(module, "EV_RESULT", GF_EV_RESULT) < 0 ||
      PyModule_AddIntConstant(module, "EV_SPAWNED", GF_EV_SPAWNED) < 0 ||
      PyModule_AddIntConstant(module, "EV_DIED", GF_EV_DIED) < 0 ||
      PyModule_AddIntConstant(module, "EV_TEMPLATE_DIED", GF_EV_TEMPLATE_DIED) < 0 ||
      PyModule_AddIntConstant(module, "MSG_TASK", GF_MSG_TASK) < 0 ||
      PyModule_AddIntConstant(module, "MSG_CHUNK", GF_MSG_CHUNK) < 0 ||
      PyModule_AddIntConstant(module, "MSG_RESULT", GF_MSG_RESULT) < 0 ||
      PyModule_AddIntConstant(module, "MSG_ERROR", GF_MSG_ERROR) < 0 ||
      PyModule_AddIntConstant(module, "BUF_BYTES", GF_BUF_BYTES) < 0 ||
      PyModule_AddIntConstant(module, "OUT_OF_BAND_MIN", GF_BLOCK_MIN) < 0 ||
      PyModule_AddIntConstant(module, "MAX_WORKERS", GF_MAX_WORKERS) < 0 ||
      PyModule_AddIntConstant(module, "EXIT_DESCRIPTORS", GF_EXIT_DESCRIPTORS) < 0)
    return -1;
  return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg) {
  module_state *st = get_state(module);
  Py_VISIT(st->buffer_type);
  Py_VISIT(st->engine_type);
  Py_VISIT(st->worker_type);
  return 0;
}

static int module_clear(PyObject *module) {
  module_state *st = get_state(module);
  Py_CLEAR(st->buffer_type);
  Py_CLEAR(st->engine_type);
  Py_CLEAR(st->worker_type);
  return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_gil
    /* The engine's registries rely on the GIL. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gilfree._engine",
    .m_doc = "Binding of gilfree's C core: shared-memory transport and worker manager.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__engine(void) { return PyModuleDef_Init(&engine_module); }
