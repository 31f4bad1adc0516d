/* Timelines from drained GIL events (see gf/gilhook.h): one thread's events become held and
 * wait spans, and spans become slices of a bounded count. Pure functions of their input. */
#include "gf/gilhook.h"

static void gf_span_emit(struct gf_gilhook_spanner *s, int state, uint64_t start, uint64_t stop,
                         uint64_t waited_ns) {
  if (start < s->t0)
    start = s->t0;
  if (stop > s->end)
    stop = s->end;
  if (stop > start)
    s->fn(&(struct gf_gilhook_span){start, stop, (uint32_t)state, waited_ns}, s->arg);
}

/* Ends the span in progress at t. */
static void gf_span_close(struct gf_gilhook_spanner *s, uint64_t t) {
  if (s->state == GF_GIL_HELD || s->state == GF_GIL_WANT)
    gf_span_emit(s, s->state, s->since, t, 0);
  s->state = GF_GIL_FREE;
}

void gf_gilhook_spans_begin(struct gf_gilhook_spanner *s, uint64_t t0, uint64_t end,
                            void (*fn)(const struct gf_gilhook_span *, void *), void *arg) {
  *s = (struct gf_gilhook_spanner){.t0 = t0, .end = end, .fn = fn, .arg = arg,
                                   .state = GF_GIL_UNKNOWN};
}

void gf_gilhook_spans_feed(struct gf_gilhook_spanner *s, const struct gf_gilhook_event *events,
                           size_t n) {
  for (size_t i = 0; i < n && !s->ended; i++) {
    uint64_t t = events[i].t_ns;
    uint32_t kind = events[i].kind & ~GF_GIL_CONTENDED;
    if (s->lost) {
      /* Events were lost from lost_at until this one: past that, the timeline would lie. */
      if (t > s->t0 && s->lost_at < s->end) {
        s->end = s->lost_at > s->t0 ? s->lost_at : s->t0;
        s->ended = 1;
        return;
      }
      s->lost = 0; /* the loss lies before the window */
    }
    if (t > s->end) {
      s->ended = 1;
      return;
    }
    /* The first event after an unknown stretch tells the state before it, from the window's
     * start at best. */
    uint64_t since = s->state == GF_GIL_UNKNOWN ? s->t0 : s->since;
    switch (kind) {
    case GF_GIL_WAIT:
      gf_span_close(s, t);
      s->state = GF_GIL_WANT;
      s->since = t;
      break;
    case GF_GIL_ACQUIRE: {
      /* A wait that took the GIL from another holder, whole, if it ended in the window. */
      int whole = s->state == GF_GIL_WANT && (events[i].kind & GF_GIL_CONTENDED) && t >= s->t0;
      if (s->state == GF_GIL_WANT || s->state == GF_GIL_UNKNOWN)
        gf_span_emit(s, GF_GIL_WANT, since, t, whole ? t - since : 0);
      s->state = GF_GIL_HELD;
      s->since = t;
      break;
    }
    case GF_GIL_RELEASE:
    case GF_GIL_ABORT: {
      int before = kind == GF_GIL_RELEASE ? GF_GIL_HELD : GF_GIL_WANT;
      if (s->state == before || s->state == GF_GIL_UNKNOWN)
        gf_span_emit(s, before, since, t, 0);
      s->state = GF_GIL_FREE;
      break;
    }
    case GF_GIL_GAP:
      gf_span_close(s, t);
      s->state = GF_GIL_UNKNOWN;
      s->lost = 1;
      s->lost_at = t;
      break;
    case GF_GIL_EXIT:
      gf_span_close(s, t);
      break;
    default: /* GF_GIL_FORCED: the release before it says all */
      break;
    }
  }
}

uint64_t gf_gilhook_spans_end(struct gf_gilhook_spanner *s) {
  if (s->lost && s->lost_at < s->end) /* nothing came after the loss */
    s->end = s->lost_at > s->t0 ? s->lost_at : s->t0;
  else if (!s->lost)
    gf_span_close(s, s->end);
  s->ended = 1;
  return s->end;
}

static void gf_slice_flush(struct gf_gilhook_coalescer *c) {
  struct gf_gilhook_slice *p = &c->pending;
  if (p->spans == 0)
    return;
  p->state = p->held_ns >= p->wait_ns ? GF_GIL_HELD : GF_GIL_WANT;
  c->fn(p, c->arg);
  p->spans = 0;
}

void gf_gilhook_coalesce(struct gf_gilhook_coalescer *c, const struct gf_gilhook_span *span) {
  struct gf_gilhook_slice *p = &c->pending;
  uint64_t length = span->end_ns - span->start_ns, r = c->resolution_ns;
  /* Short spans close together merge, until the slice is a resolution long; a long span, or one
   * after a long gap, starts a slice of its own. So every slice but the last is a resolution
   * long, or followed by a gap or a slice that long: at most 3 per resolution of the window. */
  if (!(p->spans > 0 && span->start_ns - p->end_ns < r && p->end_ns - p->start_ns < r &&
        length < r)) {
    gf_slice_flush(c);
    *p = (struct gf_gilhook_slice){.start_ns = span->start_ns};
  }
  p->end_ns = span->end_ns;
  if (span->state == GF_GIL_HELD)
    p->held_ns += length;
  else
    p->wait_ns += length;
  p->spans++;
}

void gf_gilhook_coalesce_end(struct gf_gilhook_coalescer *c) { gf_slice_flush(c); }
