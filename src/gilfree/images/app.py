"""The HTTP front: an aiohttp app whose event loop parses, admits and answers, never decodes.

Threading model: one event loop thread owns the app, the metrics and the admission count; image
work runs in the executor (gilfree.Pool workers by default). The loop only waits on futures, so
/health stays fast however busy the workers are.
"""
import asyncio
import dataclasses
import email.utils
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass

import PIL
from aiohttp import hdrs, web

from .. import __version__
from ..errors import TaskTimeout, WorkerCrashed
from ..pool import BrokenPool
from . import ops
from .executors import make_executor
from .metrics import Metrics
from .spec import CONTENT_ENCODINGS, ImageError, parse

MB = 1 << 20
CLIENT_CLOSED = 499  # nginx's status for a request its client abandoned
_RESET_DELAY = 0.5  # seconds from the FIN after a refusal to the close: the client reads the answer first
_ACCEPTED_TYPES = ("application/octet-stream",)  # and image/*; aiohttp reports a missing type as octet-stream


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = len(os.sched_getaffinity(0))  # the cores this process may run on (containers, taskset)
    root: str | None = None
    executor: str = "pool"
    max_body: int = 25 * MB
    max_pixels: int = 50_000_000
    budget: float = 10.0
    head_timeout: float = 10.0  # seconds for a request head, from the connection's start or previous answer
    max_queue: int = 128  # waiting requests beyond one per worker, then 503
    worker_nice: int = 10  # workers' niceness above the server's: the front wins a busy machine's cores
    cache_max_age: int = 3600  # seconds a cache may keep a GET answer before revalidating it


