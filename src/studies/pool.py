"""Commands of a study run as subprocesses: `run_pool` runs them a few at a time and stops them with the study
(src/studies/runner.py trains and evaluates its points with it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .spec import Point

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_pool(
    commands: list[tuple[Point, list[str], Path]], jobs: int, meanwhile: Callable[[], None] | None = None
) -> Iterator[tuple[Point, int, float]]:
    """Run each (point, command, log file) as a subprocess in the project root, `jobs` at a time, its output
    appended to its log file, each with cpu_count // jobs threads (OMP_NUM_THREADS); call `meanwhile()` once
    they are started; yield (point, exit status, seconds) as each ends (-1: not started, the study stopping).
    A SIGTERM / Ctrl-C of the study, or an error in the consumer, stops the running commands (`_stop_children`);
    close the generator (contextlib.closing) so that happens at once."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def run(cmd: list[str], log_path: Path) -> tuple[int, float]:
        start = time.monotonic()
        if stopping.is_set():
            return -1, 0.0
        with open(log_path, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running.add(proc)
            rc = proc.wait()
            running.discard(proc)
        return rc, time.monotonic() - start

    with ThreadPoolExecutor(max_workers=jobs) as pool, _stop_children(running, stopping):
        futures = {pool.submit(run, cmd, log_path): point for point, cmd, log_path in commands}
        if meanwhile is not None:
            meanwhile()
        for fut in as_completed(futures):
            rc, seconds = fut.result()
            yield futures[fut], rc, seconds


@contextlib.contextmanager
def _stop_children(running: set[subprocess.Popen], stopping: threading.Event):
    """A SIGTERM or Ctrl-C of the study, or an error in it, stops its training processes too (SIGTERM: each
    keeps its checkpoints, src.train); SIGTERM / Ctrl-C exit with 143 / 130. The next start resumes them."""

    def on_term(signum, frame):
        raise SystemExit(143)

    previous = (
        signal.signal(signal.SIGTERM, on_term)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        yield
    except BaseException as err:
        stopping.set()
        for proc in list(running):
            proc.terminate()
        for proc in list(running):
            proc.wait()
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            print("(study stopped: run the same command again to continue it)", file=sys.stderr, flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise SystemExit(130) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def last_error(log_path: Path) -> str | None:
    """The last `error: ...` line (or the last line) of a training log."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":", 1)[0]]
    return (errors or lines or [None])[-1]
