"""What taking a small policy change costs a worker's reactor: compiled in a thread or inline.

    .venv/bin/python bench/worker_apply_bench.py [--domains 100000] [--seconds 6] [--rounds 2]

One process holds the `big_policy.py` policy (1000 rules, 100,000 domains), frozen as a worker's
is (policy/heapfreeze.py), and its reactor answers a ping on a socket pair that a child process
sends 200 times a second, as a request would arrive. Every 0.15 s a change of the comment arrives
(as workers get it from their node, workers/policydelta.py) and is compiled either the way a
worker did before (`thread`: the compile in a thread with the 0.1 ms switch interval, the
replaced version freed a piece at a time in a thread) or inline on the reactor thread
(workers/inlinechange.py). Prints the ping's round trip p50/p99/max for each way, alternating,
`--rounds` times each. On a shared machine, compare the two ways of the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from big_policy import build_policy  # noqa: E402

PING_RATE = 200
CHANGE_EVERY = 0.15


def pinger(sock: socket.socket, seconds: float, out: str) -> None:
    latencies: list[float] = []
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        start = time.monotonic()
        sock.send(b"p")
        sock.recv(1)
        latencies.append(time.monotonic() - start)
        next_at += 1 / PING_RATE
    Path(out).write_text(json.dumps(latencies))
    sock.send(b"q")


def run(mode: str, domains: int, seconds: float) -> list[float]:
    from twisted.internet import reactor, task, threads
    from twisted.internet.abstract import FileDescriptor

    from safesquid_tw.policy.codec import digest
    from safesquid_tw.policy.compiled import Policy, compile_policy
    from safesquid_tw.policy.heapfreeze import HeapFreezer
    from safesquid_tw.policy.release import release_in_pieces
    from safesquid_tw.policy.validate import validate_document
    from safesquid_tw.workers.policydelta import compile_message

    document = validate_document(json.loads(json.dumps(build_policy(1000, domains))))
    state = {"policy": Policy(version=1, digest=digest(document), document=document,
                              compiled=compile_policy(document))}
    heap = HeapFreezer()
    heap.version_swapped()
    ours, theirs = socket.socketpair()
    out = tempfile.mktemp(prefix="worker-apply-")

    class Echo(FileDescriptor):
        def fileno(self) -> int:
            return ours.fileno()

        def doRead(self) -> None:
            data = ours.recv(64)
            if b"q" in data:
                reactor.stop()
            else:
                ours.send(b"a")

    ours.setblocking(False)
    Echo(reactor).startReading()

    def change() -> None:
        current = state["policy"]
        number = current.version + 1
        message = {"t": "policy", "version": number, "digest": f"d{number}", "base": current.digest,
                   "changed": {"comment": f"version {number}"}, "removed": []}

        def swap(new: Policy) -> None:
            replaced = [state["policy"]]
            state["policy"] = new
            heap.version_swapped(new)
            if mode == "thread":
                threads.deferToThread(release_in_pieces, replaced)
            replaced.clear()

        if mode == "thread":
            saved = sys.getswitchinterval()
            sys.setswitchinterval(0.0001)
            d = threads.deferToThread(compile_message, message, current)
            d.addCallback(swap)
            d.addBoth(lambda _: sys.setswitchinterval(saved))
        else:
            swap(compile_message(message, current))

    task.LoopingCall(change).start(CHANGE_EVERY, now=False)
    child = multiprocessing.get_context("fork").Process(target=pinger, args=(theirs, seconds, out))
    child.start()
    reactor.run()
    child.join()
    return json.loads(Path(out).read_text())[PING_RATE // 2:]  # the first half second warms up


def one(mode: str, domains: int, seconds: float) -> None:
    latencies = sorted(run(mode, domains, seconds))
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    print(f"  {mode:6s} n={len(latencies):5d}  p50={pick(.5):6.2f}  p99={pick(.99):6.2f}  "
          f"max={latencies[-1] * 1e3:6.2f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=("thread", "inline"), help="(internal: one measurement)")
    args = parser.parse_args(argv)
    if args.mode:
        one(args.mode, args.domains, args.seconds)
        return 0
    import subprocess

    print(f"ping through the reactor at {PING_RATE}/s, a comment change every {CHANGE_EVERY} s "
          f"(1000 rules, {args.domains} domains); round trip (ms):", flush=True)
    for _ in range(args.rounds):
        for mode in ("thread", "inline"):
            # A fresh process each: a reactor runs once.
            subprocess.run([sys.executable, __file__, "--mode", mode, "--domains", str(args.domains),
                            "--seconds", str(args.seconds)], check=True)
    print("(on a shared machine: compare the two ways of the same run, not absolutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