class Service:
    """One running service: config, executor, metrics and the admission count."""

    def __init__(self, config, executor):
        self.config = config
        self.executor = executor
        self.metrics = Metrics()
        self.in_flight = 0  # event loop thread only
        self.capacity = config.workers + config.max_queue
        self.root = os.path.realpath(config.root) if config.root else None

    async def transform_body(self, request):
        spec = parse(request.query.items(), self.config.max_pixels, self.config.max_body)
        if request.content_type not in _ACCEPTED_TYPES and not request.content_type.startswith("image/"):
            raise ImageError(415, "unsupported_media_type",
                             f"Content-Type {request.content_type!r}: send the image as image/* or application/octet-stream")
        # aiohttp's decoding is off (it refused other encodings with a text/plain 400 before any handler ran):
        # the worker decodes the body.
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if encoding not in CONTENT_ENCODINGS:
            raise ImageError(415, "unsupported_media_type",
                             f"Content-Encoding {encoding!r}: send the body as {', '.join(CONTENT_ENCODINGS)}")
        spec = dataclasses.replace(spec, encoding=encoding)
        self._check_length(request.content_length)
        # Admitted before the body comes in, so the slots also bound the memory bodies take; the budget
        # covers the upload, so a stalled one gives its slot back.
        async with self._admitted():
            body = await self._read_body(request)
            if not body:
                raise ImageError(415, "unsupported_media_type", "the request body is empty: not an image")
            return await self._run(request, body, spec)

    async def transform_path(self, request):
        spec = parse(request.query.items(), self.config.max_pixels, self.config.max_body)
        path, source_stat = self._confine(request.match_info["path"])
        tag = _output_tag(source_stat, spec)
        # Last-Modified only once the file's second is over (RFC 9110 8.8.2.2): a file replaced later in the same
        # second would have the same date, and If-Modified-Since would wrongly answer 304 for it.
        now = time.time()
        second = source_stat.st_mtime_ns // 1_000_000_000
        last_modified = second if second + 1 <= now else None
        cache_headers = self._cache_headers(tag, last_modified)
        if _not_modified(request, tag, last_modified, now):
            return web.Response(status=304, headers=cache_headers)
        async with self._admitted():
            response = await self._run(request, path, spec)
        response.headers.update(cache_headers)
        return response

    async def health(self, request):
        check = getattr(self.executor, "check", None)  # pool: replaces a broken Pool, or says it gave up
        if check is not None and (failed := check()) is not None:
            return _error(503, "unavailable", f"the worker pool failed: {failed}")
        return web.json_response({"status": "ok"})

    async def metrics_text(self, request):
        text = self.metrics.render(self.executor.stats(), self.config.workers, self.in_flight)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def _check_length(self, length):
        if length is not None and length > self.config.max_body:
            raise ImageError(413, "payload_too_large", f"body of {length} bytes is over the {self.config.max_body} byte limit")

    async def _read_body(self, request):
        if request.version >= (1, 1) and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # every check the headers allow passed
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self._remaining(request)):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    self._check_length(size)  # chunked bodies declare no length: stop at the limit
                    chunks.append(chunk)
        except TimeoutError:
            raise ImageError(408, "request_timeout",
                             f"the body did not arrive within the {self.config.budget:g} s budget") from None
        except web.RequestPayloadError:  # aiohttp's Python parser; its C one answers broken framing itself
            raise ImageError(400, "bad_request", "the body cannot be read: its chunked framing is broken") from None
        return b"".join(chunks)

    def _confine(self, relative):
        """(real path, stat) of relative under --root, or 404: no '..', no absolute path, no symlink out."""
        not_found = ImageError(404, "not_found", "no such image")
        if self.root is None:
            raise ImageError(404, "not_found", "the service was started without --root")
        # An empty component is a leading, doubled or trailing slash: 'a.jpg/' names no file either.
        if "\0" in relative or any(part in ("", "..") for part in relative.split("/")):
            raise not_found
        real = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath((self.root, real)) != self.root:
            raise not_found
        try:
            source_stat = os.stat(real)
        except OSError:
            raise not_found from None
        if not stat.S_ISREG(source_stat.st_mode):
            raise not_found
        return real, source_stat

    def _cache_headers(self, tag, last_modified):
        """A GET answer's cache headers (a weak ETag: another Pillow build may encode other bytes); Last-Modified
        when last_modified (the file's second) is not None."""
        max_age = self.config.cache_max_age
        headers = {hdrs.ETAG: f'W/"{tag}"', hdrs.CACHE_CONTROL: f"public, max-age={max_age}" if max_age else "no-cache"}
        if last_modified is not None:
            headers[hdrs.LAST_MODIFIED] = email.utils.formatdate(last_modified, usegmt=True)
        return headers

    def _admitted(self):
        if self.in_flight >= self.capacity:
            raise ImageError(503, "overloaded",
                             f"{self.in_flight} requests in flight, the limit is {self.capacity}; retry shortly")
        return _InFlight(self)

    def _remaining(self, request):
        """Seconds left of the request's budget, counted from its arrival."""
        return request[STARTED] + self.config.budget - time.monotonic()

    async def _run(self, request, source, spec):
        try:
            future = self.executor.submit(ops.transform, source, spec)
        except BrokenPool as exc:  # the pool broke and could not be replaced
            raise ImageError(503, "unavailable", f"the worker pool failed: {exc}") from None
        try:
            body, mime, width, height = await asyncio.wait_for(asyncio.wrap_future(future), self._remaining(request))
        except TaskTimeout:
            raise ImageError(504, "timeout", f"over the {self.config.budget:g} s budget; its worker was replaced") from None
        except TimeoutError:  # the wait ended: the task is cancelled if queued, else the pool stops it
            raise ImageError(504, "timeout", f"over the {self.config.budget:g} s budget") from None
        except WorkerCrashed as exc:
            raise ImageError(500, "worker_crashed", f"{exc}; the worker was replaced") from None
        except BrokenPool as exc:  # the template died with this task out: the next submit replaces the pool
            self.executor.check()
            raise ImageError(500, "worker_crashed", f"{exc}; the pool is replaced") from None
        return web.Response(body=body, content_type=mime, headers={"X-Image-Size": f"{width}x{height}"})


SERVICE = web.AppKey("service", Service)
# A request's arrival time (monotonic); aiohttp 3.14 warns about plain string keys, older ones
# have no RequestKey.
STARTED = web.RequestKey("started", float) if hasattr(web, "RequestKey") else "started"


class _InFlight:
    """Counts a request as in flight from admission to answer."""

    def __init__(self, service):
        self.service = service

    async def __aenter__(self):
        self.service.in_flight += 1

    async def __aexit__(self, *exc):
        self.service.in_flight -= 1


def _output_tag(source_stat, spec):
    """The ETag's value: what names a GET's output, the source file's identity and version, the ops, and the
    versions of the code making it."""
    identity = (source_stat.st_dev, source_stat.st_ino, source_stat.st_size, source_stat.st_mtime_ns, spec,
                __version__, PIL.__version__)
    return hashlib.blake2b(repr(identity).encode(), digest_size=12).hexdigest()


