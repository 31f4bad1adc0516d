"""Runs the app on a listening socket until SIGINT/SIGTERM."""
import asyncio
import signal
import socket

from aiohttp import web

from .app import create_app


def listen(host, port):
    """A socket listening on host:port, in the address family host resolves to (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=1024)


def make_runner(config):
    """The app's runner, not started. Every request ends within its budget (its body's arrival included),
    so a stop waits no longer for requests in progress."""
    return web.AppRunner(create_app(config), access_log=None, handle_signals=False, shutdown_timeout=config.budget)


async def serve(config, ready=None, sock=None):
    """Serves config until a stop signal. ready(port) is called once the socket listens (port 0: the OS's pick).
    sock: a socket from listen(), else one is opened on config.host:config.port, before any worker starts."""
    sock = sock or listen(config.host, config.port)
    runner = make_runner(config)
    await runner.setup()  # starts the executor
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if ready is not None:
            ready(sock.getsockname()[1])
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting (closes sock), finishes handlers, shuts the executor down
