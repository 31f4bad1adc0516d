"""Seed 000: an image service's batch on threads (the junior fix) and on gilfree.Pool.

The same batch of photo-like 2K JPEGs, two workloads: (a) thumbnail, fit into 512x512 JPEG q=85 —
libjpeg and the resize release the GIL for most of the work; (b) full-size re-encode, JPEG q=85 —
Pillow holds the GIL while it encodes into memory, so threads take turns. Then
``python -m gilfree diagnose`` runs the threaded version of each and gives its verdict.

    python demo/40_images.py                       # the demo step
    python demo/40_images.py --threaded WORKLOAD DIR   # one threaded run (what diagnose watches)
"""
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gilfree.images import ops, samples
from gilfree.images.spec import parse

WORKLOADS = {"thumbnail": "w=512&h=512&fit=inside&format=jpeg&quality=85", "re-encode": "format=jpeg&quality=85"}
IMAGES = 24
CORES = os.cpu_count() or 1
THREADED_RUN_S = 3.0  # seconds of the threaded run diagnose watches


def spec_of(workload):
    return parse([item.split("=") for item in WORKLOADS[workload].split("&")], 50_000_000)


def load(directory):
    return [path.read_bytes() for path in sorted(Path(directory).glob("*.jpg"))]


def run_batch(executor, images, spec):
    started = time.perf_counter()
    # chunksize=1: each image is tens of ms of work, one per task keeps both workers busy to the end.
    outputs = list(executor.map(ops.transform, images, [spec] * len(images), chunksize=1))
    assert all(out[1] == "image/jpeg" for out in outputs)
    return time.perf_counter() - started


def threaded(workload, directory):
    images = load(directory)
    with ThreadPoolExecutor(CORES) as executor:
        # Long enough that the steady state, not the imports, makes the verdict.
        deadline = time.perf_counter() + THREADED_RUN_S
        while time.perf_counter() < deadline:
            run_batch(executor, images, spec_of(workload))


def diagnose(workload, directory):
    """The verdict of `python -m gilfree diagnose` on the threaded run, or why it could not run."""
    done = subprocess.run([sys.executable, "-m", "gilfree", "diagnose", __file__, "--threaded", workload, directory],
                          capture_output=True, text=True)
    report = done.stderr.strip()  # diagnose prints its report on stderr, leaving stdout to the program
    if done.returncode:
        return f"(diagnose unavailable here: {(report.splitlines() or ['no output'])[-1]})"
    return report[report.find("verdict:"):] if "verdict:" in report else report


def main():
    from gilfree import Pool

    with tempfile.TemporaryDirectory() as directory:
        for seed in range(IMAGES):
            Path(directory, f"photo_{seed:02d}.jpg").write_bytes(samples.photo_jpeg(seed))
        images = load(directory)
        print(f"\n== Seed 000's image batch: {IMAGES} photo-like {samples.SIZE_2K[0]}x{samples.SIZE_2K[1]} JPEGs "
              f"transformed in this process's executors, ThreadPoolExecutor({CORES}) against gilfree.Pool({CORES}), "
              f"{CORES} cores\n   thumbnail: fit into 512x512, JPEG q=85 (libjpeg and the resize release the GIL); "
              f"re-encode: full size, JPEG q=85 (Pillow holds the GIL while encoding)")
        with ThreadPoolExecutor(CORES) as threads, Pool(CORES) as pool:
            run_batch(pool, images[:CORES], spec_of("thumbnail"))  # workers up and warm
            for workload in WORKLOADS:
                spec = spec_of(workload)
                t_threads = run_batch(threads, images, spec)
                t_pool = run_batch(pool, images, spec)
                print(f"  {workload:10} threads {IMAGES / t_threads:6.1f} img/s   gilfree.Pool {IMAGES / t_pool:6.1f} img/s"
                      f"   speed-up {t_threads / t_pool:.2f}x")
        for workload in WORKLOADS:
            print(f"  diagnose, threaded {workload}:")
            for line in diagnose(workload, directory).splitlines():
                print("    " + line)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--threaded"]:
        threaded(sys.argv[2], sys.argv[3])
    else:
        main()
