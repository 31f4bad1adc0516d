"""Runs the app on a listening socket until SIGINT/SIGTERM."""
import asyncio
import signal
import socket

from aiohttp import web

from .app import create_app


def make_runner(config):
    """The app's runner, not started. Every request ends within its budget (its body's arrival included),
    so a stop waits no longer for requests in progress."""
    return web.AppRunner(create_app(config), access_log=None, handle_signals=False, shutdown_timeout=config.budget)


async def serve(config, ready=None):
    """Serves config until a stop signal. ready(port) is called once the socket listens (port 0: the OS's pick)."""
    runner = make_runner(config)
    await runner.setup()  # starts the executor
    try:
        sock = socket.create_server((config.host, config.port), backlog=1024)
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
        await runner.cleanup()  # stops accepting, finishes handlers, shuts the executor down
