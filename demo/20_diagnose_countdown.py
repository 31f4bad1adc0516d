"""Seed 004's two-thread countdown, diagnosed: `python -m gilfree diagnose` on it prints the GIL
report and the verdict (GIL-bound: threads will not help), and draws the timeline."""
import os
import subprocess
import sys
import tempfile

COUNTDOWN = '''
import time
from threading import Thread

COUNT = 20_000_000  # the seed counts 100,000,000; a fifth keeps the demo short

def countdown(n):
    while n > 0:
        n -= 1

t1 = Thread(target=countdown, args=(COUNT // 2,))
t2 = Thread(target=countdown, args=(COUNT // 2,))
start = time.time()
t1.start()
t2.start()
t1.join()
t2.join()
end = time.time()
print('Time taken in seconds -', end - start)
'''


def main():
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out")
    os.makedirs(out_dir, exist_ok=True)
    svg = os.path.join(out_dir, "countdown_gil.svg")
    print("== demo: python -m gilfree diagnose on the seeds' two-thread countdown")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "multi_threaded.py")
        with open(script, "w") as f:
            f.write(COUNTDOWN)
        run = subprocess.run(
            [sys.executable, "-m", "gilfree", "diagnose", "--svg", svg, script],
            capture_output=True, text=True, check=True,
        )
    print(run.stdout, end="")
    print(run.stderr, end="")
    verdict = [line for line in run.stderr.splitlines() if line.startswith("verdict:")]
    print(f"\n{verdict[0] if verdict else 'no verdict: GIL accounting unavailable here'}\n")


if __name__ == "__main__":
    main()
