"""The cost of going distributed on one machine: DaskPool on a 2-worker LocalCluster against the
local gilfree.Pool(2), on the seeds' two workloads and on tiny tasks.

- countdown: 50,000,000 decrements split in two tasks (the GIL demo's CPU-bound loop);
- images: the seed-000 batch, Pillow thumbnails (fit 512x512, JPEG q=85) of generated 2K JPEGs,
  bytes in and bytes out;
- tiny tasks: 5,000 calls of a no-op, one Dask task each (submit) and chunked (map), to show
  the per-task scheduler overhead that chunking amortises.

Anchors measured in the same run: serial in this process, and the local pool. Best of 3.
"""
import io
import logging
import os
import random
import sys
import time

import distributed
from PIL import Image

import gilfree
from gilfree.cluster.dask import DaskPool

COUNTDOWN_N = 50_000_000
IMAGES = 24
IMAGE_SIZE = (2048, 1365)  # 3:2, as gilfree.images generates its 2K samples
TINY_TASKS = 5_000
REPEATS = 3


def countdown(n):
    while n > 0:
        n -= 1
    return n


def make_jpeg(seed):
    """A 2K photo-like JPEG: smooth gradients plus noise, so the codec has real work."""
    rng = random.Random(seed)
    small = Image.new("RGB", (64, 43))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64 * 43)])
    image = small.resize(IMAGE_SIZE, Image.BICUBIC)
    noise = Image.effect_noise(IMAGE_SIZE, 24).convert("RGB")
    image = Image.blend(image, noise, 0.25)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def thumbnail(jpeg):
    image = Image.open(io.BytesIO(jpeg))
    image.thumbnail((512, 512))  # the seed-000 service's thumbnail: fit into 512x512, JPEG q=85
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def noop(x):
    return x


def best_of(fn):
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    halves = [COUNTDOWN_N // 2, COUNTDOWN_N - COUNTDOWN_N // 2]
    jpegs = [make_jpeg(seed) for seed in range(IMAGES)]
    rows = []  # (workload, how, seconds, anchor seconds for the ratio column)

    def serial_countdown():
        for n in halves:
            countdown(n)

    def serial_images():
        for jpeg in jpegs:
            thumbnail(jpeg)

    serial = {"countdown": best_of(serial_countdown), "images": best_of(serial_images)}

    started = time.perf_counter()
    cluster = distributed.LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR
    )
    client = distributed.Client(cluster, set_as_default=False)
    cluster_start = time.perf_counter() - started

    with gilfree.Pool(2) as local, DaskPool(client) as dask_pool:
        for pool in (local, dask_pool):  # warm both: worker imports, first connections
            list(pool.map(noop, range(4), chunksize=1))
            list(pool.map(thumbnail, jpegs[:2], chunksize=1))
        pools = {"gilfree.Pool(2)": local, "DaskPool, 2 workers": dask_pool}
        for how, pool in pools.items():
            rows.append(("countdown 50M / 2", how,
                         best_of(lambda: list(pool.map(countdown, halves, chunksize=1))), serial["countdown"]))
        for how, pool in pools.items():
            rows.append((f"{IMAGES} 2K JPEG thumbnails", how,
                         best_of(lambda: list(pool.map(thumbnail, jpegs, chunksize=1))), serial["images"]))
        tiny = {}
        for how, pool in pools.items():
            tiny[how, "submit"] = best_of(lambda: [f.result() for f in [pool.submit(noop, i) for i in range(TINY_TASKS)]])
            tiny[how, "map"] = best_of(lambda: list(pool.map(noop, range(TINY_TASKS))))

    client.close()
    cluster.close()

    print(f"# bench_dask: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, distributed "
          f"{distributed.__version__}; best of {REPEATS}; LocalCluster start {cluster_start:.2f} s")
    print(f"{'workload':28} {'how':22} {'seconds':>9} {'vs serial':>10} {'vs local pool':>14}")
    for workload, serial_s in (("countdown 50M / 2", serial["countdown"]), (f"{IMAGES} 2K JPEG thumbnails", serial["images"])):
        print(f"{workload:28} {'serial, this process':22} {serial_s:9.3f} {1.0:9.2f}x {'':>14}")
        local_s = next(s for w, h, s, _ in rows if w == workload and h == "gilfree.Pool(2)")
        for w, how, seconds, anchor in rows:
            if w == workload:
                print(f"{w:28} {how:22} {seconds:9.3f} {anchor / seconds:9.2f}x {local_s / seconds:13.2f}x")
    print(f"\n{'tiny tasks (' + str(TINY_TASKS) + ' no-ops)':28} {'how':22} {'seconds':>9} {'per task':>10}")
    for (how, mode), seconds in tiny.items():
        label = "one task each" if mode == "submit" else "map, chunksize auto"
        print(f"{label:28} {how:22} {seconds:9.3f} {seconds / TINY_TASKS * 1e6:8.0f}us")


if __name__ == "__main__":
    main()
