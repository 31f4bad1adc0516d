"""python -m gilfree.images: the image service (see docs/images.md)."""
import argparse
import asyncio
import math
import os
import sys

from .._engine import MAX_WORKERS
from .app import MB, Config
from .executors import KINDS
from .server import listen, serve


def _positive(text):
    """argparse type: a finite number above 0 (nan, inf, 0 and below are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return value


def _directory(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def parse_args(argv):
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m gilfree.images", description=__doc__)
    p.add_argument("--host", default=defaults.host, help="an address or a host name; 0.0.0.0 or :: for every interface")
    p.add_argument("--port", type=int, default=defaults.port, help="0 lets the OS choose (printed on start)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="image workers (default: one per usable core)")
    p.add_argument("--root", type=_directory, help="directory GET /v1/transform/<path> reads from (nothing outside it)")
    p.add_argument("--executor", choices=KINDS, default=defaults.executor,
                   help="pool: gilfree.Pool (default); threads and mp: the naive and the textbook ways, for comparison")
    p.add_argument("--max-body-mb", type=_positive, default=defaults.max_body / MB, help="413 above (default 25)")
    p.add_argument("--max-megapixels", type=_positive, default=defaults.max_pixels / 1e6, help="422 above (default 50)")
    p.add_argument("--budget", type=_positive, default=defaults.budget, help="seconds per request, then 504 (default 10)")
    p.add_argument("--head-timeout", type=_positive, default=defaults.head_timeout,
                   help="seconds a connection has to send a complete request head, from its start or its previous "
                        "answer (so also how long an idle keep-alive connection stays), then it is closed (default 10)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="requests waiting beyond one per worker, then 503 (default 128)")
    p.add_argument("--worker-nice", type=int, default=defaults.worker_nice,
                   help="workers run this much nicer than the server, so /health stays fast when every core is "
                        "busy (default 10; 0 to disable)")
    p.add_argument("--cache-max-age", type=int, default=defaults.cache_max_age,
                   help="seconds caches may keep a GET answer (Cache-Control max-age); after that they revalidate "
                        "with its ETag and get a 304 while the file and the ops are the same (default 3600; 0: "
                        "revalidate every time)")
    args = p.parse_args(argv)
    if not args.host:
        p.error("--host is empty: give an address, or 0.0.0.0 or :: for every interface")
    if (not 0 <= args.port <= 65535 or not 1 <= args.workers <= MAX_WORKERS or args.max_queue < 0
            or not 0 <= args.worker_nice <= 19 or args.cache_max_age < 0):
        p.error(f"--port must be in 0..65535, --workers in 1..{MAX_WORKERS} (gilfree.Pool's limit), --max-queue >= 0, "
                "--worker-nice in 0..19, --cache-max-age >= 0")
    max_body, max_pixels = int(args.max_body_mb * MB), int(args.max_megapixels * 1e6)
    if max_body < 1 or max_pixels < 1:  # above 0, yet a limit of 0 bytes or pixels would refuse every image
        p.error(f"--max-body-mb {args.max_body_mb:g} is {max_body} bytes, --max-megapixels {args.max_megapixels:g} "
                f"is {max_pixels} pixels: each must come to at least 1")
    return Config(host=args.host, port=args.port, workers=args.workers, root=args.root, executor=args.executor,
                  max_body=max_body, max_pixels=max_pixels,
                  budget=args.budget, head_timeout=args.head_timeout, max_queue=args.max_queue,
                  worker_nice=args.worker_nice, cache_max_age=args.cache_max_age)


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sock = listen(config.host, config.port)  # before any worker starts: a taken port is one line, no leftovers
    except OSError as exc:
        print(f"python -m gilfree.images: cannot listen on {config.host} port {config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    host = f"[{config.host}]" if ":" in config.host else config.host  # an IPv6 address, in a URL

    def ready(port):
        print(f"gilfree.images listening on http://{host}:{port} "
              f"(executor={config.executor}, workers={config.workers})", flush=True)

    asyncio.run(serve(config, ready, sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
