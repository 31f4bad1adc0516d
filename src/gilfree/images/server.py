"""Runs the app on a listening socket until SIGINT/SIGTERM."""
import asyncio
import errno
import logging
import math
import signal
import socket
import time

from aiohttp import http_exceptions, web

from .app import create_app

_ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's report of an accept() failing with EMFILE
_ACCEPT_REPORT_EVERY = 10.0  # seconds
_log = logging.getLogger("gilfree.images")


class _OneLineParserErrors(logging.Filter):
    """aiohttp logs each request its HTTP parser refuses (answered 400 by aiohttp itself) with a traceback: the
    client's mistake, which any client can repeat at will, takes one line."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            record.msg, record.args = "%s: %s", (record.getMessage(), " ".join(str(exc.message).split()))
            record.exc_info = record.exc_text = None
        return True


_http_log = logging.getLogger("gilfree.images.http")  # aiohttp's protocol logs here
_http_log.addFilter(_OneLineParserErrors())


BACKLOG = 1024  # pending connections: a burst of clients waits in the kernel, not refused


class _Listener(socket.socket):
    """A listening socket that works around CPython gh-151615 (3.11 to 3.13): after an accept() failing out of
    resources (descriptors, buffers, memory), asyncio goes on calling accept() up to backlog times in the same
    round, and every failure schedules a retry of its own, so retries multiply (about 50,000 failed accept()
    calls a second, half a core). The call after such a failure says that nothing is pending, which ends
    asyncio's round: one failure, hence one retry 1 s later, per round."""

    _OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # asyncio's own list
    _failed = False

    def accept(self):
        if self._failed:
            self._failed = False
            raise BlockingIOError(errno.EAGAIN, "accept() ran out of resources: retried in asyncio's next round")
        try:
            return super().accept()
        except OSError as exc:
            self._failed = exc.errno in self._OUT_OF_RESOURCES
            raise


def listen(host, port):
    """A socket listening on host:port, in the address family host resolves to (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    return _Listener(sock.family, sock.type, sock.proto, sock.detach())


def make_runner(config):
    """The app's runner, not started. Every request ends within its budget (its body's arrival included),
    so a stop waits no longer for requests in progress. aiohttp's keep-alive timer runs from a connection's
    start and from each answer until the next request head is complete: it is the head timeout. aiohttp does not
    decode bodies: the worker does (aiohttp answered an encoding it lacks with its own text/plain 400). A client
    that leaves has its handler cancelled, and with it a task still queued."""
    return web.AppRunner(create_app(config), access_log=None, handle_signals=False, shutdown_timeout=config.budget,
                         keepalive_timeout=config.head_timeout, auto_decompress=False, logger=_http_log,
                         handler_cancellation=True)


class _AcceptFailures:
    """Loop exception handler. Out of descriptors, asyncio logs each failed accept() with a traceback (one a
    second with _Listener): this logs one line per 10 s, with the count, and passes anything else on."""

    def __init__(self, previous):
        self.previous = previous
        self.failed = 0
        self.reported = -math.inf

    def __call__(self, loop, context):
        if context.get("message") != _ACCEPT_FAILED:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.failed += 1
        now = time.monotonic()
        if now - self.reported >= _ACCEPT_REPORT_EVERY:
            _log.error("cannot accept connections: %s (%d failed attempts since the last such line; one line per %g s "
                       "at most)", context.get("exception"), self.failed, _ACCEPT_REPORT_EVERY)
            self.failed, self.reported = 0, now


async def serve(config, ready=None, sock=None):
    """Serves config until a stop signal. ready(port) is called once the socket listens (port 0: the OS's pick).
    sock: a socket from listen(), else one is opened on config.host:config.port, before any worker starts."""
    sock = sock or listen(config.host, config.port)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(_AcceptFailures(previous))
    runner = make_runner(config)
    await runner.setup()  # starts the executor
    try:
        site = web.SockSite(runner, sock, backlog=BACKLOG)  # it listens again (aiohttp's default: 128)
        await site.start()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if ready is not None:
            ready(sock.getsockname()[1])
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting (closes sock), finishes handlers, shuts the executor down
        loop.set_exception_handler(previous)