def _not_modified(request, tag, last_modified, now):
    """Whether a conditional GET is answered 304 (RFC 9110 13.2.2): If-None-Match decides when present
    (weak comparison), else If-Modified-Since against last_modified, the file's second (None: the file changed
    within the last second, so no date can vouch for it). A date later than now is ignored (RFC 9110 13.1.3)."""
    if (if_none_match := request.if_none_match) is not None:
        return any(candidate.value in ("*", tag) for candidate in if_none_match)
    if_modified_since = request.if_modified_since
    return (if_modified_since is not None and last_modified is not None
            and last_modified <= if_modified_since.timestamp() <= now)


def _error(status, error, detail):
    response = web.json_response({"error": error, "detail": detail}, status=status,
                                 dumps=lambda obj: json.dumps(obj, ensure_ascii=False))
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


async def _close_unread(request, response):
    """Answers, then closes the connection: aiohttp would read and discard the rest of the body for 10 s,
    however much comes. Closing with unread data sends a reset, which could reach a client still sending
    before it read the answer: the FIN goes first, and the close a moment later (as Go's net/http does)."""
    response.force_close()  # Connection: close
    transport = request.transport  # request.transport is None once the client has gone
    try:
        await response.prepare(request)
        await response.write_eof()
        transport.write_eof()
        await asyncio.sleep(_RESET_DELAY)
    except ConnectionError:
        pass  # the client went first
    request.protocol.force_close()


@web.middleware
async def _errors_as_json(request, handler):
    request[STARTED] = time.monotonic()
    status = None  # counted once known
    try:
        response = await _response(request, handler)
        if request.transport is not None and not request.content.is_eof():  # a body refused, or cut short
            status = response.status
            await _close_unread(request, response)
        else:
            status = await _deliver(request, response)
        return response
    finally:
        if status is None and request.transport is None:  # the client left, so aiohttp cancelled the handler
            status = CLIENT_CLOSED  # (and with it a task still queued)
        if status is not None:
            _count(request, status)


async def _response(request, handler):
    """The handler's answer, or the error it raised as JSON."""
    try:
        return await handler(request)
    except ImageError as exc:
        return _error(exc.status, exc.error, exc.detail)
    except web.HTTPException as exc:  # routing: unknown path, wrong method
        response = _error(exc.status, exc.reason.lower().replace(" ", "_"), f"{request.method} {request.path}: {exc.reason}")
        if "Allow" in exc.headers:  # 405 names the methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionResetError:  # the client left mid-body: nobody to answer, and no fault of the service
        return web.Response(status=CLIENT_CLOSED)  # never sent; counted under nginx's code for this
    except Exception:  # a bug: log it, answer without its text (it may name server paths), stay up
        request.app.logger.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "an unexpected error; the service's log has the details")


async def _deliver(request, response):
    """Writes the answer within what is left of the request's budget; returns the status to count. A client that
    does not take its answer in by then is cut off (504): it holds neither the answer's memory nor a stop longer."""
    try:
        async with asyncio.timeout(request.app[SERVICE]._remaining(request)):
            await response.prepare(request)
            await response.write_eof()
    except ConnectionError:
        return CLIENT_CLOSED
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # close() would wait for the unread answer to drain
        return 504
    return response.status


def _count(request, status):
    if request.path.startswith("/v1/transform"):
        request.app[SERVICE].metrics.observe(status, time.monotonic() - request[STARTED])


def create_app(config):
    """The aiohttp Application; its executor starts with the app and shuts down with it."""
    app = web.Application(middlewares=[_errors_as_json], client_max_size=config.max_body)

    async def executor_lifetime(app):
        executor = make_executor(config.executor, config.workers, config.budget, config.worker_nice)
        app[SERVICE] = service = Service(config, executor)
        yield
        executor.shutdown(wait=True, cancel_futures=True)
        service.metrics.close()

    app.cleanup_ctx.append(executor_lifetime)
    app.router.add_post("/v1/transform", _transform_body, expect_handler=_continue_later)
    app.router.add_get("/v1/transform/{path:.+}", _transform_path)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


async def _continue_later(request):
    """Expect: 100-continue is answered by the handler once the headers passed its checks, so a client
    learns of a 413, 415, 400 or 503 before it sends the body (aiohttp's default says 100 at once)."""


async def _transform_body(request):
    return await request.app[SERVICE].transform_body(request)


async def _transform_path(request):
    return await request.app[SERVICE].transform_path(request)


async def _health(request):
    return await request.app[SERVICE].health(request)


async def _metrics(request):
    return await request.app[SERVICE].metrics_text(request)
