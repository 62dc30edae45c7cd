"""Logs every cyclic garbage collection of every Python process that starts with this directory
on its PYTHONPATH, to place collections beside the slow answers of a bench:

    GCPROBE_DIR=/tmp/gc PYTHONPATH=bench/gcprobe .venv/bin/python bench/push_latency_bench.py \\
        --phase 4 --rounds 2 --samples /tmp/gc/samples.json

Each process (bench, master, slaves, their workers: they inherit the environment) writes
`<GCPROBE_DIR>/<pid>.log`: its command line, then one line per collection: wall-clock time at its
end, generation, duration, objects collected, thread, the collector's counts and frozen objects
(`gc.get_freeze_count()` walks the frozen list: a bench-only cost). Nothing happens without
GCPROBE_DIR.
"""

import gc
import os
import sys
import threading
import time

_directory = os.environ.get("GCPROBE_DIR")
if _directory:
    _started: dict[int, float] = {}
    _log = []

    def _collection(phase: str, info: dict) -> None:
        if phase == "start":
            _started[threading.get_ident()] = time.perf_counter()
            return
        began = _started.pop(threading.get_ident(), None)
        if began is None:
            return
        took = time.perf_counter() - began
        if not _log or _log[0][0] != os.getpid():  # a forked child writes a file of its own
            _log[:] = [(os.getpid(), open(os.path.join(_directory, f"{os.getpid()}.log"), "a", buffering=1))]
            _log[0][1].write(f"# {sys.argv}\n")
        _log[0][1].write(f"{time.time():.4f} gen={info['generation']} ms={took * 1e3:.2f} "
                      f"collected={info['collected']} thread={threading.current_thread().name} "
                      f"count={gc.get_count()} frozen={gc.get_freeze_count()}\n")

    gc.callbacks.append(_collection)
