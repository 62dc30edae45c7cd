"""policy/applier.py: the policy thread lowers its own scheduling priority, never the caller's."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from twisted.python.threadpool import ThreadPool

from safesquid_tw.policy.applier import lower_thread_priority, thread_runner

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="only Linux gives a thread a niceness of its own")


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_only_the_calling_thread_is_niced():
    before = _priority()
    seen = []

    def worker():
        seen.append(lower_thread_priority(before + 5))
        seen.append(_priority())
        seen.append(lower_thread_priority(before + 1))  # never raised back
        seen.append(_priority())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [True, before + 5, True, before + 5] and _priority() == before


@linux_only
def test_a_thread_runner_with_nice_runs_its_jobs_niced():
    # Answers come back through the reactor; here a plain callback stands in for it.
    class ImmediateReactor:
        def callFromThread(self, fn, *args, **kwargs):
            fn(*args, **kwargs)

    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-policy")
    pool.start()
    try:
        before = _priority()
        results: list = []
        done = threading.Event()
        d = thread_runner(ImmediateReactor(), pool, nice=before + 3)(lambda x: (x, _priority()), "job")
        d.addBoth(lambda r: (results.append(r), done.set()))
        assert done.wait(10)
        assert results == [("job", before + 3)] and _priority() == before
    finally:
        pool.stop()
